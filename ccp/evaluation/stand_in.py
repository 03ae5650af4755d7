"""Stand-in weight files: randomly initialised networks saved in the exact format and under the
file name of the weights users download (the FID Inception's ``weights-inception-2015-12-05-6726825d.pth``,
CLIP's ``ViT-L-14.pt``), so tests and rehearsals run the real loaders and checks offline
(``tests/stand_ins.py`` writes them).

A stand-in file carries a marker inside it, invisible to the real loaders: in a state-dict file
the entry ``ccp_stand_in`` of the pickled state dict's ``_metadata`` (which ``load_state_dict``
only reads under module prefixes, so torch-fidelity's strict load still accepts the file), in a
TorchScript archive an extra file ``extra/ccp_stand_in``. The loaders warn when they see it, and
every number measured with such a file is labelled (``"stand_in_weights": true`` in ccp-eval's
result and in reproduce's records, `STAND_IN_LABEL` on the tables): it means nothing.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STAND_IN_KEY = "ccp_stand_in"
STAND_IN_LABEL = "STAND-IN WEIGHTS: numbers mean nothing"


def mark_state_dict(state_dict: Mapping[str, Any], info: Mapping[str, Any]) -> OrderedDict:
    """`state_dict` (an OrderedDict, as ``Module.state_dict()`` returns) with the stand-in marker in
    its ``_metadata``; its keys and tensors are unchanged. Save it with ``torch.save``."""
    # in _metadata, not as a key: torch-fidelity loads the Inception file with a strict load_state_dict,
    # and a sidecar file would be lost when the file alone is copied, leaving stand-in numbers unlabelled
    marked = OrderedDict(state_dict)
    marked._metadata = OrderedDict(getattr(state_dict, "_metadata", None) or {})
    marked._metadata[STAND_IN_KEY] = dict(info)
    return marked


def stand_in_extra_files(info: Mapping[str, Any]) -> dict[str, str]:
    """The ``_extra_files`` of ``torch.jit.save`` that mark a TorchScript archive as a stand-in."""
    return {STAND_IN_KEY: json.dumps(dict(info), sort_keys=True)}


def _torchscript_names(names: list[str]) -> bool:
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def is_torchscript(path: str | Path) -> bool:
    """Whether `path` is a TorchScript archive (as OpenAI's CLIP files are), from its zip directory."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return _torchscript_names(archive.namelist())


def stand_in_marker(path: str | Path) -> dict[str, Any] | None:
    """The marker of a stand-in weights file (what wrote it), or None for any other file (also an
    unreadable one: its loader says what is wrong with it). Reads the zip directory only, or the
    state dict memory-mapped, so it is cheap even for a large file."""
    import torch

    path = Path(path).expanduser()
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                for name in names:
                    if name == f"extra/{STAND_IN_KEY}" or name.endswith(f"/extra/{STAND_IN_KEY}"):
                        info = json.loads(archive.read(name) or b"{}")
                        return dict(info) if isinstance(info, dict) else {"marker": info}
            if _torchscript_names(names):
                return None  # torch.load would load the whole TorchScript model just to find nothing
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        else:  # the legacy (pre-zip) torch.save format
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    metadata = getattr(loaded, "_metadata", None)
    if isinstance(metadata, Mapping) and STAND_IN_KEY in metadata:
        info = metadata[STAND_IN_KEY]
        return dict(info) if isinstance(info, Mapping) else {"marker": info}
    return None


def warn_if_stand_in(path: str | Path, what: str) -> bool:
    """Log a warning when `path` is a stand-in file; returns whether it is."""
    info = stand_in_marker(path)
    if info is None:
        return False
    log.warning("%s: %s is a stand-in (randomly initialised %s, written by %s): %s",
                what, path, info.get("network", "network"), info.get("written_by", "a test"), STAND_IN_LABEL)
    return True
