"""The ccp-eval job: one metric (FID, text or spatial alignment) of one trained model at one
guidance setting, from a config (``conf/eval.yaml``).

Every file input is checked before any model is loaded, with errors naming the key to set.
Writes ``result.json`` (the metric value, the weights, the method's default weights, the full
metric output and the resolved config) atomically into the output folder; a multirun writes one
folder per point, and `ccp.evaluation.sweeps` tabulates them and picks the reported point. A value
measured with stand-in weight files (`ccp.evaluation.stand_in`) has ``"stand_in_weights": true`` in
its ``details``: it means nothing.
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ccp.config import ConfigError, with_output_dir
from ccp.distributed import local_rank, rank_world
from ccp.evaluation.alignment import SamplingConfig, SpatialAlignmentConfig, TextAlignmentConfig
from ccp.evaluation.attributes import QUESTIONS, TABLE3_PROMPTS
from ccp.evaluation.fid import FIDConfig, FIDConfigError, RandomConvFeatures, resolve_inception_weights
from ccp.evaluation.metrics import METRICS, fid_metric, spatial_metric, text_metric
from ccp.evaluation.stand_in import STAND_IN_LABEL, stand_in_marker
from ccp.hardware import machine
from ccp.io import list_image_files, write_json_atomic
from ccp.methods import METHODS, method_class
from ccp.methods.base import PromptTemplate
from ccp.methods.export import (
    EXPORT_INFO,
    ExportNotFoundError,
    TrainedModel,
    UntrainedPrior,
    load_trained,
    prior_reference,
    read_export_info,
)
from ccp.pipelines.run import SampleConfigError, check_sampling, resolve_device, sampling_precision
from ccp.priors.loading import check_prior_folder, load_prior, looks_like_path, resolve_dtype
from ccp.tracking import log_eval_result, wandb_config

log = logging.getLogger(__name__)
FEATURE_EXTRACTORS = ("inception", "random_conv")
RESULT_FORMAT = 1


class EvalConfigError(ConfigError, ValueError):
    """An evaluation config that cannot run; the message says how to fix it."""


@dataclass
class EvalPlan:
    """What the checks found: everything the run needs, resolved, before any model is loaded."""

    metric: str
    method: str
    run: str
    prior_path: str
    export_path: Path | None
    template: PromptTemplate
    default_weights: dict[str, float]
    inception_weights: Path | None = None
    concept_model_used: bool = True  # False: the concept weight is 0, the export is not loaded


def weighs_concept(method_cls, template: PromptTemplate) -> bool:
    """Whether ``guidance.concept_weight`` enters the method's guidance (ours; the baselines ignore it)."""
    def weights(concept_weight: float) -> list[float]:
        return method_cls.default_guidance("model", template, "control", concept_weight, 5.0).weights

    return weights(0.5) != weights(0.25)


# --- checks that need no weights -----------------------------------------------------------------
def _fix(key: str, value: Any, problem: str, example: str) -> EvalConfigError:
    return EvalConfigError(f"{key}={value}: {problem}; set {key}={example}")


def _read_export(path: Any) -> tuple[Path, dict]:
    if not path:
        raise EvalConfigError("export.path is not set; set export.path=outputs/train/<run>/export "
                              "(written by ccp-train), or model=prior prior.path=... for the untrained prior")
    try:
        return Path(str(path)).expanduser(), read_export_info(path, key="export.path")
    except ExportNotFoundError as err:
        raise EvalConfigError(str(err)) from None


def _default_weights(method_cls) -> dict[str, float]:
    params = inspect.signature(method_cls.default_guidance).parameters
    return {key: float(params[key].default) for key in ("concept_weight", "control_weight")}


def _check_file(key: str, value: Any, what: str, example: str) -> Path:
    if not value or not Path(str(value)).expanduser().is_file():
        raise _fix(key, value, f"{what} not found (nothing is downloaded)", example)
    return Path(str(value)).expanduser()


def _check_folder(key: str, value: Any, example: str) -> Path:
    if not value or not Path(str(value)).expanduser().is_dir():
        raise _fix(key, value, "not a folder", example)
    return Path(str(value)).expanduser()


def check_eval_config(cfg: DictConfig) -> EvalPlan:
    """Every check that needs no model; raises `EvalConfigError` (or `PriorNotFoundError`,
    `InceptionWeightsError`) naming the key and the fix."""
    metric = str(cfg.metric)
    if metric not in METRICS:
        raise EvalConfigError(f"metric={metric!r} is unknown; choose one of {', '.join(METRICS)}")
    for key in ("concept_weight", "control_weight"):
        value = cfg.guidance[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EvalConfigError(f"guidance.{key} must be a number, got {value!r}")
    try:
        check_sampling(OmegaConf.create({"sampling": {**OmegaConf.to_container(cfg.sampling), "num_images": 1}}))
        resolve_dtype(cfg.prior.dtype)
    except (SampleConfigError, ValueError) as err:
        raise EvalConfigError(str(err)) from None

    # the model
    info: dict = {}
    if cfg.model == "prior":
        method_cls, export_path = UntrainedPrior, None
        if not cfg.prior.path:
            raise EvalConfigError("model=prior needs prior.path; set prior.path=/path/to/sd-v1-5")
    elif cfg.model == "export":
        export_path, info = _read_export(cfg.export.path)
        if info.get("method") not in METHODS:
            raise _fix("export.path", cfg.export.path, f"its {EXPORT_INFO} names method {info.get('method')!r}",
                       "an export of one of " + ", ".join(sorted(METHODS)))
        method_cls = method_class(info["method"])
    else:
        raise EvalConfigError(f"model={cfg.model!r} is unknown; use export (export.path) or prior (prior.path)")
    prior_path = str(cfg.prior.path or info.get("prior") or "")
    if not prior_path:
        raise EvalConfigError("prior.path is not set and the export does not name its prior; set prior.path=...")
    if looks_like_path(prior_path):
        check_prior_folder(prior_path)
    try:
        template = PromptTemplate(**(OmegaConf.to_container(cfg.template) if cfg.template is not None
                                     else info.get("template") or {}))
    except TypeError as err:
        raise EvalConfigError(f"template: {err}; use keys template, placeholder, initializer (or null: the export's)") from None
    run = cfg.run or (export_path.resolve().parent.name if export_path is not None else "prior")
    plan = EvalPlan(metric, method_cls.name, str(run), prior_path, export_path, template, _default_weights(method_cls))
    if weighs_concept(method_cls, template):
        concept_weight = float(cfg.guidance.concept_weight)
        if concept_weight < 0:
            raise EvalConfigError(
                f"guidance.concept_weight={cfg.guidance.concept_weight}: a negative weight guides away from the concept, "
                f"which is not a measurement of {method_cls.name}; use a weight >= 0")
        if concept_weight == 0 and export_path is not None:
            plan.concept_model_used = False
            log.warning("guidance.concept_weight=0: the concept model of %s is left out (not loaded); the result "
                        "measures the prior's guidance alone and says so (concept_model_used: false)", export_path)

    # the metric's own inputs
    if metric == "fid":
        extractor = cfg.fid.feature_extractor
        if extractor not in FEATURE_EXTRACTORS:
            raise EvalConfigError(f"fid.feature_extractor={extractor!r}; use inception (random_conv is for tests only)")
        try:
            fid_config(cfg, out_dir=Path(".")).check(need_weights=False)
        except FIDConfigError as err:
            raise EvalConfigError(str(err)) from None
        if extractor == "inception":
            plan.inception_weights = resolve_inception_weights(cfg.fid.inception_weights)
    elif metric == "text":
        _check_file("text.clip_weights", cfg.text.clip_weights, "CLIP ViT-L/14 weights file",
                    "/path/to/ViT-L-14.pt (OpenAI's file, see docs/alignment.md)")
        unknown = [p for p in text_prompts(cfg) if p not in QUESTIONS]
        if unknown:
            raise EvalConfigError(f"text.prompts: no attribute question for {unknown}; known: {sorted(QUESTIONS)}")
        if int(cfg.text.images_per_prompt) < 1:
            raise EvalConfigError("text.images_per_prompt must be >= 1")
    else:
        folder = _check_folder("spatial.condition_path", cfg.spatial.condition_path, "/path/to/celeba_hq")
        count = len(list_image_files(folder))
        if count < int(cfg.spatial.num_conditions):
            raise EvalConfigError(f"spatial.condition_path={cfg.spatial.condition_path} holds {count} images, fewer "
                                  f"than spatial.num_conditions={cfg.spatial.num_conditions}; lower it or add images")
        controlnet = cfg.spatial.controlnet_path
        if not controlnet:
            raise EvalConfigError("spatial.controlnet_path is not set; set spatial.controlnet_path=/path/to/sd-controlnet-canny")
        if looks_like_path(str(controlnet)) and not (Path(str(controlnet)).expanduser() / "config.json").is_file():
            raise _fix("spatial.controlnet_path", controlnet, "not a diffusers ControlNet folder (no config.json)",
                       "/path/to/sd-controlnet-canny")
    return plan


def text_prompts(cfg: DictConfig) -> tuple[str, ...]:
    prompts = cfg.text.prompts
    if not prompts:
        return TABLE3_PROMPTS
    return (str(prompts),) if isinstance(prompts, str) else tuple(str(p) for p in prompts)


def fid_config(cfg: DictConfig, out_dir: Path) -> FIDConfig:
    """`FIDConfig` from the ``fid:`` group; seed and batch size come from ``sampling:``."""
    values = {k: v for k, v in OmegaConf.to_container(cfg.fid, resolve=True).items() if k != "feature_extractor"}
    values["shard_dir"] = values["shard_dir"] or str(out_dir / "fid_shards")
    values.update(seed=int(cfg.sampling.seed), batch_size=int(cfg.sampling.batch_size))
    try:
        return FIDConfig.from_mapping(values)
    except FIDConfigError as err:
        raise EvalConfigError(str(err)) from None


# --- the run ---------------------------------------------------------------------------------------
def load_model(plan: EvalPlan, cfg: DictConfig, device: torch.device) -> TrainedModel:
    """The export (or the untrained prior) on `device`."""
    prior = load_prior(plan.prior_path, dtype=sampling_precision(str(cfg.prior.dtype), device), device=device,
                       allow_download=bool(cfg.prior.allow_download))
    if plan.export_path is None:
        return prior_reference(prior, plan.template)
    if not plan.concept_model_used:  # its term has weight 0: the pipeline never runs it
        from ccp.pipelines.gcfg import GCFGPipeline

        return TrainedModel(GCFGPipeline.from_prior(prior), "concept (not loaded)", method_class(plan.method),
                            plan.template, plan.export_path)
    return load_trained(plan.export_path, prior, plan.template)


def sampling_config(cfg: DictConfig) -> SamplingConfig:
    s = cfg.sampling
    return SamplingConfig(steps=int(s.steps), height=int(s.height), width=int(s.width), batch_size=int(s.batch_size),
                          seed=int(s.seed), concept_weight=float(cfg.guidance.concept_weight),
                          control_weight=float(cfg.guidance.control_weight))


def stand_in_files(plan: EvalPlan, cfg: DictConfig) -> list[str]:
    """The weight files of this evaluation that are stand-ins (`ccp.evaluation.stand_in`): the
    numbers measured with them mean nothing, and the result says so."""
    files = [plan.inception_weights] if plan.metric == "fid" else [cfg.text.clip_weights] if plan.metric == "text" else []
    return [str(f) for f in files if f and stand_in_marker(str(f)) is not None]


def evaluate(cfg: DictConfig, plan: EvalPlan, model: TrainedModel, out_dir: Path, device) -> tuple[float, dict]:
    sampling = sampling_config(cfg)
    images = out_dir / "images" if cfg.output.save_images else None
    if plan.metric == "fid":
        extractor = RandomConvFeatures().to(device) if cfg.fid.feature_extractor == "random_conv" else None
        if extractor is not None:
            log.warning("fid.feature_extractor=random_conv: a random 8-d test extractor, NOT FID")
        value, details = fid_metric(model, sampling, fid_config(cfg, out_dir), feature_extractor=extractor, device=device)
        return value, {**details, "feature_extractor": cfg.fid.feature_extractor}
    if plan.metric == "text":
        from ccp.evaluation.attributes import CLIPAttributePredictor

        config = TextAlignmentConfig(**sampling.__dict__, prompts=text_prompts(cfg),
                                     images_per_prompt=int(cfg.text.images_per_prompt),
                                     clip_weights=str(cfg.text.clip_weights))
        return text_metric(model, config, CLIPAttributePredictor(config.clip_weights, device=device), image_dir=images)
    from ccp.priors.loading import load_controlnet

    sp = cfg.spatial
    config = SpatialAlignmentConfig(
        **sampling.__dict__, num_conditions=int(sp.num_conditions), samples_per_condition=int(sp.samples_per_condition),
        selection_seed=int(sp.selection_seed), canny_low=int(sp.canny_low), canny_high=int(sp.canny_high),
        tolerance=int(sp.tolerance), control_scale=float(sp.control_scale), control_prompt=str(sp.control_prompt),
    )
    controlnet = load_controlnet(str(sp.controlnet_path), dtype=sampling_precision(str(cfg.prior.dtype), device),
                                 allow_download=bool(cfg.prior.allow_download))
    return spatial_metric(model, config, str(sp.condition_path), controlnet, image_dir=images)


# a rank waits this long at the FID barriers for the slowest rank (its last shard, or rank 0's real
# statistics of the whole real folder) before it fails
EVAL_COLLECTIVE_TIMEOUT = timedelta(hours=2)


def join_launcher_group(device: torch.device) -> tuple[torch.device, int]:
    """Under torchrun/SLURM-style launchers (``WORLD_SIZE`` > 1 in the environment): start the
    process group once per process (gloo on the CPU, nccl on CUDA), so that FID shards are split
    over all ranks of all nodes and every rank waits at the barrier for the others' shards (without
    it, the first rank done found the other ranks' shards missing and failed). A CUDA device
    without an index becomes this rank's ``cuda:LOCAL_RANK``. Returns (device, rank)."""
    import torch.distributed as dist

    if rank_world()[1] <= 1 or not dist.is_available():
        return device, 0
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=EVAL_COLLECTIVE_TIMEOUT)
        log.info("rank %d of %d (%s)", *rank_world(), dist.get_backend())
    return device, rank_world()[0]


def run_eval(cfg: DictConfig, out_dir: str | Path, override_dirname: str | None = None) -> dict:
    """Check `cfg`, load the model, evaluate, and write ``result.json`` into `out_dir`; returns the
    result. `override_dirname`: the sweep point's name (Hydra's), kept in the result."""
    cfg = with_output_dir(cfg, out_dir)
    plan = check_eval_config(cfg)
    wandb_config(cfg)  # a bad logger.wandb setting fails now, not after the evaluation
    device, rank = join_launcher_group(resolve_device(str(cfg.device)))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    done = out_dir / "result.json"
    if cfg.output.skip_done and done.is_file():
        previous = json.loads(done.read_text())
        if previous.get("config") == json.loads(json.dumps(resolved)):
            log.info("%s already holds this evaluation (output.skip_done=true); not recomputed", done)
            if rank == 0:  # the same wandb run id: updated, not duplicated
                log_eval_result(cfg, previous, out_dir)
            return previous

    log.info("loading %s (%s) on %s", plan.export_path or plan.prior_path, plan.method, device)
    model = load_model(plan, cfg, device)
    value, details = evaluate(cfg, plan, model, out_dir, device)
    if stand_in_files(plan, cfg):  # the loader warned already; the result says it too
        details = {**details, "stand_in_weights": True}
    if not plan.concept_model_used:
        details = {**details, "concept_model_used": False}
    metric = METRICS[plan.metric]
    result = {
        "format": RESULT_FORMAT,
        "metric": plan.metric,
        "condition": metric.condition,
        "value": value,
        "better": metric.better,
        "run": plan.run,
        "method": plan.method,
        "export": str(plan.export_path) if plan.export_path is not None else None,
        "prior": plan.prior_path,
        "concept_weight": float(cfg.guidance.concept_weight),
        "control_weight": float(cfg.guidance.control_weight),
        "default_weights": plan.default_weights,
        "num_images": details.get("num_samples", details.get("num_images", details.get("count"))),
        "override_dirname": override_dirname,
        "machine": machine(device),  # what a speed or a bf16 difference was measured on
        "details": details,
        "config": resolved,
    }
    if rank == 0:  # every rank has the same result; one writes it
        write_json_atomic(done, result)
        log_eval_result(cfg, result, out_dir)
    log.info("%s %s %s = %.6g (concept_weight=%s, control_weight=%s) -> %s%s", plan.run, plan.method, plan.metric, value,
             cfg.guidance.concept_weight, cfg.guidance.control_weight, done,
             f" ({STAND_IN_LABEL})" if details.get("stand_in_weights") else "")
    return result
