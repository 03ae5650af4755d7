"""Loading UNet priors (SD v1.x, SD 2.x, SDXL) from a local folder or a hub id, with errors that say what to do."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import ControlNetModel, StableDiffusionPipeline, StableDiffusionXLPipeline

from ccp.config import ConfigError
from ccp.priors.families import FAMILIES, check_family, detect_family, family_of

REQUIRED_COMPONENTS = FAMILIES["sd1"].components
HOW_TO_GET_SD15 = FAMILIES["sd1"].how_to_get
HOW_TO_GET_ANY = (
    f"{HOW_TO_GET_SD15}\nSD 2.x and SDXL priors load the same way "
    "(`ccp-tiny-prior OUT_DIR --family sd2|sdxl` for offline ones)."
)


class PriorNotFoundError(ConfigError, FileNotFoundError):
    """A prior folder or hub id that cannot be loaded; the message says how to get one."""


def looks_like_path(name: str) -> bool:
    """A local path (exists, or starts like one) rather than an `owner/name` hub id."""
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists() or name.count("/") != 1


def check_prior_folder(folder: str | Path, family: str | None = None) -> Path:
    """Raise `PriorNotFoundError` naming what is missing from a diffusers SD/SDXL folder (the
    components of its own family), and a `ConfigError` when `family` asks for another family."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise PriorNotFoundError(f"prior folder {folder} does not exist.\n{HOW_TO_GET_ANY}")
    index = folder / "model_index.json"
    if not index.is_file():
        raise PriorNotFoundError(
            f"prior folder {folder} has no model_index.json, so it is not a diffusers pipeline folder.\n"
            f"{HOW_TO_GET_ANY}"
        )
    declared = json.loads(index.read_text())
    found = FAMILIES[detect_family(folder)]
    check_family(found.name, family, f"prior folder {folder}")
    missing = []
    for name in found.components:
        sub = folder / name
        if name not in declared or declared[name] in (None, [None, None]):
            missing.append(f"{name} (not declared in model_index.json)")
        elif not sub.is_dir() or not any(sub.iterdir()):
            missing.append(f"{name}/ (folder missing or empty)")
        elif name in found.models and not any(
            p.suffix in (".safetensors", ".bin") for p in sub.iterdir()
        ):
            missing.append(f"{name}/ weights (no .safetensors or .bin file)")
    if missing:
        raise PriorNotFoundError(
            f"{found.title} prior folder {folder} is incomplete; missing: {', '.join(missing)}.\n{found.how_to_get}"
        )
    return folder


def load_prior(
    name_or_path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    variant: str | None = None,
    family: str | None = None,
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """Load an SD v1.x, SD 2.x (`StableDiffusionPipeline`) or SDXL (`StableDiffusionXLPipeline`) prior.

    A local folder is checked first so that a missing component is reported by name and a
    transformer prior (SD3, FLUX) is refused; a hub id (``owner/name``) goes to ``from_pretrained``
    (SDXL when the id says "xl"). `family` (sd1, sd2, sdxl or None/auto) refuses another family.
    """
    dtype = resolve_dtype(dtype)
    name = str(name_or_path)
    if looks_like_path(name):
        name = str(check_prior_folder(name, family))
        found = detect_family(name)
    else:
        found = family if family not in (None, "", "auto") else ("sdxl" if "xl" in name.lower() else "sd1")
    try:
        if found == "sdxl":
            pipe = StableDiffusionXLPipeline.from_pretrained(name, torch_dtype=dtype, variant=variant,
                                                             add_watermarker=False)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(
                name, torch_dtype=dtype, variant=variant, safety_checker=None, requires_safety_checker=False
            )
    except OSError as err:  # hub id unreachable, or not cached while offline
        raise PriorNotFoundError(f"could not load prior {name!r}: {err}\n{FAMILIES[found].how_to_get}") from err
    check_family(family_of(pipe), family, f"prior {name!r}")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


def load_controlnet(name_or_path: str | Path, dtype: torch.dtype | str | None = None) -> ControlNetModel:
    name = str(name_or_path)
    if looks_like_path(name) and not (Path(name).expanduser() / "config.json").is_file():
        raise PriorNotFoundError(
            f"ControlNet folder {name} has no config.json. Point controlnet.path at a diffusers ControlNet "
            "folder, e.g. lllyasviel/sd-controlnet-canny downloaded with huggingface-cli."
        )
    return ControlNetModel.from_pretrained(name, torch_dtype=resolve_dtype(dtype))


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}
    value = getattr(torch, aliases.get(str(dtype), str(dtype)), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16")
    return value
