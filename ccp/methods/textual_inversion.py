"""Textual Inversion baseline [12]: one new token, only its embedding vector trained.

Appendix D.2: the prompt is ``a photo of <ffhq> face``; the placeholder ``<ffhq>`` is added to
(a copy of) the tokenizer and its vector initialised from the embedding of ``face``. The text
encoder runs every step so that gradients reach the new vector through it; all prior weights
stay frozen. The new vector is its own parameter (`AddedTokens`), looked up next to the original,
untouched embedding table (`ExtendedTokenEmbedding`), so exactly ``hidden_size`` parameters train
and no restore-after-step is needed.

Export: diffusers' textual-inversion file ``learned_embeds.safetensors`` = ``{placeholder:
tensor[1, hidden]}``, which ``pipe.load_textual_inversion(folder)`` reads.
"""

from __future__ import annotations

import copy
from pathlib import Path

import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline
from torch import nn

from ccp.methods.base import Method, PromptTemplate
from ccp.methods.dreambooth import baseline_guidance, encode_tokens, frozen_copy, tokenize

EMBEDS_FILE = "learned_embeds.safetensors"  # diffusers' TEXT_INVERSION_NAME_SAFE


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


def pipeline_with_token(prior: StableDiffusionPipeline, embeds_path: str | Path):
    """A GCFG pipeline on copies of the prior's tokenizer and text encoder with the learned token
    loaded by diffusers' `load_textual_inversion` (the prior itself is not changed: loading
    replaces the copy's embedding table by a larger one and leaves the shared weights alone)."""
    from ccp.pipelines.gcfg import GCFGPipeline

    pipe = GCFGPipeline.from_prior(prior)
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

    def condition(self, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        embeds = encode_tokens(self._frozen["text_encoder"], self.prompt_ids)  # gradients reach the token
        return embeds.to(dtype).expand(batch_size, -1, -1)

    def pipeline_with_own_token(self, prior: StableDiffusionPipeline):
        """`prior`'s GCFG pipeline with the method's own tokenizer and text encoder, the placeholder
        looked up in the trained row as it is now: the encoder's weights are the prior's (shared by
        `frozen_copy`) and the row is the method's parameter, so nothing is copied and every update
        shows. What `pipeline_with_token` builds from the exported file, in memory."""
        from ccp.pipelines.gcfg import GCFGPipeline

        pipe = GCFGPipeline.from_prior(prior)  # moves the prior's parts to its device; ours join after
        pipe.register_modules(tokenizer=self.tokenizer, text_encoder=self._frozen["text_encoder"])
        return pipe

    @property
    def learned_embedding(self) -> torch.Tensor:
        """[1, hidden] the trained placeholder vector."""
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

    def predict_noise(self, noisy_latents, timesteps):
        embeds = self.condition(noisy_latents.shape[0], self.unet.dtype)
        return self.unet(noisy_latents.to(self.unet.dtype), timesteps, encoder_hidden_states=embeds, return_dict=False)[0]

    def export(self, out_dir):
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
