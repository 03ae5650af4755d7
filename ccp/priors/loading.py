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
    allow_download: bool = False,
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """Load an SD v1.x, SD 2.x (`StableDiffusionPipeline`) or SDXL (`StableDiffusionXLPipeline`) prior.

    A local folder is checked first so that a missing component is reported by name and a
    transformer prior (SD3, FLUX) is refused; a hub id (``owner/name``) goes to ``from_pretrained``
    (SDXL when the id says "xl") and is read from the local Hugging Face cache only, unless
    `allow_download` (``prior.allow_download=true``). `family` (sd1, sd2, sdxl or None/auto) refuses
    another family.
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
                                                             add_watermarker=False, local_files_only=not allow_download)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(
                name, torch_dtype=dtype, variant=variant, safety_checker=None, requires_safety_checker=False,
                local_files_only=not allow_download,
            )
    except OSError as err:  # hub id unreachable, or not in the cache while downloads are off
        offline = "" if allow_download else (
            f"\n{name!r} is not in the local Hugging Face cache and ccp does not download unless told to: set "
            "prior.allow_download=true, or download it first and pass the folder as prior.path.")
        raise PriorNotFoundError(f"could not load prior {name!r}: {err}{offline}\n{FAMILIES[found].how_to_get}") from err
    check_family(family_of(pipe), family, f"prior {name!r}")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


def load_controlnet(name_or_path: str | Path, dtype: torch.dtype | str | None = None,
                    allow_download: bool = False) -> ControlNetModel:
    """A diffusers ControlNet folder, or a hub id read from the local cache only unless `allow_download`."""
    name = str(name_or_path)
    if looks_like_path(name) and not (Path(name).expanduser() / "config.json").is_file():
        raise PriorNotFoundError(
            f"ControlNet folder {name} has no config.json. Point controlnet.path at a diffusers ControlNet "
            "folder, e.g. lllyasviel/sd-controlnet-canny downloaded with huggingface-cli."
        )
    try:
        return ControlNetModel.from_pretrained(name, torch_dtype=resolve_dtype(dtype), local_files_only=not allow_download)
    except OSError as err:
        raise PriorNotFoundError(
            f"could not load ControlNet {name!r}: {err}\nDownload it first and pass the folder, or set "
            "prior.allow_download=true to let ccp fetch hub ids.") from err


def auto_dtype(device: torch.device | str | None) -> torch.dtype:
    """Sampling precision for `device`: bf16 on a CUDA GPU that has it, else fp16 there (its VAE
    upcast where the model asks for it); fp32 on a CPU, where half precision is slow or emulated."""
    device = torch.device(device if device is not None else "cpu")
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device | str | None = None) -> torch.dtype | None:
    """A torch dtype from its name; ``"auto"``: `auto_dtype` of `device`."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) == "auto":
        return auto_dtype(device)
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}
    value = getattr(torch, aliases.get(str(dtype), str(dtype)), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, float32, float16, bfloat16")
    return value
