"""DreamBooth baseline [37]: every prior UNet parameter trained, conditioned on a fixed prompt.

Appendix D.2: the prompt is ``a photo of face`` (no placeholder: DreamBooth trains no text
embedding), encoded by the frozen prior text encoder. The prompt and encoder never change, so the
embedding is computed once and cached; ``encode_prompt_every_step=True`` runs the encoder each
step instead (same result, for benchmarking the text encoder's cost).

Options of diffusers' ``train_dreambooth.py``, off by default: ``train_text_encoder`` also trains a
copy of the text encoder (the prior's is never changed), at ``text_encoder_lr`` (null: optim.lr)
as its own optimizer parameter group; the prompt is then encoded through that copy every step, the
copy is exported as a diffusers folder ``text_encoder/`` beside ``unet/``, and sampling encodes the
prompts of this denoiser only with it (`DenoiserTextEncoderPipeline`; other denoisers, e.g. the
prior in a GCFG term, keep the prior's encoder). Prior preservation (`use_class_prompt`): the rows
after the instance rows are conditioned on the class prompt.

This module also holds what the text-conditioned baselines share: prompt encoding exactly as the
sampling pipeline does it, the paper's baseline guidance, and frozen copies of prior modules that
share their weights.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from torch import nn

from ccp.config import ConfigError
from ccp.guidance import Condition, GuidanceSpec, GuidanceTerm, Source
from ccp.methods.base import Method, PromptTemplate
from ccp.methods.conditioning import SDXLText
from ccp.models.denoisers import TextUNetDenoiser
from ccp.pipelines.gcfg import GCFGPipeline

EXPORT_SUBFOLDER = "unet"
TEXT_ENCODER_SUBFOLDER = "text_encoder"


class DreamBoothConfigError(ConfigError, ValueError):
    """DreamBooth settings that cannot train; the message names the key and the fix."""


def check_text_encoder_options(train_text_encoder, text_encoder_lr) -> None:
    """``method.module.train_text_encoder`` / ``text_encoder_lr``, checked before any model loads."""
    if not isinstance(train_text_encoder, bool):
        raise DreamBoothConfigError(f"method.module.train_text_encoder={train_text_encoder!r}: must be true or false")
    if text_encoder_lr is None:
        return
    if not train_text_encoder:
        raise DreamBoothConfigError(
            f"method.module.text_encoder_lr={text_encoder_lr!r} is set but train_text_encoder=false, so nothing uses "
            "it; set method.module.train_text_encoder=true, or text_encoder_lr=null")
    if isinstance(text_encoder_lr, bool) or not isinstance(text_encoder_lr, (int, float)) or text_encoder_lr <= 0:
        raise DreamBoothConfigError(f"method.module.text_encoder_lr={text_encoder_lr!r}: must be a positive number "
                                    "(e.g. 5.0e-6), or null for optim.lr")


# --- per-denoiser text encoders in GCFG --------------------------------------------------------
class TextEncoderUNetDenoiser(TextUNetDenoiser):
    """A UNet whose prompts its own text encoder encodes; listed among its modules, so device moves
    for a sample take the encoder along."""

    def __init__(self, unet: UNet2DConditionModel, text_encoder: nn.Module):
        super().__init__(unet)
        self.text_encoder = text_encoder

    def modules(self):
        return [self.unet, self.text_encoder]


class DenoiserTextEncoderPipeline(GCFGPipeline):
    """`GCFGPipeline` in which chosen denoisers encode their prompts with their own text encoder (a
    tuned copy; same tokenizer) and every other denoiser with the pipeline's, the prior's. The
    encoders are registered components, so `.to()` and offload see them."""

    def set_denoiser_text_encoder(self, name: str, text_encoder: nn.Module) -> None:
        if name not in self._extra_denoisers:
            raise ValueError(f"no denoiser {name!r} was added with add_denoiser; add it first")
        table = dict(getattr(self, "_denoiser_text_encoders", {}))
        table[name] = self._register_component(text_encoder, f"{name}_text_encoder")
        self._denoiser_text_encoders = table

    @classmethod
    def _get_signature_keys(cls, obj):
        expected, optional = super()._get_signature_keys(obj)
        table = getattr(obj, "_denoiser_text_encoders", None) if not isinstance(obj, type) else None
        return sorted(set(expected) | set((table or {}).values())), optional

    @property
    def denoisers(self):
        found = super().denoisers
        for name, key in getattr(self, "_denoiser_text_encoders", {}).items():
            found[name] = TextEncoderUNetDenoiser(found[name].unet, getattr(self, key))
        return found

    def encode_prompt_with(self, text_encoder: nn.Module, prompt: str) -> torch.Tensor:
        """[1, 77, D]: `encode_prompt` with `text_encoder` in place of the pipeline's."""
        prompt = self.maybe_convert_prompt(prompt, self.tokenizer)
        ids = tokenize(self.tokenizer, prompt)
        return encode_tokens(text_encoder, ids).to(dtype=text_encoder.dtype, device=self.device_for_call)

    def batch_conditions(self, plan, num_images, height, width, dtype):
        batched = super().batch_conditions(plan, num_images, height, width, dtype)
        for call in plan.calls:
            key = getattr(self, "_denoiser_text_encoders", {}).get(call.denoiser)
            if key is None:
                continue
            encoder, cache = getattr(self, key), {}
            for prompt in {c.prompt or "" for c in call.conditions}:
                cache[prompt] = self.encode_prompt_with(encoder, prompt)
            embeds = torch.cat([cache[c.prompt or ""].repeat(num_images, 1, 1) for c in call.conditions])
            batched[call.denoiser] = dataclasses.replace(batched[call.denoiser], prompt_embeds=embeds)
        return batched


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
    is cached once in a non-persistent buffer (moves with the method, never checkpointed). On SDXL
    the prompt goes through both encoders as GCFG encodes it, and the pooled embedding is cached too."""

    def _init_fixed_prompt(self, prior: StableDiffusionPipeline, encode_every_step: bool) -> None:
        self.encode_prompt_every_step = bool(encode_every_step)
        if self.sdxl:
            text = SDXLText.of(prior, encoders=[frozen_copy(e) if e is not None else None
                                                for e in (prior.text_encoder, prior.text_encoder_2)])
            self._sdxl_text = text
            if self.encode_prompt_every_step:
                self._frozen["text_encoder"] = text.encoders
            self._sdxl_prompt_ids = text.tokenize(self.training_prompt)
            with torch.no_grad():
                embeds, pooled = text.encode(self._sdxl_prompt_ids, self.training_prompt)
            self.register_buffer("prompt_embeds", embeds.detach(), persistent=False)
            self.register_buffer("pooled_prompt_embeds", pooled.detach(), persistent=False)
            return
        text_encoder = frozen_copy(prior.text_encoder)
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
                if self.sdxl:
                    embeds = self._sdxl_text.encode(self._sdxl_prompt_ids, self.training_prompt)[0]
                else:
                    embeds = encode_tokens(self._frozen["text_encoder"], self.prompt_ids)
        else:
            embeds = self.prompt_embeds
        return embeds.to(dtype).expand(batch_size, -1, -1)

    def pooled_condition(self, batch_size: int, dtype: torch.dtype) -> torch.Tensor | None:
        """[B, P] pooled embedding of the training prompt on SDXL (None otherwise)."""
        if not self.sdxl:
            return None
        return self.pooled_prompt_embeds.to(dtype).expand(batch_size, -1)

    def fixed_prompt_prediction(self, unet, noisy_latents, timesteps, time_ids=None):
        """`unet`'s prediction under the training prompt (and on SDXL its pooled text and `time_ids`)."""
        dtype, n = unet.dtype, noisy_latents.shape[0]
        added = self.added_cond_kwargs(noisy_latents, dtype, self.pooled_condition(n, dtype), time_ids)
        return unet(noisy_latents.to(dtype), timesteps, encoder_hidden_states=self.condition(n, dtype),
                    added_cond_kwargs=added, return_dict=False)[0]


def export_folder(export_dir: str | Path, subfolder: str) -> Path:
    """`export_dir/subfolder` if it exists (export_dir is what `export` was given), else export_dir."""
    export_dir = Path(export_dir)
    return export_dir / subfolder if (export_dir / subfolder).is_dir() else export_dir


def pipeline_with_denoiser(prior: StableDiffusionPipeline, name: str, unet: UNet2DConditionModel,
                           text_encoder: nn.Module | None = None):
    """``(GCFGPipeline, name)``: `prior`'s pipeline with `unet` registered as denoiser `name`, as it
    is: not copied, cast, moved or put in eval mode (a method's current weights, sampled in memory).
    With `text_encoder`, that denoiser's prompts are encoded by it (`DenoiserTextEncoderPipeline`)."""
    cls = GCFGPipeline if text_encoder is None else DenoiserTextEncoderPipeline
    pipe = cls.from_prior(prior)  # moves the prior's parts to its device; `unet` joins after
    pipe.add_denoiser(name, unet)
    if text_encoder is not None:
        pipe.set_denoiser_text_encoder(name, text_encoder)
    return pipe, name


def register_unet_denoiser(prior: StableDiffusionPipeline, name: str, unet: UNet2DConditionModel):
    """A loaded UNet as denoiser `name` of `prior`'s pipeline, on the prior's device and dtype, in eval mode."""
    unet = unet.to(prior.device) if unet.dtype == prior.unet.dtype else unet.to(device=prior.device, dtype=prior.unet.dtype)
    return pipeline_with_denoiser(prior, name, unet.eval())


# --- DreamBooth --------------------------------------------------------------------------------
class DreamBooth(FixedPromptMixin, Method):
    name = "dreambooth"
    trains_token = False

    def __init__(self, prior: StableDiffusionPipeline, template: PromptTemplate, encode_prompt_every_step: bool = False,
                 train_text_encoder: bool = False, text_encoder_lr: float | None = None):
        super().__init__(prior, template)
        self.unet = copy.deepcopy(prior.unet).requires_grad_(True).train()
        self.train_text_encoder, self.text_encoder_lr = train_text_encoder, text_encoder_lr
        # what encodes a class prompt given later (`use_class_prompt`); a tuple stays out of the module tree
        self._prompt_encoding = (prior.tokenizer, prior.text_encoder)
        if train_text_encoder:
            # a copy of its own: the prior's encoder (and every other denoiser's prompts) never change
            self.text_encoder = copy.deepcopy(prior.text_encoder).requires_grad_(True).train()
            self.register_buffer("prompt_ids", tokenize(prior.tokenizer, self.training_prompt), persistent=False)
        else:
            self._init_fixed_prompt(prior, encode_prompt_every_step)

    @classmethod
    def check_settings(cls, train_text_encoder: bool = False, text_encoder_lr: float | None = None, **_) -> None:
        check_text_encoder_options(train_text_encoder, text_encoder_lr)

    @classmethod
    def check_prior(cls, family: str, train_text_encoder: bool = False, **settings) -> None:
        super().check_prior(family, **settings)
        if family == "sdxl" and train_text_encoder:
            # two encoders, per-denoiser encoding of both and their export: not built for SDXL
            raise DreamBoothConfigError(
                "method.module.train_text_encoder=true: DreamBooth tunes the text encoder on SD v1.x/2.x priors "
                "only; an SDXL prior has two text encoders, which ccp does not tune. Set "
                "method.module.train_text_encoder=false (the UNet still trains), or use an SD v1.x/2.x prior")

    def extra_param_groups(self) -> list[dict]:
        """The text encoder at its own learning rate (an optimizer parameter group), when set."""
        if not self.train_text_encoder or self.text_encoder_lr is None:
            return []
        return [{"params": list(self.text_encoder.parameters()), "lr": float(self.text_encoder_lr)}]

    def use_class_prompt(self, class_prompt: str) -> None:
        """Prior preservation: rows after the instance rows (``num_class`` of `predict_noise`) are
        conditioned on `class_prompt`, through the same encoder(s) as the instance prompt."""
        if self.sdxl:
            with torch.no_grad():
                embeds, pooled = self._sdxl_text.encode(self._sdxl_text.tokenize(class_prompt), class_prompt)
            device = self.prompt_embeds.device
            self.register_buffer("class_prompt_embeds", embeds.detach().to(device), persistent=False)
            self.register_buffer("class_pooled_prompt_embeds", pooled.detach().to(device), persistent=False)
            return
        tokenizer, text_encoder = self._prompt_encoding
        self.register_buffer("class_prompt_ids", tokenize(tokenizer, class_prompt), persistent=False)
        if not self.train_text_encoder:
            with torch.no_grad():
                embeds = encode_tokens(text_encoder, self.class_prompt_ids).detach()
            self.register_buffer("class_prompt_embeds", embeds.to(self.prompt_embeds.device), persistent=False)

    def _embeds(self, ids_name: str, embeds_name: str, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        if self.train_text_encoder:  # gradients reach the encoder copy
            embeds = encode_tokens(self.text_encoder, getattr(self, ids_name))
        elif embeds_name == "prompt_embeds":
            return self.condition(batch_size, dtype)
        else:
            embeds = getattr(self, embeds_name)
        return embeds.to(dtype).expand(batch_size, -1, -1)

    def _pooled(self, batch_size: int, num_class: int, dtype: torch.dtype) -> torch.Tensor | None:
        if not self.sdxl:
            return None
        pooled = self.pooled_condition(batch_size - num_class, dtype)
        if num_class:
            pooled = torch.cat([pooled, self.class_pooled_prompt_embeds.to(dtype).expand(num_class, -1)])
        return pooled

    def predict_noise(self, noisy_latents, timesteps, num_class: int = 0, time_ids=None):
        dtype = self.unet.dtype
        embeds = self._embeds("prompt_ids", "prompt_embeds", noisy_latents.shape[0] - num_class, dtype)
        if num_class:
            embeds = torch.cat([embeds, self._embeds("class_prompt_ids", "class_prompt_embeds", num_class, dtype)])
        added = self.added_cond_kwargs(noisy_latents, dtype, self._pooled(noisy_latents.shape[0], num_class, dtype),
                                       time_ids)
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added,
                         return_dict=False)[0]

    def export(self, out_dir):
        path = Path(out_dir) / EXPORT_SUBFOLDER
        self.unet.save_pretrained(path)
        if self.train_text_encoder:
            self.text_encoder.save_pretrained(Path(out_dir) / TEXT_ENCODER_SUBFOLDER)
        return path

    def sampling_pipeline(self, prior):
        # the trained UNet (and text encoder) themselves
        return pipeline_with_denoiser(prior, self.name, self.unet, self.text_encoder if self.train_text_encoder else None)

    @classmethod
    def load_export(cls, prior, export_dir):
        folder = export_folder(export_dir, EXPORT_SUBFOLDER)
        unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=prior.unet.dtype)
        encoder_folder = Path(export_dir) / TEXT_ENCODER_SUBFOLDER
        if not encoder_folder.is_dir():
            return register_unet_denoiser(prior, cls.name, unet)
        encoder = type(prior.text_encoder).from_pretrained(encoder_folder, torch_dtype=prior.text_encoder.dtype)
        return pipeline_with_denoiser(prior, cls.name, unet.to(prior.device).eval(), encoder.to(prior.device).eval())

    @classmethod
    def default_guidance(cls, denoiser, template, control_prompt=None, concept_weight=1.0, control_weight=5.0):
        return baseline_guidance(cls, denoiser, template, control_prompt, control_weight)
