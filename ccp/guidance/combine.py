"""The arithmetic of GCFG (Eq. 3, Algorithm 1) as pure functions on tensors."""

from __future__ import annotations

from typing import Sequence

import torch


def combine(uncond: torch.Tensor | None, conditionals: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """eps = eps_0 + sum_i w_i (eps_i - eps_0), accumulated in term order as in Algorithm 1.

    `uncond=None` is allowed only when the weights sum to one, where eps_0's coefficient vanishes
    and eps = sum_i w_i eps_i (so a caller can skip evaluating it).
    """
    if len(conditionals) != len(weights):
        raise ValueError(f"{len(conditionals)} predictions but {len(weights)} weights")
    if uncond is None:
        if not conditionals:
            raise ValueError("nothing to combine: no unconditional prediction and no terms")
        guided = weights[0] * conditionals[0]
        for w, eps in zip(weights[1:], conditionals[1:]):
            guided = guided + w * eps
        return guided
    guided = uncond
    for w, eps in zip(weights, conditionals):
        guided = guided + w * (eps - uncond)
    return guided


def reference_prediction(uncond: torch.Tensor | None, conditionals: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """The prediction that guidance extrapolates from: the weight-normalised conditional
    eps_0 + sum_i (w_i / sum w)(eps_i - eps_0). With one term it is that term's prediction,
    which is what diffusers rescales towards."""
    total = sum(weights)
    if len(conditionals) == 1:
        return conditionals[0]
    if total == 0 or not conditionals:
        if uncond is None:
            raise ValueError("no reference prediction: weights sum to zero and no unconditional")
        return uncond
    return combine(uncond, conditionals, [w / total for w in weights])


def rescale(guided: torch.Tensor, reference: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, §3.4): match the per-sample std of `reference`, mix by phi."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    return rescale_noise_cfg(guided, reference, guidance_rescale=phi)
