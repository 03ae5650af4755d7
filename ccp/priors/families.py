"""The UNet prior families ccp handles (SD v1.x, SD 2.x, SDXL), told apart from a folder or a pipeline.

SD v1.x and SD 2.x share diffusers' `StableDiffusionPipeline` and differ only in configuration
(OpenCLIP text encoder, linear projections in the transformer blocks, often v-prediction at
768 px); SDXL has a second text encoder with a projection whose pooled output and the image's
size/crop "time ids" enter the UNet as added conditioning. Transformer priors (SD3, FLUX) have no
UNet and are refused by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ccp.config import ConfigError


@dataclass(frozen=True)
class PriorFamily:
    name: str
    title: str
    pipeline: str  # diffusers pipeline class
    components: tuple[str, ...]  # required, with weights where they are models
    models: tuple[str, ...]  # the components that hold weights
    how_to_get: str


_HUB = "huggingface-cli download {repo} --local-dir {folder}"

FAMILIES: dict[str, PriorFamily] = {
    "sd1": PriorFamily(
        "sd1", "SD v1.x", "StableDiffusionPipeline",
        ("unet", "vae", "text_encoder", "tokenizer", "scheduler"), ("unet", "vae", "text_encoder"),
        "To obtain SD v1.5, download it once on a machine with network access, e.g.\n  "
        + _HUB.format(repo="stable-diffusion-v1-5/stable-diffusion-v1-5", folder="/path/to/sd-v1-5")
        + "\nand pass that folder (prior.path=/path/to/sd-v1-5). For offline tests use `ccp-tiny-prior OUT_DIR`.",
    ),
    "sd2": PriorFamily(
        "sd2", "SD 2.x", "StableDiffusionPipeline",
        ("unet", "vae", "text_encoder", "tokenizer", "scheduler"), ("unet", "vae", "text_encoder"),
        "To obtain SD 2.1 (768 px, v-prediction), download it once on a machine with network access, e.g.\n  "
        + _HUB.format(repo="stabilityai/stable-diffusion-2-1", folder="/path/to/sd-2-1")
        + "\nand pass that folder (prior.path=/path/to/sd-2-1). For offline tests use "
        "`ccp-tiny-prior OUT_DIR --family sd2`.",
    ),
    "sdxl": PriorFamily(
        "sdxl", "SDXL", "StableDiffusionXLPipeline",
        ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
        ("unet", "vae", "text_encoder", "text_encoder_2"),
        "To obtain SDXL base 1.0, download it once on a machine with network access, e.g.\n  "
        + _HUB.format(repo="stabilityai/stable-diffusion-xl-base-1.0", folder="/path/to/sdxl-base")
        + "\n(add --include to skip the fp16 and .bin duplicates) and pass that folder "
        "(prior.path=/path/to/sdxl-base); for fp16 training also madebyollin/sdxl-vae-fp16-fix. "
        "For offline tests use `ccp-tiny-prior OUT_DIR --family sdxl`.",
    ),
}
SUPPORTED = ", ".join(f.title for f in FAMILIES.values())
# model_index.json entries of transformer (DiT/MMDiT) priors, which have no UNet to convert
_TRANSFORMER_PIPELINES = {
    "StableDiffusion3Pipeline": "SD3", "FluxPipeline": "FLUX", "PixArtAlphaPipeline": "PixArt-alpha",
    "PixArtSigmaPipeline": "PixArt-sigma", "SanaPipeline": "Sana", "AuraFlowPipeline": "AuraFlow",
}


class UnsupportedPriorFamilyError(ConfigError, ValueError):
    """A pipeline folder of a kind ccp does not personalise (yet); the message names what is supported."""


def family_from_index(index: dict, unet_config: dict | None, where: str) -> str:
    """The family of a diffusers pipeline from its model_index.json (and UNet config, for SD 2.x)."""
    class_name = str(index.get("_class_name", ""))
    if "transformer" in index or class_name in _TRANSFORMER_PIPELINES:
        kind = _TRANSFORMER_PIPELINES.get(class_name, f"a transformer prior ({class_name or 'unknown pipeline'})")
        raise UnsupportedPriorFamilyError(
            f"{where} is {kind}: transformer-based priors are not supported yet (there is no UNet whose "
            f"cross-attention the null-text concept model replaces). Supported: {SUPPORTED} "
            "(docs/transformer_priors.md says what one would take)."
        )
    if "text_encoder_2" in index or class_name.startswith("StableDiffusionXL"):
        return "sdxl"
    if "unet" not in index and not class_name.startswith("StableDiffusion"):
        raise UnsupportedPriorFamilyError(
            f"{where} declares no unet ({class_name or 'unknown pipeline'}); supported: {SUPPORTED}"
        )
    # SD 2.x's transformer blocks use linear projections (SD v1.x convolutions); its text is 1024-d
    if unet_config and (unet_config.get("use_linear_projection") or unet_config.get("cross_attention_dim") == 1024):
        return "sd2"
    return "sd1"


def detect_family(folder: str | Path) -> str:
    """`sd1`, `sd2` or `sdxl` for a diffusers pipeline folder (model_index.json present)."""
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    unet_file = folder / "unet" / "config.json"
    unet_config = json.loads(unet_file.read_text()) if unet_file.is_file() else None
    return family_from_index(index, unet_config, f"prior folder {folder}")


def family_of(pipe) -> str:
    """The family of a loaded pipeline (or anything with its components as attributes)."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    config = dict(pipe.unet.config)
    return "sd2" if config.get("use_linear_projection") or config.get("cross_attention_dim") == 1024 else "sd1"


def check_family(found: str, expected: str | None, where: str) -> None:
    """Refuse a prior of another family than the config asked for (e.g. an SDXL config on SD v1.5)."""
    if expected in (None, "", "auto"):
        return
    if expected not in FAMILIES:
        raise ConfigError(f"prior.family={expected!r}: use one of {sorted(FAMILIES)} or auto")
    if found != expected:
        raise ConfigError(
            f"{where} is {FAMILIES[found].title} but prior.family={expected} ({FAMILIES[expected].title}) was asked "
            f"for; point prior.path at a {FAMILIES[expected].title} folder or set prior.family={found} "
            "(or auto)"
        )
