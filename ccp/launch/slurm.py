"""SLURM (Cluster Toolkit A3 clusters): one sbatch script per job, `srun` starting one torchrun per node.

Preemption and time limits: ``--requeue`` puts a preempted job back in the queue;
``--signal=B:TERM@<s>`` sends SIGTERM to the batch shell <s> seconds before the time limit, and its
trap forwards TERM to srun (so torchrun, then every Lightning process, which saves last.ckpt) and
requeues the job; the rerun command resumes from that checkpoint. submit.sh submits the jobs in order,
each after the jobs it waits for (--dependency=afterok).
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from ccp.launch import torchrun
from ccp.launch.spec import Job, LaunchSpec


def sbatch_name(index: int, job: Job) -> str:
    return f"{index:02d}_{job.name}.sbatch"


def render_job(spec: LaunchSpec, job: Job) -> str:
    t, gpu = spec.target_cfg, spec.gpu
    gpus = job.nproc_per_node
    lines = [
        "#!/bin/bash",
        f"# {job.kind}: {' '.join(job.argv[:2])} ... on {job.nodes} node(s) x {job.nproc_per_node} GPU(s), "
        f"world size {job.world_size}",
        f"#SBATCH --job-name={job.name}",
        f"#SBATCH --partition={gpu['partition']}",
        f"#SBATCH --nodes={job.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gres={gpu['gres']}:{gpus}",
        f"#SBATCH --cpus-per-task={int(t['cpus_per_gpu']) * gpus}",
        *(["#SBATCH --exclusive"] if gpus == int(gpu["gpus"]) else []),
        f"#SBATCH --time={t['time_limit']}",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:TERM@{int(t['term_seconds'])}",
        "#SBATCH --open-mode=append",
        "#SBATCH --output=%x-%j.out  # in the folder submit.sh runs sbatch from",
        "set -euo pipefail",
        f"mkdir -p {shlex.quote(job.run_dir)}",
        'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        f"export MASTER_ADDR MASTER_PORT={int(t['master_port'])}",
        f"export CCP_WORLD_SIZE={job.world_size}  # = torchrun's WORLD_SIZE: {job.nodes} x {job.nproc_per_node}",
        "",
        "# SIGTERM (time limit or preemption): forward it to srun -> torchrun -> Lightning, which saves",
        "# last.ckpt; then requeue, and the same command resumes from it.",
        "forward_term() {",
        '  echo "SIGTERM: forwarding to srun ($SRUN_PID), then requeue" >&2',
        '  kill -TERM "$SRUN_PID" 2>/dev/null || true',
        '  wait "$SRUN_PID" || true',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "  exit 0",
        "}",
        "trap forward_term TERM",
        "",
        f"srun --nodes={job.nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "
        + shlex.quote(torchrun.node_script(job, torchrun.SLURM)) + " &",
        "SRUN_PID=$!",
        'wait "$SRUN_PID"',
        "",
    ]
    return "\n".join(lines)


def render_submit(spec: LaunchSpec) -> str:
    """submit.sh: sbatch each script, with --dependency=afterok on the jobs it waits for."""
    lines = ["#!/bin/bash", "# Submit the jobs in order; a job waits for those it depends on.", "set -euo pipefail",
             'cd "$(dirname "$0")"']
    var = {job.name: f"JOB_{i}" for i, job in enumerate(spec.jobs)}
    for i, job in enumerate(spec.jobs):
        dep = ""
        if job.after:
            dep = " --dependency=afterok:" + ":".join(f"${var[a]}" for a in job.after)
        lines.append(f"{var[job.name]}=$(sbatch --parsable{dep} {sbatch_name(i, job)})")
        lines.append(f'echo "{job.name}: ${var[job.name]}"')
    return "\n".join(lines) + "\n"


def render(spec: LaunchSpec) -> dict[str, str]:
    files = {sbatch_name(i, job): render_job(spec, job) for i, job in enumerate(spec.jobs)}
    files["submit.sh"] = render_submit(spec)
    return files


def submit(spec: LaunchSpec, folder: Path) -> None:
    """Run submit.sh (sbatch must be on PATH: a login node of the cluster)."""
    subprocess.run(["bash", str(folder / "submit.sh")], check=True)
