"""A random, tiny Stable Diffusion 3 pipeline built from config, for offline tests of SD 3.x support.

It keeps SD3's layout (MMDiT transformer over 2x2 patches of an 8x VAE's latents, VAE latents
shifted and scaled, two CLIP text encoders with projections, flow-matching Euler scheduler) at a
size that samples in well under a second on a CPU. It has no T5 (`text_encoder_3`/`tokenizer_3`
are None): diffusers then feeds zeros in T5's place. The same seed gives the same weights.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from ccp.priors.tiny import TINY_TEXT_ENCODER_CONFIG, TINY_VAE_CONFIG, _seeded
from ccp.priors.tokenizer import build_clip_tokenizer

# CLIP-L-like and OpenCLIP-bigG-like, both with a projection: SD3 takes the pooled (projected)
# output of each, and the penultimate hidden states of each.
TINY_SD3_TEXT_ENCODER_CONFIG = dict(TINY_TEXT_ENCODER_CONFIG, projection_dim=32)
TINY_SD3_TEXT_ENCODER_2_CONFIG = dict(TINY_TEXT_ENCODER_CONFIG, hidden_act="gelu", projection_dim=32)

_CLIP_HIDDEN = TINY_SD3_TEXT_ENCODER_CONFIG["hidden_size"] + TINY_SD3_TEXT_ENCODER_2_CONFIG["hidden_size"]
_CLIP_POOLED = TINY_SD3_TEXT_ENCODER_CONFIG["projection_dim"] + TINY_SD3_TEXT_ENCODER_2_CONFIG["projection_dim"]

TINY_SD3_TRANSFORMER_CONFIG = dict(
    sample_size=8,  # latent pixels: a 64 px default image, like the tiny SD v1.5 prior
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=2,  # the last block is context_pre_only; two keep a full joint block as well
    attention_head_dim=8,
    num_attention_heads=4,
    # the pipeline concatenates the two CLIP hidden states on the feature axis (32 + 32) and, with
    # no T5, pads them to this width and appends zeros of this width for T5; a smaller value would
    # make that pad negative and silently crop the CLIP features
    joint_attention_dim=_CLIP_HIDDEN,
    caption_projection_dim=4 * 8,  # must equal the transformer width (heads x head dim)
    pooled_projection_dim=_CLIP_POOLED,  # the two projected CLIP embeddings concatenated
    pos_embed_max_size=8,  # patches per side: images up to 128 px
)

# SD3's VAE has no quant convs and shifts as well as scales its latents (its 16 channels are 4 here);
# shift and scale are SD3 medium's, so the `latents / scaling_factor + shift_factor` decode path runs.
TINY_SD3_VAE_CONFIG = dict(
    TINY_VAE_CONFIG,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)

# SD3 medium's scheduler (scheduler/scheduler_config.json).
SD3_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)


def build_tiny_sd3(seed: int = 0) -> StableDiffusion3Pipeline:
    """A random SD3-shaped text-to-image pipeline without T5; the same seed gives the same weights."""
    # seed offsets as in ccp.priors.tiny (seed + 3 is the ControlNet's there)
    transformer = _seeded(seed, lambda: SD3Transformer2DModel(**TINY_SD3_TRANSFORMER_CONFIG))
    vae = _seeded(seed + 1, lambda: AutoencoderKL(**TINY_SD3_VAE_CONFIG))
    text_encoder = _seeded(
        seed + 2, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SD3_TEXT_ENCODER_CONFIG))
    )
    text_encoder_2 = _seeded(
        seed + 4, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SD3_TEXT_ENCODER_2_CONFIG))
    )
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=build_clip_tokenizer(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=build_clip_tokenizer(pad_token="!"),  # SD3's second (OpenCLIP bigG) tokenizer pads with "!"
        text_encoder_3=None,
        tokenizer_3=None,
    )


def save_tiny_sd3(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny SD3 pipeline folder (safetensors) that `StableDiffusion3Pipeline.from_pretrained` loads."""
    out_dir = Path(out_dir)
    build_tiny_sd3(seed).save_pretrained(out_dir, safe_serialization=True)
    return out_dir
