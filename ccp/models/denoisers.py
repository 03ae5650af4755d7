"""Uniform wrappers so that GCFG can call any denoiser the same way.

A denoiser takes a batch of noisy latents, the timestep and the batched condition tensors it
needs, and returns the noise prediction. What each kind needs is declared, so a guidance spec
can be checked before any compute.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from diffusers import ControlNetModel, UNet2DConditionModel


@dataclass
class BatchedCondition:
    prompt_embeds: torch.Tensor | None = None  # [B, 77, D]
    control_image: torch.Tensor | None = None  # [B, 3, H, W] in [0, 1]
    control_scale: torch.Tensor | None = None  # [B] per-sample ControlNet strength
    uniform_control_scale: float | None = None  # the one strength when all samples share it (known on the host: no sync)

    def to(self, dtype: torch.dtype) -> "BatchedCondition":
        """The floating tensors in `dtype` (a denoiser's own, when denoisers of several dtypes are mixed)."""
        cast = lambda t: t if t is None or t.dtype == dtype else t.to(dtype)  # noqa: E731
        return BatchedCondition(cast(self.prompt_embeds), cast(self.control_image), self.control_scale,
                                self.uniform_control_scale)


class Denoiser(ABC):
    takes_prompt: bool = False
    takes_control_image: bool = False
    kind: str = "denoiser"

    @abstractmethod
    def __call__(self, latents: torch.Tensor, t: torch.Tensor, cond: BatchedCondition) -> torch.Tensor:
        """Noise prediction for a batch."""

    @abstractmethod
    def modules(self) -> list[torch.nn.Module]:
        """The networks it runs (for device/dtype moves and parameter counts)."""

    @property
    def dtype(self) -> torch.dtype:
        """The dtype its inputs are cast to: its first network's first floating parameter's."""
        for param in self.modules()[0].parameters():
            if param.is_floating_point():
                return param.dtype
        return torch.float32


class TextUNetDenoiser(Denoiser):
    """An SD-family UNet with text cross-attention: the prior, or any other checkpoint."""

    takes_prompt = True
    kind = "unet"

    def __init__(self, unet: UNet2DConditionModel):
        self.unet = unet

    def __call__(self, latents, t, cond):
        return self.unet(latents, t, encoder_hidden_states=cond.prompt_embeds, return_dict=False)[0]

    def modules(self):
        return [self.unet]


class ControlNetDenoiser(Denoiser):
    """A UNet steered by a ControlNet (control guidance, Fig. 4b)."""

    takes_prompt = True
    takes_control_image = True
    kind = "controlnet"

    def __init__(self, unet: UNet2DConditionModel, controlnet: ControlNetModel):
        self.unet = unet
        self.controlnet = controlnet

    def __call__(self, latents, t, cond):
        scale = cond.control_scale
        uniform = scale is None or cond.uniform_control_scale is not None
        down, mid = self.controlnet(
            latents,
            t,
            encoder_hidden_states=cond.prompt_embeds,
            controlnet_cond=cond.control_image,
            conditioning_scale=1.0 if scale is None else (cond.uniform_control_scale if uniform else 1.0),
            return_dict=False,
        )
        if not uniform:  # several control strengths in one batch: scale residuals per sample
            per_sample = scale.to(device=mid.device, dtype=mid.dtype).view(-1, 1, 1, 1)
            down = [d * per_sample for d in down]
            mid = mid * per_sample
        return self.unet(
            latents,
            t,
            encoder_hidden_states=cond.prompt_embeds,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]

    def modules(self):
        return [self.unet, self.controlnet]


class ConceptDenoiser(Denoiser):
    """The null-text concept UNet: no text, no condition (concept guidance)."""

    kind = "concept"

    def __init__(self, unet: UNet2DConditionModel):
        self.unet = unet

    def __call__(self, latents, t, cond):
        return self.unet(latents, t, encoder_hidden_states=None, return_dict=False)[0]

    def modules(self):
        return [self.unet]
