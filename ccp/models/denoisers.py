"""Uniform wrappers so that GCFG can call any denoiser the same way.

A denoiser takes a batch of noisy latents, the timestep and the batched condition tensors it
needs, and returns the noise prediction. What each kind needs is declared, so a guidance spec
can be checked before any compute.
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel


@dataclass
class BatchedCondition:
    """For a denoiser with several ControlNets, the three control fields are tuples, one entry per ControlNet.
    SDXL adds the pooled text embedding and the size/crop time ids (its UNet's added conditioning)."""

    prompt_embeds: torch.Tensor | None = None  # [B, 77, D]
    control_image: torch.Tensor | tuple[torch.Tensor, ...] | None = None  # [B, 3, H, W] in [0, 1]
    control_scale: torch.Tensor | tuple[torch.Tensor, ...] | None = None  # [B] per-sample ControlNet strength
    # the one strength when all samples share it (known on the host: no sync)
    uniform_control_scale: float | tuple[float | None, ...] | None = None
    pooled_embeds: torch.Tensor | None = None  # [B, P] SDXL: text_encoder_2's projected output
    time_ids: torch.Tensor | None = None  # [B, 6] SDXL: original size, crop top-left, target size

    def to(self, dtype: torch.dtype) -> "BatchedCondition":
        """The floating tensors in `dtype` (a denoiser's own, when denoisers of several dtypes are mixed)."""
        cast = lambda t: t if t is None or t.dtype == dtype else t.to(dtype)  # noqa: E731
        image = tuple(map(cast, self.control_image)) if isinstance(self.control_image, tuple) else cast(self.control_image)
        return dataclasses.replace(self, prompt_embeds=cast(self.prompt_embeds), control_image=image,
                                   pooled_embeds=cast(self.pooled_embeds), time_ids=cast(self.time_ids))

    def added_cond_kwargs(self) -> dict[str, torch.Tensor] | None:
        """SDXL's added conditioning for a text UNet or ControlNet (None on SD v1.x/2.x)."""
        if self.pooled_embeds is None and self.time_ids is None:
            return None
        return {"text_embeds": self.pooled_embeds, "time_ids": self.time_ids}


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
        return self.unet(latents, t, encoder_hidden_states=cond.prompt_embeds,
                         added_cond_kwargs=cond.added_cond_kwargs(), return_dict=False)[0]

    def modules(self):
        return [self.unet]


class ControlNetDenoiser(Denoiser):
    """A UNet steered by one ControlNet, or by several whose residuals are summed as diffusers'
    MultiControlNetModel sums them (control guidance, Fig. 4b)."""

    takes_prompt = True
    takes_control_image = True
    kind = "controlnet"

    def __init__(self, unet: UNet2DConditionModel, controlnet: ControlNetModel | MultiControlNetModel):
        self.unet = unet
        self.controlnet = controlnet
        self.nets = list(controlnet.nets) if isinstance(controlnet, MultiControlNetModel) else [controlnet]

    @property
    def num_controlnets(self) -> int:
        return len(self.nets)

    def __call__(self, latents, t, cond):
        several = isinstance(self.controlnet, MultiControlNetModel)
        images = cond.control_image if several else (cond.control_image,)
        scales = cond.control_scale if several else (cond.control_scale,)
        uniforms = cond.uniform_control_scale if several else (cond.uniform_control_scale,)
        added = cond.added_cond_kwargs()
        down, mid = None, None
        for net, image, scale, uniform_scale in zip(self.nets, images, scales, uniforms):
            uniform = scale is None or uniform_scale is not None
            net_down, net_mid = net(
                latents,
                t,
                encoder_hidden_states=cond.prompt_embeds,
                controlnet_cond=image,
                conditioning_scale=1.0 if scale is None else (uniform_scale if uniform else 1.0),
                added_cond_kwargs=added,
                return_dict=False,
            )
            if not uniform:  # several control strengths in one batch: scale residuals per sample
                per_sample = scale.to(device=net_mid.device, dtype=net_mid.dtype).view(-1, 1, 1, 1)
                net_down = [d * per_sample for d in net_down]
                net_mid = net_mid * per_sample
            # summed in MultiControlNetModel's order, so one term equals diffusers' multi-ControlNet call
            down = net_down if down is None else [a + b for a, b in zip(down, net_down)]
            mid = net_mid if mid is None else mid + net_mid
        return self.unet(
            latents,
            t,
            encoder_hidden_states=cond.prompt_embeds,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]

    def modules(self):
        return [self.unet, self.controlnet]


class LoRADenoiser(Denoiser):
    """The prior UNet with one LoRA adapter switched on for this call only.

    The adapter's layers wrap the prior's own modules (peft), so there is no second UNet: the
    base weights are the prior's tensors, and the adapter is off for every other denoiser's call."""

    takes_prompt = True
    kind = "unet"

    def __init__(self, unet: UNet2DConditionModel, adapter: str):
        self.unet = unet
        self.adapter = adapter

    def __call__(self, latents, t, cond):
        with adapter_enabled(self.unet, self.adapter):
            return self.unet(latents, t, encoder_hidden_states=cond.prompt_embeds,
                             added_cond_kwargs=cond.added_cond_kwargs(), return_dict=False)[0]

    def modules(self):
        return [self.unet]


@contextlib.contextmanager
def adapter_enabled(unet: UNet2DConditionModel, adapter: str):
    """`adapter` alone active inside the block; every adapter off after it (the prior's state)."""
    unet.enable_adapters()
    unet.set_adapter(adapter)
    try:
        yield
    finally:
        unet.disable_adapters()


class ConceptDenoiser(Denoiser):
    """The null-text concept UNet: no text, no condition (concept guidance). On SDXL it still takes
    the size/crop time ids, which describe the image; its pooled text part is a fixed buffer."""

    kind = "concept"

    def __init__(self, unet: UNet2DConditionModel):
        self.unet = unet

    def __call__(self, latents, t, cond):
        if cond.time_ids is None:
            return self.unet(latents, t, encoder_hidden_states=None, return_dict=False)[0]
        return self.unet(latents, t, encoder_hidden_states=None, added_cond_kwargs={"time_ids": cond.time_ids},
                         return_dict=False)[0]

    def modules(self):
        return [self.unet]
