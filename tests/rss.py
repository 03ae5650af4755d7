"""Peak resident memory of this process from the kernel, for the memory tests' measuring scripts
(they run in a fresh process with the tests folder on PYTHONPATH: `measuring_env`)."""

from __future__ import annotations

import os
from pathlib import Path


def status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS: now, VmHWM: the high-water mark)."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> None:
    """Start a new high-water mark (VmHWM) from the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measuring_env() -> dict[str, str]:
    """One thread, and a fixed mmap threshold so that RSS follows the tensors: glibc otherwise keeps
    freed tensors up to 32 MiB in its heap (docs/memory.md)."""
    tests = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": path}
