"""FID: the distance against scipy, the real-statistics cache, sharded/resumable generation,
the Inception weights from a local file only, and GCFG samples end to end (tiny prior)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch

from ccp.evaluation.fid import (
    INCEPTION_WEIGHTS_FILE,
    INCEPTION_WEIGHTS_URL,
    FeatureStats,
    InceptionWeightsError,
    RandomConvFeatures,
    fid_from_shards,
    fid_over_samples,
    fill_metric_state,
    frechet_distance,
    inception_feature_extractor,
    real_statistics,
    run_fid,
)
from ccp.evaluation.generation import MissingShardsError, PipelineSampler, ShardDirMismatchError
from ccp.pipelines.sampling import noise_generators


class SmallExtractor(RandomConvFeatures):
    """ccp-eval's seeded random conv net standing in for Inception, counting its calls."""

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        self.calls += 1
        return super().forward(images)


class FakeGenerator:
    """generate_fn: image i of seed s is uniform noise from image i's generator (brightness shifted), float [0, 1]."""

    def __init__(self, fail_at: int | None = None, shift: float = 0.2):
        self.fail_at, self.shift = fail_at, shift
        self.calls: list[list[int]] = []

    def __call__(self, indices, seed):
        if self.fail_at is not None and self.fail_at in indices:
            raise KeyboardInterrupt("cut short")
        self.calls.append(list(indices))
        generators = noise_generators(seed, indices)
        return torch.stack([(torch.rand(3, 12, 12, generator=g) * 0.8 + self.shift).clamp(0, 1) for g in generators])

    @property
    def generated(self) -> list[int]:
        return [i for call in self.calls for i in call]


def scipy_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """Independent reference: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def random_images(n: int, seed: int, low: int = 0, high: int = 256, size: int = 12) -> torch.Tensor:
    return torch.randint(low, high, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def write_folder(folder: Path, n: int, seed: int, size=(20, 24)) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture
def extractor():
    return SmallExtractor()


@pytest.fixture
def real(extractor):
    return FeatureStats.from_features(extractor(random_images(40, seed=1, high=200)))


def test_fid_equals_scipy_frechet_distance(extractor):
    real_f = extractor(random_images(40, seed=1, high=200)).detach()
    fake_images = random_images(30, seed=2, low=60)
    fake_f = extractor(fake_images).detach()
    expected = scipy_fid(real_f.double().numpy(), fake_f.double().numpy())
    value = frechet_distance(FeatureStats.from_features(real_f), FeatureStats.from_features(fake_f))
    assert expected > 0.1
    assert value == pytest.approx(expected, rel=1e-7)

    # The helper fills a torchmetrics metric's real side; its own update() adds the generated side.
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=extractor, reset_real_features=False)
    fill_metric_state(metric, FeatureStats.from_features(real_f), real=True)
    for chunk in fake_images.split(7):
        metric.update(chunk, real=False)
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-5)  # compute() returns float32
    metric.reset()  # keeps the real side
    assert int(metric.real_features_num_samples) == 40 and int(metric.fake_features_num_samples) == 0


def test_real_statistics_are_cached_per_folder_and_resolution(tmp_path, extractor):
    folder = write_folder(tmp_path / "real", 6, seed=0)
    cache = tmp_path / "cache"
    first = real_statistics(folder, extractor, resolution=16, cache_dir=cache, batch_size=4, progress=False)
    assert extractor.calls == 2 and first.count == 6

    # Independently: PIL-bicubic resize to 16, uint8, features.
    images = torch.stack([
        torch.from_numpy(np.array(PIL.Image.open(p).convert("RGB").resize((16, 16), PIL.Image.Resampling.BICUBIC))).permute(2, 0, 1)
        for p in sorted(folder.iterdir())
    ])
    reference = extractor(images).detach()
    torch.testing.assert_close(first.mean, reference.double().mean(0))
    torch.testing.assert_close(first.cov, torch.from_numpy(np.cov(reference.double().numpy(), rowvar=False)))
    calls = extractor.calls

    again = real_statistics(folder, extractor, resolution=16, cache_dir=cache, progress=False)
    assert extractor.calls == calls, "second call must read the cache"
    assert torch.equal(again.features_cov_sum, first.features_cov_sum) and again.count == 6
    assert again.info["cache_file"] == first.info["cache_file"] and Path(first.info["cache_file"]).is_file()

    other_res = real_statistics(folder, extractor, resolution=12, cache_dir=cache, progress=False)
    other_folder = shutil.copytree(folder, tmp_path / "real2")
    (Path(other_folder) / "000.png").unlink()
    fewer = real_statistics(other_folder, extractor, resolution=16, cache_dir=cache, progress=False)
    assert extractor.calls > calls and fewer.count == 5
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 3, files  # one per (folder, resolution)
    assert {f.split("-")[1] for f in files} == {"16px", "12px"}
    assert not torch.equal(other_res.features_sum, first.features_sum)


def test_sharded_fid_does_not_depend_on_shard_size_batch_or_ranks(tmp_path, extractor, real):
    n = 20
    images = (FakeGenerator()(list(range(n)), 5) * 255).round().to(torch.uint8)
    direct = frechet_distance(real, FeatureStats.from_features(extractor(images)))

    def run(folder, shard_size, batch_size=1, rank=0, world_size=1, gen=None):
        return fid_over_samples(gen or FakeGenerator(), n, real, extractor, tmp_path / folder, shard_size=shard_size,
                                rank=rank, world_size=world_size, batch_size=batch_size, base_seed=5, progress=False)

    # One image per extractor call: identical features whatever the sharding, so (nearly) bit-equal FIDs.
    a, b = run("a", 4), run("b", 7)
    # Two "ranks" one after the other into one folder: rank 0 finds rank 1's shards missing.
    rank0, rank1 = FakeGenerator(), FakeGenerator()
    with pytest.raises(MissingShardsError, match=r"\(shards 1\)"):
        run("c", 7, rank=0, world_size=2, gen=rank0)
    c = run("c", 7, rank=1, world_size=2, gen=rank1)
    assert sorted(rank0.generated) == list(range(0, 7)) + list(range(14, 20))
    assert sorted(rank1.generated) == list(range(7, 14))
    assert fid_from_shards(tmp_path / "c", n, real) == c
    assert b == pytest.approx(a, rel=1e-12) and c == pytest.approx(a, rel=1e-12)
    # Other batch sizes change the extractor's float32 rounding, nothing else.
    for value in (a, run("d", 4, batch_size=3), run("e", 7, batch_size=5)):
        assert value == pytest.approx(direct, rel=1e-6)
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["shard_size"] == 7 and meta["base_seed"] == 5


def test_rerun_skips_finished_shards_and_an_interrupted_run_resumes(tmp_path, extractor, real):
    n, kwargs = 20, dict(shard_size=4, rank=0, world_size=1, batch_size=4, progress=False)
    uninterrupted = fid_over_samples(FakeGenerator(), n, real, extractor, tmp_path / "whole", **kwargs)

    shards = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        fid_over_samples(FakeGenerator(fail_at=9), n, real, extractor, shards, keep_images=True, **kwargs)
    assert sorted(p.name for p in (shards / "features").iterdir()) == ["shard-00000.safetensors", "shard-00001.safetensors"]

    resumed_gen = FakeGenerator()
    resumed = fid_over_samples(resumed_gen, n, real, extractor, shards, keep_images=True, **kwargs)
    assert resumed_gen.generated == list(range(8, 20))  # shard 2 (8..11) again, nothing before it
    assert resumed == pytest.approx(uninterrupted, rel=1e-12)

    rerun_gen = FakeGenerator()
    assert fid_over_samples(rerun_gen, n, real, extractor, shards, keep_images=True, **kwargs) == resumed
    assert rerun_gen.calls == []

    # Kept images are the exact inputs of the features: reloading the PNGs gives the same FID.
    pngs = sorted((shards / "images").iterdir())
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(n)]
    reloaded = torch.stack([torch.from_numpy(np.array(PIL.Image.open(p))).permute(2, 0, 1) for p in pngs])
    assert frechet_distance(real, FeatureStats.from_features(extractor(reloaded))) == pytest.approx(resumed, rel=1e-10)

    # Another seed (or guidance, extractor, shard size) never mixes into the same folder.
    with pytest.raises(ShardDirMismatchError, match="base_seed"):
        fid_over_samples(FakeGenerator(), n, real, extractor, shards, base_seed=1, **kwargs)
    # Statistics from another extractor are refused.
    with pytest.raises(ValueError, match="another feature extractor"):
        other = SmallExtractor(seed=3)
        fid_over_samples(FakeGenerator(), n, real_statistics(write_folder(tmp_path / "r", 3, 0), extractor, resolution=12,
                         cache=False, progress=False), other, tmp_path / "x", **kwargs)


def test_missing_inception_weights_fail_before_any_generation(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    gen = FakeGenerator()
    cfg = {"real_path": str(write_folder(tmp_path / "real", 2, 0)), "shard_dir": str(tmp_path / "shards"), "num_samples": 4}
    with pytest.raises(InceptionWeightsError) as err:
        run_fid(cfg, gen, progress=False)
    message = str(err.value)
    hub_file = tmp_path / "torch-home" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    assert INCEPTION_WEIGHTS_URL in message and str(hub_file) in message and "fid.inception_weights=" in message
    with pytest.raises(InceptionWeightsError, match="fid.inception_weights=/nowhere/w.pth does not exist"):
        run_fid({**cfg, "inception_weights": "/nowhere/w.pth"}, gen, progress=False)
    assert gen.calls == [] and not (tmp_path / "shards").exists()


def test_run_fid_from_a_config(tmp_path, extractor):
    cfg = {"real_path": str(write_folder(tmp_path / "real", 6, 0)), "shard_dir": str(tmp_path / "shards"),
           "num_samples": 10, "shard_size": 4, "batch_size": 2, "resolution": 12, "stats_cache_dir": str(tmp_path / "c"),
           "num_workers": 0}
    gen = FakeGenerator()
    gen.height = gen.width = 16
    with pytest.raises(ValueError, match="fid.resolution=12"):
        run_fid(cfg, gen, feature_extractor=extractor, progress=False)
    with pytest.raises(ValueError, match="unknown fid setting"):
        run_fid({**cfg, "num_sample": 3}, gen, feature_extractor=extractor, progress=False)
    assert gen.calls == []
    gen.height = gen.width = 12
    value = run_fid(cfg, gen, feature_extractor=extractor, rank=0, world_size=1, progress=False)
    assert np.isfinite(value) and sorted(gen.generated) == list(range(10))
    assert max(len(call) for call in gen.calls) == 2


def _random_inception_weights(path: Path) -> None:
    """A state dict shaped like torch-fidelity's InceptionV3, with random values (no download)."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    with torch.device("meta"), mock.patch.object(tfi, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):
        shapes = {k: (v.shape, v.dtype) for k, v in tfi.FeatureExtractorInceptionV3("x", ["2048"]).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, (shape, dtype) in shapes.items():
        if not dtype.is_floating_point:
            state[name] = torch.zeros(shape, dtype=dtype)
        elif name.endswith("conv.weight"):  # He init keeps activations O(1) through the 94 layers
            state[name] = torch.randn(shape, generator=generator) * (2.0 / shape[1:].numel()) ** 0.5
        elif name.endswith(("bn.weight", "running_var")):
            state[name] = torch.ones(shape)
        else:
            state[name] = torch.randn(shape, generator=generator) * 0.01
    torch.save(state, path)


def test_inception_loads_from_the_hub_cache_without_network(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    assert INCEPTION_WEIGHTS_URL == tfi.URL_INCEPTION_V3
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    hub_file = tmp_path / "torch-home" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    hub_file.parent.mkdir(parents=True)
    _random_inception_weights(hub_file)

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(tfi, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    net = inception_feature_extractor()  # found in $TORCH_HOME/hub/checkpoints
    images = random_images(2, seed=0, size=400)
    features = net(images)
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    assert (features[0] - features[1]).abs().max() > 1e-3 * features.abs().max()
    # antialias=False is torch-fidelity's own TF1-compatible resize, i.e. torchmetrics < 1.8.
    reference = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(hub_file))
    torch.testing.assert_close(features, reference(images)[0].reshape(2, -1))
    # torchmetrics >= 1.8's default (antialiased downsampling to 299) gives other features.
    assert not torch.allclose(inception_feature_extractor(hub_file, antialias=True)(images), features, rtol=1e-3)

    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(1)}, bad)
    with pytest.raises(InceptionWeightsError, match="could not be loaded"):
        inception_feature_extractor(bad)


def test_gcfg_samples_end_to_end_on_the_tiny_prior(tmp_path, tiny_prior, extractor):
    from ccp.guidance import GuidanceSpec
    from ccp.pipelines.gcfg import GCFGPipeline

    pipe = GCFGPipeline.from_prior(tiny_prior)
    real = real_statistics(write_folder(tmp_path / "real", 8, seed=0, size=(64, 64)), extractor, resolution=64,
                           cache_dir=tmp_path / "cache", progress=False)
    values = {}
    for scale in (1.0, 7.5):
        sampler = PipelineSampler(pipe, GuidanceSpec.cfg("a photo of a face", scale), num_inference_steps=2, batch_size=4)
        values[scale] = fid_over_samples(sampler, 8, real, extractor, tmp_path / f"cfg{scale}", shard_size=4,
                                         rank=0, world_size=1, progress=False)
    assert all(np.isfinite(v) for v in values.values())
    assert values[1.0] != pytest.approx(values[7.5], rel=1e-6)
    # The guidance is part of the run key: another scale never reuses these shards.
    with pytest.raises(ShardDirMismatchError, match="run_key"):
        sampler = PipelineSampler(pipe, GuidanceSpec.cfg("a photo of a face", 3.0), num_inference_steps=2, batch_size=4)
        fid_over_samples(sampler, 8, real, extractor, tmp_path / "cfg1.0", shard_size=4, rank=0, world_size=1, progress=False)
