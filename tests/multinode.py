"""Simulated multi-node jobs for the tests: each "node" is one `torchrun` started as its own
process, all on 127.0.0.1, as a user would start one per machine.

Every wait has a timeout (a hang fails the test, it never blocks CI), and `Job.kill_node` ends a
node the way a lost machine ends: torchrun and its workers at once (torchrun starts each worker in
a session of its own, so killing torchrun's process group alone would leave the worker running).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def job_inputs(root: Path) -> dict[str, Path]:
    """What a training job reads: a tiny prior and 8 random 64 px images under `root`."""
    import numpy as np
    import PIL.Image

    from ccp.priors.tiny import save_tiny_prior

    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        PIL.Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(images / f"{i}.png")
    return {"root": root, "prior": save_tiny_prior(root / "prior", seed=0), "images": images}


def checkpoint_step(run_dir: Path) -> int:
    """The newest step checkpoint written so far (0: none yet)."""
    steps = [int(m.group(1)) for p in (run_dir / "checkpoints").glob("step=*.ckpt")
             if (m := re.fullmatch(r"step=(\d+)\.ckpt", p.name))]
    return max(steps, default=0)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun() -> list[str]:
    """The torchrun beside this Python (the console script), else the same module through `-m`."""
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def node_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                        "MASTER_PORT", "TORCHELASTIC_RUN_ID", "PYTEST_CURRENT_TEST"}}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    return env


def node_command(module: str, overrides: list[str], *, nnodes: int, nproc_per_node: int, node_rank: int,
                 port: int) -> list[str]:
    return [*torchrun(), f"--nnodes={nnodes}", f"--nproc_per_node={nproc_per_node}", f"--node_rank={node_rank}",
            "--master_addr=127.0.0.1", f"--master_port={port}", "-m", module, *overrides]


def descendants(pid: int) -> list[int]:
    """`pid`'s living descendants (Linux /proc), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


class Job:
    """One launch of a job: one torchrun per node, each logging to ``<log_dir>/node<R>.log``."""

    def __init__(self, module: str, overrides: list[str], log_dir: Path, *, nnodes: int, nproc_per_node: int,
                 port: int | None = None, tag: str = "", env: dict[str, str] | None = None):
        self.port = port or free_port()
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.logs = [self.log_dir / f"{tag}node{r}.log" for r in range(nnodes)]
        self.procs: list[subprocess.Popen] = []
        self.started = time.monotonic()
        for rank, log in enumerate(self.logs):
            command = node_command(module, overrides, nnodes=nnodes, nproc_per_node=nproc_per_node, node_rank=rank,
                                   port=self.port)
            with open(log, "w") as out:
                self.procs.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**node_env(), **(env or {})},
                                                   start_new_session=True))

    def log(self, node: int) -> str:
        return self.logs[node].read_text(errors="replace")

    def wait(self, timeout: float, nodes: list[int] | None = None) -> list[int]:
        """Exit codes of `nodes` (all by default); on timeout every node is killed and the test fails."""
        deadline = time.monotonic() + timeout
        codes = []
        for node in nodes if nodes is not None else range(len(self.procs)):
            try:
                codes.append(self.procs[node].wait(timeout=max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.kill_all()
                tail = "\n".join(f"--- node {r} ---\n{self.log(r)[-3000:]}" for r in range(len(self.procs)))
                raise AssertionError(f"node {node} still running after {timeout:.0f} s (killed)\n{tail}") from None
        return codes

    def kill_node(self, node: int) -> None:
        """SIGKILL torchrun and all its workers at once, as when the machine disappears."""
        proc = self.procs[node]
        pids = [proc.pid, *descendants(proc.pid)]
        for pid in pids:  # freeze first: nobody gets to react to the others' death
            _signal(pid, signal.SIGSTOP)
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def kill_all(self) -> None:
        for node in range(len(self.procs)):
            if self.procs[node].poll() is None or descendants(self.procs[node].pid):
                self.kill_node(node)

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc) -> None:
        self.kill_all()  # never leave a node behind, whatever the test did


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def wait_for(predicate, timeout: float, what: str, job: Job | None = None, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if job is not None and any(p.poll() is not None for p in job.procs):
            tail = "\n".join(f"--- node {r} ---\n{job.log(r)[-3000:]}" for r in range(len(job.procs)))
            raise AssertionError(f"a node exited while waiting for {what}\n{tail}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def freeze(job: Job, node: int) -> None:
    """SIGSTOP a node's torchrun and workers: its sockets stay open but nothing answers, as when a
    machine hangs or its network is cut (a killed local process instead has its connections reset
    by the kernel at once)."""
    proc = job.procs[node]
    for pid in [proc.pid, *descendants(proc.pid)]:
        _signal(pid, signal.SIGSTOP)
