"""``environment.json`` of a results folder: the processor, thread count and library versions the
numbers were measured with (CPU float results, and so the toy tables, differ between processor types)."""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ccp.io import write_text_atomic

ENVIRONMENT = "environment.json"
# distributions whose versions change the numbers (models, sampling, metrics, data)
LIBRARIES = ("torch", "diffusers", "numpy", "scipy", "transformers", "torchmetrics", "lightning", "scikit-learn",
             "opencv-python", "opencv-python-headless", "pillow", "safetensors", "hydra-core", "peft", "ccp")


def processor_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s "model name" on Linux, else `platform.processor()`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def environment_record(device: str | None = None) -> dict[str, Any]:
    """Processor model, machine, OS, CPU count, torch's threads now, Python and library versions."""
    record: dict[str, Any] = {
        "processor": processor_model(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "python": sys.version.split()[0],
        "libraries": {**library_versions(), "torch": torch.__version__},  # with its build tag (+cpu, +cu130)
        "torch_cuda_build": torch.version.cuda,
        "device": device,
    }
    if torch.cuda.is_available() and device is not None and str(device).startswith("cuda"):
        record["gpu"] = torch.cuda.get_device_name(torch.device(device))
        record["cuda"] = torch.version.cuda
    return record


def write_environment(results_dir: str | Path, device: str | None = None) -> Path:
    path = Path(results_dir) / ENVIRONMENT
    write_text_atomic(path, json.dumps(environment_record(device), indent=1, sort_keys=True) + "\n")
    return path
