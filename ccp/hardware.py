"""What a number was measured on: the CPU (model, and the flags that decide whether bf16 is fast) or
the GPU, for every benchmark JSON and ``ccp-params --json``. Imports no other ccp module."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

# AVX2 alone runs bf16 emulated (~150x slower for a 3x3 convolution than fp32); avx512_bf16 and AMX
# run it natively.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_info() -> dict:
    """The CPU's model name, core count and `CPU_FLAGS`, so that CPU numbers can be compared across machines."""
    path = Path("/proc/cpuinfo")
    text = path.read_text() if path.is_file() else ""
    lines = text.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    return {"model_name": model or platform.processor(), "cores": os.cpu_count(),
            **{flag: flag in flags for flag in CPU_FLAGS}}


def device_info(device: torch.device | str) -> dict:
    """The device a number was computed on: its name, the CPU always (it runs the host side), and on
    CUDA the GPU's name and memory."""
    device = torch.device(device)
    info = {"device": str(device), "cpu": cpu_info()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 2))
    return info


def machine(device: torch.device | str = "cpu") -> dict:
    """`device_info` plus the platform, Python and torch versions and torch's thread count."""
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), **device_info(device)}
