"""Personalization methods with one interface (`Method`): ours, the paper's four baselines and LoRA.

``build_method(name, prior, template, **kwargs)`` builds one by its registry name.
"""

from __future__ import annotations

from diffusers import StableDiffusionPipeline

from ccp.methods.base import Method, PromptTemplate
from ccp.methods.conditioning import is_sdxl
from ccp.methods.controlnet import ControlNetTraining
from ccp.methods.custom_diffusion import CustomDiffusion
from ccp.methods.dreambooth import DreamBooth
from ccp.methods.lora import LoRA
from ccp.methods.oft import OFT
from ccp.methods.ours import NullTextConcept
from ccp.methods.text_to_image import TextToImage
from ccp.methods.textual_inversion import TextualInversion

METHODS: dict[str, type[Method]] = {
    "ours": NullTextConcept,
    "dreambooth": DreamBooth,
    "textual_inversion": TextualInversion,
    "custom_diffusion": CustomDiffusion,
    "oft": OFT,
    "lora": LoRA,
}


# What ccp-train can train: the methods, plus text-to-image training of a prior from captions (toy prior)
# and a ControlNet for a prior (from captions and conditioning images).
TRAINABLE: dict[str, type[Method]] = {**METHODS, "text_to_image": TextToImage, "controlnet": ControlNetTraining}


def method_class(name: str) -> type[Method]:
    try:
        return TRAINABLE[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(TRAINABLE)}") from None


def build_method(name: str, prior: StableDiffusionPipeline, template: PromptTemplate | None = None, **kwargs) -> Method:
    """The method `name` on `prior` (not modified: methods copy what they change or train), its
    settings and the prior's family checked first, as ccp-train checks them before loading."""
    cls = method_class(name)
    cls.check_settings(**kwargs)
    if is_sdxl(prior):
        cls.check_prior("sdxl", **kwargs)
    return cls(prior, template or PromptTemplate(), **kwargs)


__all__ = [
    "METHODS",
    "ControlNetTraining",
    "CustomDiffusion",
    "DreamBooth",
    "LoRA",
    "Method",
    "NullTextConcept",
    "OFT",
    "PromptTemplate",
    "TRAINABLE",
    "TextToImage",
    "TextualInversion",
    "build_method",
    "method_class",
]
