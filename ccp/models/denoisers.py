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
        uniform = scale is None or bool((scale == scale[0]).all())
        down, mid = self.controlnet(
            latents,
            t,
            encoder_hidden_states=cond.prompt_embeds,
            controlnet_cond=cond.control_image,
            conditioning_scale=float(scale[0]) if scale is not None and uniform else 1.0,
            return_dict=False,
        )
        if not uniform:  # several control strengths in one batch: scale residuals per sample
            per_sample = scale.to(mid.dtype).view(-1, 1, 1, 1)
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
