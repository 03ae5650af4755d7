"""Two "nodes" x 1 process on this machine: one `torchrun --nnodes=2 --node_rank=R` per node on
127.0.0.1 (gloo), each running the real `ccp-train` / `ccp-eval` entry point as a user would on
each machine, with a shared run folder standing in for a shared filesystem.

- a 2-node training reaches bit-identical weights to a 1-node x 2-process run (same global batch);
- the whole job killed mid-run (every node at once, a spot preemption) and launched again with the
  same commands resumes to bit-identical weights;
- one node lost mid-run: the survivor exits non-zero with a clear error in bounded time, never
  hangs (a killed node: its connections reset, seconds; a frozen node: `trainer.collective_timeout_s`);
- FID generation sharded over both nodes gives the FID of one process.

Every wait has a timeout (`tests/multinode.py`): a hang fails the test, it never blocks CI.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from multinode import Job, checkpoint_step, freeze, job_inputs, wait_for

STEPS = 10  # short, but long enough to kill a run part-way
EXPORT = Path("export") / "concept_unet" / "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return job_inputs(tmp_path_factory.mktemp("multinode"))


def train_overrides(inputs, run_dir, *, nnodes, nproc_per_node, max_steps=STEPS, extra=()):
    return [
        "experiment=tiny/ours", f"prior.path={inputs['prior']}", f"data.path={inputs['images']}",
        f"data.cache_dir={inputs['root'] / 'cache'}", f"hydra.run.dir={run_dir}",
        "trainer.accelerator=cpu", f"trainer.devices={nproc_per_node}", f"trainer.num_nodes={nnodes}",
        "trainer.strategy=ddp", f"trainer.max_steps={max_steps}", "trainer.global_batch_size=4", "data.batch_size=2",
        "checkpoint.every_n_steps=1", "validation.every_n_steps=0", *extra,
    ]


def train(inputs, run_dir, *, nnodes, nproc_per_node, timeout=240, tag="", **kwargs) -> Job:
    job = Job("ccp.cli.train", train_overrides(inputs, run_dir, nnodes=nnodes, nproc_per_node=nproc_per_node, **kwargs),
              Path(run_dir).parent / "logs", nnodes=nnodes, nproc_per_node=nproc_per_node, tag=f"{Path(run_dir).name}-{tag}")
    with job:
        codes = job.wait(timeout)
    assert codes == [0] * nnodes, "\n".join(job.log(r)[-3000:] for r in range(nnodes))
    return job


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


def trained_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


@pytest.fixture(scope="module")
def two_nodes(inputs):
    """An uninterrupted 2-node x 1-process run of STEPS steps."""
    run_dir = inputs["root"] / "two_nodes"
    job = train(inputs, run_dir, nnodes=2, nproc_per_node=1)
    return {"run_dir": run_dir, "job": job}


@pytest.mark.timeout(300)
def test_two_nodes_train_to_the_weights_of_one_node_with_two_processes(inputs, two_nodes):
    job = two_nodes["job"]
    # Lightning took the ranks from torchrun's environment (TorchElastic) and gloo on the CPU
    for node in (0, 1):
        log = job.log(node)
        assert f"Initializing distributed: GLOBAL_RANK: {node}, MEMBER: {node + 1}/2" in log
    assert "distributed_backend=gloo" in job.log(0)

    one_node = inputs["root"] / "one_node"
    train(inputs, one_node, nnodes=1, nproc_per_node=2)
    a, b = two_nodes["run_dir"], one_node
    assert_same_tensors(load_file(a / EXPORT), load_file(b / EXPORT))  # the exported (EMA) weights
    assert_same_tensors(trained_state(a), trained_state(b))  # and the raw trained weights
    assert torch.load(a / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == STEPS


@pytest.mark.timeout(300)
def test_every_node_preempted_then_relaunched_resumes_to_identical_weights(inputs, two_nodes):
    run_dir = inputs["root"] / "preempted"
    overrides = train_overrides(inputs, run_dir, nnodes=2, nproc_per_node=1)
    with Job("ccp.cli.train", overrides, inputs["root"] / "logs", nnodes=2, nproc_per_node=1, tag="preempted-") as job:
        wait_for(lambda: checkpoint_step(run_dir) >= 3, 180, "the step-3 checkpoint", job)
        job.kill_node(0)  # the spot VMs go together: SIGKILL, nothing gets to save anything
        job.kill_node(1)
    stopped_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 1 <= stopped_at < STEPS and not (run_dir / "export").exists()  # really cut short

    relaunch = train(inputs, run_dir, nnodes=2, nproc_per_node=1, tag="relaunch-")  # the same commands again
    assert "resuming from" in relaunch.log(0)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == STEPS
    reference = two_nodes["run_dir"]
    assert_same_tensors(load_file(reference / EXPORT), load_file(run_dir / EXPORT))
    assert_same_tensors(trained_state(reference), trained_state(run_dir))


def start_then_lose_node_one(inputs, name, lose, *extra):
    """A long 2-node run; once step 1 is saved, `lose(job, 1)`; returns (job, node 0's exit code, seconds)."""
    run_dir = inputs["root"] / name
    overrides = train_overrides(inputs, run_dir, nnodes=2, nproc_per_node=1, max_steps=100_000, extra=extra)
    job = Job("ccp.cli.train", overrides, inputs["root"] / "logs", nnodes=2, nproc_per_node=1, tag=f"{name}-")
    with job:
        wait_for(lambda: checkpoint_step(run_dir) >= 1, 180, "the step-1 checkpoint", job)
        lost = time.monotonic()
        lose(job, 1)
        code = job.wait(150, nodes=[0])[0]
        elapsed = time.monotonic() - lost
    return job, code, elapsed


@pytest.mark.timeout(240)
def test_a_killed_node_makes_the_survivor_exit_with_an_error_at_once(inputs):
    # the node's processes die: the kernel resets their connections and gloo fails the next collective
    job, code, elapsed = start_then_lose_node_one(inputs, "killed", Job.kill_node)
    log = job.log(0)
    assert code != 0
    assert re.search(r"Connection (reset|closed) by peer|Broken pipe", log), log[-3000:]
    assert "ChildFailedError" in log and "ccp.cli.train FAILED" in log  # torchrun reports the failed worker
    assert elapsed < 60, elapsed  # measured: about 2-3 s


@pytest.mark.timeout(240)
def test_a_frozen_node_makes_the_survivor_exit_after_the_collective_timeout(inputs):
    # the node hangs (or its network is cut): nothing resets the connections, nothing answers; the
    # survivor waits in its all-reduce for trainer.collective_timeout_s, then fails (torchrun's
    # static rendezvous does not watch the other node: without the timeout this waits 30 minutes)
    job, code, elapsed = start_then_lose_node_one(inputs, "frozen", freeze, "trainer.collective_timeout_s=10")
    log = job.log(0)
    assert code != 0
    # gloo words its timeout two ways, depending on where in the exchange the wait ends
    assert re.search(r"Timed out waiting 10000ms|Application timeout caused pair closure", log), log[-3000:]
    assert "ChildFailedError" in log and "ccp.cli.train FAILED" in log
    assert 10 <= elapsed < 60, elapsed  # measured: about 12 s


@pytest.mark.timeout(300)
def test_fid_sharded_over_two_nodes_equals_one_process(inputs, two_nodes, tmp_path):
    from ccp.config import compose
    from ccp.evaluation.run import run_eval

    def overrides(out_dir):
        return [f"export.path={two_nodes['run_dir'] / 'export'}", "metric=fid", f"fid.real_path={inputs['images']}",
                "fid.num_samples=4", "fid.shard_size=1", "fid.feature_extractor=random_conv", "fid.num_workers=0",
                f"fid.stats_cache_dir={out_dir / 'stats'}", f"fid.shard_dir={out_dir / 'shards'}", "sampling.steps=2",
                "sampling.height=64", "sampling.width=64", "sampling.batch_size=1", "device=cpu",
                f"hydra.run.dir={out_dir}"]

    shared = tmp_path / "two_nodes"  # the one folder both nodes write their shards into
    with Job("ccp.cli.eval", overrides(shared), tmp_path / "logs", nnodes=2, nproc_per_node=1) as job:
        codes = job.wait(240)
    assert codes == [0, 0], "\n".join(job.log(r)[-3000:] for r in (0, 1))
    sharded = json.loads((shared / "result.json").read_text())["value"]
    for node in (0, 1):
        assert f"rank {node} of 2 (gloo)" in job.log(node)
        # every rank printed the same FID: it waited for the other node's shards
        assert f"ours fid = {sharded:.6g}" in job.log(node)
    assert len(list((shared / "shards" / "features").glob("shard-*.safetensors"))) == 4

    alone = tmp_path / "one_process"
    cfg = compose("eval", overrides=[o for o in overrides(alone) if not o.startswith("hydra.")])
    single = run_eval(cfg, alone)["value"]
    assert sharded == pytest.approx(single, rel=1e-9, abs=0)


def test_collective_timeout_reaches_the_ddp_strategy_and_bad_values_fail_early(inputs):
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy
    from omegaconf import OmegaConf

    from ccp.config import compose
    from ccp.training.run import TrainConfigError, build_strategy, check_config

    def trainer(**values):
        return OmegaConf.create({"strategy": "ddp", **values})

    strategy = build_strategy(trainer(collective_timeout_s=7))
    assert isinstance(strategy, DDPStrategy) and strategy._timeout == timedelta(seconds=7)
    assert build_strategy(trainer())._timeout == timedelta(minutes=30)  # the default: torch's own
    assert build_strategy(OmegaConf.create({"strategy": "auto", "collective_timeout_s": 7})) == "auto"
    cfg = compose("train", overrides=train_overrides(inputs, inputs["root"] / "unused", nnodes=1, nproc_per_node=1)
                  + ["trainer.collective_timeout_s=0"])
    with pytest.raises(TrainConfigError, match="trainer.collective_timeout_s=0 must be a positive number"):
        check_config(cfg)
