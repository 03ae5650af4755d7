"""Textual Inversion baseline [12]: one new token, only its embedding vector trained.

Appendix D.2: the prompt is ``a photo of <ffhq> face``; the placeholder ``<ffhq>`` is added to
(a copy of) the tokenizer and its vector initialised from the embedding of ``face``. The text
encoder runs every step so that gradients reach the new vector through it; all prior weights
stay frozen. The new vector is its own parameter (`AddedTokens`), looked up next to the original,
untouched embedding table (`ExtendedTokenEmbedding`), so exactly ``hidden_size`` parameters train
and no restore-after-step is needed.

Export: diffusers' textual-inversion file ``learned_embeds.safetensors`` = ``{placeholder:
tensor[1, hidden]}``, which ``pipe.load_textual_inversion(folder)`` reads.

On SDXL the token is added to both tokenizers and encoders, one trained row each (``token_embeds``:
text_encoder's, ``token_embeds_2``: text_encoder_2's); the condition is the prompt as
`GCFGXLPipeline.encode_text` encodes it (both penultimate hidden states, text_encoder_2's pooled
output) plus the size/crop time ids. The file holds ``clip_l`` [1, D1] and ``clip_g`` [1, D2], the
layout diffusers documents for SDXL embeddings (``load_textual_inversion(state["clip_g"], token=...,
text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)``, and clip_l likewise); that layout
names no token, so ours is in the file's metadata (``token``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from torch import nn

from ccp.methods.base import Method, PromptTemplate
from ccp.methods.conditioning import SDXLText, is_sdxl
from ccp.methods.dreambooth import baseline_guidance, encode_tokens, frozen_copy, tokenize

EMBEDS_FILE = "learned_embeds.safetensors"  # diffusers' TEXT_INVERSION_NAME_SAFE
SDXL_EMBEDS_KEYS = ("clip_l", "clip_g")  # diffusers' SDXL textual-inversion layout: one row set per encoder


class AddedTokens(nn.Module):
    """The trainable rows of tokens added after the original vocabulary: ``weight`` [n, hidden]."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(init.detach().clone().float())


class ExtendedTokenEmbedding(nn.Module):
    """A frozen token table followed by trainable added rows: ids < n look up the original table,
    ids >= n the added rows. Gradients reach only the added rows."""

    def __init__(self, base: nn.Embedding, added: AddedTokens):
        super().__init__()
        self.base = base
        self.added = added

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings + self.added.weight.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def weight(self) -> torch.Tensor:
        """The full [vocab + n, hidden] table (read-only view for code that inspects embeddings)."""
        return torch.cat([self.base.weight, self.added.weight.to(self.base.weight.dtype)])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = self.base.num_embeddings
        is_added = input_ids >= n
        out = self.base(input_ids.masked_fill(is_added, 0))
        added = self.added.weight.to(out.dtype)[(input_ids - n).clamp(min=0, max=self.added.weight.shape[0] - 1)]
        return torch.where(is_added.unsqueeze(-1), added, out)


def add_placeholder_token(tokenizer, text_encoder: nn.Module, placeholder: str, initializer: str):
    """Copies of `tokenizer` and `text_encoder` with `placeholder` added; returns (tokenizer,
    text_encoder, AddedTokens). The callers' objects are left untouched; the text encoder copy is
    frozen and shares its weights with the original."""
    init_ids = tokenizer.encode(initializer, add_special_tokens=False)
    if len(init_ids) != 1:
        raise ValueError(f"initializer {initializer!r} must be a single token, got {len(init_ids)} tokens: {init_ids}")
    tokenizer = copy.deepcopy(tokenizer)
    if tokenizer.add_tokens(placeholder) != 1:
        raise ValueError(f"placeholder {placeholder!r} is already in the tokenizer; choose another token")
    text_encoder = frozen_copy(text_encoder)
    base = text_encoder.get_input_embeddings()
    if tokenizer.convert_tokens_to_ids(placeholder) != base.num_embeddings:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the text encoder's table {base.num_embeddings} rows; "
            "they must match before a token is added"
        )
    added = AddedTokens(base.weight[init_ids[0]].unsqueeze(0))
    text_encoder.set_input_embeddings(ExtendedTokenEmbedding(base, added))
    return tokenizer, text_encoder, added


def save_learned_embeds(out_dir: str | Path, placeholder: str, added: AddedTokens) -> Path:
    path = Path(out_dir) / EMBEDS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({placeholder: added.weight.detach().float().cpu().contiguous()}, str(path))
    return path


def save_sdxl_embeds(out_dir: str | Path, placeholder: str, added: AddedTokens, added_2: AddedTokens) -> Path:
    """``{"clip_l": [n, D1], "clip_g": [n, D2]}`` with the token in the metadata (the layout has no name)."""
    path = Path(out_dir) / EMBEDS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = {key: a.weight.detach().float().cpu().contiguous() for key, a in zip(SDXL_EMBEDS_KEYS, (added, added_2))}
    safetensors.torch.save_file(rows, str(path), metadata={"token": placeholder})
    return path


def _embeds_file(embeds_path: str | Path) -> Path:
    embeds_path = Path(embeds_path)
    return embeds_path / EMBEDS_FILE if embeds_path.is_dir() else embeds_path


def read_sdxl_embeds(embeds_path: str | Path, token: str | None = None) -> tuple[str, dict[str, torch.Tensor]]:
    """(token, {"clip_l": ..., "clip_g": ...}) of an SDXL embeddings file; `token` names it when the
    file's metadata does not (files from other tools)."""
    path = _embeds_file(embeds_path)
    with safe_open(str(path), framework="pt") as f:
        missing = [k for k in SDXL_EMBEDS_KEYS if k not in f.keys()]
        if missing:
            raise ValueError(f"{path} has no {' or '.join(missing)} rows: not an SDXL textual-inversion file "
                             f"(keys {sorted(f.keys())}); an SD v1.x/2.x embedding cannot condition an SDXL prior")
        token = token or (f.metadata() or {}).get("token")
        rows = {key: f.get_tensor(key) for key in SDXL_EMBEDS_KEYS}
    if not token:
        raise ValueError(f"{path} names no token (no 'token' in its metadata); pass the placeholder it was trained for")
    return token, rows


def pipeline_with_token(prior: StableDiffusionPipeline, embeds_path: str | Path, token: str | None = None):
    """A GCFG pipeline on copies of the prior's tokenizer(s) and text encoder(s) with the learned
    token loaded by diffusers' `load_textual_inversion` (the prior itself is not changed: loading
    replaces the copy's embedding table by a larger one and leaves the shared weights alone). On
    SDXL the clip_l rows go to the first pair and the clip_g rows to the second, as diffusers
    documents; `token` overrides the file's (SDXL files name none themselves)."""
    from ccp.pipelines.gcfg import GCFGPipeline

    pipe = GCFGPipeline.from_prior(prior)
    if is_sdxl(prior):
        token, rows = read_sdxl_embeds(embeds_path, token)
        pipe.register_modules(tokenizer=copy.deepcopy(prior.tokenizer), text_encoder=frozen_copy(prior.text_encoder),
                              tokenizer_2=copy.deepcopy(prior.tokenizer_2),
                              text_encoder_2=frozen_copy(prior.text_encoder_2))
        pipe.load_textual_inversion(rows["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(rows["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
        return pipe
    pipe.register_modules(tokenizer=copy.deepcopy(prior.tokenizer), text_encoder=frozen_copy(prior.text_encoder))
    embeds_path = Path(embeds_path)
    if embeds_path.is_dir():
        pipe.load_textual_inversion(str(embeds_path), weight_name=EMBEDS_FILE)
    else:
        pipe.load_textual_inversion(str(embeds_path.parent), weight_name=embeds_path.name)
    return pipe


class TokenTrainingMixin:
    """Placeholder token trained through a frozen text encoder that runs every step."""

    def _init_token(self, prior: StableDiffusionPipeline) -> None:
        if self.sdxl:
            return self._init_sdxl_token(prior)
        t = self.template
        tokenizer, text_encoder, self.token_embeds = add_placeholder_token(
            prior.tokenizer, prior.text_encoder, t.placeholder, t.initializer
        )
        self.placeholder_id = tokenizer.convert_tokens_to_ids(t.placeholder)
        self._frozen["text_encoder"] = text_encoder
        self.tokenizer = tokenizer
        self.register_buffer("prompt_ids", tokenize(tokenizer, self.training_prompt), persistent=False)
        if not (self.prompt_ids == self.placeholder_id).any():
            raise ValueError(f"training prompt {self.training_prompt!r} does not contain the placeholder {t.placeholder!r}")

    def _init_sdxl_token(self, prior) -> None:
        """The token added to both tokenizers and encoders (copies), one trained row each
        (``token_embeds``: text_encoder's, ``token_embeds_2``: text_encoder_2's)."""
        t = self.template
        if prior.text_encoder is None:
            raise ValueError("textual inversion on SDXL needs both text encoders; this prior has no text_encoder")
        tokenizer, encoder, self.token_embeds = add_placeholder_token(
            prior.tokenizer, prior.text_encoder, t.placeholder, t.initializer)
        tokenizer_2, encoder_2, self.token_embeds_2 = add_placeholder_token(
            prior.tokenizer_2, prior.text_encoder_2, t.placeholder, t.initializer)
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.placeholder_id = tokenizer.convert_tokens_to_ids(t.placeholder)
        self._sdxl_text = SDXLText.of(prior, [tokenizer, tokenizer_2], [encoder, encoder_2])
        self._frozen["text_encoder"] = self._sdxl_text.encoders
        self._sdxl_prompt_ids = self._sdxl_text.tokenize(self.training_prompt)
        if not (self._sdxl_prompt_ids[0] == self.placeholder_id).any():
            raise ValueError(f"training prompt {self.training_prompt!r} does not contain the placeholder {t.placeholder!r}")

    def condition(self, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        embeds = encode_tokens(self._frozen["text_encoder"], self.prompt_ids)  # gradients reach the token
        return embeds.to(dtype).expand(batch_size, -1, -1)

    def sdxl_condition(self, batch_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds [B, 77, D1 + D2], pooled [B, P]) of the training prompt, as
        `GCFGXLPipeline.encode_text` computes them; gradients reach both rows."""
        embeds, pooled = self._sdxl_text.encode(self._sdxl_prompt_ids, self.training_prompt)
        return embeds.to(dtype).expand(batch_size, -1, -1), pooled.to(dtype).expand(batch_size, -1)

    def pipeline_with_own_token(self, prior: StableDiffusionPipeline):
        """`prior`'s GCFG pipeline with the method's own tokenizer and text encoder, the placeholder
        looked up in the trained row as it is now: the encoder's weights are the prior's (shared by
        `frozen_copy`) and the row is the method's parameter, so nothing is copied and every update
        shows. What `pipeline_with_token` builds from the exported file, in memory."""
        from ccp.pipelines.gcfg import GCFGPipeline

        pipe = GCFGPipeline.from_prior(prior)  # moves the prior's parts to its device; ours join after
        if self.sdxl:
            first, second = self._sdxl_text.encoders
            pipe.register_modules(tokenizer=self.tokenizer, text_encoder=first, tokenizer_2=self.tokenizer_2,
                                  text_encoder_2=second)
        else:
            pipe.register_modules(tokenizer=self.tokenizer, text_encoder=self._frozen["text_encoder"])
        return pipe

    @property
    def learned_embedding(self) -> torch.Tensor:
        """[1, hidden] the trained placeholder vector (on SDXL text_encoder's; `token_embeds_2` holds text_encoder_2's)."""
        return self.token_embeds.weight


class TextualInversion(TokenTrainingMixin, Method):
    name = "textual_inversion"
    trains_token = True

    def __init__(self, prior: StableDiffusionPipeline, template: PromptTemplate):
        super().__init__(prior, template)
        self._frozen["unet"] = frozen_copy(prior.unet)
        self._init_token(prior)

    @property
    def unet(self):
        return self._frozen["unet"]

    def predict_noise(self, noisy_latents, timesteps, time_ids=None):
        dtype, n = self.unet.dtype, noisy_latents.shape[0]
        if self.sdxl:
            embeds, pooled = self.sdxl_condition(n, dtype)
            added = self.added_cond_kwargs(noisy_latents, dtype, pooled, time_ids)
            return self.unet(noisy_latents.to(dtype), timesteps, encoder_hidden_states=embeds,
                             added_cond_kwargs=added, return_dict=False)[0]
        embeds = self.condition(n, dtype)
        return self.unet(noisy_latents.to(dtype), timesteps, encoder_hidden_states=embeds, return_dict=False)[0]

    def export(self, out_dir):
        if self.sdxl:
            return save_sdxl_embeds(out_dir, self.template.placeholder, self.token_embeds, self.token_embeds_2)
        return save_learned_embeds(out_dir, self.template.placeholder, self.token_embeds)

    def sampling_pipeline(self, prior):
        pipe = self.pipeline_with_own_token(prior)
        # the method's frozen UNet copy (the prior's weights; already on the training device)
        pipe.register_modules(unet=self.unet)
        return pipe, "prior"

    @classmethod
    def load_export(cls, prior, export_dir):
        return pipeline_with_token(prior, export_dir), "prior"

    @classmethod
    def default_guidance(cls, denoiser, template, control_prompt=None, concept_weight=1.0, control_weight=5.0):
        return baseline_guidance(cls, denoiser, template, control_prompt, control_weight)
