"""Sample-based metrics during training: a Lightning callback that every N optimizer steps
measures FID (and optionally text alignment) of the current model on a small sample.

The model is sampled exactly as `ccp-eval` samples an export: the method's
``sampling_pipeline(prior)`` (which goes through export and ``load_export``) with the EMA weights
swapped in when an `EMACallback` is present (as `ValidationGrid` does), and the method's own
``default_guidance`` at the given weights. Values go to every logger of the trainer as
``eval/fid`` and ``eval/text_alignment`` at the current step, from global rank 0 only; the other
ranks carry on and wait at their next collective, so keep the sample small (a few hundred
images at most) or the collective may time out.

A small-sample FID is biased upwards and only useful as a trend within a run; the reported
numbers come from `ccp-eval` (50,000 samples).
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from collections.abc import Sequence

import lightning as L
import torch
from torch import nn

from ccp.evaluation.attributes import AttributePredictor
from ccp.evaluation.fid import FeatureStats, fid_over_samples
from ccp.evaluation.generation import PipelineSampler
from ccp.methods.base import PromptTemplate
from ccp.training.callbacks import EMACallback

log = logging.getLogger(__name__)


class SampleMetrics(L.Callback):
    """Every `every_n_steps` optimizer steps: FID of `num_samples` unconditional samples against
    `real_stats` (computed beforehand with `ccp.evaluation.fid.real_statistics` and the same
    `feature_extractor`), and, with a `predictor`, the text alignment over `prompts`
    (`images_per_prompt` each). Logged as ``eval/fid`` and ``eval/text_alignment``; the last
    values are in `self.last`.
    """

    def __init__(
        self,
        prior,
        template: PromptTemplate,
        real_stats: FeatureStats,
        feature_extractor: nn.Module,
        every_n_steps: int = 1000,
        num_samples: int = 256,
        *,
        concept_weight: float = 1.0,
        control_weight: float = 5.0,
        steps: int = 25,
        height: int | None = None,
        width: int | None = None,
        batch_size: int = 8,
        seed: int = 0,
        predictor: AttributePredictor | None = None,
        prompts: Sequence[str] = ("wearing glasses", "smiling"),
        images_per_prompt: int = 8,
    ):
        if every_n_steps < 1 or num_samples < 2:
            raise ValueError(f"every_n_steps must be >= 1 and num_samples >= 2, got {every_n_steps}, {num_samples}")
        self.prior, self.template = prior, template
        self.real_stats, self.feature_extractor = real_stats, feature_extractor
        self.every_n_steps, self.num_samples = int(every_n_steps), int(num_samples)
        self.concept_weight, self.control_weight = float(concept_weight), float(control_weight)
        self.steps, self.height, self.width = int(steps), height, width
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.predictor, self.prompts, self.images_per_prompt = predictor, tuple(prompts), int(images_per_prompt)
        if predictor is not None:
            predictor.check(self.prompts)  # an unknown prompt fails at construction, not mid-training
        self.last: dict[str, float] = {}
        self._done = -1

    def measure(self, pl_module) -> dict[str, float]:
        """The metrics of the module's current weights (call with the weights to measure in place)."""
        method = pl_module.method
        method_cls = type(method)
        pipe, denoiser = method.sampling_pipeline(self.prior)
        pipe = pipe.to(pl_module.device)
        pipe.set_progress_bar_config(disable=True)
        spec = method_cls.default_guidance(denoiser, self.template, None, self.concept_weight, self.control_weight)
        sampler = PipelineSampler(pipe, spec, num_inference_steps=self.steps, height=self.height, width=self.width,
                                  batch_size=self.batch_size)
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
            result = text_alignment(pipe, denoiser, method_cls, self.template, self.predictor, config, progress=False)
            metrics["eval/text_alignment"] = float(result["mean"])
        return metrics

    def _run(self, trainer, pl_module) -> None:
        ema = next((cb for cb in trainer.callbacks if isinstance(cb, EMACallback)), None)
        context = ema.swapped_in(pl_module) if ema is not None and ema.ema is not None else contextlib.nullcontext()
        was_training = pl_module.training
        pl_module.eval()
        try:
            with context, torch.no_grad():
                metrics = self.measure(pl_module)
        finally:
            pl_module.train(was_training)
        self.last = metrics
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if not all(math.isfinite(v) for v in metrics.values()):
            log.warning("step %d: non-finite evaluation metric(s) %s", step, metrics)
        log.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if trainer.global_rank != 0 or step == 0 or step % self.every_n_steps or self._done == step:
            return  # also skips the extra micro-batches of one step under gradient accumulation
        self._done = step
        self._run(trainer, pl_module)
