"""Saving and loading a pipeline's extra denoisers (`GCFGPipeline.add_denoiser`) beside diffusers'
own layout: their modules are saved as components, and `EXTRA_DENOISERS` says which component
is which denoiser's UNet or ControlNet."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch

EXTRA_DENOISERS = "ccp_extra_denoisers.json"  # beside model_index.json: denoiser name -> its components


def saved_class_name(folder: str | os.PathLike) -> str | None:
    """The pipeline class a local folder was saved from (None: not a local pipeline folder)."""
    index_file = Path(folder) / "model_index.json"
    return json.loads(index_file.read_text()).get("_class_name") if index_file.is_file() else None


def write_extra_denoisers(folder: str | os.PathLike, table: dict[str, tuple[str, str | None]]) -> None:
    """`table`: denoiser name -> (UNet component, ControlNet component or None)."""
    if table:
        entries = {name: {"unet": unet, "controlnet": controlnet} for name, (unet, controlnet) in table.items()}
        (Path(folder) / EXTRA_DENOISERS).write_text(json.dumps(entries, indent=2) + "\n")


def read_extra_denoisers(folder: str | os.PathLike) -> dict[str, tuple[str, str | None]]:
    """What `write_extra_denoisers` wrote in `folder`; empty when it holds none."""
    path = Path(folder) / EXTRA_DENOISERS
    if not path.is_file():
        return {}
    return {name: (parts["unet"], parts["controlnet"]) for name, parts in json.loads(path.read_text()).items()}


@contextlib.contextmanager
def quiet_about_extra_components(folder: str | os.PathLike, pipeline_cls: type) -> Iterator[None]:
    """diffusers warns that it ignores the components its pipeline class does not take; the extra
    denoisers' are loaded by `load_extra_denoiser_modules`, so those warnings are dropped."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    keys = set(index) - set(inspect.signature(pipeline_cls.__init__).parameters) - {"_class_name", "_diffusers_version"}

    def keep(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("not expected" in message and any(repr(k) in message for k in keys))

    loggers = [logging.getLogger(n) for n in ("diffusers.configuration_utils", "diffusers.pipelines.pipeline_utils")]
    for lg in loggers:
        lg.addFilter(keep)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(keep)


def load_extra_denoiser_modules(
    pipe: Any, folder: str | os.PathLike, table: dict[str, tuple[str, str | None]], dtype: torch.dtype | None
) -> dict[str, tuple[torch.nn.Module, torch.nn.Module | None]]:
    """Per extra denoiser, its (UNet, ControlNet or None): a component `pipe` already holds (the
    prior's UNet, say) as it is, any other read once from `folder` in `dtype` onto `pipe`'s device
    (denoisers that share a component share the one module)."""
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    read: dict[str, torch.nn.Module] = {}

    def module(key: str | None) -> torch.nn.Module | None:
        if key is None or hasattr(pipe, key):
            return getattr(pipe, key) if key else None
        if key not in read:
            library, class_name = index[key]
            model_cls = getattr(importlib.import_module(library), class_name)
            read[key] = model_cls.from_pretrained(folder / key, torch_dtype=dtype).to(pipe.device)
        return read[key]

    return {name: (module(unet), module(controlnet)) for name, (unet, controlnet) in table.items()}
