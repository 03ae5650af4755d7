"""The null-text concept UNet of §4.3: an SD UNet whose cross-attentions are replaced by constants.

In every transformer block the text branch ``attn2(norm2(h), text)`` becomes a fixed per-layer
feature F (Eq. 5) that is added as the residual (Eq. 6), so the model needs no text encoder and
no prompt. Two definitions of F are offered:

``value_mean``
    Eq. 5 read literally: F = to_out(mean over the 77 tokens of to_v(null-text embedding)), i.e.
    the cross-attention output under uniform attention over the empty prompt's tokens.
``calibrated``
    The prior's actual empty-prompt cross-attention output, averaged over a calibration batch of
    noisy latents, query positions and a spread of timesteps.

The null text is the prior's own unconditional text conditioning. On SDXL it is two tensors (the
concatenated penultimate hidden states of both text encoders and text_encoder_2's pooled
projection) and, when the pipeline sets ``force_zeros_for_empty_prompt`` (SDXL base does), both
are zeros rather than the encoded "". The pooled part of SDXL's added conditioning becomes a fixed
buffer; the size/crop ``time_ids`` describe the image, not the text, and stay inputs.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from ccp.priors.tiny import SD15_SCHEDULER_CONFIG

NULL_TEXT_DEFINITIONS = ("value_mean", "calibrated")
# Where the null text comes from: the encoded "" or, as SDXL pipelines with
# force_zeros_for_empty_prompt use for their unconditional branch, zeros.
NULL_TEXT_SOURCES = ("empty_prompt", "zeros")
# Chosen from benchmarks/results/null_text_init.json (lower relative error to the prior's
# empty-prompt prediction at initialisation); see docs/null_text_unet.md.
DEFAULT_NULL_TEXT_DEFINITION = "calibrated"
FEATURE_BUFFER = "feature"
POOLED_BUFFER = "pooled_null_text"
SDXL_TIME_IDS = 6  # original (h, w), crop (top, left), target (h, w)


class NullTextFeaturesMissingError(ValueError):
    """A folder was loaded as a null-text UNet but does not hold the null-text features."""


class UnsupportedPriorError(ValueError):
    """The UNet has a transformer-block layout the null-text conversion does not handle."""


class NullTextCrossAttention(nn.Module):
    """Stands in for ``attn2``: returns a fixed feature per channel, whatever the input."""

    def __init__(self, dim: int):
        super().__init__()
        # NaN until set by conversion or loading, so a model without real features cannot run silently.
        self.register_buffer(FEATURE_BUFFER, torch.full((dim,), math.nan), persistent=True)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None, **kwargs):
        return self.feature.to(hidden_states.dtype).expand_as(hidden_states)

    def extra_repr(self) -> str:
        return f"dim={self.feature.shape[0]}"


@dataclass
class NullTextCalibration:
    """Inputs for the ``calibrated`` definition: x_t = add_noise(z0, noise, t) for each timestep.

    ``latents`` (z0) defaults to standard normal latents of the UNet's sample size; ``scheduler``
    defaults to SD v1.5's training noise schedule (pass the prior's own scheduler otherwise).
    """

    timesteps: Sequence[int] | None = None
    num_timesteps: int = 8
    batch_size: int = 2
    seed: int = 0
    latents: torch.Tensor | None = None
    scheduler: Any = None

    def _scheduler(self):
        return self.scheduler if self.scheduler is not None else DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)

    def resolved_timesteps(self) -> list[int]:
        if self.timesteps is not None:
            return [int(t) for t in self.timesteps]
        last = self._scheduler().config.num_train_timesteps - 1
        return torch.linspace(0, last, self.num_timesteps).round().long().tolist()

    def noisy_latents(self, unet: UNet2DConditionModel) -> list[tuple[int, torch.Tensor]]:
        """The (t, x_t) pairs the calibration runs the prior on; deterministic given ``seed``."""
        generator = torch.Generator().manual_seed(self.seed)
        if self.latents is not None:
            z0 = self.latents.detach().float().cpu()
        else:
            size = unet.config.sample_size
            z0 = torch.randn(self.batch_size, unet.config.in_channels, size, size, generator=generator)
        scheduler = self._scheduler()
        if float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0:
            # Sigma-space schedulers (Euler, SDXL's) add noise without the sqrt(alpha_bar) scaling the
            # UNet sees after scale_model_input; noise with the same betas in the UNet's own space.
            scheduler = DDPMScheduler.from_config(scheduler.config)
        pairs = []
        for t in self.resolved_timesteps():
            noise = torch.randn(z0.shape, generator=generator)
            x_t = scheduler.add_noise(z0, noise, torch.full((z0.shape[0],), t, dtype=torch.long))
            pairs.append((t, x_t.to(device=unet.device, dtype=unet.dtype)))
        return pairs

    def to_config(self) -> dict[str, Any]:
        """What went into the features, for the model config (latents and scheduler only by description)."""
        return {
            "timesteps": self.resolved_timesteps(),
            "batch_size": int(self.latents.shape[0]) if self.latents is not None else self.batch_size,
            "seed": self.seed,
            "latents": "user-provided" if self.latents is not None else "standard normal",
            "scheduler": type(self._scheduler()).__name__,
        }


def empty_prompt_embedding(text_encoder, tokenizer) -> torch.Tensor:
    """The text encoder's output for "" padded to the tokenizer's max length, as SD pipelines encode it."""
    tokens = tokenizer(
        "", padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    device = text_encoder.device
    mask = tokens.attention_mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    with torch.no_grad():
        return text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]


def sdxl_empty_prompt(text_encoder, tokenizer, text_encoder_2, tokenizer_2) -> tuple[torch.Tensor, torch.Tensor]:
    """"" as ``StableDiffusionXLPipeline.encode_prompt`` encodes it: both encoders' penultimate hidden
    states concatenated, and the pooled (projected) output of the encoder that has one (text_encoder_2)."""
    pairs = [(tokenizer, text_encoder), (tokenizer_2, text_encoder_2)] if text_encoder is not None else [
        (tokenizer_2, text_encoder_2)
    ]
    hidden, pooled = [], None
    with torch.no_grad():
        for tok, encoder in pairs:
            ids = tok("", padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
            out = encoder(ids.input_ids.to(encoder.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
    if pooled is None:
        raise UnsupportedPriorError("no text encoder with a pooled projection (SDXL's text_encoder_2) was given")
    return torch.cat(hidden, dim=-1), pooled


def pooled_dim(unet) -> int:
    """Width of the pooled text embedding in SDXL's ``text_time`` added conditioning."""
    return unet.config.projection_class_embeddings_input_dim - SDXL_TIME_IDS * unet.config.addition_time_embed_dim


def has_pooled_text(unet) -> bool:
    return unet.config.addition_embed_type == "text_time"


def size_time_ids(sample: torch.Tensor, vae_scale: int = 8) -> torch.Tensor:
    """SDXL time ids [B, 6] for uncropped images of the latents' size: original = target = (8H, 8W), crop (0, 0)."""
    h, w = sample.shape[-2] * vae_scale, sample.shape[-1] * vae_scale
    ids = torch.tensor([h, w, 0, 0, h, w], dtype=sample.dtype, device=sample.device)
    return ids.expand(sample.shape[0], -1)


def cross_attention_blocks(unet: nn.Module) -> list[tuple[str, BasicTransformerBlock]]:
    """The transformer blocks whose ``attn2`` is a text cross-attention, checked to be convertible."""
    blocks = []
    for name, block in unet.named_modules():
        if not isinstance(block, BasicTransformerBlock) or block.attn2 is None:
            continue
        if isinstance(block.attn2, NullTextCrossAttention):
            blocks.append((name, block))
            continue
        attn = block.attn2
        problems = []
        if block.norm_type != "layer_norm":
            problems.append(f"norm_type={block.norm_type!r} (only 'layer_norm', as in SD, is supported)")
        if block.only_cross_attention or not attn.is_cross_attention:
            problems.append("attn2 is not a pure text cross-attention")
        if attn.residual_connection or attn.added_kv_proj_dim is not None:
            problems.append("attn2 has a residual connection or added KV projections")
        if problems:
            raise UnsupportedPriorError(f"cannot convert transformer block {name}: {'; '.join(problems)}")
        blocks.append((name, block))
    if not blocks:
        raise UnsupportedPriorError("the UNet has no cross-attention transformer blocks to convert")
    return blocks


@torch.no_grad()
def value_mean_features(unet: UNet2DConditionModel, null_text: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eq. 5: to_out of the token-mean of to_v(null text); equals attn2 under uniform attention."""
    features = {}
    for name, block in cross_attention_blocks(unet):
        attn = block.attn2
        text = null_text.to(device=attn.to_v.weight.device, dtype=attn.to_v.weight.dtype)
        if attn.norm_cross is not None:
            text = attn.norm_encoder_hidden_states(text)
        # Linear maps commute with the mean, so this is the per-head uniform-softmax output exactly.
        value = attn.to_v(text).mean(dim=1)
        features[name] = (attn.to_out[0](value) / attn.rescale_output_factor)[0]
    return features


@torch.no_grad()
def calibrated_features(
    unet: UNet2DConditionModel,
    null_text: torch.Tensor,
    calibration: NullTextCalibration,
    pooled: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Mean of each attn2's output over batch, query positions and timesteps on the calibration set.

    On SDXL (``pooled`` given) the prior also gets the pooled null text and the time ids of the
    calibration latents' size (:func:`size_time_ids`).
    """
    blocks = cross_attention_blocks(unet)
    sums = {name: torch.zeros(block.attn2.to_out[0].out_features, dtype=torch.float64) for name, block in blocks}
    counts = dict.fromkeys(sums, 0)

    def recorder(name):
        def hook(module, args, output):
            flat = output.reshape(-1, output.shape[-1])
            sums[name] += flat.double().sum(dim=0).cpu()
            counts[name] += flat.shape[0]

        return hook

    handles = [block.attn2.register_forward_hook(recorder(name)) for name, block in blocks]
    try:
        for t, x_t in calibration.noisy_latents(unet):
            text = null_text.to(device=unet.device, dtype=unet.dtype).expand(x_t.shape[0], -1, -1)
            added = None
            if pooled is not None:
                text_embeds = pooled.to(device=unet.device, dtype=unet.dtype).expand(x_t.shape[0], -1)
                added = {"text_embeds": text_embeds, "time_ids": size_time_ids(x_t)}
            unet(x_t, t, encoder_hidden_states=text, added_cond_kwargs=added)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name] / counts[name]).to(device=unet.device, dtype=unet.dtype) for name in sums}


def _check_definition(definition: str) -> None:
    if definition not in NULL_TEXT_DEFINITIONS:
        raise ValueError(f"null-text definition must be one of {NULL_TEXT_DEFINITIONS}, got {definition!r}")


def _check_source(source: str) -> None:
    if source not in (*NULL_TEXT_SOURCES, "custom"):
        raise ValueError(f"null_text must be one of {NULL_TEXT_SOURCES}, got {source!r}")


# Runs once at import, before mutation testing can switch a mutant on: mutants here could never be
# killed; tests/test_null_text_unet.py's saved-config round trip checks what it builds.
def _with_null_text_parameters(signature: inspect.Signature) -> inspect.Signature:  # pragma: no mutate block
    """The parent's init signature plus our config entries, so diffusers' config machinery sees them."""
    extra = [
        inspect.Parameter("null_text_definition", inspect.Parameter.KEYWORD_ONLY, default=DEFAULT_NULL_TEXT_DEFINITION),
        inspect.Parameter("null_text_calibration", inspect.Parameter.KEYWORD_ONLY, default=None),
        inspect.Parameter("null_text_source", inspect.Parameter.KEYWORD_ONLY, default="empty_prompt"),
        inspect.Parameter("null_text_pooled_dim", inspect.Parameter.KEYWORD_ONLY, default=None),
    ]
    return signature.replace(parameters=[*signature.parameters.values(), *extra])


class NullTextUNet2DConditionModel(UNet2DConditionModel):
    """SD's UNet without text conditioning: each cross-attention is a fixed null-text residual (§4.3).

    Build one with :meth:`from_prior` (or :func:`null_text_from_pipeline`); ``save_pretrained``/
    ``from_pretrained`` work as for any diffusers model. All remaining UNet parameters are
    trainable; the null-text features (and on SDXL the pooled null text) are buffers and stay fixed.
    """

    def __init__(
        self,
        *args,
        null_text_definition: str = DEFAULT_NULL_TEXT_DEFINITION,
        null_text_calibration: dict | None = None,
        null_text_source: str = "empty_prompt",
        null_text_pooled_dim: int | None = None,
        **kwargs,
    ):
        _check_definition(null_text_definition)
        _check_source(null_text_source)
        super().__init__(*args, **kwargs)
        pooled = has_pooled_text(self)
        if pooled and null_text_pooled_dim is None:
            null_text_pooled_dim = pooled_dim(self)
        # The parent's init re-registers its own arguments; keep ours recorded as explicit values
        # so a saved config always states the definition it was built with.
        used_defaults = [k for k in self.config.get("_use_default_values", []) if not k.startswith("null_text_")]
        self.register_to_config(
            null_text_definition=null_text_definition,
            null_text_calibration=null_text_calibration,
            null_text_source=null_text_source,
            null_text_pooled_dim=null_text_pooled_dim,
            _use_default_values=used_defaults,
        )
        for _, block in cross_attention_blocks(self):
            dim = block.attn2.to_out[0].out_features
            block.norm2 = nn.Identity()
            block.attn2 = NullTextCrossAttention(dim)
        # NaN until set, like the features; None (no state-dict entry) without pooled added conditioning.
        self.register_buffer(POOLED_BUFFER, torch.full((null_text_pooled_dim,), math.nan) if pooled else None)

    __init__.__signature__ = _with_null_text_parameters(inspect.signature(UNet2DConditionModel.__init__))
    __init__ = register_to_config(__init__)

    def forward(
        self,
        sample: torch.Tensor,
        timestep,
        encoder_hidden_states: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        **kwargs,
    ):
        """As ``UNet2DConditionModel.forward``; ``encoder_hidden_states`` is accepted and ignored.

        On SDXL, ``added_cond_kwargs={"time_ids": [B, 6] or [6]}`` is required and the pooled text
        comes from the fixed buffer; a ``text_embeds`` entry is refused, since it would be ignored.
        """
        if self.pooled_null_text is not None:
            added_cond_kwargs = self._added_conditioning(sample, added_cond_kwargs)
        return super().forward(sample, timestep, None, added_cond_kwargs=added_cond_kwargs, **kwargs)

    def _added_conditioning(self, sample: torch.Tensor, added: dict | None) -> dict[str, torch.Tensor]:
        added = dict(added or {})
        if "text_embeds" in added:
            raise ValueError(
                "this null-text UNet's pooled text embedding is fixed (its pooled_null_text buffer); "
                "pass added_cond_kwargs={'time_ids': ...} without 'text_embeds'"
            )
        if added.get("time_ids") is None:
            raise ValueError(
                "this SDXL null-text UNet needs the image's size/crop conditioning: call it with "
                "added_cond_kwargs={'time_ids': ids}, ids of shape [batch, 6] = (original h, w, crop top, left, "
                "target h, w) in pixels, e.g. ccp.models.null_text_unet.size_time_ids(sample) for uncropped "
                "images of the latents' size"
            )
        batch = sample.shape[0]
        time_ids = added["time_ids"].reshape(-1, SDXL_TIME_IDS)
        if time_ids.shape[0] == 1 and batch > 1:
            time_ids = time_ids.expand(batch, -1)
        text_embeds = self.pooled_null_text.to(sample.dtype).expand(batch, -1)
        return {**added, "time_ids": time_ids, "text_embeds": text_embeds}

    def null_text_features(self) -> dict[str, torch.Tensor]:
        """Per transformer block (module name), the fixed residual its cross-attention was replaced by."""
        return {name: block.attn2.feature for name, block in cross_attention_blocks(self)}

    @classmethod
    @torch.no_grad()
    def from_prior(
        cls,
        unet: UNet2DConditionModel,
        text_encoder,
        tokenizer,
        definition: str = DEFAULT_NULL_TEXT_DEFINITION,
        calibration: NullTextCalibration | None = None,
        *,
        text_encoder_2=None,
        tokenizer_2=None,
        null_text: str | None = None,
        share_prior_weights: bool = False,
    ) -> NullTextUNet2DConditionModel:
        """Convert an SD-family UNet: copy every weight except attn2/norm2, which become null-text features.

        The text encoder(s) and tokenizer(s) are used once, on the empty prompt; SDXL needs
        ``text_encoder_2``/``tokenizer_2`` unless ``null_text="zeros"``. ``null_text`` defaults to
        ``"zeros"`` for SDXL UNets (``StableDiffusionXLPipeline``'s default ``force_zeros_for_empty_prompt``)
        and ``"empty_prompt"`` otherwise; :func:`null_text_from_pipeline` follows the pipeline's own flag.
        ``calibration`` only matters for ``definition="calibrated"``; see :meth:`from_null_text` for
        ``share_prior_weights``.
        """
        _check_definition(definition)
        pooled_text = has_pooled_text(unet)
        source = null_text or ("zeros" if pooled_text else "empty_prompt")
        if source not in NULL_TEXT_SOURCES:
            raise ValueError(f"null_text must be one of {NULL_TEXT_SOURCES}, got {source!r}")
        pooled = None
        if source == "zeros":
            length = tokenizer.model_max_length if tokenizer is not None else 77
            text = torch.zeros(1, length, unet.config.cross_attention_dim)
            pooled = torch.zeros(1, pooled_dim(unet)) if pooled_text else None
        elif pooled_text:
            if text_encoder_2 is None or tokenizer_2 is None:
                raise ValueError(
                    "an SDXL UNet's empty-prompt null text needs text_encoder_2 and tokenizer_2 "
                    "(or null_text='zeros'); null_text_from_pipeline(prior) passes them"
                )
            text, pooled = sdxl_empty_prompt(text_encoder, tokenizer, text_encoder_2, tokenizer_2)
        else:
            text = empty_prompt_embedding(text_encoder, tokenizer)
        return cls.from_null_text(
            unet, text, pooled, definition, calibration, source=source, share_prior_weights=share_prior_weights
        )

    @classmethod
    @torch.no_grad()
    def from_null_text(
        cls,
        unet: UNet2DConditionModel,
        text: torch.Tensor,
        pooled: torch.Tensor | None = None,
        definition: str = DEFAULT_NULL_TEXT_DEFINITION,
        calibration: NullTextCalibration | None = None,
        *,
        source: str = "custom",
        share_prior_weights: bool = False,
    ) -> NullTextUNet2DConditionModel:
        """Convert with a given null text [1, L, D] (and pooled [1, P] for SDXL); ``source`` goes to the config.

        ``share_prior_weights=True`` makes the model reuse the prior's weight storage instead of a
        copy (half the memory, for measuring large priors); training it would then change the prior.
        """
        _check_definition(definition)  # before the (possibly long) feature computation
        _check_source(source)
        if isinstance(unet, NullTextUNet2DConditionModel):
            raise ValueError("the UNet is already a null-text UNet; convert the original prior UNet instead")
        if has_pooled_text(unet) != (pooled is not None):
            raise ValueError("a pooled null text is needed exactly when the UNet has text_time added conditioning")
        if definition == "value_mean":
            features, calibration_config = value_mean_features(unet, text), None
        else:
            calibration = calibration or NullTextCalibration()
            features = calibrated_features(unet, text, calibration, pooled)
            calibration_config = calibration.to_config()

        # Built on the meta device: no throwaway random init (seconds for SD v1.5 on a CPU); every
        # tensor is then assigned from copies of the prior's weights and the new features.
        extra = {"null_text_source": source}
        if pooled is not None:
            extra["null_text_pooled_dim"] = pooled.shape[-1]
        with torch.device("meta"):
            model = cls.from_config(
                unet.config, null_text_definition=definition, null_text_calibration=calibration_config, **extra
            )
        dropped = tuple(f"{name}.{part}." for name, _ in cross_attention_blocks(unet) for part in ("attn2", "norm2"))
        state = {
            k: v.detach() if share_prior_weights else v.detach().clone()
            for k, v in unet.state_dict().items()
            if not k.startswith(dropped)
        }
        for name, feature in features.items():
            state[f"{name}.attn2.{FEATURE_BUFFER}"] = feature.to(device=unet.device, dtype=unet.dtype)
        if pooled is not None:
            state[POOLED_BUFFER] = pooled[0].to(device=unet.device, dtype=unet.dtype).clone()
        model.load_state_dict(state, strict=True, assign=True)
        left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"conversion left tensors without values: {left}")
        model.requires_grad_(True)
        return model.eval()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """``ModelMixin.from_pretrained``, refusing folders that lack the null-text features (or pooled null text)."""
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        suffix = f".attn2.{FEATURE_BUFFER}"
        missing = {k for k in info["missing_keys"] if k.endswith(suffix)}
        missing |= {f"{n}{suffix}" for n, f in model.null_text_features().items() if torch.isnan(f).any()}
        if model.pooled_null_text is not None and (
            POOLED_BUFFER in info["missing_keys"] or torch.isnan(model.pooled_null_text).any()
        ):
            missing.add(POOLED_BUFFER)
        if missing:
            folder = Path(str(pretrained_model_name_or_path)) / kwargs.get("subfolder", "")
            raise NullTextFeaturesMissingError(
                f"{folder} does not hold null-text UNet features ({len(missing)} missing, e.g. {min(missing)}); "
                "it is probably a plain UNet folder or an incomplete save. Convert the prior with "
                "NullTextUNet2DConditionModel.from_prior(unet, text_encoder, tokenizer) (for any family: "
                "null_text_from_pipeline(prior)) and save_pretrained that."
            )
        return (model, info) if wants_info else model


def null_text_from_pipeline(prior, **kwargs) -> NullTextUNet2DConditionModel:
    """:meth:`NullTextUNet2DConditionModel.from_prior` with the inputs of any family's pipeline.

    SDXL: both text encoders, and ``null_text`` following the pipeline's ``force_zeros_for_empty_prompt``.
    Without a ``calibration`` the noise schedule is the prior scheduler's. Other keyword
    arguments go to ``from_prior``.
    """
    if getattr(prior, "text_encoder_2", None) is not None:
        kwargs.setdefault("text_encoder_2", prior.text_encoder_2)
        kwargs.setdefault("tokenizer_2", prior.tokenizer_2)
        zeros = prior.config.get("force_zeros_for_empty_prompt", True)
        kwargs.setdefault("null_text", "zeros" if zeros else "empty_prompt")
    if kwargs.get("calibration") is None and getattr(prior, "scheduler", None) is not None:
        kwargs["calibration"] = NullTextCalibration(scheduler=prior.scheduler)
    return NullTextUNet2DConditionModel.from_prior(prior.unet, prior.text_encoder, prior.tokenizer, **kwargs)
