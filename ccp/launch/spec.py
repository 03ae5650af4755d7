"""`LaunchSpec`: what to run where, read from a ccp-launch config and checked (`checks`).

Jobs: ``train`` runs `command` (one ccp-train run) on every GPU of every node; ``fid`` runs
ccp-eval metric=fid of one trained run on every GPU of every node (each rank writes its share of the
shards, waits for the others at a barrier, and every rank reads the same FID); ``text`` runs ccp-eval
metric=text of one trained run on one GPU (it is not split over ranks); ``reproduce`` is a sequence: one training job per
(dataset, method) of ccp-reproduce's scale, all on every GPU of every node, then one ccp-reproduce job
(one process on one node) that evaluates the exports they wrote. ccp-reproduce itself is a single
process: run under torchrun on all GPUs it would repeat every step on each rank, so its trainings
are split out as DDP jobs and it only evaluates (reusing their exports).

Model weights (``weights.inception``, ``weights.clip``) are never in the container: a job that loads
them is refused unless they are given, and gets them on its command line as the container sees them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ccp.config import compose, plain
from ccp.launch import checks
from ccp.launch.checks import LaunchConfigError


@dataclass(frozen=True)
class Job:
    """One scheduler job: `argv` (a ccp entry point and its overrides, container paths) under torchrun."""

    name: str
    kind: str                    # train | fid | reproduce: how the node script runs argv
    argv: tuple[str, ...]
    nodes: int
    nproc_per_node: int          # torchrun processes per node (GPUs used)
    run_dir: str                 # where the job writes, as seen in the container
    after: tuple[str, ...] = ()  # jobs that must finish first

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node


@dataclass(frozen=True)
class LaunchSpec:
    target: str
    job: str
    nodes: int
    gpus_per_node: int
    gpu_type: str
    gpu: dict                    # the target's entry for gpu_type
    spot: bool
    max_restarts: int
    name: str
    image: str
    output_dir: str              # storage.output_dir as configured (gs://... or a path)
    data_dir: str
    weights: dict                # weights.<key> as configured (gs://... or an absolute path); "" when not given
    log_dir: str                 # output_dir as seen in the container: paths.log_dir
    data_path: str               # data_dir as seen in the container: paths.data_dir
    target_cfg: dict
    jobs: tuple[Job, ...]
    out_dir: Path
    dry_run: bool

    @property
    def buckets(self) -> list[str]:
        paths = (self.output_dir, self.data_dir, *self.weights.values())
        return sorted({b for b in map(checks.bucket_of, paths) if b})

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


def container_path(path: str, mount_root: str) -> str:
    """gs://<bucket>/<path> -> <mount_root>/<bucket>/<path>; any other path unchanged."""
    if checks.bucket_of(path) is None:
        return path.rstrip("/") or path
    return f"{mount_root.rstrip('/')}/{path[len('gs://'):].rstrip('/')}"


def k8s_name(*parts: str, limit: int = 40) -> str:
    """A DNS-1035 label (lowercase, digits, '-') of at most `limit` characters."""
    name = re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")
    name = re.sub(r"-+", "-", name)[:limit].rstrip("-")
    return name if name[:1].isalpha() else f"j-{name}"[:limit]


def _compose(config: str, overrides: list[str], what: str) -> DictConfig:
    try:
        return compose(config, overrides)
    except Exception as err:  # Hydra's override and missing-config errors
        raise LaunchConfigError(f"{what}: the {config} config does not compose with {overrides}: {err}") from None


def train_job(spec_name: str, overrides: list[str], nodes: int, gpus: int, log_dir: str, data_path: str,
              weights: dict[str, str | None], after: tuple[str, ...] = ()) -> Job:
    """A ccp-train job on nodes x gpus GPUs, its global batch checked on the composed config."""
    checks.check_weights_not_overridden(overrides, {"eval.inception_weights": "inception"}, "the ccp-train command")
    launch_overrides = [f"paths.log_dir={log_dir}", f"paths.data_dir={data_path}",
                        f"trainer.num_nodes={nodes}", f"trainer.devices={gpus}"]
    cfg = _compose("train", overrides + launch_overrides, "ccp-train " + " ".join(overrides))
    run_name = str(cfg.run_name)
    checks.check_accelerator(run_name, cfg.trainer.accelerator)
    checks.check_global_batch(run_name, int(cfg.trainer.global_batch_size), int(cfg.data.batch_size), nodes, gpus)
    if (int(OmegaConf.select(cfg, "eval.every_n_steps", default=0) or 0) > 0
            and OmegaConf.select(cfg, "eval.feature_extractor") == "inception"):
        if not weights.get("inception"):
            raise checks.missing_weights("inception", f"{run_name} (eval.every_n_steps > 0: FID during training)")
        launch_overrides.append(f"eval.inception_weights={weights['inception']}")
    return Job(k8s_name(spec_name, "train", run_name), "train", ("ccp-train", *overrides, *launch_overrides),
               nodes, gpus, f"{log_dir}/train/{run_name}", after)


def fid_job(spec_name: str, fid: DictConfig, nodes: int, gpus: int, log_dir: str, data_path: str,
            weights: dict[str, str | None]) -> Job:
    run, num = str(fid.run), fid.num_samples
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise LaunchConfigError(f"fid.num_samples={num!r}: must be an integer >= 1 (Table 1: 50000)")
    extra = [str(o) for o in fid.overrides]
    checks.check_weights_not_overridden(extra, {"fid.inception_weights": "inception"}, "fid.overrides")
    inception = weights.get("inception")
    run_dir = f"{log_dir}/eval/{run}_fid"
    overrides = ["metric=fid", f"export.path={log_dir}/train/{run}/export", f"fid.real_path={data_path}/{fid.dataset}",
                 f"fid.num_samples={num}", f"fid.shard_dir={run_dir}/fid_shards",
                 *([f"fid.inception_weights={inception}"] if inception else []),
                 f"paths.log_dir={log_dir}", f"paths.data_dir={data_path}", *extra]
    cfg = _compose("eval", overrides, "ccp-eval")
    if cfg.fid.feature_extractor == "inception" and not inception:
        raise checks.missing_weights("inception", "job=fid (the FID's InceptionV3)")
    return Job(k8s_name(spec_name, "fid", run), "fid", ("ccp-eval", *overrides, f"hydra.run.dir={run_dir}"),
               nodes, gpus, run_dir)


def text_job(spec_name: str, text: DictConfig, log_dir: str, data_path: str, weights: dict[str, str | None]) -> Job:
    """ccp-eval metric=text on one GPU: text alignment runs whole on every rank, so more would repeat it."""
    run = str(text.run)
    extra = [str(o) for o in text.overrides]
    checks.check_weights_not_overridden(extra, {"text.clip_weights": "clip"}, "text.overrides")
    clip = weights.get("clip")
    run_dir = f"{log_dir}/eval/{run}_text"
    overrides = ["metric=text", f"export.path={log_dir}/train/{run}/export",
                 *([f"text.clip_weights={clip}"] if clip else []),
                 f"paths.log_dir={log_dir}", f"paths.data_dir={data_path}", *extra]
    _compose("eval", overrides, "ccp-eval")
    if not clip:
        raise checks.missing_weights("clip", "job=text (CLIP ViT-L/14, the zero-shot attribute predictor)")
    return Job(k8s_name(spec_name, "text", run), "text", ("ccp-eval", *overrides, f"hydra.run.dir={run_dir}"),
               1, 1, run_dir)


def reproduce_jobs(spec_name: str, rep: DictConfig, nodes: int, gpus: int, log_dir: str, data_path: str,
                   weights: dict[str, str | None]) -> list[Job]:
    """One training job per (dataset, method) of the scale, then ccp-reproduce on one GPU after them all."""
    extra = [str(o) for o in rep.overrides]
    checks.check_weights_not_overridden(
        extra, {"fid.inception_weights": "inception", "text_alignment.clip_weights": "clip"}, "reproduce.overrides")
    inception, clip = weights.get("inception"), weights.get("clip")
    out_dir = f"{log_dir}/reproduce/{rep.scale}"
    overrides = [f"scale={rep.scale}", *extra,
                 *([f"fid.inception_weights={inception}"] if inception else []),
                 *([f"text_alignment.clip_weights={clip}"] if clip else []),
                 f"paths.log_dir={log_dir}", f"paths.data_dir={data_path}", f"out_dir={out_dir}",
                 f"train_dir={log_dir}/train", f"results_dir={out_dir}/results"]
    cfg = _compose("reproduce", overrides, "ccp-reproduce")
    if not cfg.get("toy_data"):  # what ccp-reproduce itself requires (ccp.reproduce.config)
        if cfg.fid.feature_extractor == "inception" and not inception:
            raise checks.missing_weights("inception", f"job=reproduce (scale={rep.scale}: FID and KID's InceptionV3)")
        if cfg.text_alignment.enabled and cfg.text_alignment.predictor == "clip" and not clip:
            raise checks.missing_weights("clip", f"job=reproduce (scale={rep.scale}: text alignment's CLIP ViT-L/14)")
    exports = plain(cfg.get("exports"))
    train_extra = [str(o) for o in rep.train_overrides]
    trainings = []
    for dataset in cfg.datasets:
        for method in cfg.methods:
            if (exports.get(dataset) or {}).get(method):
                continue  # given as +exports.<dataset>.<method>=...: nothing to train
            train_overrides = [*cfg.data[dataset].train_overrides, f"method={method}"]
            trainings.append(train_job(spec_name, [*train_overrides, *train_extra], nodes, gpus, log_dir,
                                       data_path, weights))
    evaluate = Job(k8s_name(spec_name, "reproduce", str(rep.scale)), "reproduce",
                   ("ccp-reproduce", *overrides, f"hydra.run.dir={out_dir}/logs/launch"), 1, 1, out_dir,
                   tuple(j.name for j in trainings))
    return [*trainings, evaluate]


def spec_from_config(cfg: DictConfig) -> LaunchSpec:
    """The checked LaunchSpec of a composed ccp-launch config; raises LaunchConfigError naming the fix."""
    target_cfg = plain(cfg.target)
    target = str(target_cfg.get("name"))
    nodes, gpus, restarts = cfg.nodes, cfg.gpus_per_node, cfg.max_restarts
    checks.check_counts(nodes, gpus, restarts)
    checks.check_job(str(cfg.job))
    gpu_type = str(cfg.gpu_type or target_cfg["default_gpu_type"])
    gpu = dict(checks.check_gpu(target, gpu_type, gpus, target_cfg["gpu_types"]))
    output_dir, data_dir = str(cfg.storage.output_dir or ""), str(cfg.storage.data_dir or "")
    checks.check_storage_path("storage.output_dir", output_dir)
    checks.check_storage_path("storage.data_dir", data_dir)
    if target == "vertex" and checks.bucket_of(output_dir) is None:
        raise LaunchConfigError(f"storage.output_dir={output_dir!r}: target=vertex needs a gs://<bucket>/<folder> "
                                "(the job's base output directory)")
    mount = str(target_cfg.get("gcs_mount_root") or "/gcs")
    log_dir, data_path = container_path(output_dir, mount), container_path(data_dir, mount)
    weights_given = {key: str(OmegaConf.select(cfg, f"weights.{key}") or "") for key in checks.WEIGHTS}
    for key, path in weights_given.items():
        checks.check_weights_path(key, path)
    weights = {key: container_path(path, mount) if path else None for key, path in weights_given.items()}
    name = k8s_name(str(cfg.name), limit=12)
    if cfg.job == "train":
        entry, overrides = checks.split_command(str(cfg.command or ""))
        if entry != "ccp-train":
            raise LaunchConfigError(f"job=train runs ccp-train, got command={cfg.command!r}; use job=fid or job=text "
                                    "for the FID or text alignment of a trained run and job=reproduce for the tables")
        jobs = [train_job(name, overrides, nodes, gpus, log_dir, data_path, weights)]
    elif cfg.job == "fid":
        jobs = [fid_job(name, cfg.fid, nodes, gpus, log_dir, data_path, weights)]
    elif cfg.job == "text":
        jobs = [text_job(name, cfg.text, log_dir, data_path, weights)]
    else:
        jobs = reproduce_jobs(name, cfg.reproduce, nodes, gpus, log_dir, data_path, weights)
    return LaunchSpec(target=target, job=str(cfg.job), nodes=nodes, gpus_per_node=gpus, gpu_type=gpu_type, gpu=gpu,
                      spot=bool(cfg.spot), max_restarts=int(restarts), name=name, image=str(cfg.image),
                      output_dir=output_dir, data_dir=data_dir, weights=weights_given, log_dir=log_dir,
                      data_path=data_path, target_cfg=target_cfg, jobs=tuple(jobs), out_dir=Path(str(cfg.out_dir)),
                      dry_run=bool(cfg.dry_run))


def describe(spec: LaunchSpec) -> dict:
    """A JSON-able summary (launch.json beside the rendered files)."""
    return {"target": spec.target, "job": spec.job, "nodes": spec.nodes, "gpus_per_node": spec.gpus_per_node,
            "world_size": spec.world_size, "gpu_type": spec.gpu_type, "spot": spec.spot,
            "max_restarts": spec.max_restarts, "image": spec.image, "output_dir": spec.output_dir,
            "data_dir": spec.data_dir, "weights": {k: v or None for k, v in spec.weights.items()},
            "log_dir": spec.log_dir, "data_path": spec.data_path,
            "jobs": [{"name": j.name, "argv": list(j.argv), "nodes": j.nodes, "nproc_per_node": j.nproc_per_node,
                      "world_size": j.world_size, "run_dir": j.run_dir, "after": list(j.after)} for j in spec.jobs],
            "target_config": spec.target_cfg}
