"""Every bad input of `ccp-launch`, found before anything is rendered or submitted."""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence

from ccp.config import ConfigError

# The ccp entry points a launch can run on GPU nodes (ccp/cli); the others are local helpers.
ENTRY_POINTS = ("ccp-train", "ccp-eval", "ccp-reproduce", "ccp-sample")
# Set by the launcher from nodes, gpus_per_node and storage; a command must not set them itself.
LAUNCHER_KEYS = ("paths.log_dir", "paths.data_dir", "trainer.num_nodes", "trainer.devices")
JOBS = ("train", "fid", "text", "reproduce")
# weights.<key> of ccp-launch -> the file it names. The container holds no weights and nothing is downloaded.
WEIGHTS = {"inception": "weights-inception-2015-12-05-6726825d.pth", "clip": "ViT-L-14.pt"}


class LaunchConfigError(ConfigError, ValueError):
    """A launch that cannot run; the message names the fix. Raised before any submission."""


def check_counts(nodes, gpus_per_node, max_restarts) -> None:
    for key, value, low in (("nodes", nodes, 1), ("gpus_per_node", gpus_per_node, 1), ("max_restarts", max_restarts, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise LaunchConfigError(f"{key}={value!r}: must be an integer >= {low} (e.g. {key}={max(low, 2)})")


def check_job(job: str) -> None:
    if job not in JOBS:
        raise LaunchConfigError(f"job={job!r} is unknown; choose one of {', '.join(JOBS)}")


def check_gpu(target: str, gpu_type: str, gpus_per_node: int, offered: Mapping[str, Mapping]) -> Mapping:
    """The target's entry for `gpu_type`, which must offer `gpus_per_node` GPUs on one node."""
    if gpu_type not in offered:
        raise LaunchConfigError(f"gpu_type={gpu_type!r} is not offered by target={target}; choose one of "
                                f"{', '.join(offered)} (ccp/conf/target/{target}.yaml)")
    most = int(offered[gpu_type]["gpus"])
    if gpus_per_node > most:
        raise LaunchConfigError(f"gpus_per_node={gpus_per_node}: a {gpu_type} node of target={target} has {most} GPUs; "
                                f"use gpus_per_node<={most} and more nodes")
    return offered[gpu_type]


def check_storage_path(key: str, path: str) -> None:
    """A gs:// path must name a bucket: gs://<bucket>/<folder>."""
    if not path:
        raise LaunchConfigError(f"{key} is empty; give a gs://<bucket>/<folder> or a path mounted on every node")
    if path.startswith("gs:/") and not bucket_of(path):
        raise LaunchConfigError(f"{key}={path!r} has no bucket; write gs://<bucket>/<folder>, e.g. gs://my-bucket/ccp")


def check_weights_path(key: str, path: str) -> None:
    """weights.<key>, when given: gs://<bucket>/<file> or an absolute path (a relative one would be
    read from the container's working folder, which holds no weights)."""
    if not path:
        return
    example = f"gs://<bucket>/ccp/checkpoints/{WEIGHTS[key]}"
    if path.startswith("gs:/"):
        bucket = bucket_of(path)
        if not bucket or not path[len(f"gs://{bucket}"):].strip("/"):
            raise LaunchConfigError(f"weights.{key}={path!r} names no file in a bucket; write {example}")
    elif not path.startswith("/"):
        raise LaunchConfigError(f"weights.{key}={path!r} is relative, and the container holds no weights; give "
                                f"{example} or an absolute path present on every node")


def missing_weights(key: str, needed_by: str) -> LaunchConfigError:
    """The error for a job that loads weights.<key> when it is not given: the key and where to get the file."""
    from ccp.evaluation.attributes import CLIP_VIT_L14_URL
    from ccp.evaluation.fid import INCEPTION_WEIGHTS_URL

    url = {"inception": INCEPTION_WEIGHTS_URL, "clip": CLIP_VIT_L14_URL}[key]
    return LaunchConfigError(f"{needed_by} loads {WEIGHTS[key]}, which the container does not have and never "
                             f"downloads: download {url}, put it in a bucket and set "
                             f"weights.{key}=gs://<bucket>/ccp/checkpoints/{WEIGHTS[key]} (or an absolute path on "
                             "every node)")


def check_weights_not_overridden(overrides: Sequence[str], keys: Mapping[str, str], where: str) -> None:
    """`keys` (a job's config key -> weights.<key>) are set by the launcher, from weights.*, as the container sees them."""
    for word in overrides:
        key = str(word).split("=", 1)[0].lstrip("+~")
        if key in keys:
            raise LaunchConfigError(f"{where} sets {key}; give the file as weights.{keys[key]}=... instead (the "
                                    "launcher passes it to the job, a gs:// path as the container's mount)")


def bucket_of(path: str) -> str | None:
    """The bucket of gs://<bucket>/..., '' for a gs:// path without one, None for other paths."""
    if not path.startswith("gs:/"):
        return None
    rest = path[len("gs://"):] if path.startswith("gs://") else ""
    return rest.split("/", 1)[0]


def split_command(command: str, allowed: Sequence[str] = ENTRY_POINTS) -> tuple[str, list[str]]:
    """(entry point, overrides) of a command string; the entry point must be one of `allowed`."""
    try:
        argv = shlex.split(command or "")
    except ValueError as err:
        raise LaunchConfigError(f"command={command!r} cannot be split into words: {err}") from None
    if not argv or argv[0] not in allowed:
        raise LaunchConfigError(f"command={command!r} is not a ccp entry point; start it with one of "
                                f"{', '.join(allowed)} (e.g. command=\"ccp-train experiment=table1 dataset=face method=ours\")")
    overrides = argv[1:]
    for word in overrides:
        if word.startswith("-"):
            raise LaunchConfigError(f"command={command!r}: option {word!r} is not supported; give Hydra key=value "
                                    "overrides only (a multirun -m is one launch per run)")
        key = word.split("=", 1)[0].lstrip("+~")
        if key in LAUNCHER_KEYS:
            raise LaunchConfigError(f"command={command!r} sets {key}; the launcher sets it (nodes, gpus_per_node, "
                                    "storage.output_dir, storage.data_dir): drop it from the command")
    return argv[0], overrides


def check_global_batch(run_name: str, global_batch: int, batch_size: int, nodes: int, gpus_per_node: int) -> int:
    """Accumulation steps of a training on nodes x gpus_per_node GPUs; raises if they do not divide."""
    per_step = batch_size * nodes * gpus_per_node
    if global_batch < per_step or global_batch % per_step:
        raise LaunchConfigError(
            f"{run_name}: trainer.global_batch_size={global_batch} is not divisible by data.batch_size x nodes x "
            f"gpus_per_node = {batch_size} x {nodes} x {gpus_per_node} = {per_step}; change data.batch_size in the "
            "command, nodes or gpus_per_node, or trainer.global_batch_size (a multiple of that product)")
    return global_batch // per_step


def check_accelerator(run_name: str, accelerator: str) -> None:
    if str(accelerator) not in ("gpu", "cuda", "auto"):
        raise LaunchConfigError(f"{run_name}: trainer.accelerator={accelerator!r} on GPU nodes; add trainer=ddp to "
                                "the command")
