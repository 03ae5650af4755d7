"""Lost work: Ctrl-C saves `last.ckpt` at the current step and the same command resumes exactly,
with one CSV log; a full disk is reported as such, before training where it can be foreseen."""

from __future__ import annotations

import csv
import errno
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import lightning as L
import pytest
import torch
from pixels import write_random_pngs

TESTS = Path(__file__).resolve().parent
PAUSE_STEP = 2  # the periodic checkpoint falls here; Ctrl-C comes during the step after it
MAX_STEPS = 6


class PauseForSignal(L.Callback):
    """Test hook run inside `ccp-train` (as callbacks.progress_bar): halfway through the optimizer
    step after PAUSE_STEP it writes PAUSE_MARKER and waits for PAUSE_GO, so the test's SIGINT lands
    mid-step without depending on timing. Once only: a resumed run never pauses."""

    def __init__(self):
        self.step = int(os.environ["PAUSE_STEP"])
        self.marker, self.go = Path(os.environ["PAUSE_MARKER"]), Path(os.environ["PAUSE_GO"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        mid_step = (batch_idx + 1) % trainer.accumulate_grad_batches != 0
        if trainer.global_step == self.step and mid_step and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            deadline = time.monotonic() + 300
            while not self.go.exists() and time.monotonic() < deadline:
                time.sleep(0.01)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    return write_random_pngs(tmp_path_factory.mktemp("images"))


def _overrides(prior_dir, image_dir, *extra):
    return ["experiment=tiny/ours", f"prior.path={prior_dir}", f"data.path={image_dir}",
            f"data.cache_dir={image_dir.parent / 'cache'}", *extra]


def _csv_steps(run_dir: Path) -> tuple[list[Path], list[int]]:
    versions = sorted((run_dir / "csv").glob("version_*"))
    steps = [int(row["step"]) for v in versions for row in csv.DictReader((v / "metrics.csv").open())
             if row.get("train/loss")]
    return versions, steps


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    ema = next(v for k, v in ckpt["callbacks"].items() if "EMACallback" in k)
    out = {f"ckpt/{k}": v for k, v in ckpt["state_dict"].items()}
    out.update({f"ema/{i}": t for i, t in enumerate(ema["shadow_params"])})
    for file in sorted((run_dir / "export").rglob("*.safetensors")):
        out.update({f"export/{file.relative_to(run_dir / 'export')}/{k}": v for k, v in load_file(file).items()})
    return out


def test_ctrl_c_saves_last_at_the_current_step_and_the_same_command_resumes_exactly(tiny_prior_dir, image_dir,
                                                                                   tmp_path):
    from ccp.config import compose
    from ccp.training.run import run_training

    run_dir, marker, go = tmp_path / "run", tmp_path / "paused", tmp_path / "go"
    args = _overrides(tiny_prior_dir, image_dir, f"trainer.max_steps={MAX_STEPS}", "checkpoint.every_n_steps=2",
                      "validation.every_n_steps=0", f"hydra.run.dir={run_dir}",
                      "callbacks.progress_bar._target_=test_interrupt.PauseForSignal")
    env = {**os.environ, "PAUSE_STEP": str(PAUSE_STEP), "PAUSE_MARKER": str(marker), "PAUSE_GO": str(go),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "ccp.cli.train", *args]
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if marker.exists():
            os.kill(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C, halfway through step PAUSE_STEP + 1
            go.touch()
        output, _ = proc.communicate(timeout=300)
    assert marker.exists(), output[-3000:]
    saved_step = PAUSE_STEP + 1
    last = run_dir / "checkpoints" / "last.ckpt"
    assert proc.returncode == 130, output[-3000:]
    assert torch.load(last, weights_only=False)["global_step"] == saved_step  # not the periodic one of step 2
    assert sorted(p.name for p in last.parent.glob("step=*.ckpt")) == [f"step={PAUSE_STEP:07d}.ckpt"]
    assert f"Interrupted by Ctrl-C at step {saved_step}" in output and str(last) in output, output[-3000:]
    printed = next(line.strip() for line in output.splitlines() if "-m ccp.cli.train" in line)
    tokens = shlex.split(printed)
    assert tokens[1:] == command[1:]  # the same command line, as typed

    resumed = subprocess.run([sys.executable, *tokens[1:]], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert torch.load(last, weights_only=False)["global_step"] == MAX_STEPS

    versions, steps = _csv_steps(run_dir)
    assert [v.name for v in versions] == ["version_0"]  # both launches in one log
    assert steps == list(range(MAX_STEPS))  # every step once

    reference = tmp_path / "uninterrupted"
    run_training(compose("train", overrides=_overrides(tiny_prior_dir, image_dir, f"trainer.max_steps={MAX_STEPS}",
                                                       "checkpoint.every_n_steps=2", "validation.every_n_steps=0")),
                 reference)
    a, b = _weights(reference), _weights(run_dir)
    assert a.keys() == b.keys() and any(k.startswith("export/") for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_a_resumed_run_continues_its_csv_log_without_repeating_steps(tmp_path):
    from ccp.training.logs import csv_logger

    first = csv_logger(tmp_path, resuming=False)
    for step in range(5):  # steps 3 and 4 were taken after the last checkpoint (step 3), then lost
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.save()
    second = csv_logger(tmp_path, resuming=True)
    for step in range(3, 6):
        second.log_metrics({"train/loss": 10.0 + step, "train/lr": 1.0}, step=step)
    second.save()
    versions, steps = _csv_steps(tmp_path)
    assert [v.name for v in versions] == ["version_0"]
    assert steps == [0, 1, 2, 3, 4, 5]
    rows = list(csv.DictReader((versions[0] / "metrics.csv").open()))
    assert [float(r["train/loss"]) for r in rows] == [0, 1, 2, 13, 14, 15]
    assert csv_logger(tmp_path, resuming=False).version == 1  # a fresh run starts its own


SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 3990"
Usage = namedtuple("Usage", "total used free")


def test_a_full_disk_says_so_and_keeps_the_previous_last(tmp_path, monkeypatch):
    from ccp.training.callbacks import FileCheckpointIO

    folder = tmp_path / "checkpoints"
    last = folder / "last.ckpt"
    writer = FileCheckpointIO()
    writer.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(1024)}}, last)
    before = last.read_bytes()

    def short_write(obj, path, *args, **kwargs):  # what torch's zip writer does when the disk fills up
        Path(path).write_bytes(b"x" * 512)
        raise RuntimeError(SHORT_WRITE)

    monkeypatch.setattr(torch, "save", short_write)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 100, 100))
    with pytest.raises(OSError) as failed:
        writer.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.zeros(1024)}}, last)
    message = str(failed.value)
    assert failed.value.errno == errno.ENOSPC
    assert "no space left on device" in message and str(folder) in message
    assert "4.0 KiB" in message and "100 bytes" in message and "paths.log_dir" in message, message
    assert last.read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]

    # the same failure with room to spare is not a full disk: torch's error as it was
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 0, 10**12))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        writer.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.zeros(1024)}}, last)
    assert last.read_bytes() == before


def test_too_little_room_for_checkpoints_is_refused_before_training(tiny_prior_dir, image_dir, tmp_path, monkeypatch):
    import ccp.training.callbacks as callbacks
    from ccp.config import compose
    from ccp.training.run import run_training

    cfg = compose("train", overrides=_overrides(tiny_prior_dir, image_dir, "trainer.max_steps=1",
                                                "validation.every_n_steps=0"))
    predicted = []
    check = callbacks.check_checkpoint_space
    monkeypatch.setattr(callbacks, "check_checkpoint_space",
                        lambda *a, **k: predicted.append(check(*a, **k)) or predicted[-1])
    run_training(cfg, tmp_path / "room")
    actual = (tmp_path / "room" / "checkpoints" / "last.ckpt").stat().st_size
    assert actual <= predicted[0] <= 1.1 * actual + 2 * 2**20  # weights, AdamW moments and the EMA, not more

    real_usage, small = shutil.disk_usage, tmp_path / "small"
    room_for_one_and_a_half = Usage(10**9, 10**9 - 3 * actual // 2, 3 * actual // 2)
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda path: room_for_one_and_a_half if str(path).startswith(str(tmp_path)) else real_usage(path))
    with pytest.raises(OSError, match=r"not enough free space for checkpoints in .*small/checkpoints") as refused:
        run_training(cfg, small)
    assert refused.value.errno == errno.ENOSPC and "room for two" in str(refused.value)
    assert not (small / "checkpoints").exists() and not (small / "csv").exists()  # no step was taken
