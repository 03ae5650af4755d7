"""The real CLIP BPE tokenizer, built offline from the vocabulary that clip-anytorch ships."""

from __future__ import annotations

import gzip
import os
from functools import lru_cache

from transformers import CLIPTokenizer

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# 49152 BPE entries minus the 256 byte symbols minus the two specials: the merges CLIP uses.
_N_MERGES = 49152 - 256 - 2


def _bpe_file() -> str:
    import clip.simple_tokenizer as st  # clip-anytorch

    path = st.default_bpe()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"clip-anytorch's BPE vocabulary is missing at {path}; reinstall clip-anytorch.")
    return path


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges in exactly the order OpenAI CLIP (and SD v1.x's tokenizer) uses."""
    from clip.simple_tokenizer import bytes_to_unicode

    lines = gzip.open(_bpe_file()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _N_MERGES + 1]]
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"built a CLIP vocabulary of {len(vocab)} tokens, expected {CLIP_VOCAB_SIZE}")
    return vocab, merges


def build_clip_tokenizer(pad_token: str = EOS) -> CLIPTokenizer:
    """SD v1.x's tokenizer (openai/clip-vit-large-patch14): lower-case BPE, 77 tokens, EOS as padding.

    ``pad_token="!"`` gives the OpenCLIP variant (SD 2.x's tokenizer, SDXL's tokenizer_2): same
    vocabulary and merges, padded with "!" (id 0) after the EOS."""
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=EOS,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=pad_token,
        model_max_length=CLIP_MAX_LENGTH,
    )
