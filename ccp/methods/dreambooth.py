"""DreamBooth baseline [37]: every prior UNet parameter trained, conditioned on a fixed prompt.

Appendix D.2: the prompt is ``a photo of face`` (no placeholder: DreamBooth trains no text
embedding), encoded by the frozen prior text encoder. The prompt and encoder never change, so the
embedding is computed once and cached; ``encode_prompt_every_step=True`` runs the encoder each
step instead (same result, for benchmarking the text encoder's cost).

This module also holds what the text-conditioned baselines share: prompt encoding exactly as the
sampling pipeline does it, the paper's baseline guidance, and frozen copies of prior modules that
share their weights.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from torch import nn

from ccp.guidance import Condition, GuidanceSpec, GuidanceTerm, Source
from ccp.methods.base import Method, PromptTemplate

EXPORT_SUBFOLDER = "unet"


# --- shared by the baselines -------------------------------------------------------------------
def tokenize(tokenizer, prompt: str) -> torch.Tensor:
    """[1, 77] token ids, padded and truncated as diffusers' SD pipelines (and GCFGPipeline) do."""
    return tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_tokens(text_encoder: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, 77, D] last hidden state, as `GCFGPipeline.encode_prompt` computes it."""
    device = next(text_encoder.parameters()).device
    if getattr(text_encoder.config, "use_attention_mask", False):
        raise ValueError(
            "this text encoder needs an attention mask (use_attention_mask=True); ccp trains SD v1.x-family priors, whose CLIP encoder needs none"
        )
    return text_encoder(input_ids.to(device))[0]


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of the module tree whose parameters are new, frozen `nn.Parameter`s sharing storage
    with the original's (buffers are shared as they are).

    For frozen prior parts a method runs (gradients may flow through them) or changes in structure
    (attention processors, adapters, an extended token table): no weight memory is duplicated, and
    the caller's modules keep their structure, `requires_grad` flags and device when the method's
    copy is frozen, changed or moved.
    """
    memo = {id(p): nn.Parameter(p.detach(), requires_grad=False) for p in module.parameters()}
    memo.update({id(b): b for b in module.buffers()})
    return copy.deepcopy(module, memo=memo)


def baseline_guidance(cls, denoiser: str, template: PromptTemplate, control_prompt: str | None, control_weight: float) -> GuidanceSpec:
    """Appendix D.2: a baseline samples with its own model for every prediction. Unconditional =
    the method's denoiser on ""; one CFG term = the method's denoiser on its training prompt,
    joined with the control prompt (``a photo of <ffhq> face, wearing glasses``)."""
    prompt = template.prompt(with_token=cls.trains_token)
    if control_prompt:
        prompt = f"{prompt}, {control_prompt}"
    return GuidanceSpec(
        terms=(GuidanceTerm("prompt", Source(denoiser, Condition(prompt=prompt)), float(control_weight)),),
        unconditional=Source(denoiser, Condition(prompt="")),
    )


class FixedPromptMixin:
    """For methods whose condition is a fixed prompt through a frozen text encoder: the embedding
    is cached once in a non-persistent buffer (moves with the method, never checkpointed)."""

    def _init_fixed_prompt(self, prior: StableDiffusionPipeline, encode_every_step: bool) -> None:
        text_encoder = frozen_copy(prior.text_encoder)
        self.encode_prompt_every_step = bool(encode_every_step)
        if self.encode_prompt_every_step:  # otherwise the encoder is not needed after this
            self._frozen["text_encoder"] = text_encoder
        self.register_buffer("prompt_ids", tokenize(prior.tokenizer, self.training_prompt), persistent=False)
        with torch.no_grad():
            embeds = encode_tokens(text_encoder, self.prompt_ids).detach()
        self.register_buffer("prompt_embeds", embeds, persistent=False)

    def condition(self, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        """[B, 77, D] embedding of the training prompt."""
        if self.encode_prompt_every_step:
            with torch.no_grad():
                embeds = encode_tokens(self._frozen["text_encoder"], self.prompt_ids)
        else:
            embeds = self.prompt_embeds
        return embeds.to(dtype).expand(batch_size, -1, -1)


def export_folder(export_dir: str | Path, subfolder: str) -> Path:
    """`export_dir/subfolder` if it exists (export_dir is what `export` was given), else export_dir."""
    export_dir = Path(export_dir)
    return export_dir / subfolder if (export_dir / subfolder).is_dir() else export_dir


def pipeline_with_denoiser(prior: StableDiffusionPipeline, name: str, unet: UNet2DConditionModel):
    """``(GCFGPipeline, name)``: `prior`'s pipeline with `unet` registered as denoiser `name`, as it
    is: not copied, cast, moved or put in eval mode (a method's current weights, sampled in memory)."""
    from ccp.pipelines.gcfg import GCFGPipeline

    pipe = GCFGPipeline.from_prior(prior)  # moves the prior's parts to its device; `unet` joins after
    pipe.add_denoiser(name, unet)
    return pipe, name


def register_unet_denoiser(prior: StableDiffusionPipeline, name: str, unet: UNet2DConditionModel):
    """A loaded UNet as denoiser `name` of `prior`'s pipeline, on the prior's device and dtype, in eval mode."""
    unet = unet.to(prior.device) if unet.dtype == prior.unet.dtype else unet.to(device=prior.device, dtype=prior.unet.dtype)
    return pipeline_with_denoiser(prior, name, unet.eval())


# --- DreamBooth --------------------------------------------------------------------------------
class DreamBooth(FixedPromptMixin, Method):
    name = "dreambooth"
    trains_token = False

    def __init__(self, prior: StableDiffusionPipeline, template: PromptTemplate, encode_prompt_every_step: bool = False):
        super().__init__(prior, template)
        self.unet = copy.deepcopy(prior.unet).requires_grad_(True).train()
        self._init_fixed_prompt(prior, encode_prompt_every_step)

    def predict_noise(self, noisy_latents, timesteps):
        embeds = self.condition(noisy_latents.shape[0], self.unet.dtype)
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=embeds, return_dict=False)[0]

    def export(self, out_dir):
        path = Path(out_dir) / EXPORT_SUBFOLDER
        self.unet.save_pretrained(path)
        return path

    def sampling_pipeline(self, prior):
        return pipeline_with_denoiser(prior, self.name, self.unet)  # the trained UNet itself

    @classmethod
    def load_export(cls, prior, export_dir):
        folder = export_folder(export_dir, EXPORT_SUBFOLDER)
        unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=prior.unet.dtype)
        return register_unet_denoiser(prior, cls.name, unet)

    @classmethod
    def default_guidance(cls, denoiser, template, control_prompt=None, concept_weight=1.0, control_weight=5.0):
        return baseline_guidance(cls, denoiser, template, control_prompt, control_weight)
