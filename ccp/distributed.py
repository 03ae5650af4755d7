"""The one place that knows about process groups: rank, world size, barrier, and "rank 0
computes, every rank waits, every rank reads".

Library functions (metrics, caches, scans) take their rank and world size as arguments and never
call a collective themselves; the caller decides how work is spread and uses these helpers to
meet. Every rank must call a helper that meets (``barrier``, ``rank_zero_computes``) at the same
point, or all of them wait until the process group's timeout.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def _group_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """(global rank, world size): torch.distributed's when a group is up, else the launcher's
    ``RANK``/``WORLD_SIZE`` (torchrun, SLURM via ccp-launch), else (0, 1)."""
    if _group_ready():
        import torch.distributed as dist

        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK, SLURM's SLURM_LOCALID), else 0."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


def meets() -> bool:
    """True when there are other ranks to meet: a process group of more than one rank is up."""
    return _group_ready() and rank_world()[1] > 1


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if meets():
        import torch.distributed as dist

        dist.barrier()


def barrier_or_none() -> Callable[[], None] | None:
    """`barrier` when there are other ranks to meet, else None (for functions whose "no barrier"
    means "the last rank to finish completes the work")."""
    return barrier if meets() else None


class RankZeroFailed(RuntimeError):
    """Raised on the other ranks when rank 0's part of `rank_zero_computes` failed."""


def rank_zero_computes(compute: Callable[[], T], read: Callable[[], T] | None = None) -> T:
    """Rank 0 runs `compute()`; every other rank waits for it, then reads the result: with `read`,
    by calling it (e.g. loading the file `compute` wrote: nothing large crosses the group), else as
    the object rank 0 sends. A failure on rank 0 is sent too, so the other ranks fail at once with
    its message instead of waiting out the group's timeout. In one process: `compute()`."""
    if not meets():
        return compute()
    import torch.distributed as dist

    rank = dist.get_rank()
    result, error = None, None
    if rank == 0:
        try:
            result = compute()
        except BaseException as err:  # noqa: BLE001 - re-raised below, after the others heard of it
            error = err
    sent = [None if error is None else f"{type(error).__name__}: {error}",
            result if (read is None and error is None) else None]
    dist.broadcast_object_list(sent, src=0)
    if rank == 0:
        if error is not None:
            raise error
        return result
    if sent[0] is not None:
        raise RankZeroFailed(f"rank 0 failed while this rank waited for it: {sent[0]}")
    return read() if read is not None else sent[1]
