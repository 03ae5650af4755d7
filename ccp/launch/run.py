"""`run_launch(cfg)`: check, render into out_dir (atomic writes), print, and submit unless dry_run."""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import DictConfig

from ccp.io import write_text_atomic
from ccp.launch import gke, slurm, vertex
from ccp.launch.spec import LaunchSpec, describe, spec_from_config

TARGETS = {"slurm": slurm, "vertex": vertex, "gke": gke}


def render_files(spec: LaunchSpec) -> dict[str, str]:
    files = TARGETS[spec.target].render(spec)
    files["launch.json"] = json.dumps(describe(spec), indent=1) + "\n"
    return files


def write_files(folder: Path, files: dict[str, str]) -> list[Path]:
    paths = []
    for name, text in files.items():
        path = write_text_atomic(folder / name, text)
        if name.endswith((".sh", ".sbatch")):
            os.chmod(path, 0o755)
        paths.append(path)
    return paths


def run_launch(cfg: DictConfig) -> LaunchSpec:
    """Every check runs before anything is written or submitted (LaunchConfigError names the fix)."""
    spec = spec_from_config(cfg)
    paths = write_files(spec.out_dir, render_files(spec))
    print(f"ccp-launch: target={spec.target} job={spec.job}: {len(spec.jobs)} job(s) on {spec.nodes} node(s) x "
          f"{spec.gpus_per_node} {spec.gpu_type} (world size {spec.world_size}), outputs in {spec.output_dir}")
    for job in spec.jobs:
        after = f" (after {', '.join(job.after)})" if job.after else ""
        print(f"  {job.name}: {' '.join(job.argv)}{after}")
    print("rendered:\n  " + "\n  ".join(str(p) for p in paths))
    if spec.dry_run:
        print("dry_run=true: nothing submitted")
    else:
        TARGETS[spec.target].submit(spec, spec.out_dir)
    return spec
