"""A folder written in numbered shards by many ranks and resumed shard by shard: FID samples, the
latent cache and class images all use it.

Items ``0 .. N-1`` are cut into shards of ``shard_size`` (the last may be shorter); rank ``r`` of
``W`` owns shards ``r, r + W, r + 2W, ...`` (W counts the processes of every node). What a shard's
files are, and whether one is finished, is the owner's business (`shard_done`): each shard is
written atomically (`ccp.io.write_atomic`), so a finished shard is never redone and a half-written
one (a temporary file, or a file that fails the check) is. Two records frame the folder:

* ``meta.json``, first: what is being written; `open_meta` returns the one already there, so a
  resumed or second rank compares it with its own (every rank writes the same bytes if it is absent);
* the completion record, last: written once every shard is there, and listing each file with its
  size, so that on an object store (docs/storage.md) a folder counts as finished only when every
  object it lists is there whole.

Nothing here calls a collective: the caller meets the other ranks (``ccp.distributed``) and says
so through `finish`'s ``met``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ccp.io import remove_stale_temporaries, write_json_atomic

log = logging.getLogger(__name__)

META = "meta.json"
# After the ranks met, how long a rank keeps looking for the shards of other nodes: a Cloud Storage
# FUSE mount caches "not found" for a few seconds (docs/storage.md); it looks again every POLL_S.
SHARDS_VISIBLE_WAIT_S = 120.0
POLL_S = 2.0


def shard_ranges(num_items: int, shard_size: int) -> list[range]:
    """Items of each shard: ``[0, s), [s, 2s), ...``, the last cut at `num_items`."""
    if num_items < 1 or shard_size < 1:
        raise ValueError(f"the item count and shard size must be positive, got {num_items} and {shard_size}")
    return [range(s, min(s + shard_size, num_items)) for s in range(0, num_items, shard_size)]


def rank_shards(num_shards: int, rank: int, world_size: int) -> list[int]:
    """Shards of rank `rank` among `world_size` processes: rank, rank + W, ..."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    return list(range(rank, num_shards, world_size))


def as_ranges(indices: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``: shard lists in messages."""
    parts, start = [], None
    for pos, k in enumerate(indices):
        if start is None:
            start = k
        if pos + 1 == len(indices) or indices[pos + 1] != k + 1:
            parts.append(str(start) if start == k else f"{start}-{k}")
            start = None
    return ", ".join(parts)


def record_complete(folder: str | Path, record: str) -> bool:
    """Whether `folder`'s completion record `record` is there and every file it lists (``files``:
    relative path -> bytes) has its size. A record that lists no files counts by its presence."""
    folder = Path(folder)
    try:
        files = json.loads((folder / record).read_text()).get("files", {})
        return all((folder / rel).is_file() and (folder / rel).stat().st_size == size for rel, size in files.items())
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def open_meta(folder: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    """`folder`'s ``meta.json`` as found, or `meta`, written now (the folder is created): the
    caller compares what it finds with what it would write. Every rank writes the same bytes, so
    racing writers agree."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / META
    if path.is_file():
        return json.loads(path.read_text())
    write_json_atomic(path, meta)
    return json.loads(json.dumps(meta))


class IncompleteShardsError(RuntimeError):
    """Some shards are not finished after every rank met: a rank failed, or the folder is not shared."""

    def __init__(self, message: str, missing: list[int]):
        super().__init__(message)
        self.missing = missing


@dataclass(frozen=True)
class ShardedFolder:
    """`folder` holding items ``0 .. num_items-1`` in shards of `shard_size`.

    `shard_done(k, items)` says whether shard `k` (holding `items`) is finished on disk;
    `shard_files(k, items)` names its files relative to `folder` (what the completion record lists);
    `record` is the completion record's name (None: the owner keeps none, as FID sample folders,
    whose record is the evaluation's result file).
    """

    folder: Path
    num_items: int
    shard_size: int
    shard_done: Callable[[int, range], bool]
    shard_files: Callable[[int, range], list[str]]
    record: str | None = None

    @property
    def ranges(self) -> list[range]:
        return shard_ranges(self.num_items, self.shard_size)

    def complete(self) -> bool:
        return self.record is not None and record_complete(self.folder, self.record)

    def owned(self, rank: int = 0, world_size: int = 1) -> list[int]:
        return rank_shards(len(self.ranges), rank, world_size)

    def pending(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """This rank's shards that are not finished: the ones to write (or write again)."""
        ranges = self.ranges
        return [k for k in self.owned(rank, world_size) if not self.shard_done(k, ranges[k])]

    def missing(self, wait_s: float = 0.0) -> list[int]:
        """Shards not finished, looking again for up to `wait_s` seconds while some are missing
        (another node's shards may take a few seconds to show on an object-store mount)."""
        ranges = self.ranges
        deadline = time.monotonic() + wait_s
        while True:
            missing = [k for k, items in enumerate(ranges) if not self.shard_done(k, items)]
            if not missing or time.monotonic() >= deadline:
                return missing
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))

    def finish(self, record: dict[str, Any], met: bool, wait_s: float = 0.0) -> list[int]:
        """Write the completion record (`record` plus ``files``: each shard file's size) once every
        shard is there; returns the shards still missing. `met`: every rank has finished its
        shards (the caller met them), so a missing shard is an error; without meeting, the last
        rank to finish completes the folder and the others return what is left for them."""
        if self.record is None:
            raise ValueError(f"{self.folder} keeps no completion record")
        if self.complete():
            return []
        missing = self.missing(wait_s if met else 0.0)
        ranges = self.ranges
        if missing:
            if met:
                files = [name for k in missing for name in self.shard_files(k, ranges[k])]
                raise IncompleteShardsError(
                    f"{self.folder}: {len(missing)} of {len(ranges)} shards are missing after every rank "
                    f"finished (shards {as_ranges(missing)}: {', '.join(files[:5])}"
                    f"{', ...' if len(files) > 5 else ''}); is the folder shared by every rank?", missing)
            log.info("%s: %d shards left for other ranks", self.folder, len(missing))
            return missing
        # every shard is there, so no shard writer is left: what killed ones left would only be uploaded.
        # Another rank may be completing the folder at this moment: its record temporary is spared.
        remove_stale_temporaries(self.folder, sparing=self.record)
        names = [name for k, items in enumerate(ranges) for name in self.shard_files(k, items)]
        sizes = {name: (self.folder / name).stat().st_size for name in names}
        write_json_atomic(self.folder / self.record, {**record, "files": sizes})  # the commit point: last
        return []
