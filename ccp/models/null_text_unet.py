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
# Chosen from benchmarks/results/null_text_init.json (lower relative error to the prior's
# empty-prompt prediction at initialisation); see docs/null_text_unet.md.
DEFAULT_NULL_TEXT_DEFINITION = "calibrated"
FEATURE_BUFFER = "feature"


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
    unet: UNet2DConditionModel, null_text: torch.Tensor, calibration: NullTextCalibration
) -> dict[str, torch.Tensor]:
    """Mean of each attn2's output over batch, query positions and timesteps on the calibration set."""
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
            unet(x_t, t, encoder_hidden_states=text)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name] / counts[name]).to(device=unet.device, dtype=unet.dtype) for name in sums}


def _check_definition(definition: str) -> None:
    if definition not in NULL_TEXT_DEFINITIONS:
        raise ValueError(f"null-text definition must be one of {NULL_TEXT_DEFINITIONS}, got {definition!r}")


def _with_null_text_parameters(signature: inspect.Signature) -> inspect.Signature:
    """The parent's init signature plus our config entries, so diffusers' config machinery sees them."""
    extra = [
        inspect.Parameter("null_text_definition", inspect.Parameter.KEYWORD_ONLY, default=DEFAULT_NULL_TEXT_DEFINITION),
        inspect.Parameter("null_text_calibration", inspect.Parameter.KEYWORD_ONLY, default=None),
    ]
    return signature.replace(parameters=[*signature.parameters.values(), *extra])


class NullTextUNet2DConditionModel(UNet2DConditionModel):
    """SD's UNet without text conditioning: each cross-attention is a fixed null-text residual (§4.3).

    Build one with :meth:`from_prior`; ``save_pretrained``/``from_pretrained`` work as for any
    diffusers model. All remaining UNet parameters are trainable; the null-text features are
    buffers and stay fixed.
    """

    def __init__(
        self,
        *args,
        null_text_definition: str = DEFAULT_NULL_TEXT_DEFINITION,
        null_text_calibration: dict | None = None,
        **kwargs,
    ):
        _check_definition(null_text_definition)
        super().__init__(*args, **kwargs)
        # The parent's init re-registers its own arguments; keep ours recorded as explicit values
        # so a saved config always states the definition it was built with.
        used_defaults = [k for k in self.config.get("_use_default_values", []) if not k.startswith("null_text_")]
        self.register_to_config(
            null_text_definition=null_text_definition,
            null_text_calibration=null_text_calibration,
            _use_default_values=used_defaults,
        )
        for _, block in cross_attention_blocks(self):
            dim = block.attn2.to_out[0].out_features
            block.norm2 = nn.Identity()
            block.attn2 = NullTextCrossAttention(dim)

    __init__.__signature__ = _with_null_text_parameters(inspect.signature(UNet2DConditionModel.__init__))
    __init__ = register_to_config(__init__)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor | None = None, **kwargs):
        """As ``UNet2DConditionModel.forward``; ``encoder_hidden_states`` is accepted and ignored."""
        return super().forward(sample, timestep, None, **kwargs)

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
    ) -> NullTextUNet2DConditionModel:
        """Convert an SD-family UNet: copy every weight except attn2/norm2, which become null-text features.

        The text encoder and tokenizer are used once, on the empty prompt. ``calibration`` only
        matters for ``definition="calibrated"`` (defaults to ``NullTextCalibration()``).
        """
        _check_definition(definition)  # before the (possibly long) feature computation
        if isinstance(unet, NullTextUNet2DConditionModel):
            raise ValueError("the UNet is already a null-text UNet; convert the original prior UNet instead")
        null_text = empty_prompt_embedding(text_encoder, tokenizer)
        if definition == "value_mean":
            features, calibration_config = value_mean_features(unet, null_text), None
        else:
            calibration = calibration or NullTextCalibration()
            features, calibration_config = calibrated_features(unet, null_text, calibration), calibration.to_config()

        # Built on the meta device: no throwaway random init (seconds for SD v1.5 on a CPU); every
        # tensor is then assigned from copies of the prior's weights and the new features.
        with torch.device("meta"):
            model = cls.from_config(
                unet.config, null_text_definition=definition, null_text_calibration=calibration_config
            )
        dropped = tuple(f"{name}.{part}." for name, _ in cross_attention_blocks(unet) for part in ("attn2", "norm2"))
        state = {k: v.detach().clone() for k, v in unet.state_dict().items() if not k.startswith(dropped)}
        for name, feature in features.items():
            state[f"{name}.attn2.{FEATURE_BUFFER}"] = feature.to(device=unet.device, dtype=unet.dtype)
        model.load_state_dict(state, strict=True, assign=True)
        left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"conversion left tensors without values: {left}")
        model.requires_grad_(True)
        return model.eval()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """``ModelMixin.from_pretrained``, refusing folders that lack the null-text features."""
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        suffix = f".attn2.{FEATURE_BUFFER}"
        missing = {k for k in info["missing_keys"] if k.endswith(suffix)}
        missing |= {f"{n}{suffix}" for n, f in model.null_text_features().items() if torch.isnan(f).any()}
        if missing:
            folder = Path(str(pretrained_model_name_or_path)) / kwargs.get("subfolder", "")
            raise NullTextFeaturesMissingError(
                f"{folder} does not hold null-text UNet features ({len(missing)} missing, e.g. {min(missing)}); "
                "it is probably a plain UNet folder or an incomplete save. Convert the prior with "
                "NullTextUNet2DConditionModel.from_prior(unet, text_encoder, tokenizer) and save_pretrained that."
            )
        return (model, info) if wants_info else model
