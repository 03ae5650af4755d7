"""What a personalization method is, for the one training loop: trainable parts, the condition it
trains with, and how it exports and plugs back into GCFG sampling.

The loop (ccp.training) owns data, noise, timesteps, loss, optimiser, EMA and checkpoints; a
method owns only what differs between ours and the four baselines.
"""

from __future__ import annotations

import inspect
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator

import torch
from diffusers import StableDiffusionPipeline
from torch import nn

from ccp.config import ConfigError
from ccp.guidance import GuidanceSpec
from ccp.methods.conditioning import added_cond_kwargs, is_sdxl, sdxl_time_ids, target_size_of, vae_scale_factor


@dataclass(frozen=True)
class PromptTemplate:
    """Appendix D.2: ``a photo of <ffhq> face``. The placeholder token appears only for methods
    that train a text embedding; the others train with ``a photo of face``."""

    template: str = "a photo of {token} face"
    placeholder: str = "<ffhq>"
    initializer: str = "face"  # word whose embedding initialises a new token

    def prompt(self, with_token: bool) -> str:
        text = self.template.format(token=self.placeholder if with_token else "")
        return re.sub(r"\s+", " ", text).strip()


class Method(nn.Module, ABC):
    """A personalization method as a module: its registered submodules/parameters are what it
    trains and checkpoints; frozen prior parts it needs are held outside the module tree."""

    name: ClassVar[str]
    trains_token: ClassVar[bool] = False  # uses the placeholder token in its prompt
    # data.<key> the method's items need, with an example value: ccp-train refuses the run before loading
    needs_data: ClassVar[dict[str, str]] = {}

    def __init__(self, prior: StableDiffusionPipeline, template: PromptTemplate):
        super().__init__()
        self.template = template
        # Frozen prior parts: kept out of state_dict/parameters so checkpoints stay small and the
        # optimiser never sees them. `move_frozen` puts them on the training device.
        self._frozen: dict[str, nn.Module] = {}
        # SDXL: every prediction also takes the pooled text and the size/crop time ids
        self.sdxl = is_sdxl(prior)
        self.vae_scale = vae_scale_factor(prior) if prior is not None else 8

    @property
    def training_prompt(self) -> str | None:
        return self.template.prompt(with_token=self.trains_token)

    def move_frozen(self, device: torch.device, dtype: torch.dtype | None = None) -> None:
        """Frozen parts to `device` (and `dtype`). A frozen module may hold the method's own
        trainable submodules (attention processors, adapters, a new token row): those go to
        `device` but keep their dtype, so the optimiser keeps updating full-precision weights."""
        own = {id(t) for t in (*self.parameters(), *self.buffers())}
        for module in self._frozen.values():
            module.to(device=device)
            if dtype is None:
                continue
            for sub in module.modules():
                for tensors in (sub._parameters, sub._buffers):
                    for key, t in tensors.items():
                        if t is not None and t.is_floating_point() and id(t) not in own:
                            if isinstance(t, nn.Parameter):
                                t.data = t.data.to(dtype)
                            else:
                                tensors[key] = t.to(dtype)

    @classmethod
    def check_settings(cls, **settings) -> None:
        """Refuse settings (``method.module``'s keys) that cannot build the method, before any
        model loads; the message names the key and a valid value. Called once, before building
        (ccp-train's check_config, or `build_method`); the constructor does not repeat it."""

    @classmethod
    def takes_time_ids(cls) -> bool:
        return "time_ids" in inspect.signature(cls.predict_noise).parameters

    @classmethod
    def check_prior(cls, family: str, **settings) -> None:
        """Refuse a prior family (sd1, sd2, sdxl) the method cannot train on, before any model loads
        (called as `check_settings` is; the constructor does not repeat it)."""
        if family == "sdxl" and not cls.takes_time_ids():
            raise ConfigError(f"method {cls.name!r} does not train on SDXL priors yet (its prediction takes no "
                              "size/crop time ids); use an SD v1.x/2.x prior, or ours, dreambooth, "
                              "custom_diffusion or oft")

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold to resume: trainable tensors plus the method's own buffers."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        buffers = {name for name, _ in self.named_buffers()}
        return {k: v for k, v in self.state_dict().items() if k in trainable or k in buffers}

    def batch_inputs(self, batch: dict, generator: torch.Generator) -> dict:
        """Extra keyword arguments of `predict_noise` taken from the batch (e.g. per-item captions);
        draws only from `generator`, so a resumed run repeats them. On SDXL: ``time_ids`` [B, 6] from
        the items' original sizes and crops, the target size the batch's image size; otherwise none."""
        if not self.sdxl:
            return {}
        return {"time_ids": sdxl_time_ids(batch, target_size_of(batch, self.vae_scale))}

    def added_cond_kwargs(self, noisy_latents: torch.Tensor, dtype: torch.dtype, pooled: torch.Tensor | None,
                          time_ids: torch.Tensor | None) -> dict | None:
        """The UNet's added conditioning on SDXL (None otherwise); no `time_ids`: GCFG's sampling default."""
        if not self.sdxl:
            return None
        return added_cond_kwargs(noisy_latents, dtype, self.vae_scale, pooled, time_ids)

    @abstractmethod
    def predict_noise(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The model prediction the loss is taken on, under the method's training condition. A method
        that trains on SDXL also takes ``time_ids=None`` (`batch_inputs`) and passes the added conditioning."""

    def on_after_optimizer_step(self) -> None:
        """Hook for methods that must restore frozen state after an update."""

    @abstractmethod
    def export(self, out_dir: str | Path) -> Path:
        """Write the trained result in the format users load (diffusers/peft conventions)."""

    @abstractmethod
    def sampling_pipeline(self, prior: StableDiffusionPipeline):
        """``(GCFGPipeline, denoiser_name)`` that samples the method's current weights (validation
        grids, metrics during training), built in memory: `prior`'s pipeline with the method's own
        modules plugged in as they are, sharing their storage (no weights copied, no files written).
        It samples what ``load_export(prior, <export of now>)`` samples, and leaves the method's
        modules as they were: no change of training mode, ``requires_grad``, device or dtype, so
        sampling in eval mode is the caller's choice (the training callbacks sample in eval mode)
        and the pipeline follows every later update of the weights."""

    @classmethod
    @abstractmethod
    def load_export(cls, prior: StableDiffusionPipeline, export_dir: str | Path):
        """Return ``(GCFGPipeline, denoiser_name)``: the prior pipeline with this export plugged in."""

    @classmethod
    @abstractmethod
    def default_guidance(cls, denoiser: str, template: PromptTemplate, control_prompt: str | None = None,
                         concept_weight: float = 1.0, control_weight: float = 5.0) -> GuidanceSpec:
        """How the method is sampled in the paper's evaluation (Appendix D.2)."""
