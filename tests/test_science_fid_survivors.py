"""FID code pinned where the last mutation run (benchmarks/results/mutation/report.md) showed no test
would notice a change: the real-statistics cache (its file name, key, folder and contents), what
`stats.info` records, bad images (skipped with a warning and a log line, or refused with a message
naming them), the progress bar's arguments, max_images / center_crop / batch and worker settings,
rank 0 computing and the other ranks loading under torch.distributed, the barrier and shard wait of
sharded FID, the extractor fingerprint, `num_features`, the shard statistics' info, and the error
messages that tell a user what to do.

Expected values are computed here independently of the code under test: cache keys and extractor
fingerprints by re-deriving their documented hashes with hashlib/json, images with PIL, statistics
with numpy; nothing expected is read back from ccp.evaluation.fid itself."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ccp.evaluation import fid as fid_module
from ccp.evaluation import statistics as statistics_module
from ccp.evaluation.fid import (
    INCEPTION_WEIGHTS_URL,
    FeatureStats,
    FIDConfig,
    FIDConfigError,
    extract_features,
    extractor_fingerprint,
    fake_statistics,
    fid_from_shards,
    fid_over_samples,
    frechet_distance,
    inception_feature_extractor,
    num_features_of,
    real_statistics,
    real_stats_key,
    run_fid,
)
from ccp.evaluation.inception import _device_of
from ccp.evaluation.statistics import _collate, _FolderImages
from ccp.io import BadImageWarning
from ccp.pipelines.sampling import noise_generators
from stand_ins import CountingExtractor, pil_reference_images


# --- helpers (independent of the code under test) -----------------------------------------------------


class Generator:
    """generate_fn: image i of seed s is uniform noise from image i's generator, float [0, 1]."""

    def __init__(self):
        self.calls: list[list[int]] = []

    def __call__(self, indices, seed):
        self.calls.append(list(indices))
        return torch.stack([torch.rand(3, 12, 12, generator=g) for g in noise_generators(seed, indices)])


def write_folder(folder: Path, n: int, seed: int = 0, size=(20, 24), prefix: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        PIL.Image.fromarray(array).save(folder / f"{prefix}{i:03d}.png")
    return folder


def sha(data) -> str:
    """sha256 of sorted JSON (anything else as its str), as docs/evaluation.md documents the keys."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def expected_fingerprint(module: nn.Module) -> str:
    """Class, the settings attributes it has, then every state tensor (sorted by name) as raw bytes."""
    digest = hashlib.sha256()
    digest.update(f"{type(module).__module__}.{type(module).__qualname__};".encode())
    for attr in ("num_features", "features_list", "use_antialias", "INPUT_IMAGE_SIZE", "fid_fingerprint"):
        if hasattr(module, attr):
            digest.update(f"{attr}={getattr(module, attr)!r};".encode())
    for name, tensor in sorted(module.state_dict().items()):
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:24]


def expected_folder_parts(folder: Path, module, resolution, center_crop=False, max_images=None) -> dict:
    root = folder.resolve()
    files = sorted(p for p in root.rglob("*.png"))[:max_images]
    listing = [[p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return {"format": 1, "resolution": resolution, "center_crop": center_crop, "max_images": max_images,
            "features": expected_fingerprint(module), "source": str(root), "listing": sha(listing),
            "num_files": len(files), "preprocess": "pil-rgb8-bicubic-resize-uint8"}


class TqdmRecorder:
    """Stands in for tqdm: keeps its arguments and the sum of its updates."""

    def __init__(self):
        self.bars: list[dict] = []

    def __call__(self, *args, **kwargs):
        record = {"kwargs": kwargs, "updates": []}
        self.bars.append(record)
        recorder = self

        class Bar:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def update(self, n):
                record["updates"].append(n)

        del recorder
        return Bar()


@pytest.fixture
def bars(monkeypatch):
    recorder = TqdmRecorder()
    monkeypatch.setattr(statistics_module, "tqdm", recorder)
    return recorder


@pytest.fixture
def loaders(monkeypatch):
    """Records the DataLoader arguments; runs in-process whatever num_workers was asked for."""
    calls: list[dict] = []
    real_loader = statistics_module.DataLoader

    def loader(*args, **kwargs):
        calls.append(dict(kwargs))
        kwargs["num_workers"] = 0
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(statistics_module, "DataLoader", loader)
    return calls


class FakeDist:
    """torch.distributed as an initialised process group of `world` ranks, this one `rank`."""

    def __init__(self, monkeypatch, rank: int, world: int):
        self.barriers = 0
        monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: world)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: rank)
        monkeypatch.setattr(torch.distributed, "barrier", self.barrier)

    def barrier(self, *args, **kwargs):
        self.barriers += 1


def corrupt(path: Path) -> Path:
    path.write_bytes(b"not an image at all")
    return path


# --- the cache file: name, key, folder and contents ---------------------------------------------------
def test_cache_file_is_named_by_sanitised_folder_resolution_and_key(tmp_path):
    extractor = CountingExtractor()
    folder = write_folder(tmp_path / "My Faces (v2)!", 3)
    cache = tmp_path / "a" / "b" / "cache"  # missing parents are created
    stats = real_statistics(folder, extractor, resolution=16, cache_dir=cache, progress=False)

    parts = expected_folder_parts(folder, extractor, 16)
    key = sha(parts)[:16]
    path = cache / f"My_Faces_v2_-16px-{key}.safetensors"
    assert sorted(cache.iterdir()) == [path]
    assert stats.info == {**parts, "count": 3, "skipped": 0, "cache_file": str(path)}
    # the file: sums, mu and sigma (numpy), count and info in the metadata
    images = pil_reference_images(sorted(folder.iterdir()), 16)
    features = extractor(images).detach().double().numpy()
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["features_cov_sum", "features_sum", "mu", "sigma"]
        meta = f.metadata()
        np.testing.assert_allclose(f.get_tensor("mu").numpy(), features.mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(f.get_tensor("sigma").numpy(), np.cov(features, rowvar=False), rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(f.get_tensor("features_sum").numpy(), features.sum(0), rtol=1e-6)
    assert meta["format"] == "1" and meta["count"] == "3"
    assert json.loads(meta["info"]) == stats.info


def test_cache_name_is_cut_at_48_characters_and_keeps_letters_digits_dot_dash(tmp_path):
    extractor = CountingExtractor()
    long_name = "Ab.c-d_" + "x" * 60
    folder = write_folder(tmp_path / long_name, 2)
    stats = real_statistics(folder, extractor, resolution=None, cache_dir=tmp_path / "c", progress=False)
    key = sha(expected_folder_parts(folder, extractor, None))[:16]
    assert Path(stats.info["cache_file"]).name == f"{long_name[:48]}-native-{key}.safetensors"


def test_the_cache_folder_defaults_to_ccp_cache_dir_fid_stats(tmp_path, monkeypatch):
    monkeypatch.setenv("CCP_CACHE_DIR", str(tmp_path / "ccp-cache"))
    extractor = CountingExtractor()
    folder = write_folder(tmp_path / "real", 2)
    stats = real_statistics(folder, extractor, resolution=12, progress=False)
    key = sha(expected_folder_parts(folder, extractor, 12))[:16]
    path = tmp_path / "ccp-cache" / "fid_stats" / f"real-12px-{key}.safetensors"
    assert stats.info["cache_file"] == str(path) and path.is_file()


def test_cache_false_writes_nothing_and_info_has_no_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CCP_CACHE_DIR", str(tmp_path / "ccp-cache"))
    extractor = CountingExtractor()
    folder = write_folder(tmp_path / "real", 2)
    stats = real_statistics(folder, extractor, resolution=12, cache=False, cache_dir=tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists() and not (tmp_path / "ccp-cache").exists()
    assert stats.info == {**expected_folder_parts(folder, extractor, 12), "count": 2, "skipped": 0}


def test_a_cached_file_is_read_back_without_the_extractor_and_logged(tmp_path, caplog):
    extractor = CountingExtractor()
    folder = write_folder(tmp_path / "real", 3)
    with caplog.at_level(logging.INFO, logger="ccp.evaluation.statistics"):
        first = real_statistics(folder, extractor, resolution=12, cache_dir=tmp_path / "c", progress=False)
    path = first.info["cache_file"]
    assert [r.getMessage() for r in caplog.records] == [f"real FID statistics of 3 images cached in {path}"]
    caplog.clear()
    calls = extractor.calls
    with caplog.at_level(logging.INFO, logger="ccp.evaluation.statistics"):
        again = real_statistics(folder, extractor, resolution=12, cache_dir=tmp_path / "c", progress=False)
    assert extractor.calls == calls
    assert [r.getMessage() for r in caplog.records] == [f"real FID statistics from cache {path}"]
    assert again.info == first.info and again.count == 3
    assert torch.equal(again.features_sum, first.features_sum)


def test_a_dataset_with_a_cache_key_is_cached_under_that_key(tmp_path):
    extractor = CountingExtractor()
    images = [torch.randint(0, 256, (3, 12, 12), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)
              for i in range(3)]
    stats = real_statistics(images, extractor, resolution=12, cache_dir=tmp_path / "c", cache_key="faces v1/train",
                            progress=False)
    parts = {"format": 1, "resolution": 12, "center_crop": False, "max_images": None,
             "features": expected_fingerprint(extractor), "source": "dataset:faces v1/train", "num_files": 3,
             "preprocess": "dataset-items-as-uint8"}
    path = tmp_path / "c" / f"faces_v1_train-12px-{sha(parts)[:16]}.safetensors"
    assert stats.info == {**parts, "count": 3, "skipped": 0, "cache_file": str(path)} and path.is_file()
    reference = extractor(torch.stack(images)).detach().double()
    torch.testing.assert_close(stats.mean, reference.mean(0))

    # an empty cache key still names a file
    empty = real_statistics(images, extractor, resolution=12, cache_dir=tmp_path / "e", cache_key="", progress=False)
    assert Path(empty.info["cache_file"]).name.startswith("images-12px-")


def test_a_dataset_without_cache_key_is_not_cached_and_info_names_extractor_and_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("CCP_CACHE_DIR", str(tmp_path / "ccp-cache"))
    extractor = CountingExtractor()
    images = [torch.full((3, 8, 8), 40 * i, dtype=torch.uint8) for i in range(3)]
    assert real_stats_key(images, extractor, 8) is None
    stats = real_statistics(images, extractor, resolution=8, progress=False)
    assert stats.info == {"features": expected_fingerprint(extractor), "resolution": 8, "count": 3, "skipped": 0}
    assert not (tmp_path / "ccp-cache").exists()


# --- real_stats_key -----------------------------------------------------------------------------------
def test_real_stats_key_is_the_hash_of_what_the_statistics_depend_on(tmp_path):
    extractor = CountingExtractor()
    folder = write_folder(tmp_path / "real", 4)
    parts, key = real_stats_key(folder, extractor, 16)
    expected = expected_folder_parts(folder, extractor, 16)
    assert parts == expected and key == sha(expected)[:16]
    cropped, _ = real_stats_key(folder, extractor, 16, center_crop=1, max_images=2, fingerprint="given")
    assert cropped == {**expected_folder_parts(folder, extractor, 16, True, 2), "features": "given"}
    parts, key = real_stats_key(["a", "b"], extractor, None, cache_key="k")
    assert parts == {"format": 1, "resolution": None, "center_crop": False, "max_images": None,
                     "features": expected_fingerprint(extractor), "source": "dataset:k", "num_files": 2,
                     "preprocess": "dataset-items-as-uint8"}
    assert key == sha(parts)[:16]


# --- bad images ---------------------------------------------------------------------------------------
def test_unreadable_images_are_skipped_with_a_warning_each_and_a_log_line(tmp_path, caplog, bars):
    extractor = CountingExtractor()
    folder = write_folder(tmp_path / "real", 3, prefix="b")
    bad = [corrupt(folder / "a0.png"), corrupt(folder / "a1.png")]  # sorted first: one batch of only bad files
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO, logger="ccp.evaluation.statistics"):
        warnings.simplefilter("always")
        stats = real_statistics(folder, extractor, resolution=12, cache_dir=tmp_path / "c", batch_size=2,
                                progress=False)
    messages = [str(w.message) for w in caught if w.category is BadImageWarning]
    assert len(messages) == 2
    for path, message in zip(bad, messages):
        assert re.fullmatch(rf"skipping {re.escape(str(path.resolve()))}: UnidentifiedImageError: .+", message)
    assert stats.count == 3 and stats.info["skipped"] == 2 and stats.info["count"] == 3
    logs = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert (logging.WARNING, "real FID statistics: skipped 2 unreadable image(s)") in logs
    # the good images' statistics, computed from PIL directly
    reference = extractor(pil_reference_images(sorted(folder.glob("b*.png")), 12)).detach().double()
    torch.testing.assert_close(stats.mean, reference.mean(0))
    # the progress bar counts every file, bad ones included: batches [bad, bad], [good, good], [good]
    assert bars.bars[0]["updates"] == [2, 2, 1]
    assert bars.bars[0]["kwargs"]["total"] == 5


def test_on_bad_image_fail_refuses_naming_the_first_20_files(tmp_path):
    extractor = CountingExtractor()
    folder = write_folder(tmp_path / "real", 2, prefix="z")
    bad = [corrupt(folder / f"bad{i:02d}.png") for i in range(21)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", BadImageWarning)  # fail: no skip warnings
        with pytest.raises(ValueError) as err:
            real_statistics(folder, extractor, resolution=12, cache_dir=tmp_path / "c", on_bad_image="fail",
                            progress=False)
    message = str(err.value)
    head = "21 unreadable image(s) (on_bad_image=fail): "
    assert message.startswith(head)
    entries = message[len(head):].split("; ")
    assert len(entries) == 20
    for path, entry in zip(bad, entries):
        assert re.fullmatch(rf"{re.escape(str(path.resolve()))}: UnidentifiedImageError: .+", entry)
    assert not (tmp_path / "c").exists()


def test_on_bad_image_must_be_skip_or_fail(tmp_path):
    folder = write_folder(tmp_path / "real", 2)
    with pytest.raises(ValueError, match=r"^on_bad_image must be 'skip' or 'fail', got 'ignore'$"):
        real_statistics(folder, CountingExtractor(), resolution=12, on_bad_image="ignore", cache=False, progress=False)


def test_two_real_images_are_enough_one_is_not(tmp_path):
    extractor = CountingExtractor()
    two = real_statistics(write_folder(tmp_path / "two", 2), extractor, resolution=12, cache=False, progress=False)
    assert two.count == 2
    folder = write_folder(tmp_path / "one", 1)
    corrupt(folder / "x.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        with pytest.raises(ValueError, match=r"^FID needs at least 2 real images, got 1$"):
            real_statistics(folder, extractor, resolution=12, cache=False, progress=False)


# --- what is passed on: progress, max_images, center_crop, batches, workers ---------------------------
def test_progress_bar_arguments_follow_the_progress_flag(tmp_path, bars):
    folder = write_folder(tmp_path / "real", 3)
    real_statistics(folder, CountingExtractor(), resolution=12, cache=False)  # progress defaults to on
    real_statistics(folder, CountingExtractor(), resolution=12, cache=False, progress=False)
    on, off = (bar["kwargs"] for bar in bars.bars)
    assert {k: on[k] for k in ("total", "unit", "desc", "disable")} == \
        {"total": 3, "unit": "img", "desc": "real FID statistics", "disable": False}
    assert off["disable"] is True


def test_max_images_takes_the_first_files_in_sorted_order(tmp_path):
    extractor = CountingExtractor()
    folder = write_folder(tmp_path / "real", 5)
    stats = real_statistics(folder, extractor, resolution=12, max_images=3, cache_dir=tmp_path / "c", progress=False)
    assert stats.count == 3 and stats.info["max_images"] == 3 and stats.info["num_files"] == 3
    reference = extractor(pil_reference_images(sorted(folder.iterdir())[:3], 12)).detach().double()
    torch.testing.assert_close(stats.mean, reference.mean(0))


def test_center_crop_cuts_the_central_square_before_resizing(tmp_path):
    extractor = CountingExtractor()
    folder = write_folder(tmp_path / "real", 3, size=(30, 14))  # wide images: the crop matters
    files = sorted(folder.iterdir())
    item = _FolderImages(files, 12, True)[1]
    assert item[0] == 1 and item[2] is None
    assert torch.equal(item[1], pil_reference_images(files[1:2], 12, center_crop=True)[0])
    stats = real_statistics(folder, extractor, resolution=12, center_crop=True, cache_dir=tmp_path / "c",
                            progress=False)
    reference = extractor(pil_reference_images(files, 12, center_crop=True)).detach().double()
    torch.testing.assert_close(stats.mean, reference.mean(0))
    assert stats.info["center_crop"] is True


def test_batch_size_and_workers_reach_the_loader(tmp_path, loaders):
    folder = write_folder(tmp_path / "real", 51, size=(8, 8))
    extractor = CountingExtractor()
    real_statistics(folder, extractor, resolution=8, cache=False, progress=False)
    assert extractor.calls == 2  # 50 per call by default
    real_statistics(folder, extractor, resolution=8, cache=False, batch_size=20, num_workers=3, progress=False)
    assert extractor.calls == 2 + 3
    assert [(c["batch_size"], c.get("num_workers", 0)) for c in loaders] == [(50, 0), (20, 3)]


def test_collate_stacks_the_good_items_and_lists_the_failures():
    a, b = torch.zeros(3, 2, 2, dtype=torch.uint8), torch.ones(3, 2, 2, dtype=torch.uint8)
    batch, bad = _collate([(0, a, None), (1, None, "OSError: x"), (2, b, None)])
    assert torch.equal(batch, torch.stack([a, b])) and bad == [(1, "OSError: x")]
    assert _collate([(4, None, "E: y")]) == (None, [(4, "E: y")])


# --- torch.distributed: the metric meets no one; its callers use ccp.distributed -----------------------
def test_real_statistics_calls_no_collective_on_any_rank(tmp_path, monkeypatch):
    # a collective inside the metric deadlocked DDP: rank 0 sat in this barrier while the training
    # callback had the other ranks in a broadcast (tests/test_ddp_everything.py runs that case)
    folder = write_folder(tmp_path / "real", 3)
    cache = tmp_path / "c"
    for rank in (1, 0):
        dist = FakeDist(monkeypatch, rank=rank, world=2)
        extractor = CountingExtractor()
        stats = real_statistics(folder, extractor, resolution=12, cache_dir=cache, batch_size=2, progress=False)
        assert dist.barriers == 0 and stats.count == 3
        # the first call (rank 1 here) computed and cached; the second read the cache
        assert extractor.calls == (2 if rank == 1 else 0)


def test_run_fid_has_rank_0_compute_the_real_statistics_for_every_rank(tmp_path, monkeypatch):
    import ccp.evaluation.fid as fid

    seen = []
    monkeypatch.setattr(fid, "rank_zero_computes", lambda compute, read=None: seen.append(read) or compute())
    monkeypatch.setattr(fid, "fid_over_samples", lambda *a, **k: 0.0)
    cfg = FIDConfig(real_path=str(write_folder(tmp_path / "real", 3)), shard_dir=str(tmp_path / "s"), resolution=12,
                    stats_cache_dir=str(tmp_path / "c"), num_workers=0)
    run_fid(cfg, lambda indices, seed: None, feature_extractor=CountingExtractor(), progress=False)
    assert seen == [None]  # through the one helper, the statistics sent to the other ranks


def test_rank_0_passes_every_setting_on(tmp_path, monkeypatch, bars, loaders):
    folder = write_folder(tmp_path / "real", 5, size=(30, 14))
    corrupt(folder / "000_bad.png")
    FakeDist(monkeypatch, rank=0, world=2)
    extractor = CountingExtractor()
    with pytest.raises(ValueError, match=r"^1 unreadable image\(s\) \(on_bad_image=fail\): "):
        real_statistics(folder, extractor, resolution=12, cache_dir=tmp_path / "c", on_bad_image="fail",
                        progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        stats = real_statistics(folder, extractor, resolution=12, center_crop=True, max_images=4,
                                cache_dir=tmp_path / "c", batch_size=2, num_workers=2, progress=True)
    files = [p for p in sorted(folder.iterdir())[:4] if "bad" not in p.name]
    reference = extractor(pil_reference_images(files, 12, center_crop=True)).detach().double()
    torch.testing.assert_close(stats.mean, reference.mean(0))
    assert stats.count == 3 and stats.info["skipped"] == 1
    assert stats.info["center_crop"] is True and stats.info["max_images"] == 4 and stats.info["resolution"] == 12
    assert Path(stats.info["cache_file"]).is_file()
    assert (loaders[-1]["batch_size"], loaders[-1]["num_workers"]) == (2, 2)
    assert bars.bars[-1]["kwargs"]["disable"] is False and sum(bars.bars[-1]["updates"]) == 4


def test_one_process_or_no_cache_means_no_barrier(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "real", 2)
    single = FakeDist(monkeypatch, rank=0, world=1)
    real_statistics(folder, CountingExtractor(), resolution=12, cache_dir=tmp_path / "c", progress=False)
    assert single.barriers == 0
    uncached = FakeDist(monkeypatch, rank=1, world=2)
    extractor = CountingExtractor()
    stats = real_statistics(folder, extractor, resolution=12, cache=False, progress=False)
    assert uncached.barriers == 0 and extractor.calls == 1 and stats.count == 2


# --- sharded FID: defaults, barrier and the shard wait --------------------------------------------------
@pytest.fixture
def waits(monkeypatch):
    recorded: list[float] = []
    original = statistics_module.iter_shard_features

    def recording(*args, wait_s=0.0, **kwargs):
        recorded.append(wait_s)
        return original(*args, wait_s=wait_s, **kwargs)

    monkeypatch.setattr(statistics_module, "iter_shard_features", recording)
    return recorded


@pytest.fixture
def real_stats():
    extractor = CountingExtractor()
    images = torch.randint(0, 200, (20, 3, 12, 12), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    stats = FeatureStats.from_features(extractor(images))
    stats.info = {"features": expected_fingerprint(extractor)}
    return stats


def test_after_a_barrier_ranks_wait_for_other_nodes_shards(tmp_path, monkeypatch, waits, real_stats):
    extractor = CountingExtractor()
    dist = FakeDist(monkeypatch, rank=0, world=2)
    fid_over_samples(Generator(), 4, real_stats, extractor, tmp_path / "a", shard_size=4, rank=0, world_size=2,
                     progress=False)
    assert dist.barriers == 1 and waits == [120.0]
    single = FakeDist(monkeypatch, rank=0, world=1)
    fid_over_samples(Generator(), 4, real_stats, extractor, tmp_path / "b", shard_size=4, rank=0, world_size=1,
                     progress=False)
    assert single.barriers == 0 and waits == [120.0, 0.0]
    fid_from_shards(tmp_path / "b", 4, real_stats)
    fake_statistics(tmp_path / "b", 4)
    assert waits[2:] == [0.0, 0.0]


def test_fid_over_samples_defaults(tmp_path, monkeypatch, real_stats):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    recorded = []
    original = fid_module.generate_shards

    def recording(*args, **kwargs):
        recorded.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(fid_module, "generate_shards", recording)
    gen = Generator()
    value = fid_over_samples(gen, 17, real_stats, CountingExtractor(), tmp_path / "s")
    assert np.isfinite(value)
    assert [len(c) for c in gen.calls] == [16, 1]  # 16 images per call when generate_fn has no batch_size
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["shard_size"] == 1000 and meta["run_key"] is None
    assert not (tmp_path / "s" / "images").exists()
    assert {k: recorded[0][k] for k in ("rank", "world_size", "keep_images", "progress", "batch_size")} == \
        {"rank": 0, "world_size": 1, "keep_images": False, "progress": True, "batch_size": 16}

    gen = Generator()
    gen.batch_size, gen.run_key = 3, "from the sampler"
    fid_over_samples(gen, 4, real_stats, CountingExtractor(), tmp_path / "t", rank=0, world_size=1, progress=False)
    assert [len(c) for c in gen.calls] == [3, 1]
    assert json.loads((tmp_path / "t" / "meta.json").read_text())["run_key"] == "from the sampler"
    fid_over_samples(gen, 4, real_stats, CountingExtractor(), tmp_path / "u", rank=0, world_size=1, progress=False,
                     run_key="given")
    assert json.loads((tmp_path / "u" / "meta.json").read_text())["run_key"] == "given"
    assert recorded[-1]["progress"] is False


def test_shard_statistics_info_and_missing_folder(tmp_path, real_stats):
    extractor = CountingExtractor()
    fid_over_samples(Generator(), 5, real_stats, extractor, tmp_path / "s", shard_size=2, rank=0, world_size=1,
                     progress=False)
    stats = fake_statistics(tmp_path / "s", 5)
    assert stats.info == {"features": expected_fingerprint(extractor), "count": 5, "shard_dir": str(tmp_path / "s")}
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(str(tmp_path / 'none'))} is not a sample shard folder "
                                                r"\(no meta.json\)$"):
        fake_statistics(tmp_path / "none", 5)


def test_real_statistics_of_another_size_or_extractor_are_refused_saying_why(tmp_path, real_stats):
    small = FeatureStats.from_features(torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"^real statistics are 4-d, the feature extractor gives 8-d$"):
        fid_over_samples(Generator(), 4, small, CountingExtractor(), tmp_path / "s", rank=0, world_size=1, progress=False)
    other = CountingExtractor(seed=3)
    fingerprint = expected_fingerprint(other)
    with pytest.raises(ValueError, match=rf"^the real statistics were computed with another feature extractor "
                                         rf"\({real_stats.info['features']}, now {fingerprint}\); compute them again "
                                         r"with this one \(real_statistics\)$"):
        fid_over_samples(Generator(), 4, real_stats, other, tmp_path / "s", rank=0, world_size=1, progress=False)


def test_frechet_distance_warns_nothing():
    a, b = FeatureStats.from_features(torch.randn(10, 3)), FeatureStats.from_features(torch.randn(10, 3) + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert frechet_distance(a, b) > 0


# --- the feature extractor: fingerprint, num_features, device ------------------------------------------
class Configured(nn.Module):
    num_features = 8
    features_list = ["2048"]
    use_antialias = False
    INPUT_IMAGE_SIZE = 299
    fid_fingerprint = "v1"

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 3)
        self.register_buffer("steps", torch.tensor([1, 2], dtype=torch.int64))


def test_extractor_fingerprint_hashes_class_settings_and_weights():
    module = Configured()
    assert extractor_fingerprint(module) == expected_fingerprint(module)
    assert len(extractor_fingerprint(module)) == 24
    for attr, value in (("features_list", ["64"]), ("use_antialias", True), ("INPUT_IMAGE_SIZE", 300),
                        ("fid_fingerprint", "v2"), ("num_features", 9)):
        changed = Configured()
        changed.load_state_dict(module.state_dict())
        setattr(changed, attr, value)
        assert extractor_fingerprint(changed) == expected_fingerprint(changed) != extractor_fingerprint(module), attr


def test_num_features_must_be_a_positive_integer():
    class With(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.num_features = dim

    assert num_features_of(With(1)) == 1
    assert num_features_of(With(torch.tensor(8))) == 8
    for dim in (None, 0, -2, "8", 2.0):
        module = With(dim) if dim is not None else nn.Identity()
        with pytest.raises(TypeError, match=rf"^the feature extractor needs an integer `num_features` \(its output "
                                            rf"size\), got {re.escape(repr(dim))}$"):
            num_features_of(module)


def test_images_go_to_the_extractors_device():
    class OnMeta(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.zeros(2, device="meta"))
            self.seen = None

        def forward(self, images):
            self.seen = images.device
            return images.float().flatten(1)

    module = OnMeta()
    out = extract_features(module, torch.zeros(2, 3, 2, 2, dtype=torch.uint8))
    assert module.seen == torch.device("meta") and out.shape == (2, 12)
    assert _device_of(nn.Identity()) == torch.device("cpu")
    assert torch.equal(extract_features(nn.Flatten(), torch.ones(2, 3, 1, 1, dtype=torch.uint8)),
                       torch.ones(2, 3, dtype=torch.uint8))


# --- FeatureStats files ---------------------------------------------------------------------------------
def test_feature_stats_load_refuses_other_files_and_defaults_info(tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other), metadata={"format": "2"})
    with pytest.raises(ValueError, match=rf"^{re.escape(str(other))} is not a ccp feature-statistics file "
                                         r"\(format '2'\)$"):
        FeatureStats.load(other)
    bare = tmp_path / "bare.safetensors"
    save_file({"features_sum": torch.tensor([1.0, 2.0], dtype=torch.float64),
               "features_cov_sum": torch.eye(2, dtype=torch.float64)}, str(bare), metadata={"format": "1", "count": "4"})
    stats = FeatureStats.load(bare)
    assert stats.info == {} and stats.count == 4
    assert torch.equal(stats.features_sum, torch.tensor([1.0, 2.0], dtype=torch.float64))


# --- the Inception loader ---------------------------------------------------------------------------------
def test_missing_torch_fidelity_says_how_to_install_it(tmp_path, monkeypatch):
    import torchmetrics.utilities.imports as imports

    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    monkeypatch.setattr(imports, "_TORCH_FIDELITY_AVAILABLE", False)
    with pytest.raises(ModuleNotFoundError, match=r"^the InceptionV3 feature extractor needs torch-fidelity: "
                                                  r"pip install -c constraints\.txt torch-fidelity$"):
        inception_feature_extractor(weights)


def _fake_inception(monkeypatch, with_antialias: bool, error: Exception | None = None):
    import torchmetrics.image.fid as tm_fid

    made: list[dict] = []

    class Net(nn.Module):
        def __init__(self, name, features_list, feature_extractor_weights_path, **kwargs):
            super().__init__()
            if error is not None:
                raise error
            made.append(dict(name=name, features_list=features_list, path=feature_extractor_weights_path, **kwargs))
            self.moved_to = []

        def to(self, *args, **kwargs):
            self.moved_to.append(args)
            return self

    if with_antialias:
        def init(self, name, features_list, feature_extractor_weights_path, antialias=False):
            Net.__init__(self, name, features_list, feature_extractor_weights_path, antialias=antialias)
        Antialiased = type("Antialiased", (Net,), {"__init__": init})
        monkeypatch.setattr(tm_fid, "NoTrainInceptionV3", Antialiased)
    else:
        monkeypatch.setattr(tm_fid, "NoTrainInceptionV3", Net)
    return made


def test_inception_is_built_as_torchmetrics_builds_it(tmp_path, monkeypatch):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    made = _fake_inception(monkeypatch, with_antialias=True)
    net = inception_feature_extractor(weights, antialias=True)
    assert made == [{"name": "inception-v3-compat", "features_list": ["2048"], "path": str(weights), "antialias": True}]
    assert net.num_features == 2048 and net.moved_to == []
    net = inception_feature_extractor(weights, device="cpu")
    assert net.moved_to == [("cpu",)]

    _fake_inception(monkeypatch, with_antialias=False)
    with pytest.raises(FIDConfigError, match=r"^this torchmetrics has no antialiased resize \(added in 1\.8\); "
                                             r"use antialias=false$"):
        inception_feature_extractor(weights, antialias=True)

    _fake_inception(monkeypatch, with_antialias=False, error=RuntimeError("bad magic"))
    with pytest.raises(Exception, match=rf"^{re.escape(str(weights))} could not be loaded as torch-fidelity's "
                                        rf"InceptionV3 weights \(RuntimeError: bad magic\); download "
                                        rf"{re.escape(INCEPTION_WEIGHTS_URL)} again$"):
        inception_feature_extractor(weights)
