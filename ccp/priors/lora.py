"""Reading a LoRA file for the prior UNet, and checking that it fits before anything is attached."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from ccp.config import ConfigError

UNET_PREFIX = "unet."
# the down (A: input side) and up (B: output side) matrices as diffusers' and peft's layouts name them
DOWN_UP_SUFFIXES = tuple((f".{name}.weight", axis) for names, axis in (
    (("lora_A", "lora.down", "lora_down"), 1), (("lora_B", "lora.up", "lora_up"), 0)) for name in names)


class LoRAShapeError(ConfigError, ValueError):
    """A LoRA that does not fit the prior UNet (another architecture, or not a LoRA at all)."""


def read_lora(lora: Any, weight_name: str | None = None) -> tuple[dict[str, torch.Tensor], dict | None, dict | None]:
    """(state dict, network alphas, metadata) in diffusers' format, through diffusers' own reader
    (diffusers, peft and kohya layouts). `lora`: a .safetensors file, a folder, or a state dict."""
    source = lora
    if isinstance(lora, (str, Path)):
        path = Path(lora).expanduser()
        if path.is_file():
            source, weight_name = str(path.parent), path.name
        elif path.is_dir():
            source = str(path)
        else:
            raise LoRAShapeError(f"LoRA {lora} does not exist; pass a .safetensors LoRA file or its folder")
    try:
        state_dict, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
            source, weight_name=weight_name, return_lora_metadata=True
        )
    except (OSError, ValueError, EnvironmentError) as err:
        raise LoRAShapeError(f"cannot read LoRA {lora}: {err}") from None
    return state_dict, alphas, metadata


def check_lora_fits(state_dict: dict[str, torch.Tensor], unet: UNet2DConditionModel, where: str = "LoRA") -> None:
    """Every LoRA pair targets a module of `unet` with matching in/out sizes; the first misfits
    are named. Text-encoder layers are refused: the term's prompt is encoded by the prior's text
    encoder, which the LoRA denoiser shares."""
    text_keys = [k for k in state_dict if not k.startswith(UNET_PREFIX)]
    if text_keys:
        raise LoRAShapeError(
            f"{where}: {len(text_keys)} LoRA tensors are not for the UNet (e.g. {text_keys[0]!r}); a LoRA "
            "denoiser shares the prior's text encoder, so export a UNet-only LoRA"
        )
    if not state_dict:
        raise LoRAShapeError(f"{where}: the file holds no LoRA tensors")
    modules = dict(unet.named_modules())
    misfits = []
    for key, tensor in state_dict.items():
        name = key[len(UNET_PREFIX):]
        for part, axis in DOWN_UP_SUFFIXES:
            if not name.endswith(part):
                continue
            module_name = name[: -len(part)]
            module = modules.get(module_name)
            base = getattr(getattr(module, "base_layer", module), "weight", None)
            if base is None:
                misfits.append(f"{module_name} (no such layer in the prior UNet)")
            elif tensor.shape[axis] != base.shape[axis] or (tensor.ndim != base.ndim and tensor.ndim > 2):
                side = "input" if axis == 1 else "output"
                misfits.append(f"{module_name} ({side} size {tensor.shape[axis]}, the prior's layer has {base.shape[axis]})")
    if misfits:
        shown = "; ".join(misfits[:3]) + (f"; and {len(misfits) - 3} more" if len(misfits) > 3 else "")
        raise LoRAShapeError(
            f"{where} does not fit the prior UNet: {shown}. It was trained for another architecture; "
            "use a LoRA trained on this prior (an SD v1.x LoRA for an SD v1.x prior)"
        )
