"""Vertex AI custom jobs: the CustomJob spec as a dict, submitted with the google-cloud-aiplatform SDK.

Worker pool 0 holds one replica (the master, RANK=0), pool 1 the other nodes - 1; Vertex sets
MASTER_ADDR, MASTER_PORT, RANK (replica index) and WORLD_SIZE (replicas) on each, which the node
script hands to torchrun. Spot capacity: scheduling.strategy=SPOT with restart_job_on_worker_restart,
so a preempted worker restarts the job and every node resumes from last.ckpt. gs://<bucket>/<path>
is mounted by Vertex at /gcs/<bucket>/<path> in the container: the commands use those paths.
"""

from __future__ import annotations

import json
from pathlib import Path

from ccp.launch import torchrun
from ccp.launch.checks import LaunchConfigError, bucket_of
from ccp.launch.spec import Job, LaunchSpec


def worker_pool(spec: LaunchSpec, job: Job, replicas: int) -> dict:
    gpus = job.nproc_per_node
    machine = spec.gpu["machine_type"] if gpus == int(spec.gpu["gpus"]) else _smaller_machine(spec, gpus)
    return {
        "machine_spec": {"machine_type": machine, "accelerator_type": spec.gpu_type, "accelerator_count": gpus},
        "replica_count": replicas,
        "disk_spec": {"boot_disk_type": "pd-ssd", "boot_disk_size_gb": int(spec.target_cfg["boot_disk_gb"])},
        "container_spec": {
            "image_uri": spec.image,
            "command": ["bash", "-c", torchrun.node_script(job, torchrun.VERTEX)],
            "env": [{"name": "CCP_WORLD_SIZE", "value": str(job.world_size)},
                    {"name": "HF_HUB_OFFLINE", "value": "1"}],
        },
    }


def _smaller_machine(spec: LaunchSpec, gpus: int) -> str:
    """The same machine family with `gpus` GPUs (a3-highgpu-8g -> a3-highgpu-1g, g2-standard-96 -> the table)."""
    machine = str(spec.gpu["machine_type"])
    if machine.startswith("g2-standard-"):
        return {1: "g2-standard-12", 2: "g2-standard-24", 4: "g2-standard-48"}.get(gpus, machine)
    if machine.endswith("-8g"):
        return f"{machine[:-2]}{gpus}g"
    return machine


def render_job(spec: LaunchSpec, job: Job) -> dict:
    """CustomJob as the REST resource (projects.locations.customJobs), snake_case as the SDK takes it."""
    pools = [worker_pool(spec, job, 1)]
    if job.nodes > 1:
        pools.append(worker_pool(spec, job, job.nodes - 1))
    scheduling = {"restart_job_on_worker_restart": True}
    if spec.spot:
        scheduling["strategy"] = "SPOT"
    return {
        "display_name": job.name,
        "labels": {"ccp-job": spec.job, "ccp-kind": job.kind},
        "job_spec": {
            "worker_pool_specs": pools,
            "scheduling": scheduling,
            "base_output_directory": {"output_uri_prefix": f"{spec.output_dir.rstrip('/')}/launch/vertex/{job.name}"},
        },
        "after": list(job.after),
    }


def render(spec: LaunchSpec) -> dict[str, str]:
    return {f"{i:02d}_{job.name}.json": json.dumps(render_job(spec, job), indent=1) + "\n"
            for i, job in enumerate(spec.jobs)}


def _sdk():
    try:
        from google.cloud import aiplatform
        from google.cloud.aiplatform.compat.types import custom_job as custom_job_types
    except ImportError:
        raise LaunchConfigError("target=vertex submits with the Vertex AI SDK, which is not installed: "
                                "pip install google-cloud-aiplatform (or dry_run=true to only render)") from None
    return aiplatform, custom_job_types


def submit(spec: LaunchSpec, folder: Path) -> None:
    """Submit the jobs in order; a job with `after` starts once those have succeeded (waited for here)."""
    aiplatform, types = _sdk()
    t = spec.target_cfg
    staging = t.get("staging_bucket") or f"gs://{bucket_of(spec.output_dir)}"
    aiplatform.init(project=t["project"], location=t["region"], staging_bucket=staging)
    submitted = {}
    for i, job in enumerate(spec.jobs):
        rendered = json.loads((folder / f"{i:02d}_{job.name}.json").read_text())
        for name in rendered["after"]:
            submitted[name].wait()
        body = rendered["job_spec"]
        custom_job = aiplatform.CustomJob(
            display_name=rendered["display_name"], worker_pool_specs=body["worker_pool_specs"],
            base_output_dir=body["base_output_directory"]["output_uri_prefix"], labels=rendered["labels"])
        strategy = body["scheduling"].get("strategy")
        custom_job.submit(
            restart_job_on_worker_restart=body["scheduling"]["restart_job_on_worker_restart"],
            scheduling_strategy=types.Scheduling.Strategy[strategy] if strategy else None)
        submitted[job.name] = custom_job
        print(f"submitted {job.name}: {custom_job.resource_name}")
