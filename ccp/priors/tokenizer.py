"""The real CLIP BPE tokenizer, built offline from the vocabulary that clip-anytorch ships."""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import os
import sys
from functools import lru_cache

from transformers import CLIPTokenizer

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# 49152 BPE entries minus the 256 byte symbols minus the two specials: the merges CLIP uses.
_N_MERGES = 49152 - 256 - 2
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
INSTALL_HINT = "pip install clip-anytorch (a dependency of ccp; it ships OpenAI CLIP's BPE vocabulary)"


def _clip_package_dirs() -> list[str]:
    """Folders of the ``clip`` package, found without running its ``__init__`` (clip/clip.py imports
    pkg_resources, which setuptools >= 81 no longer has)."""
    module = sys.modules.get("clip")
    if module is not None:
        return list(getattr(module, "__path__", []))
    try:
        spec = importlib.util.find_spec("clip")
    except (ImportError, ValueError):
        return []
    return list(spec.submodule_search_locations or []) if spec is not None else []


def _bpe_file() -> str:
    """clip-anytorch's BPE vocabulary file; FileNotFoundError naming the install when it is absent."""
    candidates = []
    try:  # the distribution we declare first: another project may also be importable as `clip`
        candidates.append(str(importlib.metadata.distribution("clip-anytorch").locate_file(f"clip/{BPE_FILE}")))
    except importlib.metadata.PackageNotFoundError:
        pass
    candidates += [os.path.join(folder, BPE_FILE) for folder in _clip_package_dirs()]
    for path in candidates:
        if os.path.isfile(path):
            return path
    looked = ", ".join(candidates) or "no clip package is installed"
    raise FileNotFoundError(f"CLIP's BPE vocabulary {BPE_FILE} was not found (looked in: {looked}); {INSTALL_HINT}")


def clip_package_file(name: str) -> str:
    """A file of clip-anytorch's ``clip`` package (e.g. ``model.py``), found beside its vocabulary
    without importing the package."""
    return os.path.join(os.path.dirname(_bpe_file()), name)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's (GPT-2's) reversible byte -> printable character table, which orders the vocabulary.
    Written here: `clip.simple_tokenizer` would run clip's __init__, and transformers 5 dropped its copy."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges in exactly the order OpenAI CLIP (and SD v1.x's tokenizer) uses."""
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
