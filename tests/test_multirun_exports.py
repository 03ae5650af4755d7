"""The README's two-step recipe: `ccp-train -m` over several rows, then `ccp-reproduce scale=full`
finds those exports with no extra flag (a multirun used to write to <log_dir>/multirun/train/<run>
while scale=full read <log_dir>/train/<run>). Run as a user runs it: the console script, default
trainer (auto: the CPU here, and it says so)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest


@pytest.mark.timeout(600)
def test_multirun_trainings_land_where_the_full_reproduction_looks(tiny_prior_dir, tmp_path):
    from ccp.config import compose
    from ccp.reproduce.config import export_dir

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        PIL.Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(images / f"{i}.png")
    log_dir = tmp_path / "runs"
    command = [str(Path(sys.executable).with_name("ccp-train")), "-m", "prior=tiny", f"prior.path={tiny_prior_dir}",
               "data=tiny", f"data.path={images}", "method=ours,oft", "dataset_name=face", f"paths.log_dir={log_dir}",
               "trainer.max_steps=1", "trainer.global_batch_size=2", "data.batch_size=2", "validation.every_n_steps=0",
               "logger=none"]
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=540, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    said = done.stdout + done.stderr
    assert said.count("trainer=auto: no CUDA device found") == 2  # each job said which hardware it chose

    cfg = compose("reproduce", ["scale=full", f"paths.log_dir={log_dir}"])
    for method in ("ours", "oft"):
        found = export_dir(cfg, "face", method)
        assert found == log_dir / "train" / f"face_{method}" / "export"
        assert json.loads((found / "ccp_export.json").read_text())["method"] == method
    assert not (log_dir / "multirun").exists()

    # the same command again (a lab adds rows and reruns the sweep): the finished runs are not
    # trained or exported again, so what was measured on their exports (FID shards) stays valid
    from ccp.io import folder_stamp

    stamps = {m: folder_stamp(export_dir(cfg, "face", m)) for m in ("ours", "oft")}
    again = subprocess.run(command, capture_output=True, text=True, timeout=540, env=env)
    assert again.returncode == 0, again.stderr[-4000:]
    assert {m: folder_stamp(export_dir(cfg, "face", m)) for m in ("ours", "oft")} == stamps
    assert (again.stdout + again.stderr).count("kept as it is") == 2
