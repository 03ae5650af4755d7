"""ccp imports and tokenizes where pkg_resources is gone (setuptools >= 81), and pyproject declares
every third-party package that ccp's code imports.

`pip install ccp-*.whl` without constraints.txt gets the newest setuptools, which has no
pkg_resources; clip-anytorch's ``clip/__init__.py`` imports it, so ccp must reach clip-anytorch's
BPE vocabulary without importing the ``clip`` package.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from stand_ins import WITHOUT_PKG_RESOURCES

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a cat", "<ffhq> portrait of a person, wearing sunglasses", "café naïve 東京 😀", ""]

# Runs in a fresh interpreter: `import pkg_resources` raises ImportError there, as with setuptools >= 81.
CHILD = WITHOUT_PKG_RESOURCES + """
from ccp.priors.tokenizer import build_clip_tokenizer
prompts = json.loads(sys.argv[1])
ids = {pad: [build_clip_tokenizer(pad_token=pad)(p, padding="max_length").input_ids for p in prompts]
       for pad in ("<|endoftext|>", "!")}
print(json.dumps({"ids": ids, "clip_init_ran": "clip.clip" in sys.modules}))
"""


def _reference_ids(prompt: str, pad_id: int) -> list[int]:
    """OpenAI's own tokenizer (clip-anytorch; this process has pkg_resources), padded to 77 tokens."""
    from clip.simple_tokenizer import SimpleTokenizer

    ids = [49406, *SimpleTokenizer().encode(prompt), 49407]
    return ids + [pad_id] * (77 - len(ids))


def test_tokenizer_builds_without_pkg_resources():
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(PROMPTS)], capture_output=True, text=True,
                           cwd=REPO, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["clip_init_ran"] is False
    assert result["ids"]["<|endoftext|>"] == [_reference_ids(p, 49407) for p in PROMPTS]
    assert result["ids"]["!"] == [_reference_ids(p, 0) for p in PROMPTS]
    assert result["ids"]["<|endoftext|>"][0][:7] == [49406, 320, 1125, 539, 320, 2368, 49407]  # a photo of a cat


def test_missing_vocabulary_names_the_install(monkeypatch):
    from ccp.priors import tokenizer

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    monkeypatch.delitem(sys.modules, "clip", raising=False)
    tokenizer.clip_vocab_and_merges.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match=r"bpe_simple_vocab_16e6\.txt\.gz.*pip install clip-anytorch"):
            tokenizer.build_clip_tokenizer()
    finally:
        tokenizer.clip_vocab_and_merges.cache_clear()


# --- what pyproject declares ------------------------------------------------------------------------
def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", r).group(0)).lower() for r in requirements}


def _imported_top_level_modules() -> dict[str, set[str]]:
    """Top-level module -> the ccp files importing it (absolute imports anywhere in a file)."""
    found: dict[str, set[str]] = {}
    for path in (REPO / "ccp").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(REPO)))
    return found


# Imported only on a path that says what to install when it is missing; not a dependency.
OPTIONAL_IMPORTS = {"google": "google-cloud-aiplatform: ccp-launch target=vertex without dry_run (ccp/launch/vertex.py)"}


def test_pyproject_declares_every_imported_package():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    required = _requirement_names(project["dependencies"])
    extras = _requirement_names([r for reqs in project["optional-dependencies"].values() for r in reqs])
    distributions = importlib.metadata.packages_distributions()
    undeclared = {}
    for module, files in sorted(_imported_top_level_modules().items()):
        if module in sys.stdlib_module_names or module == "ccp" or module in OPTIONAL_IMPORTS:
            continue
        names = {re.sub(r"[-_.]+", "-", d).lower() for d in distributions.get(module, [module])}
        if not names & (required | extras):
            undeclared[module] = (sorted(names), sorted(files))
    assert not undeclared, f"imported by ccp but not in pyproject's dependencies or extras: {undeclared}"
    # the tokenizer reads its vocabulary from clip-anytorch, so it must be a hard dependency
    assert "clip-anytorch" in required
