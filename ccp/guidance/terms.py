"""Guidance as data: which denoiser predicts what, under which condition, with which weight.

A `GuidanceSpec` is Eq. 3 of the paper written down: an unconditional source and any number of
weighted terms, each naming a denoiser (the prior UNet, a ControlNet, another checkpoint, the
null-text concept UNet) by the name the pipeline registered it under.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ccp.config import ConfigError


class GuidanceConfigError(ConfigError, ValueError):
    """A guidance specification that cannot be sampled; the message says how to fix it."""


@dataclass(frozen=True)
class Condition:
    """What a denoiser is conditioned on. `prompt=None` means no text (the null-text UNet) or,
    for a text denoiser, the empty prompt."""

    prompt: str | None = None
    # PIL image, array, tensor or path; a list: one per output; for a denoiser with several
    # ControlNets, a tuple of one entry per ControlNet, each of those forms
    control_image: Any = None
    control_scale: float | tuple[float, ...] = 1.0  # or one per ControlNet

    def key(self) -> tuple:
        # Two sources with equal keys are evaluated once per step.
        scale = tuple(self.control_scale) if isinstance(self.control_scale, (list, tuple)) else self.control_scale
        return (self.prompt, _identity(self.control_image), scale)


def _identity(image: Any) -> Any:
    """Images compare by object; a tuple of them (one per ControlNet) by its members."""
    if image is None:
        return None
    if isinstance(image, tuple):
        return tuple(_identity(im) for im in image)
    return id(image)


@dataclass(frozen=True)
class Source:
    """One prediction: a denoiser evaluated under a condition."""

    denoiser: str
    condition: Condition = field(default_factory=Condition)


@dataclass(frozen=True)
class GuidanceTerm:
    name: str
    source: Source
    weight: float


@dataclass(frozen=True)
class GuidanceSpec:
    """eps = eps_uncond + sum_i w_i (eps_i - eps_uncond), optionally rescaled (Lin et al. 2023)."""

    terms: tuple[GuidanceTerm, ...] = ()
    unconditional: Source = field(default_factory=lambda: Source("prior", Condition(prompt="")))
    rescale: float = 0.0

    @property
    def weights(self) -> list[float]:
        return [t.weight for t in self.terms]

    @property
    def unconditional_coefficient(self) -> float:
        return 1.0 - math.fsum(self.weights)

    @property
    def needs_unconditional(self) -> bool:
        """False when Eq. 3 gives the unconditional prediction a zero coefficient (weights sum to 1)."""
        return not math.isclose(self.unconditional_coefficient, 0.0, abs_tol=1e-12)

    def sources(self) -> list[Source]:
        return [self.unconditional] + [t.source for t in self.terms]

    def without_zero_weights(self) -> "GuidanceSpec":
        """The same guidance without its weight-0 terms: Eq. 3 adds 0 * (eps_i - eps_0) for them, so
        their denoisers need neither be evaluated nor loaded."""
        if all(t.weight != 0 for t in self.terms):
            return self
        return GuidanceSpec(terms=tuple(t for t in self.terms if t.weight != 0), unconditional=self.unconditional,
                            rescale=self.rescale)

    @property
    def denoisers_run(self) -> set[str]:
        """The denoisers Eq. 3 evaluates for this spec (weight-0 terms and a zero-coefficient
        unconditional left out)."""
        active = self.without_zero_weights()
        sources = active.sources() if active.needs_unconditional else [t.source for t in active.terms]
        return {source.denoiser for source in sources}

    @property
    def zero_weight_terms(self) -> list[str]:
        return [t.name for t in self.terms if t.weight == 0]

    def for_outputs(self, positions: list[int], total: int) -> "GuidanceSpec":
        """The spec for a batch of the outputs at `positions` of `total`: every per-output list of
        control images (a list of exactly `total`, at any depth) cut to those outputs; the same
        list cut once, so conditions that shared it still share it (and are evaluated once)."""
        cut: dict[int, list] = {}

        def select(image: Any) -> Any:
            if isinstance(image, tuple):  # one entry per ControlNet
                return tuple(select(im) for im in image)
            if isinstance(image, list):
                if len(image) == total and total > 1:
                    return cut.setdefault(id(image), [image[p] for p in positions])
                return [select(im) for im in image] if any(isinstance(im, list) for im in image) else image
            return image

        def source(src: Source) -> Source:
            condition = src.condition
            image = select(condition.control_image)
            if image is condition.control_image:
                return src
            return Source(src.denoiser, Condition(condition.prompt, image, condition.control_scale))

        terms = tuple(GuidanceTerm(t.name, source(t.source), t.weight) for t in self.terms)
        return GuidanceSpec(terms=terms, unconditional=source(self.unconditional), rescale=self.rescale)

    # --- common special cases -------------------------------------------------------------
    @classmethod
    def cfg(cls, prompt: str, scale: float, negative_prompt: str | None = None, denoiser: str = "prior", rescale: float = 0.0):
        """Classic CFG. With a negative prompt, GCFG's reading of it (§4.4): the empty-prompt
        unconditional plus the positive prompt at `scale` and the negative prompt at `1 - scale`."""
        terms = [GuidanceTerm("prompt", Source(denoiser, Condition(prompt=prompt)), float(scale))]
        if negative_prompt is not None:
            terms.append(GuidanceTerm("negative", Source(denoiser, Condition(prompt=negative_prompt)), 1.0 - scale))
        return cls(terms=tuple(terms), unconditional=Source(denoiser, Condition(prompt="")), rescale=rescale)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], control_images: Mapping[str, Any] | None = None) -> "GuidanceSpec":
        """Build from plain config (e.g. Hydra's `guidance:` group).

        ``{unconditional: {denoiser, prompt}, terms: {name: {denoiser, weight, prompt?,
        control_image?, control_scale?, enabled?}}, rescale}``. A term's ``control_image`` is a key
        of `control_images` (already loaded) or a path; a term with ``enabled: false`` is skipped.
        """
        control_images = dict(control_images or {})

        def source(where: str, entry: Mapping[str, Any]) -> Source:
            if not isinstance(entry, Mapping) or "denoiser" not in entry:
                raise GuidanceConfigError(f"{where}: needs a `denoiser` (e.g. {where}.denoiser=prior)")
            image = _resolve_images(entry.get("control_image"), control_images)
            scale = entry.get("control_scale", 1.0)
            if isinstance(scale, (list, tuple)):
                scale = tuple(_number(v, f"{where}.control_scale[{i}]") for i, v in enumerate(scale))
            else:
                scale = _number(scale, f"{where}.control_scale")
            prompt = entry.get("prompt")
            if prompt is not None and not isinstance(prompt, str):
                raise GuidanceConfigError(f"{where}.prompt must be a string, got {prompt!r}")
            return Source(str(entry["denoiser"]), Condition(prompt=prompt, control_image=image, control_scale=scale))

        uncond_cfg = cfg.get("unconditional") or {"denoiser": "prior", "prompt": ""}
        terms = []
        for name, entry in (cfg.get("terms") or {}).items():
            if entry is None or not entry.get("enabled", True):
                continue
            if "weight" not in entry:
                raise GuidanceConfigError(f"guidance.terms.{name} has no weight (set guidance.terms.{name}.weight=...)")
            weight = _number(entry["weight"], f"guidance.terms.{name}.weight")
            terms.append(GuidanceTerm(str(name), source(f"guidance.terms.{name}", entry), weight))
        rescale = _number(cfg.get("rescale", 0.0), "guidance.rescale")
        if not 0.0 <= rescale <= 1.0:
            raise GuidanceConfigError(f"guidance.rescale must be in [0, 1], got {rescale}")
        return cls(terms=tuple(terms), unconditional=source("guidance.unconditional", uncond_cfg), rescale=rescale)


def _resolve_images(image: Any, named: Mapping[str, Any]) -> Any:
    """Names of loaded images replaced by the images, keeping lists (one per output) and tuples
    (one per ControlNet) as they are."""
    if isinstance(image, str):
        return named.get(image, image)
    if isinstance(image, (list, tuple)):
        items = [_resolve_images(im, named) for im in image]
        return tuple(items) if isinstance(image, tuple) else items
    return image


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise GuidanceConfigError(f"{where} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise GuidanceConfigError(f"{where} must be a number, got {value!r} (e.g. {where}=1.5)") from None
    if not math.isfinite(number):
        raise GuidanceConfigError(f"{where} must be finite, got {value!r}")
    return number
