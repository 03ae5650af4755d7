"""`ccp.distributed`: rank 0 computes, every rank waits, every rank reads; rank 0's failure reaches
the others at once. Two gloo processes on this machine."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from ccp.distributed import RankZeroFailed, barrier, meets, rank_world, rank_zero_computes


def _worker(rank: int, out_dir: str, mode: str) -> None:
    out = Path(out_dir)
    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    calls = out / f"calls{rank}.txt"
    result: dict = {"rank_world": list(rank_world()), "meets": meets()}

    def compute():
        calls.write_text("computed")
        if mode == "fail":
            raise ValueError("no real images in /data/ffhq")
        time.sleep(1.0)  # the others are already waiting
        (out / "value.json").write_text(json.dumps({"mean": 3.5}))
        return {"mean": 3.5}

    start = time.monotonic()
    try:
        if mode == "read":
            result["value"] = rank_zero_computes(compute, read=lambda: json.loads((out / "value.json").read_text()))
        else:
            result["value"] = rank_zero_computes(compute)
    except Exception as err:  # noqa: BLE001 - recorded for the test
        result["error"] = f"{type(err).__name__}: {err}"
    result["seconds"] = time.monotonic() - start
    result["computed"] = calls.is_file()
    if "error" not in result:
        barrier()
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _run(tmp_path, mode) -> list[dict]:
    mp.spawn(_worker, args=(str(tmp_path), mode), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["send", "read"])
def test_rank_zero_computes_once_and_every_rank_gets_the_result(tmp_path, mode):
    ranks = _run(tmp_path, mode)
    assert [r["rank_world"] for r in ranks] == [[0, 2], [1, 2]] and all(r["meets"] for r in ranks)
    assert [r["value"] for r in ranks] == [{"mean": 3.5}] * 2
    assert [r["computed"] for r in ranks] == [True, False]  # only rank 0 ran the computation
    assert ranks[1]["seconds"] >= 0.9  # and rank 1 waited for it


@pytest.mark.timeout(180)
def test_a_failure_on_rank_zero_fails_every_rank_at_once_with_its_message(tmp_path):
    ranks = _run(tmp_path, "fail")
    assert ranks[0]["error"] == "ValueError: no real images in /data/ffhq"
    assert ranks[1]["error"] == ("RankZeroFailed: rank 0 failed while this rank waited for it: "
                                 "ValueError: no real images in /data/ffhq")
    assert ranks[1]["seconds"] < 30  # not the group's 120 s timeout


def test_one_process_computes_directly_and_meets_no_one(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert rank_world() == (0, 1) and not meets()
    assert rank_zero_computes(lambda: 7, read=lambda: pytest.fail("read in one process")) == 7
    barrier()  # a no-op without a process group
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert rank_world() == (3, 8)  # a launcher's ranks before any group is up
    assert RankZeroFailed.__mro__[1] is RuntimeError
