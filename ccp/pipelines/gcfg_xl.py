"""GCFG on SDXL priors: the same guidance plan and Eq. 3 as `GCFGPipeline`, with SDXL's conditioning.

Per condition, a text denoiser gets what diffusers' `StableDiffusionXLPipeline.encode_prompt`
computes: both text encoders' penultimate hidden states concatenated, and text_encoder_2's pooled
(projected) embedding. Every condition, the concept model's too, carries the size/crop time ids
(original size, crop top-left, target size), which describe the image rather than the text.

The empty prompt: with ``force_zeros_for_empty_prompt`` (SDXL base's config), diffusers' CFG uses
zero text and pooled embeddings for its unconditional branch; here every text condition whose
prompt is empty (the default unconditional ``Condition(prompt="")``, or a term with prompt "") is
those zeros. Without the flag, "" is encoded like any prompt. (diffusers encodes an explicit
``negative_prompt=""``; in GCFG an empty negative term is the zeros, like the unconditional.)
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ccp.pipelines.gcfg import GCFGPipeline

logger = logging.getLogger(__name__)


class GCFGXLPipeline(GCFGPipeline):
    """`GCFGPipeline` for SDXL priors: two text encoders, pooled embeddings and time ids per condition.

    Only prompt encoding, the batched conditions (with the size conditioning `__call__` takes:
    original_size, crops_coords_top_left, target_size) and VAE upcasting differ from the base;
    the denoisers, the plan (one batched call per denoiser per step), Eq. 3, img2img and
    inpainting are the base's."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    prior_families = ("sdxl",)

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        concept_unet: UNet2DConditionModel | None = None,
        controlnet: ControlNetModel | None = None,
        force_zeros_for_empty_prompt: bool = True,
    ):
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                         concept_unet=concept_unet, controlnet=controlnet)
        self.register_modules(text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)

    @classmethod
    def _prior_components(cls, prior) -> dict[str, Any]:
        return dict(
            super()._prior_components(prior),
            text_encoder_2=prior.text_encoder_2,
            tokenizer_2=prior.tokenizer_2,
            force_zeros_for_empty_prompt=bool(prior.config.get("force_zeros_for_empty_prompt", True)),
        )

    def add_denoiser(
        self, name: str, unet: UNet2DConditionModel, controlnet: ControlNetModel | MultiControlNetModel | None = None
    ) -> None:
        """As `GCFGPipeline.add_denoiser`, for SDXL UNet checkpoints: they share the prior's two text encoders."""
        if isinstance(unet, UNet2DConditionModel):
            mine, theirs = self.unet.config, unet.config
            keys = ("cross_attention_dim", "addition_embed_type", "projection_class_embeddings_input_dim")
            if any(mine.get(k) != theirs.get(k) for k in keys):
                raise ValueError(
                    f"add_denoiser({name!r}): this UNet's text conditioning "
                    f"({', '.join(f'{k}={theirs.get(k)}' for k in keys)}) does not fit the SDXL prior's "
                    f"({', '.join(f'{k}={mine.get(k)}' for k in keys)}); add an SDXL UNet checkpoint"
                )
        super().add_denoiser(name, unet, controlnet=controlnet)

    # --- conditions --------------------------------------------------------------------------
    def encode_prompt(self, prompt: str, device: torch.device | None = None) -> torch.Tensor:
        """[1, 77, D1 + D2] text embedding as `StableDiffusionXLPipeline.encode_prompt` computes it."""
        return self.encode_text(prompt, device)["prompt_embeds"]

    def encode_text(self, prompt: str, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """prompt_embeds [1, 77, D1 + D2] and pooled_embeds [1, P], as diffusers' SDXL pipeline
        (zeros for the empty prompt under force_zeros_for_empty_prompt, see the module doc), on
        `device` (None: the pipeline's execution device)."""
        device = self._execution_device if device is None else device
        hidden, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            if encoder is None:  # e.g. a refiner-like prior without the first encoder
                continue
            text = self.maybe_convert_prompt(prompt, tokenizer)  # multi-vector textual inversion
            ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            untruncated = tokenizer(text, padding="longest", return_tensors="pt").input_ids
            if untruncated.shape[-1] > ids.shape[-1]:
                removed = tokenizer.batch_decode(untruncated[:, tokenizer.model_max_length - 1 : -1])
                logger.warning("prompt longer than %d tokens was truncated as CLIP does; dropped: %r",
                               tokenizer.model_max_length, removed[0])
            out = encoder(ids.to(device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # the projected encoder's pooled output
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        embeds = torch.cat(hidden, dim=-1).to(dtype=self.text_encoder_2.dtype, device=device)
        if not prompt and self.config.force_zeros_for_empty_prompt:
            embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        return {"prompt_embeds": embeds, "pooled_embeds": pooled.to(device)}

    def image_conditions(
        self,
        height: int,
        width: int,
        device: torch.device | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """time_ids [1, 6]: (original size, crop top-left, target size), diffusers' defaults (h, w), (0, 0), (h, w)."""
        ids = [*(original_size or (height, width)), *crops_coords_top_left, *(target_size or (height, width))]
        config = self.unet.config
        if config.get("addition_embed_type") == "text_time":
            passed = config.addition_time_embed_dim * len(ids) + self.text_encoder_2.config.projection_dim
            expected = self.unet.add_embedding.linear_1.in_features
            if passed != expected:
                raise ValueError(
                    f"the UNet's added conditioning takes {expected} features but {len(ids)} time ids and a "
                    f"{self.text_encoder_2.config.projection_dim}-d pooled embedding give {passed}; this pipeline "
                    "supports SDXL base-style UNets (size/crop/target time ids, no aesthetic score)"
                )
        device = self._execution_device if device is None else device
        return {"time_ids": torch.tensor([ids], dtype=torch.float32, device=device)}

    # --- the VAE: fp16 SDXL VAEs overflow, so diffusers runs them in fp32 (force_upcast) ------------
    @contextlib.contextmanager
    def _vae_upcast(self):
        upcast = self.vae.dtype == torch.float16 and self.vae.config.get("force_upcast", False)
        if upcast:
            self.vae.to(dtype=torch.float32)
        try:
            yield
        finally:
            if upcast:
                self.vae.to(dtype=torch.float16)

    def decode_latents(self, latents: torch.Tensor, generator=None) -> torch.Tensor:
        with self._vae_upcast():
            return super().decode_latents(latents, generator)

    def _encode(self, image: torch.Tensor, generator) -> torch.Tensor:
        with self._vae_upcast():
            return super()._encode(image.to(self.vae.dtype), generator)
