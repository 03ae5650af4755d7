"""Custom Diffusion baseline [21]: cross-attention key/value projections + a modifier token.

As diffusers' ``examples/custom_diffusion/train_custom_diffusion.py`` with its default
``--freeze_model crossattn_kv``: every attention layer of (a copy of) the UNet gets diffusers'
`CustomDiffusionAttnProcessor2_0`; cross-attention processors own new ``to_k``/``to_v``
projections initialised from the prior's (``train_kv=True``, ``train_q_out=False``),
self-attention processors train nothing (``train_kv=False``). The modifier token ``<ffhq>`` is
trained as in textual inversion. ``train_q_out=True`` (the example's ``--freeze_model crossattn``)
also trains new ``to_q``/``to_out`` projections: that is the setting whose count on SD v1.5
(44.0M) matches the paper's Table 1 (see docs/methods.md).

Export (``out_dir``): ``pytorch_custom_diffusion_weights.safetensors`` with diffusers'
attention-processor keys (``<layer>.processor.to_k_custom_diffusion.weight``, ...) and the token
in textual-inversion format, ``learned_embeds.safetensors``. Prior preservation (as the example's ``--with_prior_preservation``; `use_class_prompt`): the rows
after the instance rows are conditioned on the class prompt, encoded every step through the
method's text encoder like the instance prompt. Loading uses our own
`load_custom_diffusion_processors`: in diffusers 0.42 ``UNet2DConditionModel.load_attn_procs``
only installs the processors when called with the private ``_pipeline=`` argument (otherwise it
returns without changing the UNet), and it cannot read the safetensors file its own
``save_attn_procs`` writes (the untrained self-attention entries are dropped, so its processor
count check fails).

On SDXL (2048-d cross-attention) the processors are the same; the modifier token gets one trained
row per text encoder, the prompt (and class prompt) is encoded through both as GCFG encodes it,
and the token file holds ``clip_l``/``clip_g`` rows (diffusers' SDXL textual-inversion layout).
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0
from torch import nn

from ccp.methods.base import Method, PromptTemplate
from ccp.methods.dreambooth import baseline_guidance, encode_tokens, frozen_copy, tokenize
from ccp.methods.textual_inversion import (
    EMBEDS_FILE,
    TokenTrainingMixin,
    pipeline_with_token,
    save_learned_embeds,
    save_sdxl_embeds,
)

WEIGHTS_FILE = "pytorch_custom_diffusion_weights.safetensors"  # diffusers' CUSTOM_DIFFUSION_WEIGHT_NAME_SAFE
WEIGHTS_FILE_BIN = "pytorch_custom_diffusion_weights.bin"  # what diffusers' example writes by default


def _is_cross_attention(processor_name: str, unet: UNet2DConditionModel) -> bool:
    layer = unet.get_submodule(processor_name.rsplit(".processor", 1)[0])
    return bool(getattr(layer, "is_cross_attention", False))


def add_custom_diffusion_processors(unet: UNet2DConditionModel, train_q_out: bool = False) -> dict[str, nn.Module]:
    """Install Custom Diffusion processors on every attention layer of `unet` (in place), the new
    projections initialised from the layer's own; returns {processor name: trainable processor}."""
    trainable = {}
    processors = {}
    for name in unet.attn_processors:
        layer = unet.get_submodule(name.rsplit(".processor", 1)[0])
        hidden_size = layer.to_q.out_features
        if not _is_cross_attention(name, unet):
            processors[name] = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False, hidden_size=hidden_size)
            continue
        if layer.to_k.bias is not None or layer.to_v.bias is not None:
            raise ValueError(f"{name}: Custom Diffusion's k/v projections have no bias, but this layer's do")
        processor = CustomDiffusionAttnProcessor2_0(
            train_kv=True, train_q_out=train_q_out, hidden_size=hidden_size, cross_attention_dim=layer.to_k.in_features
        )
        weights = {
            "to_k_custom_diffusion.weight": layer.to_k.weight,
            "to_v_custom_diffusion.weight": layer.to_v.weight,
        }
        if train_q_out:
            weights["to_q_custom_diffusion.weight"] = layer.to_q.weight
            weights["to_out_custom_diffusion.0.weight"] = layer.to_out[0].weight
            weights["to_out_custom_diffusion.0.bias"] = layer.to_out[0].bias
        processor.load_state_dict({k: v.detach().clone() for k, v in weights.items()})
        processors[name] = trainable[name] = processor.to(device=layer.to_k.weight.device, dtype=torch.float32)
    unet.set_attn_processor(processors)
    return trainable


def custom_diffusion_state_dict(processors: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """diffusers' key layout: ``<processor name>.<tensor name>`` (as ``save_attn_procs`` writes)."""
    return {f"{name}.{key}": t for name, p in processors.items() for key, t in p.state_dict().items()}


def load_custom_diffusion_processors(unet: UNet2DConditionModel, state_dict: dict[str, torch.Tensor]) -> None:
    """Install the processors described by `state_dict` on `unet` (in place): layers with weights
    get trained processors (``train_q_out`` if ``to_q`` weights are present), the rest untrained
    Custom Diffusion processors. Unknown keys and shape mismatches are errors."""
    state_dict = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}  # .bin holds {} for untrained
    names = list(unet.attn_processors)
    grouped: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
    for key, value in state_dict.items():
        owner = next((n for n in names if key.startswith(n + ".")), None)
        if owner is None:
            raise ValueError(f"Custom Diffusion weight {key!r} matches no attention layer of this UNet")
        grouped[owner][key[len(owner) + 1 :]] = value
    if not any(grouped.values()):
        raise ValueError("the state dict holds no Custom Diffusion weights")
    device, dtype = unet.device, unet.dtype
    processors = {}
    for name, weights in grouped.items():
        layer = unet.get_submodule(name.rsplit(".processor", 1)[0])
        if not weights:
            processors[name] = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False, hidden_size=layer.to_q.out_features)
            continue
        processor = CustomDiffusionAttnProcessor2_0(
            train_kv=True,
            train_q_out="to_q_custom_diffusion.weight" in weights,
            hidden_size=layer.to_q.out_features,
            cross_attention_dim=layer.to_k.in_features,
        )
        processor.load_state_dict(weights, strict=True)
        processors[name] = processor.to(device=device, dtype=dtype)
    unet.set_attn_processor(processors)


def read_custom_diffusion_weights(export_dir: Path) -> dict[str, torch.Tensor]:
    if (export_dir / WEIGHTS_FILE).is_file():
        return safetensors.torch.load_file(str(export_dir / WEIGHTS_FILE))
    if (export_dir / WEIGHTS_FILE_BIN).is_file():
        return torch.load(export_dir / WEIGHTS_FILE_BIN, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{export_dir} has neither {WEIGHTS_FILE} nor {WEIGHTS_FILE_BIN}")


class CustomDiffusion(TokenTrainingMixin, Method):
    name = "custom_diffusion"
    trains_token = True

    def __init__(self, prior: StableDiffusionPipeline, template: PromptTemplate, train_q_out: bool = False):
        super().__init__(prior, template)
        self.train_q_out = bool(train_q_out)
        unet = frozen_copy(prior.unet)  # processors are installed on the copy, the prior keeps its own
        processors = add_custom_diffusion_processors(unet, train_q_out=self.train_q_out)
        # Module names cannot contain "."; the processors are the same objects the UNet runs.
        self.processors = nn.ModuleDict({name.replace(".", "__"): p for name, p in processors.items()})
        self._frozen["unet"] = unet
        self._init_token(prior)  # on SDXL: one row per text encoder (`TokenTrainingMixin`)

    @property
    def unet(self) -> UNet2DConditionModel:
        return self._frozen["unet"]

    def use_class_prompt(self, class_prompt: str) -> None:
        """Prior preservation: rows after the instance rows (``num_class`` of `predict_noise`) are
        conditioned on `class_prompt` (usually without the modifier token)."""
        if self.sdxl:
            self._sdxl_class_prompt = class_prompt
            self._sdxl_class_ids = self._sdxl_text.tokenize(class_prompt)
            return
        self.register_buffer("class_prompt_ids", tokenize(self.tokenizer, class_prompt), persistent=False)

    def _sdxl_condition(self, num: int, num_class: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, pooled = self.sdxl_condition(num, dtype)  # gradients reach the token rows
        if num_class:
            class_embeds, class_pooled = self._sdxl_text.encode(self._sdxl_class_ids, self._sdxl_class_prompt)
            embeds = torch.cat([embeds, class_embeds.to(dtype).expand(num_class, -1, -1)])
            pooled = torch.cat([pooled, class_pooled.to(dtype).expand(num_class, -1)])
        return embeds, pooled

    def predict_noise(self, noisy_latents, timesteps, num_class: int = 0, time_ids=None):
        dtype, n = self.unet.dtype, noisy_latents.shape[0]
        if self.sdxl:
            embeds, pooled = self._sdxl_condition(n - num_class, num_class, dtype)
            added = self.added_cond_kwargs(noisy_latents, dtype, pooled, time_ids)
            return self.unet(noisy_latents.to(dtype), timesteps, encoder_hidden_states=embeds,
                             added_cond_kwargs=added, return_dict=False)[0]
        embeds = self.condition(n - num_class, dtype)
        if num_class:
            class_embeds = encode_tokens(self._frozen["text_encoder"], self.class_prompt_ids)
            embeds = torch.cat([embeds, class_embeds.to(dtype).expand(num_class, -1, -1)])
        return self.unet(noisy_latents.to(dtype), timesteps, encoder_hidden_states=embeds, return_dict=False)[0]

    def export(self, out_dir):
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        processors = {name.replace("__", "."): p for name, p in self.processors.items()}
        state = {k: v.detach().cpu().contiguous() for k, v in custom_diffusion_state_dict(processors).items()}
        safetensors.torch.save_file(state, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
        if self.sdxl:
            save_sdxl_embeds(out_dir, self.template.placeholder, self.token_embeds, self.token_embeds_2)
        else:
            save_learned_embeds(out_dir, self.template.placeholder, self.token_embeds)
        return out_dir

    def sampling_pipeline(self, prior):
        # The UNet copy the method trains through: the prior's weights (shared) with the method's
        # processors installed, plus the method's tokenizer(s) and text encoder(s) with the current token.
        pipe = self.pipeline_with_own_token(prior)
        pipe.add_denoiser(self.name, self.unet)
        return pipe, self.name

    @classmethod
    def load_export(cls, prior, export_dir):
        export_dir = Path(export_dir)
        unet = frozen_copy(prior.unet)
        load_custom_diffusion_processors(unet, read_custom_diffusion_weights(export_dir))
        pipe = pipeline_with_token(prior, export_dir / EMBEDS_FILE)  # SDXL: clip_l/clip_g rows
        pipe.add_denoiser(cls.name, unet.eval())
        return pipe, cls.name

    @classmethod
    def default_guidance(cls, denoiser, template, control_prompt=None, concept_weight=1.0, control_weight=5.0):
        return baseline_guidance(cls, denoiser, template, control_prompt, control_weight)

