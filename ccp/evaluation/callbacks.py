"""Sample-based metrics during training: a Lightning callback that every N optimizer steps
measures FID (and optionally text alignment) of the current model on a small sample.

The model is sampled as `ccp-eval` samples an export: the module's `trained_model()` (the
method's in-memory ``sampling_pipeline(prior)``) with the EMA weights swapped in when an
`EMACallback` is present (as `ValidationGrid` does), and the method's own ``default_guidance`` at
the given weights. Under DDP every rank builds the feature extractor on its own device and
generates its share of the sample (image i on rank i mod world size); the feature statistics are
summed over ranks, so every rank gets the same FID. The real statistics are computed once, on
global rank 0 (cached on disk), and broadcast. Text alignment runs on rank 0 and is broadcast.
Values go to the loggers as ``eval/fid`` and ``eval/text_alignment`` at the current step.

A small-sample FID is biased upwards and only useful as a trend within a run; the reported
numbers come from `ccp-eval` (50,000 samples).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from torch import nn

from ccp.distributed import rank_zero_computes
from ccp.evaluation.attributes import AttributePredictor
from ccp.evaluation.fid import (
    FeatureStats,
    FIDConfigError,
    RandomConvFeatures,
    extract_features,
    frechet_distance,
    inception_feature_extractor,
    real_statistics,
    resolve_inception_weights,
)
from ccp.evaluation.generation import PipelineSampler
from ccp.training.callbacks import evaluation_weights, sampling_on

log = logging.getLogger(__name__)


class SampleMetrics(L.Callback):
    """Every `every_n_steps` optimizer steps: FID of `num_samples` unconditional samples against
    the real images, and, with a `predictor`, the text alignment over `prompts`
    (`images_per_prompt` each). Logged as ``eval/fid`` and ``eval/text_alignment``; the last
    values are in `self.last`. ``every_n_steps=0`` turns it off.

    The real side: `real_stats` and a `feature_extractor` module as given, or, from a config,
    `real_path` with ``feature_extractor="inception"`` (`inception_weights`, checked here, before
    training starts) or ``"random_conv"`` (tests only); their statistics are computed on global
    rank 0 when training starts (cached on disk by `real_statistics`).
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        num_samples: int = 256,
        *,
        real_stats: FeatureStats | None = None,
        feature_extractor: nn.Module | str = "inception",
        real_path: str | None = None,
        inception_weights: str | None = None,
        resolution: int | None = None,
        concept_weight: float = 1.0,
        control_weight: float = 5.0,
        steps: int = 25,
        batch_size: int = 8,
        seed: int = 0,
        predictor: AttributePredictor | None = None,
        prompts: Sequence[str] = ("wearing glasses", "smiling"),
        images_per_prompt: int = 8,
    ):
        self.every_n_steps, self.num_samples = int(every_n_steps), int(num_samples)
        self.real_stats, self.feature_extractor = real_stats, feature_extractor
        self.real_path, self.resolution = real_path, resolution
        self.concept_weight, self.control_weight = float(concept_weight), float(control_weight)
        self.steps, self.batch_size, self.seed = int(steps), int(batch_size), int(seed)
        self.predictor, self.prompts, self.images_per_prompt = predictor, tuple(prompts), int(images_per_prompt)
        self.last: dict[str, float] = {}
        self._done = -1
        self._inception_weights = None
        if not self.every_n_steps:
            return
        if self.every_n_steps < 0 or self.num_samples < 2:
            raise FIDConfigError(f"eval.every_n_steps must be >= 0 and eval.num_samples >= 2, got "
                                 f"{every_n_steps}, {num_samples}")
        if isinstance(feature_extractor, str):
            if feature_extractor not in ("inception", "random_conv"):
                raise FIDConfigError(f"eval.feature_extractor={feature_extractor!r}; use inception "
                                     "(random_conv: a random 8-d net for tests only)")
            if feature_extractor == "inception":
                self._inception_weights = resolve_inception_weights(inception_weights, "eval.inception_weights")  # names the file and where to put it
        if real_stats is None and not (real_path and Path(str(real_path)).expanduser().is_dir()):
            raise FIDConfigError(f"eval.real_path={real_path} is not a folder of real images; set eval.real_path")
        if predictor is not None:
            predictor.check(self.prompts)  # an unknown prompt fails at construction, not mid-training

    def on_fit_start(self, trainer, pl_module):
        # on_fit_start, not setup: only now is the module on this rank's own device
        if not self.every_n_steps:
            return
        device = pl_module.device
        if isinstance(self.feature_extractor, str):
            self.feature_extractor = (inception_feature_extractor(self._inception_weights, device=device)
                                      if self.feature_extractor == "inception" else RandomConvFeatures())
        self.feature_extractor.to(device)
        if self.real_stats is None:
            # rank 0 computes (and caches), the others wait in one broadcast: real_statistics meets no one
            self.real_stats = rank_zero_computes(
                lambda: real_statistics(str(self.real_path), self.feature_extractor, resolution=self.resolution))

    def measure(self, pl_module, rank: int = 0, world_size: int = 1, sum_over_ranks=None) -> dict[str, float]:
        """The metrics of the module's current weights (call with the weights to measure in place).
        This rank generates images ``rank, rank + world_size, ...``; `sum_over_ranks` (a tensor
        all-reduce) combines the feature statistics; with one process, leave it None."""
        model = pl_module.trained_model()
        model.pipe.set_progress_bar_config(disable=True)
        spec = model.guidance(None, self.concept_weight, self.control_weight)
        sampler = PipelineSampler(model.pipe, spec, num_inference_steps=self.steps, height=self.resolution,
                                  width=self.resolution, batch_size=self.batch_size)
        mine = list(range(rank, self.num_samples, world_size))
        stats = None
        with sampling_on(model, pl_module.device, [spec]):
            for start in range(0, len(mine), self.batch_size):
                images = sampler(mine[start:start + self.batch_size], self.seed)
                part = FeatureStats.from_features(extract_features(self.feature_extractor, images))
                stats = part if stats is None else stats.add_(part)
        if stats is None:  # more ranks than samples
            stats = FeatureStats.zeros(self.real_stats.num_features)
        if sum_over_ranks is not None:
            device = pl_module.device
            stats = FeatureStats(sum_over_ranks(stats.features_sum.to(device)).cpu(),
                                 sum_over_ranks(stats.features_cov_sum.to(device)).cpu(),
                                 int(sum_over_ranks(torch.tensor(float(stats.count), device=device)).item()))
        metrics = {"eval/fid": float(frechet_distance(self.real_stats, stats))}
        if self.predictor is not None and rank == 0:
            from ccp.evaluation.alignment import TextAlignmentConfig, text_alignment

            config = TextAlignmentConfig(steps=self.steps, height=sampler.height, width=sampler.width,
                                         batch_size=self.batch_size, seed=self.seed, concept_weight=self.concept_weight,
                                         control_weight=self.control_weight, prompts=self.prompts,
                                         images_per_prompt=self.images_per_prompt)
            with sampling_on(model, pl_module.device, [model.guidance(p, self.concept_weight, self.control_weight)
                                                       for p in self.prompts]):
                result = text_alignment(model, self.predictor, config, progress=False)
            metrics["eval/text_alignment"] = float(result["mean"])
        return metrics

    def _run(self, trainer, pl_module) -> None:
        world = trainer.world_size
        reduce = (lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if world > 1 else None
        with evaluation_weights(trainer, pl_module):
            metrics = self.measure(pl_module, trainer.global_rank, world, reduce)
        if world > 1 and self.predictor is not None:
            metrics = trainer.strategy.broadcast(metrics, src=0)
        self.last = metrics
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if trainer.global_rank != 0:
            return
        if not all(math.isfinite(v) for v in metrics.values()):
            log.warning("step %d: non-finite evaluation metric(s) %s", step, metrics)
        log.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not self.every_n_steps or step == 0 or step % self.every_n_steps or self._done == step:
            return  # also skips the extra micro-batches of one step under gradient accumulation
        self._done = step
        self._run(trainer, pl_module)
