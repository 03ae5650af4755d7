"""What KID reads, pinned by hand: the real features (every readable image of the folder,
PIL-bicubic resized or centre-cropped as for FID, in file order, float32), their cache file beside
the FID statistics (name, format check, `cache_dir` or ``$CCP_CACHE_DIR``), the messages for an
unreadable folder and a missing shard folder, and the generated features read back from shards.
Expected features come from running the extractor on images prepared here with PIL and numpy."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ccp.evaluation import fid as fid_module
from ccp.evaluation import statistics as statistics_module
from ccp.evaluation.statistics import KID_FORMAT_VERSION
from ccp.evaluation.fid import (
    RandomConvFeatures,
    fake_features,
    fid_over_samples,
    real_features,
    real_stats_key,
)
from ccp.pipelines.sampling import noise_generators
from stand_ins import CountingExtractor, pil_reference_images




class RecordingBar:
    """tqdm's context manager, keeping its arguments and the count it was advanced by."""

    def __init__(self, **kwargs):
        self.kwargs, self.n = kwargs, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        self.n += n


def write_folder(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (w, h) in enumerate(sizes):
        path = folder / f"{i:02d}.png"
        PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def by_hand(extractor, paths, resolution, center_crop=False) -> torch.Tensor:
    with torch.no_grad():
        return RandomConvFeatures.forward(extractor, pil_reference_images(paths, resolution, center_crop)).float()


def test_real_features_are_the_extractor_on_resized_images_in_file_order(tmp_path):
    paths = write_folder(tmp_path / "real folder!", [(20, 12), (12, 20), (16, 16), (30, 18), (9, 9)])
    extractor = CountingExtractor()
    got = real_features(tmp_path / "real folder!", extractor, resolution=16, cache_dir=tmp_path / "cache",
                        batch_size=2, progress=False)
    assert got.dtype == torch.float32 and got.shape == (5, 8)
    torch.testing.assert_close(got, by_hand(extractor, paths, 16), rtol=1e-6, atol=1e-6)
    assert extractor.batches == [2, 2, 1]

    # cached beside the FID statistics: <sanitised folder name>-<res>px-<key>.features.safetensors, key as FID's
    _, key = real_stats_key(tmp_path / "real folder!", extractor, 16)
    cache_file = tmp_path / "cache" / f"real_folder_-16px-{key}.features.safetensors"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [cache_file.name]
    with safe_open(str(cache_file), framework="pt") as f:
        meta = f.metadata()
        assert meta["format"] == str(KID_FORMAT_VERSION) == "1"
        assert json.loads(meta["info"])["resolution"] == 16
        assert torch.equal(f.get_tensor("features"), got)


def test_center_crop_max_images_and_native_size_reach_the_features(tmp_path):
    paths = write_folder(tmp_path / "real", [(24, 12), (12, 24), (30, 14)])
    extractor = CountingExtractor()
    cropped = real_features(tmp_path / "real", extractor, resolution=12, center_crop=True, max_images=2,
                            cache_dir=tmp_path / "cache", progress=False)
    torch.testing.assert_close(cropped, by_hand(extractor, paths[:2], 12, center_crop=True), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(cropped, by_hand(extractor, paths[:2], 12, center_crop=False), atol=1e-3)

    same = write_folder(tmp_path / "same", [(14, 14), (14, 14)])
    native = real_features(tmp_path / "same", extractor, resolution=None, cache_dir=tmp_path / "cache", progress=False)
    torch.testing.assert_close(native, by_hand(extractor, same, None), rtol=1e-6, atol=1e-6)
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert [n.split("-")[:2] for n in names] == [["real", "12px"], ["same", "native"]]


def test_the_cache_is_read_back_and_a_file_of_another_format_is_recomputed(tmp_path):
    write_folder(tmp_path / "real", [(16, 16)] * 3)
    first = real_features(tmp_path / "real", CountingExtractor(), resolution=16, cache_dir=tmp_path / "c",
                          progress=False)
    (cache_file,) = (tmp_path / "c").iterdir()
    again_extractor = CountingExtractor()
    again = real_features(tmp_path / "real", again_extractor, resolution=16, cache_dir=tmp_path / "c", progress=False)
    assert again_extractor.batches == [] and torch.equal(again, first)

    save_file({"features": torch.zeros(3, 8)}, str(cache_file), metadata={"format": "0"})
    redo_extractor = CountingExtractor()
    redone = real_features(tmp_path / "real", redo_extractor, resolution=16, cache_dir=tmp_path / "c", progress=False)
    assert redo_extractor.batches == [3] and torch.equal(redone, first)


def test_without_cache_dir_features_go_under_ccp_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CCP_CACHE_DIR", str(tmp_path / "root"))
    write_folder(tmp_path / "real", [(16, 16)] * 2)
    real_features(tmp_path / "real", CountingExtractor(), resolution=16, progress=False)
    (written,) = (tmp_path / "root" / "fid_stats").iterdir()
    assert written.name.startswith("real-16px-") and written.name.endswith(".features.safetensors")


def test_unreadable_images_are_skipped_and_a_folder_of_none_is_refused(tmp_path):
    paths = write_folder(tmp_path / "real", [(16, 16)] * 3)
    paths[1].write_bytes(b"not a png")
    extractor = CountingExtractor()
    got = real_features(tmp_path / "real", extractor, resolution=16, cache_dir=tmp_path / "c", progress=False)
    torch.testing.assert_close(got, by_hand(extractor, [paths[0], paths[2]], 16), rtol=1e-6, atol=1e-6)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match=rf"^no readable image in {bad.resolve()} for KID$"):
        real_features(bad, extractor, resolution=16, cache_dir=tmp_path / "c", progress=False)


def test_progress_bar_counts_images_and_follows_the_flag(tmp_path, monkeypatch):
    bars = []
    monkeypatch.setattr(statistics_module, "tqdm", lambda **kwargs: bars.append(RecordingBar(**kwargs)) or bars[-1])
    paths = write_folder(tmp_path / "real", [(16, 16)] * 3)
    paths[0].write_bytes(b"broken")
    real_features(tmp_path / "real", CountingExtractor(), resolution=16, cache_dir=tmp_path / "c", batch_size=2,
                  progress=False)
    real_features(tmp_path / "real", CountingExtractor(1), resolution=16, cache_dir=tmp_path / "d", progress=True)
    assert [b.kwargs["disable"] for b in bars] == [True, False]
    assert all(b.kwargs["total"] == 3 and b.n == 3 and b.kwargs["unit"] == "img" for b in bars)
    assert bars[0].kwargs["desc"] == "real KID features"


class Noise:
    """generate_fn: image i of seed s from image i's generator, float [0, 1]."""

    def __call__(self, indices, seed):
        generators = noise_generators(seed, indices)
        return torch.stack([torch.rand(3, 12, 12, generator=g) for g in generators])


def test_fake_features_are_the_generated_images_features_in_index_order(tmp_path):
    extractor = RandomConvFeatures(0)
    real = fid_module.FeatureStats.from_features(extractor(torch.randint(0, 256, (6, 3, 12, 12), dtype=torch.uint8)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fid_over_samples(Noise(), 5, real, extractor, tmp_path / "shards", shard_size=2, batch_size=2, progress=False)
    got = fake_features(tmp_path / "shards", 5)
    images = Noise()(list(range(5)), 0)
    expected = extractor(torch.round(images * 255).to(torch.uint8)).float()
    assert got.shape == (5, 8)
    torch.testing.assert_close(got.float(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fake_features(tmp_path / "shards", 4).float(), expected[:4], rtol=1e-5, atol=1e-5)


def test_fake_features_of_a_folder_that_is_not_a_shard_folder_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"^{tmp_path} is not a sample shard folder \(no meta.json\)$"):
        fake_features(tmp_path, 3)


def test_the_cache_key_follows_crop_and_image_cap(tmp_path):
    paths = write_folder(tmp_path / "real", [(24, 12), (12, 24), (30, 14)])
    extractor = CountingExtractor()
    cache = tmp_path / "cache"
    plain = real_features(tmp_path / "real", extractor, resolution=12, cache_dir=cache, progress=False)
    cropped = real_features(tmp_path / "real", extractor, resolution=12, center_crop=True, cache_dir=cache,
                            progress=False)
    capped = real_features(tmp_path / "real", extractor, resolution=12, max_images=2, cache_dir=cache, progress=False)
    torch.testing.assert_close(plain, by_hand(extractor, paths, 12), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cropped, by_hand(extractor, paths, 12, center_crop=True), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(capped, by_hand(extractor, paths[:2], 12), rtol=1e-6, atol=1e-6)
    keys = {real_stats_key(tmp_path / "real", extractor, 12, crop, cap)[1] for crop, cap in
            [(False, None), (True, None), (False, 2)]}
    assert sorted(p.name.split("-")[2].split(".")[0] for p in cache.iterdir()) == sorted(keys)


def test_cache_names_keep_letters_of_either_case_and_are_cut_at_48_characters(tmp_path, monkeypatch):
    long_name = "Real_Faces." + "x" * 50
    write_folder(tmp_path / long_name, [(16, 16)] * 2)
    real_features(tmp_path / long_name, CountingExtractor(), resolution=16, cache_dir=tmp_path / "c", progress=False)
    (written,) = (tmp_path / "c").iterdir()
    assert written.name.split("-")[0] == long_name[:48]

    # a source whose name is empty (the current folder as ".") is called "images"
    write_folder(tmp_path / "here", [(16, 16)] * 2)
    monkeypatch.chdir(tmp_path / "here")
    real_features(".", CountingExtractor(), resolution=16, cache_dir=tmp_path / "d", progress=False)
    (written,) = (tmp_path / "d").iterdir()
    assert written.name.startswith("images-16px-")


def test_loader_defaults_are_batches_of_50_in_the_main_process(tmp_path, monkeypatch):
    seen = []
    real_loader = statistics_module.DataLoader

    def recording_loader(dataset, **kwargs):
        seen.append({k: kwargs[k] for k in ("batch_size", "num_workers")})
        return real_loader(dataset, **kwargs)

    monkeypatch.setattr(statistics_module, "DataLoader", recording_loader)
    write_folder(tmp_path / "real", [(16, 16)] * 2)
    real_features(tmp_path / "real", CountingExtractor(), resolution=16, cache_dir=tmp_path / "c", progress=False)
    real_features(tmp_path / "real", CountingExtractor(1), resolution=16, cache_dir=tmp_path / "d", batch_size=3,
                  num_workers=0, progress=False)
    assert seen == [{"batch_size": 50, "num_workers": 0}, {"batch_size": 3, "num_workers": 0}]


def test_a_batch_of_only_unreadable_images_counts_once_and_progress_shows_by_default(tmp_path, monkeypatch):
    bars = []
    monkeypatch.setattr(statistics_module, "tqdm", lambda **kwargs: bars.append(RecordingBar(**kwargs)) or bars[-1])
    paths = write_folder(tmp_path / "real", [(16, 16)] * 3)
    paths[1].write_bytes(b"broken")
    real_features(tmp_path / "real", CountingExtractor(), resolution=16, cache_dir=tmp_path / "c", batch_size=1)
    (bar,) = bars
    assert bar.kwargs["disable"] is False and bar.n == 3


# --- KID: torchmetrics' polynomial-kernel MMD on the given features --------------------------------
def unbiased_poly_mmd(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef: float) -> float:
    m = len(x)
    k_xx, k_yy, k_xy = ((a @ b.T * gamma + coef) ** degree for a, b in ((x, x), (y, y), (x, y)))
    off = lambda k: k.sum() - np.trace(k)  # noqa: E731
    return float((off(k_xx) + off(k_yy)) / (m * (m - 1)) - 2 * k_xy.sum() / m**2)


def test_kid_kernel_settings_reach_the_kernel():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(30, 4, generator=g, dtype=torch.float64)
    fake = torch.randn(30, 4, generator=g, dtype=torch.float64) * 1.2 + 0.3
    x, y = real.numpy(), fake.numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchmetrics' "will save all extracted features" is silenced
        mean, std = fid_module.kernel_inception_distance(real, fake, subsets=1, subset_size=30, degree=2, gamma=0.5,
                                                         coef=0.3)
        default_kernel, _ = fid_module.kernel_inception_distance(real, fake, subsets=1, subset_size=30)
    assert mean == pytest.approx(unbiased_poly_mmd(x, y, 2, 0.5, 0.3), rel=1e-10) and std == 0.0
    assert default_kernel == pytest.approx(unbiased_poly_mmd(x, y, 3, 1 / 4, 1.0), rel=1e-10)


def test_kid_defaults_are_100_subsets_of_1000_drawn_with_seed_0():
    from torchmetrics.image.kid import poly_mmd

    g = torch.Generator().manual_seed(1)
    real = torch.randn(1100, 3, generator=g, dtype=torch.float64)
    fake = torch.randn(1100, 3, generator=g, dtype=torch.float64) + 0.2
    mean, std = fid_module.kernel_inception_distance(real, fake)
    # by hand: 100 subsets; per subset the first 1000 of a permutation of the real rows, then of the fake
    # rows, from torch's generator seeded with 0
    torch.manual_seed(0)
    scores = []
    for _ in range(100):
        r = real[torch.randperm(1100)[:1000]]
        f = fake[torch.randperm(1100)[:1000]]
        scores.append(float(poly_mmd(r, f)))
    assert mean == pytest.approx(np.mean(scores), rel=1e-9)
    assert std == pytest.approx(np.std(scores), rel=1e-9)
    assert std > 1e-4 * abs(mean)  # the subsets differ, so their number, size and seed all show
    with pytest.raises(fid_module.FIDConfigError, match=r"subset_size=1000 exceeds the 999 features"):
        fid_module.kernel_inception_distance(real[:999], fake)


def _kid_on_a_rank(rank: int, store: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        g = torch.Generator().manual_seed(3)
        real = torch.randn(40, 4, generator=g, dtype=torch.float64)
        fake = torch.randn(40, 4, generator=g, dtype=torch.float64) + 0.5
        value = fid_module.kernel_inception_distance(real, fake, subsets=5, subset_size=20, seed=2)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(value))
    finally:
        torch.distributed.destroy_process_group()


def test_kid_is_computed_per_rank_under_torch_distributed(tmp_path):
    # every rank holds all the features it scores: syncing the metric across ranks would pool both
    # ranks' copies and draw the subsets from the doubled set
    torch.multiprocessing.spawn(_kid_on_a_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    g = torch.Generator().manual_seed(3)
    real = torch.randn(40, 4, generator=g, dtype=torch.float64)
    fake = torch.randn(40, 4, generator=g, dtype=torch.float64) + 0.5
    alone = list(fid_module.kernel_inception_distance(real, fake, subsets=5, subset_size=20, seed=2))
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [alone, alone]
