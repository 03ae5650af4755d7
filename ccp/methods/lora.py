"""LoRA baseline (LoRA-DreamBooth): low-rank updates of the UNet's attention projections, with peft.

As diffusers' ``train_dreambooth_lora.py``: peft's ``LoraConfig(r=rank, lora_alpha=alpha,
init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"])`` on every
attention layer (self- and cross-attention) of (a copy of) the prior UNet. B starts at zero, so
training starts from the prior exactly; each targeted layer trains ``rank * (in + out)`` numbers
(797,184 on SD v1.5 at rank 4). The prompt carries no token (``a photo of face``, as DreamBooth's)
and runs through the frozen text encoder: cached.

Export: ``out_dir/pytorch_lora_weights.safetensors`` in diffusers' LoRA format (``unet.``-prefixed
keys, rank and alpha in the file's metadata), written by ``save_lora_weights`` as the diffusers
script writes it, so ``StableDiffusionPipeline.load_lora_weights(out_dir)`` reads it. Loading puts
the adapter, through diffusers' own loader, on a `frozen_copy` of the prior UNet: the LoRA layers
stay unmerged, and the copy shares every base weight with the prior, so only the LoRA numbers are
new memory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from torch import nn

from ccp.config import ConfigError
from ccp.methods.base import Method, PromptTemplate
from ccp.methods.dreambooth import (
    FixedPromptMixin,
    baseline_guidance,
    frozen_copy,
    pipeline_with_denoiser,
    register_unet_denoiser,
)

WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA weight name
TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")
ADAPTER = "default"


class LoRAConfigError(ConfigError, ValueError):
    """LoRA settings that cannot build an adapter; the message names the key and a valid value."""


def _positive(value, key: str, integer: bool) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise LoRAConfigError(f"method.module.{key}={value!r}: the LoRA {key} must be a positive "
                              f"{'integer' if integer else 'number'}; set e.g. method.module.{key}=4")


def lora_config(rank: int = 4, alpha: float | None = None) -> LoraConfig:
    """train_dreambooth_lora.py's config; ``alpha=None`` means alpha = rank (update scale 1)."""
    return LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        init_lora_weights="gaussian",
        target_modules=list(TARGET_MODULES),
    )


class LoRA(FixedPromptMixin, Method):
    name = "lora"
    trains_token = False

    @classmethod
    def check_settings(cls, rank: int = 4, alpha: float | None = None, **_) -> None:
        _positive(rank, "rank", integer=True)
        if alpha is not None:
            _positive(alpha, "alpha", integer=False)

    def __init__(
        self,
        prior: StableDiffusionPipeline,
        template: PromptTemplate,
        rank: int = 4,
        alpha: float | None = None,
        encode_prompt_every_step: bool = False,
    ):
        super().__init__(prior, template)
        config = lora_config(rank, alpha)
        unet = frozen_copy(prior.unet)
        unet.add_adapter(config, adapter_name=ADAPTER)  # injects peft layers in place: still a UNet2DConditionModel
        self._frozen["unet"] = unet
        # The LoRA factors are the same modules the UNet runs ("." is not allowed in names).
        layers = {
            name.replace(".", "__"): nn.ModuleDict({"lora_A": m.lora_A[ADAPTER], "lora_B": m.lora_B[ADAPTER]})
            for name, m in unet.named_modules()
            if isinstance(m, LoraLayer)
        }
        if not layers:
            raise ValueError(f"LoRA found none of {TARGET_MODULES} in the UNet")
        self.lora = nn.ModuleDict(layers)
        # fp32 master weights whatever the prior's dtype (diffusers' cast_training_params).
        self.lora.to(torch.float32).requires_grad_(True)
        self.rank, self.alpha = int(config.r), config.lora_alpha
        self._init_fixed_prompt(prior, encode_prompt_every_step)

    @property
    def unet(self) -> UNet2DConditionModel:
        """The UNet copy with the LoRA layers injected (what runs)."""
        return self._frozen["unet"]

    def predict_noise(self, noisy_latents, timesteps, time_ids=None):
        return self.fixed_prompt_prediction(self.unet, noisy_latents, timesteps, time_ids)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter in diffusers' key layout, without the ``unet.`` prefix (`save_lora_weights` adds it)."""
        return convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet, adapter_name=ADAPTER))

    def export(self, out_dir):
        out_dir = Path(out_dir)
        StableDiffusionPipeline.save_lora_weights(
            out_dir,
            unet_lora_layers={k: v.detach().float().contiguous() for k, v in self.lora_state_dict().items()},
            # rank and alpha travel in the file: without them a loader would assume alpha = rank
            unet_lora_adapter_metadata=self.unet.peft_config[ADAPTER].to_dict(),
            weight_name=WEIGHTS_FILE,
            safe_serialization=True,
        )
        return out_dir

    def sampling_pipeline(self, prior):
        return pipeline_with_denoiser(prior, self.name, self.unet)  # LoRA layers active, unmerged

    @classmethod
    def load_export(cls, prior, export_dir):
        path = Path(export_dir)
        path = path / WEIGHTS_FILE if path.is_dir() else path
        if not path.is_file():
            raise LoRAConfigError(f"{export_dir}: no {WEIGHTS_FILE} there; point at the export folder of a "
                                  "ccp-train lora run (or a diffusers LoRA folder)")
        state_dict, network_alphas, metadata = StableDiffusionPipeline.lora_state_dict(
            str(path.parent), weight_name=path.name, return_lora_metadata=True)
        text_encoder_keys = [k for k in state_dict if not k.startswith("unet.")]
        if text_encoder_keys:
            raise LoRAConfigError(f"{path}: holds LoRA weights beyond the UNet ({text_encoder_keys[0]}, ...); the lora "
                                  "method adapts the UNet only, so load this file with diffusers' load_lora_weights")
        unet = frozen_copy(prior.unet)
        # diffusers' own loading path (what pipe.load_lora_weights runs for the UNet).
        StableDiffusionPipeline.load_lora_into_unet(state_dict, network_alphas=network_alphas, unet=unet,
                                                    adapter_name=ADAPTER, metadata=metadata)
        return register_unet_denoiser(prior, cls.name, unet)

    @classmethod
    def default_guidance(cls, denoiser, template, control_prompt=None, concept_weight=1.0, control_weight=5.0):
        return baseline_guidance(cls, denoiser, template, control_prompt, control_weight)
