"""One GCFG step's noise prediction (Eq. 3, Algorithm 1) as a function of its inputs alone.

It reads nothing from a pipeline: the latents, the timestep, the denoisers, the batched plan and
its weights come in as arguments, so any number of samples may step through it interleaved.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ccp.guidance import GuidancePlan, combine, reference_prediction, rescale
from ccp.models.denoisers import BatchedCondition, Denoiser


def guided_prediction(
    latents: torch.Tensor,
    t: torch.Tensor,
    denoisers: Mapping[str, Denoiser],
    plan: GuidancePlan,
    conditions: Mapping[str, BatchedCondition],
    scale_model_input: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    dtypes: Mapping[str, torch.dtype] | None = None,
) -> torch.Tensor:
    """The guided eps for `latents` [B, C, h, w] at timestep `t`.

    Each denoiser of `plan` runs once, on all the conditions that use it (`conditions`: per
    denoiser, B rows per condition in the plan's order, as `GCFGPipeline.batch_conditions` stacks
    them); Eq. 3 combines the predictions with the plan's weights, rescaled when its spec asks.
    The plan holds only terms of non-zero weight (and the unconditional only when its coefficient
    is non-zero), so what Eq. 3 multiplies by 0 is never evaluated.

    `scale_model_input`: the scheduler's input scaling (none when None). Denoisers may differ in
    dtype (a bf16 prior beside an fp32 concept UNet): each gets its inputs in its own dtype
    (`dtypes`, when the caller has read them once; else each denoiser's), and the predictions are
    combined in fp32."""
    outputs = {}
    for call in plan.calls:
        denoiser = denoisers[call.denoiser]
        dtype = (dtypes or {}).get(call.denoiser) or denoiser.dtype
        model_input = torch.cat([latents] * len(call.conditions))
        if scale_model_input is not None:
            model_input = scale_model_input(model_input, t)
        prediction = denoiser(model_input.to(dtype), t, conditions[call.denoiser].to(dtype))
        outputs[call.denoiser] = prediction.float()
    uncond, predictions = plan.split(outputs)
    weights = plan.spec.weights
    guided = combine(uncond, predictions, weights)
    if plan.spec.rescale > 0 and predictions:
        guided = rescale(guided, reference_prediction(uncond, predictions, weights), plan.spec.rescale)
    return guided
