"""Sample-based metrics during training: a Lightning callback that every N optimizer steps
measures FID (and optionally text alignment) of the current model on a small sample.

The model is sampled exactly as `ccp-eval` samples an export: the module's `trained_model()`
(the method's ``sampling_pipeline(prior)``, which goes through export and ``load_export``) with
the EMA weights swapped in when an `EMACallback` is present (as `ValidationGrid` does), and the
method's own ``default_guidance`` at the given weights. Values go to every logger of the trainer as
``eval/fid`` and ``eval/text_alignment`` at the current step, from global rank 0 only; the other
ranks carry on and wait at their next collective, so keep the sample small (a few hundred
images at most) or the collective may time out.

A small-sample FID is biased upwards and only useful as a trend within a run; the reported
numbers come from `ccp-eval` (50,000 samples).
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from torch import nn

from ccp.evaluation.attributes import AttributePredictor
from ccp.evaluation.fid import (
    FeatureStats,
    FIDConfigError,
    RandomConvFeatures,
    fid_over_samples,
    inception_feature_extractor,
    real_statistics,
    resolve_inception_weights,
)
from ccp.evaluation.generation import PipelineSampler
from ccp.training.callbacks import evaluation_weights

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
                self._inception_weights = resolve_inception_weights(inception_weights)  # names the file and where to put it
        if real_stats is None and not (real_path and Path(str(real_path)).expanduser().is_dir()):
            raise FIDConfigError(f"eval.real_path={real_path} is not a folder of real images; set eval.real_path")
        if predictor is not None:
            predictor.check(self.prompts)  # an unknown prompt fails at construction, not mid-training

    def setup(self, trainer, pl_module, stage):
        if not self.every_n_steps or trainer.global_rank != 0:
            return
        if isinstance(self.feature_extractor, str):
            self.feature_extractor = (inception_feature_extractor(self._inception_weights, device=pl_module.device)
                                      if self.feature_extractor == "inception" else RandomConvFeatures())
        self.feature_extractor.to(pl_module.device)
        if self.real_stats is None:
            self.real_stats = real_statistics(str(self.real_path), self.feature_extractor, resolution=self.resolution)

    def measure(self, pl_module) -> dict[str, float]:
        """The metrics of the module's current weights (call with the weights to measure in place)."""
        model = pl_module.trained_model()
        model.pipe.set_progress_bar_config(disable=True)
        spec = model.guidance(None, self.concept_weight, self.control_weight)
        sampler = PipelineSampler(model.pipe, spec, num_inference_steps=self.steps, height=self.resolution,
                                  width=self.resolution, batch_size=self.batch_size)
        with tempfile.TemporaryDirectory(prefix="ccp-eval-fid-") as shards:
            fid = fid_over_samples(sampler, self.num_samples, self.real_stats, self.feature_extractor, shards,
                                   shard_size=self.num_samples, rank=0, world_size=1, base_seed=self.seed,
                                   progress=False)
        metrics = {"eval/fid": float(fid)}
        if self.predictor is not None:
            from ccp.evaluation.alignment import TextAlignmentConfig, text_alignment

            config = TextAlignmentConfig(steps=self.steps, height=sampler.height, width=sampler.width,
                                         batch_size=self.batch_size, seed=self.seed, concept_weight=self.concept_weight,
                                         control_weight=self.control_weight, prompts=self.prompts,
                                         images_per_prompt=self.images_per_prompt)
            result = text_alignment(model, self.predictor, config, progress=False)
            metrics["eval/text_alignment"] = float(result["mean"])
        return metrics

    def _run(self, trainer, pl_module) -> None:
        with evaluation_weights(trainer, pl_module):
            metrics = self.measure(pl_module)
        self.last = metrics
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if not all(math.isfinite(v) for v in metrics.values()):
            log.warning("step %d: non-finite evaluation metric(s) %s", step, metrics)
        log.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if (not self.every_n_steps or trainer.global_rank != 0 or step == 0 or step % self.every_n_steps
                or self._done == step):
            return  # also skips the extra micro-batches of one step under gradient accumulation
        self._done = step
        self._run(trainer, pl_module)
