"""`ccp.io.shards.ShardedFolder`, the one store written in shards by many ranks and resumed (FID
samples, the latent cache, class images): a resume after an interrupted shard redoes only that
shard; two ranks write disjoint shards; the completion record on an object store (os.replace
played as a whole-object copy then a delete, as tests/test_storage.py does)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ccp.io import write_atomic
from ccp.io.shards import (IncompleteShardsError, ShardedFolder, as_ranges, open_meta, rank_shards, record_complete,
                           shard_ranges)
from test_storage import ObjectStoreRename, Preempted

RECORD = "done.json"


class Killed(BaseException):
    """The job went away in the middle of a shard."""


def shard_file(k: int) -> str:
    return f"part-{k:03d}.txt"


def store(folder: Path, num_items: int = 10, shard_size: int = 3) -> ShardedFolder:
    """A shard holds its items' squares, one per line; finished when every line is there."""
    def done(k: int, items: range) -> bool:
        path = folder / shard_file(k)
        return path.is_file() and path.read_text().split() == [str(i * i) for i in items]
    return ShardedFolder(folder, num_items, shard_size, shard_done=done,
                         shard_files=lambda k, items: [shard_file(k)], record=RECORD)


def write_shards(folder: Path, rank: int, world_size: int, kill_in: int | None = None) -> list[int]:
    """This rank's pending shards, each written atomically; `kill_in`: the job dies while writing it."""
    shards = store(folder)
    written = []
    for k in shards.pending(rank, world_size):
        def write(tmp: str, k=k) -> None:
            lines = [str(i * i) for i in shards.ranges[k]]
            if k == kill_in:
                Path(tmp).write_text(lines[0])  # half a shard, never renamed
                raise Killed(f"killed while writing shard {k}")
            Path(tmp).write_text("\n".join(lines))
        write_atomic(folder / shard_file(k), write)
        written.append(k)
    return written


def test_shards_cover_the_items_and_ranks_take_every_wth_shard():
    assert shard_ranges(10, 3) == [range(0, 3), range(3, 6), range(6, 9), range(9, 10)]
    assert rank_shards(4, 1, 2) == [1, 3] and rank_shards(4, 0, 1) == [0, 1, 2, 3]
    assert as_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    with pytest.raises(ValueError, match="rank must be in"):
        rank_shards(4, 2, 2)


def test_a_resume_after_an_interrupted_shard_redoes_only_that_shard(tmp_path):
    with pytest.raises(Killed):
        write_shards(tmp_path, 0, 1, kill_in=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [shard_file(0), shard_file(1)]  # no half shard
    assert store(tmp_path).pending() == [2, 3]
    (tmp_path / shard_file(3)).write_text("9")  # a shard cut short by another cause fails its check
    (tmp_path / f".{shard_file(2)}.killed.tmp").write_text("0")  # what a killed writer leaves
    assert write_shards(tmp_path, 0, 1) == [2, 3]
    assert write_shards(tmp_path, 0, 1) == []  # finished shards are never redone
    assert store(tmp_path).finish({"what": "squares"}, met=True) == []
    record = json.loads((tmp_path / RECORD).read_text())
    assert record["what"] == "squares" and sorted(record["files"]) == [shard_file(k) for k in range(4)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [RECORD] + [shard_file(k) for k in range(4)]


def test_two_ranks_write_disjoint_shards_and_the_last_to_finish_completes(tmp_path):
    assert write_shards(tmp_path, 1, 2) == [1, 3]
    assert store(tmp_path).finish({}, met=False) == [0, 2]  # without meeting: left for rank 0
    assert not store(tmp_path).complete()
    assert write_shards(tmp_path, 0, 2) == [0, 2]
    assert store(tmp_path).finish({}, met=False) == []
    assert store(tmp_path).complete()


def test_a_shard_missing_after_the_ranks_met_is_an_error_naming_it(tmp_path):
    write_shards(tmp_path, 0, 2)
    with pytest.raises(IncompleteShardsError, match=r"2 of 4 shards are missing .*shards 1, 3") as caught:
        store(tmp_path).finish({}, met=True)
    assert caught.value.missing == [1, 3] and not (tmp_path / RECORD).exists()


def test_a_record_without_file_sizes_counts_by_its_presence(tmp_path):
    """A latent-cache manifest written before the store recorded sizes stays a complete cache."""
    (tmp_path / RECORD).write_text(json.dumps({"complete": True, "num_images": 10}))
    assert store(tmp_path).complete()
    (tmp_path / RECORD).write_text("{not json")
    assert not store(tmp_path).complete()


def test_meta_is_written_once_and_read_back_by_every_later_rank(tmp_path):
    folder = tmp_path / "new"
    assert open_meta(folder, {"shard_size": 3}) == {"shard_size": 3}
    assert open_meta(folder, {"shard_size": 5}) == {"shard_size": 3}  # the caller compares


def test_completion_record_on_an_object_store(tmp_path, monkeypatch):
    rename = ObjectStoreRename()
    monkeypatch.setattr(os, "replace", rename)
    write_shards(tmp_path, 0, 1)
    # preempted while the record's object is copied: no record, the folder is not finished
    rename.stop_after = rename.moved
    with pytest.raises(Preempted):
        store(tmp_path).finish({}, met=True)
    assert not store(tmp_path).complete()
    rename.stop_after = None
    assert store(tmp_path).finish({}, met=True) == [] and store(tmp_path).complete()
    # a listed object that is not whole (or gone) takes the folder's completion back
    (tmp_path / shard_file(1)).write_text("0")
    assert not record_complete(tmp_path, RECORD)
    assert store(tmp_path).pending() == [1]


def test_another_nodes_shard_that_shows_late_is_waited_for(tmp_path):
    import threading

    node0, node1 = tmp_path / "bucket", tmp_path / "node1_view"
    node0.mkdir(), node1.mkdir()
    write_shards(node0, 0, 2)
    write_shards(node1, 1, 2)
    assert store(node0).missing() == [1, 3]
    timers = [threading.Timer(1.0, lambda k=k: (node0 / shard_file(k)).write_text((node1 / shard_file(k)).read_text()))
              for k in (1, 3)]
    for timer in timers:
        timer.start()
    try:
        assert store(node0).finish({}, met=True, wait_s=30) == []
    finally:
        for timer in timers:
            timer.cancel()
    assert store(node0).complete()


def test_completing_ranks_remove_killed_shard_writers_temporaries_but_not_each_others_record(tmp_path):
    """Without a barrier two ranks can see every shard at once and both complete the folder: the
    one that clears killed writers' temporaries must not delete the record the other is writing."""
    write_shards(tmp_path, 0, 1)
    killed_shard = tmp_path / f".{shard_file(0)}.111.tmp"  # a writer killed mid-shard, later redone
    killed_shard.write_text("0")
    other_rank_record = tmp_path / f".{RECORD}.222.tmp"  # the other rank, between write and rename
    other_rank_record.write_text("{")
    assert store(tmp_path).finish({"n": 10}, met=False) == []
    assert not killed_shard.exists() and other_rank_record.exists()
    assert record_complete(tmp_path, RECORD)
