"""Inputs that cannot start a GCFG sample, found before any model runs (and before any weights
load: a CLI checks its config with these first). Each error says how to fix the input."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from ccp.config import ConfigError
from ccp.guidance import Condition, GuidanceConfigError, GuidanceSpec


class ImageInputError(ConfigError, ValueError):
    """An init image, mask or strength that cannot start a sample; the message says how to fix it."""


def _used_sources(spec: GuidanceSpec) -> list:
    """(config path, source) of every source Eq. 3 evaluates for `spec`."""
    terms = [(f"guidance.terms.{t.name}", t.source) for t in spec.terms]
    return ([("guidance.unconditional", spec.unconditional)] if spec.needs_unconditional else []) + terms


def check_guidance_against(spec: GuidanceSpec, denoiser_kinds: dict[str, str]) -> None:
    """Validate a spec against the configured denoisers (name -> kind: unet, controlnet, concept).

    Cheap and model-free, so a CLI can call it before loading any weights.
    """
    takes_prompt = {"unet", "controlnet"}
    for where, source in _used_sources(spec):
        kind = denoiser_kinds.get(source.denoiser)
        if kind is None:
            raise GuidanceConfigError(
                f"{where} uses denoiser {source.denoiser!r}, which is not configured; configured: "
                f"{sorted(denoiser_kinds)}. Configure it (e.g. concept.path=... for 'concept', "
                f"controlnet.path=... for 'controlnet') or point {where}.denoiser at one of those."
            )
        condition: Condition = source.condition
        if kind == "concept" and condition.prompt:
            raise GuidanceConfigError(
                f"{where}: the null-text concept model takes no prompt (got {condition.prompt!r}); "
                "put the prompt in its own term on the prior (control guidance)."
            )
        if kind not in takes_prompt and condition.control_image is not None:
            raise GuidanceConfigError(f"{where}: denoiser {source.denoiser!r} ({kind}) takes no control image")
        if kind == "controlnet":
            image = condition.control_image
            if image is None:
                raise GuidanceConfigError(
                    f"{where} uses the ControlNet denoiser {source.denoiser!r} but has no control image; "
                    f"set {where}.control_image=path/to/image.png"
                )
            for file in _paths_in(image):
                if not Path(file).expanduser().is_file():
                    raise GuidanceConfigError(f"{where}.control_image: file {file} does not exist")
    for term in spec.terms:
        if not math.isfinite(term.weight):
            raise GuidanceConfigError(f"guidance.terms.{term.name}.weight must be finite, got {term.weight}")


def _paths_in(value: Any) -> list:
    if isinstance(value, (str, Path)):
        return [value]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _paths_in(v)]
    return []


def open_image(image: Any, what: str) -> Any:
    """A PIL image, array or tensor as given; a path opened, with an error that names it."""
    if not isinstance(image, (str, Path)):
        return image
    path = Path(image).expanduser()
    if not path.is_file():
        raise ImageInputError(f"{what} {image} does not exist; pass an existing image file")
    try:
        with PIL.Image.open(path) as opened:
            return opened.convert("RGB")
    except OSError as err:
        raise ImageInputError(f"{what} {image} cannot be read as an image ({err}); pass a PNG or JPEG file") from None


def _image_count(value: Any) -> int:
    if isinstance(value, (list, tuple)):
        return len(value)
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 4:
        return value.shape[0]
    return 1


def check_init_inputs(image: Any, mask_image: Any, strength: Any, num_images: int, steps: int, latents: Any = None) -> None:
    """Image-to-image inputs that cannot start a sample, found before any model runs."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise ImageInputError(f"strength must be a number in (0, 1], got {strength!r}")
    if image is None:
        if mask_image is not None:
            raise ImageInputError("a mask image needs an init image to inpaint: pass image=... with mask_image")
        if strength != 1.0:
            raise ImageInputError(f"strength={strength} needs an init image (image=...); text to image runs all steps")
        return
    if latents is not None:
        raise ImageInputError("pass either latents or an init image, not both: the init image defines the start latents")
    if not 0.0 < strength <= 1.0:
        raise ImageInputError(
            f"strength must be in (0, 1], got {strength}: the share of the schedule run from the init image "
            "(1 = from pure noise, small = close to the image)"
        )
    if int(steps * strength) < 1:
        raise ImageInputError(
            f"strength {strength} of {steps} steps leaves no denoising step; raise strength to at least "
            f"{1 / steps:.3g} or the number of steps"
        )
    for what, value in (("init image", image), ("mask image", mask_image)):
        count = _image_count(value) if value is not None else 1
        if count not in (1, num_images):
            raise ImageInputError(
                f"{count} {what}s for {num_images} output images; give one for all outputs or one per output"
            )


def check_control_inputs(spec: GuidanceSpec, controlnets: dict[str, int], num_images: int) -> None:
    """Every ControlNet term's images and strengths against its ControlNets and the batch.

    `controlnets`: denoiser name -> its number of ControlNets. A term on one ControlNet takes one
    image or a list of one per output; on several, a tuple of one entry per ControlNet (each one
    image or a list per output) and one strength or one per ControlNet."""
    for where, source in _used_sources(spec):
        count = controlnets.get(source.denoiser)
        if count is None:
            continue
        image, scale = source.condition.control_image, source.condition.control_scale
        per_net = [image]
        if count > 1:
            if not isinstance(image, tuple) or len(image) != count:
                given = f"{len(image)} control image entries" if isinstance(image, tuple) else f"a {type(image).__name__}"
                raise GuidanceConfigError(
                    f"{where}: denoiser {source.denoiser!r} has {count} ControlNets but got {given}; give a tuple "
                    f"of {count} control images, one per ControlNet in order (a list means one image per output)"
                )
            per_net = list(image)
        if isinstance(scale, (list, tuple)) and len(scale) != count:
            raise GuidanceConfigError(
                f"{where}.control_scale: {len(scale)} strengths for {count} ControlNet(s); give one number or {count}"
            )
        for entry in per_net:
            n = len(entry) if isinstance(entry, list) else 1
            if n not in (1, num_images):
                raise GuidanceConfigError(
                    f"{where}.control_image: a list of {n} images for {num_images} output images; give one "
                    f"image for all outputs or a list of exactly {num_images}, one per output"
                )
