"""Randomly initialised SD-shaped priors, built from config: no download, deterministic per seed.

`build_tiny_prior` is what the tests and the toy experiments use, in the shape of SD v1.5 (default),
SD 2.x (`family="sd2"`: OpenCLIP-style text encoder, linear projections, v-prediction) or SDXL
(`family="sdxl"`: two text encoders, the second with a projection whose pooled output and the
size/crop time ids are the UNet's added conditioning). `build_sd15_shaped_*` and
`build_sdxl_shaped_unet` give the real architectures with random weights, for parameter counts,
the null-text error at initialisation and speed benchmarks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ccp.priors.families import FAMILIES
from ccp.priors.tokenizer import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, build_clip_tokenizer

# SD v1.5's scheduler config (scheduler/scheduler_config.json of runwayml/stable-diffusion-v1-5).
SD15_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    clip_sample=False,
    prediction_type="epsilon",
    trained_betas=None,
)

SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    norm_num_groups=32,
)

SD15_TEXT_ENCODER_CONFIG = dict(
    vocab_size=CLIP_VOCAB_SIZE,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=CLIP_MAX_LENGTH,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
)

SD15_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
    scaling_factor=0.18215,
)

# The tiny prior keeps SD's shape (8x VAE, 4 latent channels, cross-attention UNet, CLIP text
# encoder over the full 49,408-token vocabulary) at a size that runs in milliseconds on a CPU.
TINY_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    attention_head_dim=4,
    cross_attention_dim=32,
    norm_num_groups=16,
)

TINY_TEXT_ENCODER_CONFIG = dict(
    vocab_size=CLIP_VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=CLIP_MAX_LENGTH,
    hidden_act="quick_gelu",
    projection_dim=32,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
)

TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=0.18215,
)


# SD 2.1's scheduler (stabilityai/stable-diffusion-2-1, 768 px): DDIM over v-prediction.
SD2_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="v_prediction",
    trained_betas=None,
)

# SDXL base 1.0's scheduler (stabilityai/stable-diffusion-xl-base-1.0).
SDXL_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    interpolation_type="linear",
    use_karras_sigmas=False,
    timestep_spacing="leading",
    steps_offset=1,
    trained_betas=None,
)

# SDXL base 1.0's UNet (unet/config.json), for the architecture with random weights.
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + the pooled 1280-d text embedding
    norm_num_groups=32,
)

# SDXL base 1.0's text encoders: CLIP ViT-L (penultimate layer used) and OpenCLIP bigG with its projection.
SDXL_TEXT_ENCODER_CONFIG = dict(
    TINY_TEXT_ENCODER_CONFIG, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    projection_dim=768,
)
SDXL_TEXT_ENCODER_2_CONFIG = dict(
    TINY_TEXT_ENCODER_CONFIG, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    hidden_act="gelu", projection_dim=1280,
)

# Tiny SD 2.x: the SD v1.5-sized tiny shapes with SD 2's linear projections, per-level heads and GELU text encoder.
TINY_SD2_UNET_CONFIG = dict(TINY_UNET_CONFIG, attention_head_dim=(2, 4), use_linear_projection=True)
TINY_SD2_TEXT_ENCODER_CONFIG = dict(TINY_TEXT_ENCODER_CONFIG, hidden_act="gelu")

# Tiny SDXL: SDXL's layout (no attention at the top level, deeper transformers lower down, text_time
# added conditioning) at tiny width. Text: 32-d CLIP-L-like + 32-d bigG-like with a 32-d projection.
TINY_SDXL_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2),
    cross_attention_dim=64,  # the two text encoders' hidden states concatenated: 32 + 32
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids x 8 + the pooled 32-d embedding
    norm_num_groups=16,
)
TINY_SDXL_TEXT_ENCODER_2_CONFIG = dict(TINY_TEXT_ENCODER_CONFIG, hidden_act="gelu", projection_dim=32)
TINY_SDXL_VAE_CONFIG = dict(TINY_VAE_CONFIG, scaling_factor=0.13025, force_upcast=True)


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_tiny_prior(seed: int = 0, family: str = "sd1") -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """A random SD-shaped text-to-image pipeline of `family` (sd1, sd2, sdxl); the same seed gives the same weights."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}: use one of {sorted(FAMILIES)}")
    if family == "sdxl":
        return _build_tiny_sdxl(seed)
    sd2 = family == "sd2"
    unet = _seeded(seed, lambda: UNet2DConditionModel(**(TINY_SD2_UNET_CONFIG if sd2 else TINY_UNET_CONFIG)))
    vae = _seeded(seed + 1, lambda: AutoencoderKL(**TINY_VAE_CONFIG))
    text_config = CLIPTextConfig(**(TINY_SD2_TEXT_ENCODER_CONFIG if sd2 else TINY_TEXT_ENCODER_CONFIG))
    text_encoder = _seeded(seed + 2, lambda: CLIPTextModel(text_config))
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        # SD 2.x's (OpenCLIP) tokenizer pads with "!" (id 0), SD v1.x's with the EOS
        tokenizer=build_clip_tokenizer(pad_token="!") if sd2 else build_clip_tokenizer(),
        unet=unet.eval(),
        scheduler=(DDIMScheduler.from_config(SD2_SCHEDULER_CONFIG) if sd2
                   else PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_tiny_sdxl(seed: int) -> StableDiffusionXLPipeline:
    unet = _seeded(seed, lambda: UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG))
    vae = _seeded(seed + 1, lambda: AutoencoderKL(**TINY_SDXL_VAE_CONFIG))
    text_encoder = _seeded(seed + 2, lambda: CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER_CONFIG)))
    text_encoder_2 = _seeded(
        seed + 4, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SDXL_TEXT_ENCODER_2_CONFIG))
    )
    return StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(pad_token="!"),  # SDXL's second (OpenCLIP bigG) tokenizer pads with "!"
        unet=unet.eval(),
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        add_watermarker=False,
    )


def build_sdxl_shaped_unet(seed: int = 0) -> UNet2DConditionModel:
    """SDXL base's UNet architecture (2.6 B parameters) with random weights."""
    return _seeded(seed, lambda: UNet2DConditionModel(**SDXL_UNET_CONFIG))


def build_sdxl_shaped_prior(seed: int = 0, meta: bool = False) -> StableDiffusionXLPipeline:
    """SDXL base's UNet and text encoders (random weights; on the meta device with `meta`: shapes
    only, no memory) with the tiny SDXL VAE, for parameter counts and speed benchmarks."""
    def build():
        unet = build_sdxl_shaped_unet(seed)
        text_encoder = _seeded(seed + 2, lambda: CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER_CONFIG)))
        text_encoder_2 = _seeded(
            seed + 4, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2_CONFIG))
        )
        return unet, text_encoder, text_encoder_2

    if meta:
        with torch.device("meta"):
            unet, text_encoder, text_encoder_2 = build()
    else:
        unet, text_encoder, text_encoder_2 = build()
    return StableDiffusionXLPipeline(
        vae=_seeded(seed + 1, lambda: AutoencoderKL(**TINY_SDXL_VAE_CONFIG)).eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(pad_token="!"),
        unet=unet.eval(),
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        add_watermarker=False,
    )


def build_tiny_controlnet(unet: UNet2DConditionModel, seed: int = 0) -> ControlNetModel:
    """A ControlNet for `unet` with random (non-zero) weights, so tests see its effect."""
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32, 32))
    # from_unet zero-initialises the output convolutions; randomise everything so a bug that
    # drops the ControlNet residuals cannot pass a comparison by accident.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in controlnet.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return controlnet.eval()


def build_sd15_shaped_unet(seed: int = 0) -> UNet2DConditionModel:
    return _seeded(seed, lambda: UNet2DConditionModel(**SD15_UNET_CONFIG))


def build_sd15_shaped_text_encoder(seed: int = 0) -> CLIPTextModel:
    return _seeded(seed, lambda: CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG)))


def build_sd15_shaped_prior(seed: int = 0) -> StableDiffusionPipeline:
    """SD v1.5's UNet, text encoder and tokenizer (random weights) with the tiny VAE."""
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**TINY_VAE_CONFIG).eval(),
        text_encoder=build_sd15_shaped_text_encoder(seed + 2).eval(),
        tokenizer=build_clip_tokenizer(),
        unet=build_sd15_shaped_unet(seed).eval(),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_prior(out_dir: str | Path, seed: int = 0, with_controlnet: bool = False, family: str = "sd1") -> Path:
    """Write a tiny prior folder laid out like SD v1.5, SD 2.x or SDXL (plus `controlnet/` when asked)."""
    out_dir = Path(out_dir)
    pipe = build_tiny_prior(seed, family=family)
    pipe.save_pretrained(out_dir)
    if with_controlnet:
        build_tiny_controlnet(pipe.unet, seed + 3).save_pretrained(out_dir / "controlnet")
    return out_dir
