"""FID of Table 1 (App. D.3): torchmetrics' FrechetInceptionDistance over 50,000 samples, and the
evaluation run that decides which rank computes what.

The pieces live beside this module, one concern each: the Inception network and its weights
(`ccp.evaluation.inception`), feature statistics, the real-image path and its cache
(`ccp.evaluation.statistics`), KID (`ccp.evaluation.kid`) and sharded, resumable sample generation
(`ccp.evaluation.generation`). Here: the distance, a metric function of two sets of statistics
(torchmetrics' own ``compute()`` on a metric whose states are filled with them, through its public
``update`` and ``merge_state``), and `fid_over_samples` / `run_fid`, the run: rank 0 computes the
real statistics while the others wait (`ccp.distributed`), every rank generates its shards, all
meet, and every rank reads the same FID. Choices that change the number: docs/evaluation.md.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ccp.distributed import barrier, meets, rank_world, rank_zero_computes
from ccp.evaluation.generation import GenerateFn, generate_shards, prepare_shard_dir, run_meta
# the names other modules import from here, defined beside it
from ccp.evaluation.inception import (  # noqa: F401
    INCEPTION_FEATURES,
    INCEPTION_WEIGHTS_FILE,
    INCEPTION_WEIGHTS_URL,
    FIDConfigError,
    GivenFeatures,
    InceptionWeightsError,
    RandomConvFeatures,
    extract_features,
    extractor_fingerprint,
    hub_weights_path,
    inception_feature_extractor,
    num_features_of,
    resolve_inception_weights,
)
from ccp.evaluation.kid import kernel_inception_distance  # noqa: F401
from ccp.evaluation.statistics import (  # noqa: F401
    FeatureStats,
    check_real_stats,
    fake_features,
    fake_statistics,
    real_features,
    real_stats_key,
    real_statistics,
)

from ccp.io.shards import SHARDS_VISIBLE_WAIT_S

log = logging.getLogger(__name__)


# --- the distance: statistics in, a number out ------------------------------------------------------
def fill_metric_state(metric, stats: FeatureStats, real: bool = True) -> None:
    """Add `stats` to one side of a torchmetrics ``FrechetInceptionDistance`` (its public
    ``merge_state``): e.g. cached real statistics into a metric made with
    ``reset_real_features=False``, which then only ever sees generated images."""
    side, other = ("real", "fake") if real else ("fake", "real")
    state = getattr(metric, f"{side}_features_sum")
    if state.shape[0] != stats.num_features:
        raise ValueError(f"the metric has {state.shape[0]}-d features, the statistics {stats.num_features}-d")
    incoming = {
        f"{side}_features_sum": stats.features_sum.to(state),
        f"{side}_features_cov_sum": stats.features_cov_sum.to(getattr(metric, f"{side}_features_cov_sum")),
        f"{side}_features_num_samples": torch.tensor(stats.count, device=state.device),
    }
    for name in ("features_sum", "features_cov_sum", "features_num_samples"):
        incoming[f"{other}_{name}"] = torch.zeros_like(getattr(metric, f"{other}_{name}"))
    metric.merge_state(incoming)


def frechet_distance(real: FeatureStats, fake: FeatureStats) -> float:
    """FID between two sets of statistics, by torchmetrics' ``FrechetInceptionDistance.compute``."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real.num_features != fake.num_features:
        raise ValueError(f"real statistics are {real.num_features}-d, generated {fake.num_features}-d")
    metric = FrechetInceptionDistance(feature=GivenFeatures(real.num_features), sync_on_compute=False)
    # an update with no features: the metric learns the features' dtype (float64, kept by the result)
    metric.update(torch.zeros(0, real.num_features, dtype=torch.float64), real=True)
    fill_metric_state(metric, real, real=True)
    fill_metric_state(metric, fake, real=False)
    return float(metric.compute())


def fid_from_shards(shard_dir: str | Path, num_samples: int, real_stats: FeatureStats, wait_s: float = 0.0) -> float:
    """FID of finished shards against real statistics (e.g. after independent per-rank jobs)."""
    fake = fake_statistics(shard_dir, num_samples, wait_s=wait_s)
    check_real_stats(real_stats, fake.info["features"], fake.num_features)
    return frechet_distance(real_stats, fake)


# --- the run: who computes, who waits ----------------------------------------------------------------
def fid_over_samples(
    generate_fn: GenerateFn,
    num_samples: int,
    real_stats: FeatureStats,
    feature_extractor: nn.Module,
    shard_dir: str | Path,
    shard_size: int = 1000,
    rank: int | None = None,
    world_size: int | None = None,
    *,
    batch_size: int | None = None,
    base_seed: int = 0,
    keep_images: bool = False,
    run_key: Any = None,
    progress: bool = True,
) -> float:
    """FID of `num_samples` generated images against `real_stats`.

    Image i is image i of seed `base_seed`: ``generate_fn([.., i, ..], base_seed)`` in calls of
    `batch_size` indices; this rank (default: torch.distributed's, or RANK/WORLD_SIZE)
    generates its unfinished shards, then, after a barrier when torch.distributed is initialised,
    the statistics of all shards are combined; a shard another rank has not written yet raises
    `MissingShardsError` (run that rank, then `fid_from_shards`). Defaults read from `generate_fn`
    when it has them (`PipelineSampler` does): ``batch_size``, ``run_key``.
    """
    default_rank, default_world = rank_world()
    rank = default_rank if rank is None else rank
    world_size = default_world if world_size is None else world_size
    fingerprint = extractor_fingerprint(feature_extractor)
    dim = num_features_of(feature_extractor)
    check_real_stats(real_stats, fingerprint, dim)
    batch_size = int(batch_size or getattr(generate_fn, "batch_size", 16))
    run_key = run_key if run_key is not None else getattr(generate_fn, "run_key", None)

    meta = run_meta(shard_size, base_seed, fingerprint, run_key)
    run_hash = prepare_shard_dir(shard_dir, meta)
    generate_shards(
        generate_fn,
        lambda images: extract_features(feature_extractor, images),
        num_samples,
        shard_dir,
        run_hash,
        shard_size,
        batch_size=batch_size,
        base_seed=base_seed,
        rank=rank,
        world_size=world_size,
        keep_images=keep_images,
        progress=progress,
    )
    wait_s = 0.0
    if world_size > 1 and meets():
        barrier()
        wait_s = SHARDS_VISIBLE_WAIT_S
    return fid_from_shards(shard_dir, num_samples, real_stats, wait_s=wait_s)


# --- config-driven ----------------------------------------------------------------------------------
@dataclass
class FIDConfig:
    """The ``fid:`` settings of an evaluation config (Table 1: 50,000 samples at 512 px)."""

    real_path: str | None = None  # folder of real images (FFHQ, AFHQv2)
    shard_dir: str | None = None  # where the per-shard features (and kept images) go
    resolution: int = 512  # real images are resized to this; samples must have this size
    num_samples: int = 50_000
    shard_size: int = 1000
    batch_size: int = 16  # images per generate_fn call
    seed: int = 0  # image i of this seed (ccp.pipelines.sampling)
    keep_images: bool = False  # also write shard_dir/images/<i>.png
    inception_weights: str | None = None  # local weights-inception-2015-12-05-6726825d.pth (else the torch hub cache)
    antialias: bool = False  # False: TF-compatible resize to 299, as torchmetrics < 1.8 (the paper's numbers)
    center_crop: bool = False
    max_real_images: int | None = None  # null: every image of the folder
    stats_cache_dir: str | None = None  # null: $CCP_CACHE_DIR/fid_stats
    feature_batch_size: int = 50  # real images per Inception call
    num_workers: int = 4  # image decoding workers for the real statistics

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "FIDConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise FIDConfigError(f"unknown fid setting(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(values))

    def check(self, need_weights: bool = True) -> Path | None:
        """Everything checkable without models; returns the Inception weights path."""
        for key in ("resolution", "num_samples", "shard_size", "batch_size", "feature_batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FIDConfigError(f"fid.{key} must be a positive integer, got {value!r}")
        if self.num_samples < 2:
            raise FIDConfigError("fid.num_samples must be at least 2")
        if not self.shard_dir:
            raise FIDConfigError("fid.shard_dir is not set; set fid.shard_dir=/path/for/sample/shards")
        if not self.real_path or not Path(self.real_path).expanduser().is_dir():
            raise FIDConfigError(f"fid.real_path={self.real_path} is not a folder; set it to the real images (e.g. data/ffhq)")
        return resolve_inception_weights(self.inception_weights) if need_weights else None


def run_fid(
    cfg: FIDConfig | Mapping[str, Any],
    generate_fn: GenerateFn,
    *,
    feature_extractor: nn.Module | None = None,
    device: str | torch.device | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    run_key: Any = None,
    progress: bool = True,
) -> float:
    """Check the config and the Inception weights, build the extractor, get the (cached) real
    statistics, then generate and measure. Nothing is generated before all checks pass; a CLI
    should call ``FIDConfig.check()`` itself before it loads the diffusion model."""
    cfg = cfg if isinstance(cfg, FIDConfig) else FIDConfig.from_mapping(cfg)
    weights = cfg.check(need_weights=feature_extractor is None)
    for axis in ("height", "width"):
        size = getattr(generate_fn, axis, None)
        if size is not None and size != cfg.resolution:
            raise FIDConfigError(
                f"samples are {axis} {size} but fid.resolution={cfg.resolution}: the real images are resized to "
                "fid.resolution, so sample at that size (or set fid.resolution to the sample size)"
            )
    if feature_extractor is None:
        feature_extractor = inception_feature_extractor(weights, device, antialias=cfg.antialias)
    real = rank_zero_computes(lambda: real_statistics(
        cfg.real_path,
        feature_extractor,
        resolution=cfg.resolution,
        center_crop=cfg.center_crop,
        max_images=cfg.max_real_images,
        cache_dir=cfg.stats_cache_dir,
        batch_size=cfg.feature_batch_size,
        num_workers=cfg.num_workers,
        progress=progress,
    ))
    return fid_over_samples(
        generate_fn,
        cfg.num_samples,
        real,
        feature_extractor,
        cfg.shard_dir,
        cfg.shard_size,
        rank,
        world_size,
        batch_size=cfg.batch_size,
        base_seed=cfg.seed,
        keep_images=cfg.keep_images,
        run_key=run_key,
        progress=progress,
    )
