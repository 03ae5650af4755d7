"""Outputs on Cloud Storage (docs/storage.md): a run folder on a Cloud Storage FUSE mount of a
flat-namespace bucket, where a file's rename is a whole-object copy then a delete and a folder's
rename moves one object after the other. `ObjectStoreRename` plays that store on a local folder
(os.replace patched), and `Preempted` is the kill in the middle of it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from ccp.config import compose
from ccp.io import (COMPLETE_RECORD, dir_complete, file_sizes, remove_stale_temporaries, write_atomic, write_dir_atomic,
                    write_json_atomic)
from ccp.methods.export import EXPORT_INFO, is_export
from ccp.methods.ours import NullTextConcept
from ccp.training.callbacks import FileCheckpointIO
from ccp.training.run import run_training

REAL_REPLACE = os.replace


class Preempted(BaseException):
    """The VM went away: nothing after this point ran."""


class ObjectStoreRename:
    """os.replace as a FUSE mount of an object store does it: each object copied whole (it appears
    complete or not at all), then the source deleted; a folder moves object by object. After
    `stop_after` objects the process is preempted."""

    def __init__(self, stop_after: int | None = None):
        self.stop_after = stop_after
        self.moved = 0

    def _move_object(self, src: Path, dst: Path) -> None:
        if self.stop_after is not None and self.moved >= self.stop_after:
            raise Preempted(f"preempted after {self.moved} object(s)")
        dst.parent.mkdir(parents=True, exist_ok=True)
        staged = dst.with_name(dst.name + ".uploading")
        shutil.copyfile(src, staged)
        REAL_REPLACE(staged, dst)  # the object is finalized whole
        src.unlink()
        self.moved += 1

    def __call__(self, src, dst, *args, **kwargs):
        src, dst = Path(src), Path(dst)
        if src.is_dir():
            for p in sorted(q for q in src.rglob("*") if q.is_file()):
                self._move_object(p, dst / p.relative_to(src))
            shutil.rmtree(src)
        else:
            self._move_object(src, dst)


@pytest.fixture
def object_store(monkeypatch):
    def install(stop_after: int | None = None) -> ObjectStoreRename:
        rename = ObjectStoreRename(stop_after)
        monkeypatch.setattr(os, "replace", rename)
        return rename

    return install


def _write_files(count: int, content: bytes = b"x" * 100):
    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        for i in range(count):
            (tmp / f"{i}.bin").write_bytes(content + bytes([i]))
    return write


def test_a_folder_preempted_while_moving_is_not_finished_and_the_rerun_completes_it(tmp_path, object_store):
    from ccp.toy.demo import ensure_concept_data
    from ccp.toy.digits import write_concept_dataset

    reference = tmp_path / "reference"
    write_concept_dataset(reference, "bold", "train", 0, 32)
    expected = file_sizes(reference)
    assert len(expected) > 3

    root = tmp_path / "bucket"
    object_store(stop_after=2)
    with pytest.raises(Preempted):
        ensure_concept_data(root, "bold", "train", seed=0, resolution=32)
    folder = root / "bold" / "train"
    assert folder.is_dir() and len(list(folder.iterdir())) == 2  # a partial folder: existence says nothing
    assert not dir_complete(folder)

    object_store()  # the job restarts on a healthy node
    assert ensure_concept_data(root, "bold", "train", seed=0, resolution=32) == folder
    assert dir_complete(folder)
    assert file_sizes(folder) == expected
    for rel in expected:
        assert (folder / rel).read_bytes() == (reference / rel).read_bytes(), rel
    assert not list(folder.parent.glob(".*"))  # no temporary folder left beside it


def test_the_completion_record_is_checked_against_the_files(tmp_path):
    folder = write_dir_atomic(tmp_path / "out", _write_files(4))
    record = json.loads((folder / COMPLETE_RECORD).read_text())
    assert record == {"files": {f"{i}.bin": 101 for i in range(4)}}
    assert dir_complete(folder)

    (folder / "2.bin").write_bytes(b"short")  # an object cut off
    assert not dir_complete(folder)
    (folder / "2.bin").write_bytes(b"x" * 100 + bytes([2]))
    assert dir_complete(folder)
    (folder / "3.bin").unlink()  # an object missing
    assert not dir_complete(folder)
    (folder / "3.bin").write_bytes(b"x" * 101)
    (folder / COMPLETE_RECORD).write_text("{")  # a torn record
    assert not dir_complete(folder)
    assert not dir_complete(tmp_path / "absent")


def test_a_toy_prior_counts_as_finished_only_with_its_completion_record(tmp_path):
    from ccp.toy.prior import DONE, finished

    folder = tmp_path / "prior"

    def publish(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "model_index.json").write_text("{}")
        (tmp / DONE).write_text(json.dumps({"key": "k1"}))

    write_dir_atomic(folder, publish)
    assert finished(folder, "k1") and not finished(folder, "k2")
    (folder / COMPLETE_RECORD).unlink()  # e.g. DONE moved first, the rest never arrived
    assert (folder / DONE).is_file() and not finished(folder, "k1")


def test_an_interrupted_file_write_leaves_the_previous_object(tmp_path, object_store):
    object_store()
    path = tmp_path / "result.json"
    write_json_atomic(path, {"fid": 1.0})

    def dies_midway(tmp: str) -> None:
        Path(tmp).write_text('{"fid": 2')
        raise Preempted

    with pytest.raises(Preempted):
        write_atomic(path, dies_midway)
    assert json.loads(path.read_text()) == {"fid": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_checkpoints_on_the_store_and_the_temporaries_a_kill_leaves(tmp_path, object_store):
    object_store()
    io = FileCheckpointIO()
    folder = tmp_path / "checkpoints"
    io.save_checkpoint({"global_step": 1}, folder / "last.ckpt")
    io.save_checkpoint({"global_step": 1}, folder / "step=0000001.ckpt")
    # killed by SIGKILL during the next save: the FUSE mount uploads the half-written temporary
    (folder / ".last.ckpt.4242.tmp").write_bytes(b"partial")
    write_json_atomic(folder / "keep.json", {})
    assert torch.load(folder / "last.ckpt", weights_only=True) == {"global_step": 1}
    removed = remove_stale_temporaries(folder)
    assert [p.name for p in removed] == [".last.ckpt.4242.tmp"]
    assert sorted(p.name for p in folder.iterdir()) == ["keep.json", "last.ckpt", "step=0000001.ckpt"]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(4):
        PIL.Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def _cfg(prior_dir, image_dir, steps):
    return compose("train", overrides=["experiment=tiny/ours", f"prior.path={prior_dir}", f"data.path={image_dir}",
                                       f"data.cache_dir={image_dir.parent / 'cache'}", f"trainer.max_steps={steps}",
                                       "validation.every_n_steps=0", "logger=none"])


def test_a_run_on_the_store_preempted_while_exporting_resumes_to_the_same_export(
        tiny_prior_dir, image_dir, tmp_path, object_store, monkeypatch):
    from safetensors.torch import load_file

    reference = run_training(_cfg(tiny_prior_dir, image_dir, 2), tmp_path / "local")

    object_store()
    run = tmp_path / "bucket" / "run"
    run_training(_cfg(tiny_prior_dir, image_dir, 1), run)
    assert is_export(run / "export")

    real_export = NullTextConcept.export

    def preempted_after_the_weights(self, out_dir):
        real_export(self, out_dir)
        raise Preempted

    monkeypatch.setattr(NullTextConcept, "export", preempted_after_the_weights)
    with pytest.raises(Preempted):  # trained to step 2, killed while rewriting the export
        run_training(_cfg(tiny_prior_dir, image_dir, 2), run)
    assert not is_export(run / "export")  # step 1's info no longer vouches for the rewritten files
    (run / "checkpoints" / ".last.ckpt.99.tmp").write_bytes(b"partial")  # and a kill left this

    monkeypatch.setattr(NullTextConcept, "export", real_export)
    export = run_training(_cfg(tiny_prior_dir, image_dir, 2), run)
    assert json.loads((export / EXPORT_INFO).read_text())["step"] == 2
    assert not (run / "checkpoints" / ".last.ckpt.99.tmp").exists()
    a = load_file(reference / "concept_unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(export / "concept_unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_fid_shards_of_another_node_are_waited_for_after_the_barrier(tmp_path):
    import threading

    from ccp.evaluation.generation import (MissingShardsError, generate_shards, iter_shard_features, prepare_shard_dir,
                                           run_meta, shard_path)

    def generate(indices, seed):
        g = torch.Generator().manual_seed(seed)
        return torch.rand(len(indices), 3, 8, 8, generator=g)

    def features(images):
        return images.float().mean(dim=(2, 3))

    def shards(folder, rank, world_size):
        run_hash = prepare_shard_dir(folder, run_meta(3, 0, "mean-rgb", {"test": 1}))
        generate_shards(generate, features, 6, folder, run_hash, 3, base_seed=0, rank=rank, world_size=world_size,
                        progress=False)
        return run_hash

    single = tmp_path / "one_process"
    expected = torch.cat(list(iter_shard_features(single, 6, 3, shards(single, 0, 1))))

    node0, node1 = tmp_path / "bucket", tmp_path / "node1_view"
    run_hash = shards(node0, 0, 2)
    shards(node1, 1, 2)
    with pytest.raises(MissingShardsError):  # not visible yet, and no waiting asked for
        list(iter_shard_features(node0, 6, 3, run_hash))
    # node 1's upload becomes visible to node 0 only 1.5 s after the barrier
    timer = threading.Timer(1.5, lambda: shutil.copyfile(shard_path(node1, 1), shard_path(node0, 1)))
    timer.start()
    try:
        got = torch.cat(list(iter_shard_features(node0, 6, 3, run_hash, wait_s=30)))
    finally:
        timer.cancel()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
