"""SDXL's conditioning in training, as GCFG feeds it to a denoiser at sampling.

SDXL's UNet takes, besides the text embedding, ``added_cond_kwargs={"text_embeds": pooled [B, P],
"time_ids": [B, 6]}``. The time ids are (original size h, w, crop top-left y, x, target size h, w):
in training, as diffusers' SDXL scripts build them, the source file's real size, the crop offset
and the training resolution; at sampling (GCFG's default) the sample's size, (0, 0), its size.

A fixed prompt is encoded as `GCFGXLPipeline.encode_text` encodes it: both encoders' penultimate
hidden states concatenated, text_encoder_2's pooled output, zeros for "" under
``force_zeros_for_empty_prompt``. Tokenising and encoding are split so that a method tokenises
once and encodes once (frozen encoders) or every step (a trained token).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ccp.priors.families import family_of

TIME_IDS = 6


def is_sdxl(prior) -> bool:
    return prior is not None and family_of(prior) == "sdxl"


def vae_scale_factor(prior) -> int:
    vae = getattr(prior, "vae", None)
    return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8


def target_size_of(batch: Mapping, vae_scale: int) -> tuple[int, int]:
    """(h, w) of the training images: the pixels' size, or the latents' size x the VAE factor."""
    for key, scale in (("pixel_values", 1), ("latents", vae_scale), ("latent_mean", vae_scale)):
        if key in batch:
            h, w = batch[key].shape[-2:]
            return int(h) * scale, int(w) * scale
    raise ValueError(f"a batch needs pixel_values, latents or latent_mean to size SDXL's time ids; got {sorted(batch)}")


def sdxl_time_ids(batch: Mapping, target_size: tuple[int, int]) -> torch.Tensor:
    """[B, 6] float32 time ids (original h, w, crop y, x, target h, w) of a training batch.

    Items without ``original_size`` (no source file, e.g. generated tensors) count as uncropped
    images of the target size, GCFG's default at sampling."""
    ref = next(v for v in batch.values() if torch.is_tensor(v))
    n, device = ref.shape[0], ref.device
    target = torch.tensor(target_size, dtype=torch.float32, device=device).expand(n, 2)
    original = batch.get("original_size")
    original = target if original is None else original.to(device=device, dtype=torch.float32)
    crop = batch.get("crop_top_left")
    crop = torch.zeros(n, 2, device=device) if crop is None else crop.to(device=device, dtype=torch.float32)
    return torch.cat([original, crop, target], dim=1)


def default_time_ids(latents: torch.Tensor, vae_scale: int) -> torch.Tensor:
    """[B, 6]: uncropped images of the latents' size, what GCFG uses at sampling by default."""
    h, w = latents.shape[-2] * vae_scale, latents.shape[-1] * vae_scale
    ids = torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32, device=latents.device)
    return ids.expand(latents.shape[0], -1)


def added_cond_kwargs(latents: torch.Tensor, dtype: torch.dtype, vae_scale: int, pooled: torch.Tensor | None,
                      time_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """SDXL UNet's added conditioning for a batch of `latents`; without `pooled`, time ids only (the
    null-text concept UNet holds its pooled text as a buffer)."""
    if time_ids is None:
        time_ids = default_time_ids(latents, vae_scale)
    added = {"time_ids": time_ids.to(device=latents.device, dtype=dtype)}
    if pooled is not None:
        added["text_embeds"] = pooled.to(dtype)
    return added


@dataclass
class SDXLText:
    """The (tokenizer, encoder) pairs SDXL encodes a prompt with, in `GCFGXLPipeline`'s order.
    ``encoders`` is an `nn.ModuleList` only to move them together; it is not part of a method's tree."""

    tokenizers: list
    encoders: nn.ModuleList
    force_zeros_for_empty_prompt: bool

    @classmethod
    def of(cls, prior, tokenizers=None, encoders=None) -> "SDXLText":
        """`prior`'s pairs (or the given replacements: copies with an added token), skipping an absent
        first encoder as the pipeline does."""
        tokenizers = tokenizers or [prior.tokenizer, prior.tokenizer_2]
        encoders = encoders or [prior.text_encoder, prior.text_encoder_2]
        pairs = [(t, e) for t, e in zip(tokenizers, encoders) if e is not None]
        return cls([t for t, _ in pairs], nn.ModuleList([e for _, e in pairs]),
                   bool(prior.config.get("force_zeros_for_empty_prompt", True)))

    def tokenize(self, prompt: str) -> list[torch.Tensor]:
        """[1, 77] ids per encoder, padded and truncated as the pipeline does."""
        return [t(prompt, padding="max_length", max_length=t.model_max_length, truncation=True,
                  return_tensors="pt").input_ids for t in self.tokenizers]

    def encode(self, ids: list[torch.Tensor], prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds [1, 77, D1 + D2], pooled [1, P]) of `prompt` tokenised as `ids`."""
        hidden, pooled = [], None
        for encoder, tokens in zip(self.encoders, ids):
            out = encoder(tokens.to(next(encoder.parameters()).device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # the projected encoder's pooled output
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        embeds = torch.cat(hidden, dim=-1).to(dtype=self.encoders[-1].dtype)
        if not prompt and self.force_zeros_for_empty_prompt:
            embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        return embeds, pooled


def encode_sdxl_prompt(prior, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled) of `prompt` through `prior`'s frozen encoders, without gradients."""
    text = SDXLText.of(prior)
    with torch.no_grad():
        embeds, pooled = text.encode(text.tokenize(prompt), prompt)
    return embeds.detach(), pooled.detach()
