"""`ccp-launch`: one ccp job on several GPU nodes through SLURM, Vertex AI or GKE (JobSet + Kueue).

`run_launch(cfg)` composes the ccp command(s) of the job, checks every input (`checks`), renders the
scheduler's files into ``out_dir`` and submits them unless ``dry_run=true``. Each node runs one
``torchrun`` (`torchrun`), whose flags come from the scheduler's environment.
"""

from ccp.launch.checks import LaunchConfigError
from ccp.launch.run import run_launch

__all__ = ["LaunchConfigError", "run_launch"]
