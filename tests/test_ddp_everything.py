"""`ccp-train` under DDP (one node, two gloo processes started by torchrun, as on a GPU node) with
every callback a lab turns on at once: in-training FID whose real statistics are computed by the
run itself (first uncached, then from the cache), validation grids, EMA, checkpoints every step,
the latent cache, prior-preservation class images and wandb offline. The first run finishes; the
second (statistics cached) is killed mid-run and relaunched, and reaches the first run's weights
bit for bit.

Before `ccp.distributed.rank_zero_computes`, rank 0 computed the real statistics and entered a
barrier while rank 1 waited in a broadcast: both sat in mismatched collectives until the collective
timeout (here 60 s, so the old code fails this test instead of hanging for 30 minutes).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from multinode import Job, checkpoint_step, job_inputs, wait_for

STEPS = 4
EXPORT = Path("export") / "unet" / "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_everything")
    # data.cache_dir: latents and class images; CCP_CACHE_DIR: the real FID statistics
    return {**job_inputs(root), "cache": root / "cache", "ccp_cache": root / "ccp_cache"}


def overrides(inputs, run_dir) -> list[str]:
    return [
        "experiment=tiny/dreambooth", f"prior.path={inputs['prior']}", f"data.path={inputs['images']}",
        f"data.cache_dir={inputs['cache']}", f"hydra.run.dir={run_dir}",
        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.collective_timeout_s=60",
        f"trainer.max_steps={STEPS}", "trainer.global_batch_size=4", "data.batch_size=2",
        "logger=default",                                                         # CSV + wandb offline
        "checkpoint.every_n_steps=1", "ema.enabled=true",
        "validation.every_n_steps=2", "validation.num_images=2", "validation.steps=2",
        "data.latent_cache.enabled=true",
        "prior_preservation.enabled=true", "prior_preservation.class_prompt=a photo of a thing",
        "prior_preservation.num_class_images=4", "prior_preservation.steps=2", "prior_preservation.sample_batch_size=2",
        "eval.every_n_steps=2", "eval.num_samples=4", "eval.feature_extractor=random_conv", "eval.steps=2",
        "eval.batch_size=2",
    ]


def launch(inputs, run_dir, tag) -> Job:
    return Job("ccp.cli.train", overrides(inputs, run_dir), inputs["root"] / "logs", nnodes=1, nproc_per_node=2,
               tag=tag, env={"CCP_CACHE_DIR": str(inputs["ccp_cache"])})


def logged(run_dir: Path, key: str) -> dict[int, float]:
    """step -> value of `key` in the run's CSV logs (every version)."""
    values = {}
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get(key):
                    values[int(row["step"])] = float(row[key])
    return values


@pytest.fixture(scope="module")
def finished(inputs):
    """The uninterrupted run, real statistics not cached yet."""
    run_dir = inputs["root"] / "finished"
    with launch(inputs, run_dir, "finished-") as job:
        codes = job.wait(420)
    assert codes == [0], job.log(0)[-4000:]
    return {"run_dir": run_dir, "log": job.log(0), "cache": inputs["ccp_cache"]}


@pytest.mark.timeout(600)
def test_ddp_run_with_every_callback_computes_its_own_fid_statistics_and_finishes(finished, inputs):
    run_dir, log = finished["run_dir"], finished["log"]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in log
    # in-training FID at steps 2 and 4, one finite value per step, the same on both ranks (one row)
    fid = logged(run_dir, "eval/fid")
    assert sorted(fid) == [2, 4] and all(math.isfinite(v) and v >= 0 for v in fid.values()), fid
    stats = list((finished["cache"] / "fid_stats").glob("images-64px-*.safetensors"))
    assert len(stats) == 1  # computed once, by rank 0, and cached
    assert sorted(p.name for p in (run_dir / "validation").glob("*.png")) == ["step_0000002.png", "step_0000004.png"]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == STEPS
    assert any("EMA" in key for key in ckpt["callbacks"])  # EMA state travels with the checkpoint
    manifests = [json.loads(p.read_text()) for p in (inputs["cache"] / "latents").glob("*/manifest.json")]
    assert sorted(m["num_images"] for m in manifests if m["complete"]) == [4, 8]  # class and instance latents
    class_images = [p for p in (inputs["cache"] / "class_images").rglob("*.png")]
    assert len(class_images) == 4
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline wandb run"
    assert (run_dir / EXPORT).is_file()


@pytest.mark.timeout(600)
def test_ddp_run_with_cached_statistics_killed_and_relaunched_reaches_the_same_weights(finished, inputs):
    run_dir = inputs["root"] / "killed"
    with launch(inputs, run_dir, "killed-") as job:
        wait_for(lambda: checkpoint_step(run_dir) >= 2, 300, "the step-2 checkpoint", job)
        job.kill_node(0)  # torchrun and both ranks, SIGKILL: nothing saves anything
    stopped_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 1 <= stopped_at < STEPS and not (run_dir / EXPORT).exists()  # really cut short
    with launch(inputs, run_dir, "relaunched-") as job:
        codes = job.wait(420)
    assert codes == [0], job.log(0)[-4000:]
    assert "resuming from" in job.log(0)
    assert len(list((finished["cache"] / "fid_stats").glob("images-64px-*.safetensors"))) == 1  # read, not redone

    reference = finished["run_dir"]
    a = torch.load(reference / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    b = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    exported_a, exported_b = load_file(reference / EXPORT), load_file(run_dir / EXPORT)  # the EMA weights
    assert all(torch.equal(exported_a[k], exported_b[k]) for k in exported_a)
    # the same FID at step 4: same weights, same samples, same (cached) real statistics
    assert logged(run_dir, "eval/fid")[4] == logged(reference, "eval/fid")[4]
    info = json.loads((run_dir / "export" / "ccp_export.json").read_text())
    assert info["method"] == "dreambooth"
