"""GKE: one JobSet (jobset.x-k8s.io/v1alpha2) per job, queued by Kueue, applied with kubectl.

One replicated job ``workers`` of one Indexed Job with parallelism = completions = nodes: pod i is
node i (JOB_COMPLETION_INDEX), pod 0 the torchrun master, reached through the headless service
JobSet creates (network.enableDNSHostnames). Each pod asks for gpus_per_node GPUs of the configured
cloud.google.com/gke-accelerator (Spot nodes when spot=true). A failed or preempted pod fails its Job
(backoffLimit 0) and JobSet restarts all of them (failurePolicy.maxRestarts); they resume from
last.ckpt. Every bucket of a gs:// path is a Cloud Storage FUSE CSI volume at <gcs_mount_root>/<bucket>.
Jobs that wait for others are applied after `kubectl wait --for=condition=Completed` on those.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from ccp.launch import torchrun
from ccp.launch.spec import Job, LaunchSpec

API_VERSION = "jobset.x-k8s.io/v1alpha2"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
REPLICATED_JOB = "workers"


def render_job(spec: LaunchSpec, job: Job) -> dict:
    t = spec.target_cfg
    gpus = job.nproc_per_node
    rdzv = torchrun.gke(job.name, REPLICATED_JOB, job.name, int(t["master_port"]))
    mount = str(t.get("gcs_mount_root") or "/gcs").rstrip("/")
    node_selector = {"cloud.google.com/gke-accelerator": spec.gpu_type}
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if spec.spot:
        node_selector["cloud.google.com/gke-spot"] = "true"
        tolerations.append({"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true",
                            "effect": "NoSchedule"})
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    for bucket in spec.buckets:
        volumes.append({"name": f"gcs-{bucket}"[:63].replace(".", "-"), "csi": {
            "driver": "gcsfuse.csi.storage.gke.io",
            "volumeAttributes": {"bucketName": bucket, "mountOptions": "implicit-dirs"}}})
        mounts.append({"name": volumes[-1]["name"], "mountPath": f"{mount}/{bucket}"})
    pod_spec = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": int(t["termination_grace_seconds"]),
        "nodeSelector": node_selector,
        "tolerations": tolerations,
        "containers": [{
            "name": "ccp",
            "image": spec.image,
            "command": ["bash", "-c", torchrun.node_script(job, rdzv)],
            "env": [{"name": "CCP_WORLD_SIZE", "value": str(job.world_size)},
                    {"name": "HF_HUB_OFFLINE", "value": "1"}],
            "ports": [{"containerPort": int(t["master_port"])}],
            "resources": {"limits": {"nvidia.com/gpu": gpus}},
            "volumeMounts": mounts,
        }],
        "volumes": volumes,
    }
    if t.get("service_account"):
        pod_spec["serviceAccountName"] = str(t["service_account"])
    pod_metadata = {"annotations": {"gke-gcsfuse/volumes": "true"}} if spec.buckets else {}
    return {
        "apiVersion": API_VERSION,
        "kind": "JobSet",
        "metadata": {
            "name": job.name,
            "namespace": str(t["namespace"]),
            "labels": {QUEUE_LABEL: str(t["queue"]), "ccp-job": spec.job, "ccp-kind": job.kind},
            **({"annotations": {"ccp/after": ",".join(job.after)}} if job.after else {}),
        },
        "spec": {
            "network": {"enableDNSHostnames": True, "subdomain": job.name},
            "failurePolicy": {"maxRestarts": spec.max_restarts},
            "successPolicy": {"operator": "All", "targetReplicatedJobs": [REPLICATED_JOB]},
            "replicatedJobs": [{
                "name": REPLICATED_JOB,
                "replicas": 1,
                "template": {"spec": {
                    "parallelism": job.nodes,
                    "completions": job.nodes,
                    "completionMode": "Indexed",
                    "backoffLimit": 0,
                    "template": {"metadata": pod_metadata, "spec": pod_spec},
                }},
            }],
        },
    }


def render(spec: LaunchSpec) -> dict[str, str]:
    return {f"{i:02d}_{job.name}.yaml": yaml.safe_dump(render_job(spec, job), sort_keys=False, width=120)
            for i, job in enumerate(spec.jobs)}


def submit(spec: LaunchSpec, folder: Path) -> None:
    """kubectl apply each manifest in order, first waiting for the JobSets it depends on to complete."""
    kubectl, namespace = str(spec.target_cfg["kubectl"]), str(spec.target_cfg["namespace"])
    for i, job in enumerate(spec.jobs):
        for name in job.after:
            subprocess.run([kubectl, "wait", "-n", namespace, "--for=condition=Completed", f"jobset/{name}",
                            "--timeout=-1s"], check=True)
        subprocess.run([kubectl, "apply", "-f", str(folder / f"{i:02d}_{job.name}.yaml")], check=True)
