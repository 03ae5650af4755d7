"""The script each node runs: one `torchrun` whose flags come from the scheduler's environment.

Static rendezvous on every target: --nnodes and --nproc_per_node are known when rendering;
--node_rank, --master_addr and --master_port are shell expressions read on the node:

    slurm   $SLURM_NODEID; MASTER_ADDR = first host of $SLURM_JOB_NODELIST (set by the sbatch script)
    vertex  $RANK, $MASTER_ADDR, $MASTER_PORT that Vertex AI sets on every replica (RANK = replica index)
    gke     $JOB_COMPLETION_INDEX of the Indexed Job; master = pod 0's JobSet hostname

torchrun then sets RANK, LOCAL_RANK, WORLD_SIZE (= nodes x nproc_per_node), MASTER_ADDR/PORT for each
process; Lightning reads them (TorchElastic environment, chosen before SLURM's). Restarts are left to
the scheduler (--max_restarts=0): a restarted job resumes from last.ckpt / finished FID shards.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from ccp.launch.spec import Job


@dataclass(frozen=True)
class Rendezvous:
    """Shell expressions (already quoted) for this node's rank and the master's address and port."""

    node_rank: str
    master_addr: str
    master_port: str


SLURM = Rendezvous('"$SLURM_NODEID"', '"$MASTER_ADDR"', '"$MASTER_PORT"')
VERTEX = Rendezvous('"${RANK:-0}"', '"${MASTER_ADDR:-localhost}"', '"${MASTER_PORT:-29500}"')


def gke(jobset: str, replicated_job: str, subdomain: str, port: int) -> Rendezvous:
    """Pod 0 of job 0 of the JobSet is the master: <jobset>-<replicated job>-0-0.<subdomain>."""
    return Rendezvous('"$JOB_COMPLETION_INDEX"', f"{jobset}-{replicated_job}-0-0.{subdomain}", str(port))


def torchrun_args(job: Job, rdzv: Rendezvous) -> list[str]:
    return [f"--nnodes={job.nodes}", f"--nproc_per_node={job.nproc_per_node}", f"--node_rank={rdzv.node_rank}",
            f"--master_addr={rdzv.master_addr}", f"--master_port={rdzv.master_port}", "--max_restarts=0"]


def node_script(job: Job, rdzv: Rendezvous) -> str:
    """Bash run once per node (under `bash -c`): torchrun over the node's GPUs. Every entry point
    joins torchrun's process group (ccp-train through Lightning, ccp-eval for its FID shards, each
    rank on cuda:LOCAL_RANK, waiting at a barrier for the other ranks' shards)."""
    args = " ".join(shlex.quote(a) for a in job.argv[1:])
    flags = " ".join(torchrun_args(job, rdzv))
    return f"set -euo pipefail\nexec torchrun {flags} --no-python {job.argv[0]} {args}\n"
