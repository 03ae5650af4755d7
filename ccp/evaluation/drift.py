"""Unconditional drift (§3.2, Appendix B): how far a method's unconditional model moved from the prior's.

A method samples with guidance ``eps_uncond + sum_i w_i (eps_i - eps_uncond)``; its unconditional
source is whatever its `default_guidance` names (baselines: their fine-tuned model on ""; ours:
the untouched prior on ""). Sampling that source alone (a `GuidanceSpec` with no terms) shows the
distribution the method falls back to. Drift compares ``N`` such samples with ``N`` samples of the
prior's own unconditional, drawn from the same seeds (image ``i`` from ``seed + i``):

* ``fid``: Fréchet distance between the two sample sets in a feature space (the toy digit
  classifier's penultimate layer at toy scale);
* ``style_share`` / ``prior_style_share``: the share of each set that a style classifier calls
  the concept style (a method whose unconditional learned the concept "leaks" it into samples
  that should be the prior's).

Nothing is special-cased: a method that leaves the prior's UNet untouched (ours, Textual
Inversion) gets ~0 because its samples are the prior's, not because it is skipped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ccp.evaluation.fid import FeatureStats, frechet_distance
from ccp.evaluation.generation import to_uint8_images
from ccp.guidance import GuidanceSpec
from ccp.pipelines.sampling import sample_batches

# uint8 images [n, 3, H, W] -> (features [n, D], style index [n])
Judge = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class DriftConfig:
    num_samples: int = 359
    steps: int = 25
    height: int = 32
    width: int = 32
    batch_size: int = 32
    seed: int = 0

    def check(self) -> None:
        for key, value in asdict(self).items():
            if key != "seed" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"drift.{key} must be a positive integer, got {value!r}")
        if self.num_samples < 2:
            raise ValueError("drift.num_samples must be at least 2 (FID needs a covariance)")


def prior_unconditional() -> GuidanceSpec:
    """The prior on the empty prompt (GuidanceSpec's default unconditional), alone."""
    return GuidanceSpec(terms=())


@dataclass
class UnconditionalSamples:
    features: torch.Tensor  # float [N, D]
    styles: torch.Tensor  # int64 [N], style index per sample

    def style_share(self, style: int) -> float:
        return float((self.styles == int(style)).float().mean())

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {"features": self.features.contiguous(), "styles": self.styles.contiguous()}


def sample_unconditional(pipe, spec: GuidanceSpec, judge: Judge, config: DriftConfig) -> UnconditionalSamples:
    """Images ``0 .. num_samples - 1`` of seed ``config.seed`` under `spec`, judged batch by batch
    (features and style), images not kept."""
    config.check()
    pipe.check_guidance(spec)
    features, styles = [], []
    for _, images in sample_batches(pipe, spec, range(config.num_samples), seed=config.seed,
                                    batch_size=config.batch_size, num_inference_steps=config.steps,
                                    height=config.height, width=config.width, output_type="pt"):
        f, s = judge(to_uint8_images(images))
        features.append(f.detach().cpu().double())
        styles.append(s.detach().cpu().long())
    return UnconditionalSamples(torch.cat(features), torch.cat(styles))


def drift(method: UnconditionalSamples, prior: UnconditionalSamples, style: int) -> dict[str, float]:
    """``{fid, style_share, prior_style_share, num_samples}`` of a method's unconditional samples
    against the prior's (same count, same seeds)."""
    if method.features.shape != prior.features.shape:
        raise ValueError(f"method samples {tuple(method.features.shape)} and prior samples "
                         f"{tuple(prior.features.shape)} differ; draw both with the same DriftConfig")
    fid = frechet_distance(FeatureStats.from_features(prior.features), FeatureStats.from_features(method.features))
    return {
        "fid": max(fid, 0.0),  # equal sets give ~-1e-12 from the matrix square root; FID is >= 0
        "style_share": method.style_share(style),
        "prior_style_share": prior.style_share(style),
        "num_samples": int(method.features.shape[0]),
    }
