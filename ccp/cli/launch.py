"""`ccp-launch`: render and (unless dry_run=true) submit a ccp job on several GPU nodes (conf/launch.yaml).

    ccp-launch target=vertex nodes=4 gpus_per_node=8 spot=true 'command="ccp-train experiment=table1 dataset=face method=ours"'
    ccp-launch target=gke job=fid fid.run=face_ours weights.inception=gs://<bucket>/<path>/weights-inception-2015-12-05-6726825d.pth dry_run=true
    ccp-launch target=slurm job=reproduce weights.inception=... weights.clip=... dry_run=true out_dir=gcp/examples/slurm

Targets: slurm (sbatch), vertex (Vertex AI custom job), gke (JobSet + Kueue) (`ccp.launch`).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ccp.config import CONF_DIR, exit_on_config_error, run_checked


@hydra.main(config_path=CONF_DIR, config_name="launch", version_base="1.3")
def launch(cfg: DictConfig) -> None:
    from ccp.launch import run_launch  # here: a refused command line never waits for torch
    with exit_on_config_error("ccp-launch"):
        run_launch(cfg)


def main() -> None:
    """ccp-launch: the command line checked (`ccp.config.check_command_line`) before Hydra runs the job."""
    run_checked("ccp-launch", "launch", launch)


if __name__ == "__main__":
    main()
