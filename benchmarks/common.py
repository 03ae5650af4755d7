"""Shared helpers for the benchmark scripts: timing, file names, and the machine description every
result JSON records (`ccp.hardware`: CPU model and bf16 flags, or the GPU)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from ccp.hardware import cpu_info, device_info, machine  # noqa: F401  (the scripts' record of the machine)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def patched(obj, name: str, value):
    """`obj.name` set to `value` for the block (the original yielded), then put back."""
    original = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield original
    finally:
        setattr(obj, name, original)


def step_times(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `repeats` timed calls of `fn`, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    return statistics.median(step_times(fn, device, repeats, warmup))


def device_slug(device: torch.device) -> str:
    """A file-name-safe device name: "NVIDIA H200" -> "nvidia-h200", a CPU -> "cpu"."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or device.type


def write_json(out_dir: str | Path, name: str, payload: dict) -> Path:
    """Atomic write, so an interrupted run never leaves a half-written result."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path
