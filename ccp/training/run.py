"""The ccp-train job: train one method as configured (resuming when possible) and export it.

Checks that need no weights (data folder, method, batch arithmetic, prior folder, the module's
options, every callback's settings) run once, before anything is loaded; nothing after repeats
them. The method and the callbacks are built from the config with `hydra.utils.instantiate`
(``method.module``, ``callbacks.*``), the module from its checked `TrainingConfig`; the run folder holds
``config.yaml``, checkpoints (``checkpoints/last.ckpt``: the same call resumes), logs, validation
grids and, at the end, the (EMA) weights in ``export/`` with `EXPORT_INFO`.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from diffusers import DDPMScheduler
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from ccp.config import ConfigError, cuda_device_count
from ccp.distributed import local_rank
from ccp.methods import TRAINABLE
from ccp.methods.base import Method, PromptTemplate
from ccp.io import remove_stale_temporaries
from ccp.methods.export import EXPORT_INFO, export_is_current, write_export_info
from ccp.priors.families import FAMILIES, detect_family
from ccp.priors.loading import check_prior_folder, load_prior, looks_like_path, resolve_dtype
from ccp.training.callbacks import EMACallback, FileCheckpointIO
from ccp.training.module import PersonalizationModule, TrainingConfig, accumulation_steps
from ccp.training.optim import check_optimizer_name
from ccp.training.schedules import check_loss_options, check_lr_schedule
from ccp.training.runs import run_config, write_run_stamps

log = logging.getLogger(__name__)


class TrainConfigError(ConfigError, ValueError):
    """A training config that cannot run; the message says how to fix it."""


def devices_count(trainer_cfg: DictConfig) -> int:
    devices = trainer_cfg.devices
    if devices in (-1, "auto", "-1"):
        devices = torch.cuda.device_count() if trainer_cfg.accelerator in ("gpu", "cuda") else 1
    if isinstance(devices, (list, tuple)):
        devices = len(devices)
    return max(1, int(devices)) * int(trainer_cfg.get("num_nodes", 1))


def method_class_of(cfg: DictConfig) -> type[Method]:
    """The class ``method.module`` builds, checked against ``method.name``."""
    name = cfg.method.name
    if name not in TRAINABLE:
        raise TrainConfigError(f"method={name!r} is unknown; choose one of {sorted(TRAINABLE)}")
    target = OmegaConf.select(cfg, "method.module._target_")
    try:
        cls = get_class(str(target))
    except Exception as err:  # hydra raises ImportError or ValueError, depending on what is wrong
        raise TrainConfigError(f"method.module._target_={target}: cannot be imported ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, Method)) or cls.name != name:
        raise TrainConfigError(f"method.module._target_={target} does not build method {name!r}; "
                               f"use {TRAINABLE[name].__module__}.{TRAINABLE[name].__name__}")
    return cls


def check_method_keys(cls: type[Method], settings: dict) -> None:
    """``method.module``'s keys against what the method's constructor takes (a misspelt key added
    with ``+`` would otherwise fail in the constructor, after the prior has loaded)."""
    import difflib

    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = [name for name in params if name not in ("self", "prior", "template")]
    for key in settings:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean method.module.{close[0]}?" if close else f"it takes: {', '.join(known) or 'nothing'}"
            raise TrainConfigError(f"method.module.{key}: {cls.__name__} ({cls.name}) takes no setting {key!r}; {hint}")


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """``callbacks.*`` (null entries dropped; the EMA only when ``ema.enabled``)."""
    callbacks = []
    for key, node in (cfg.get("callbacks") or {}).items():
        if node is None or (key == "ema" and not cfg.ema.enabled):
            continue
        try:
            callbacks.append(instantiate(node, _convert_="all"))
        except InstantiationException as err:
            cause = err.__cause__
            if isinstance(cause, ConfigError):
                raise cause from None
            raise TrainConfigError(f"callbacks.{key}: {cause or err}") from None
    return callbacks


HALF = {"bfloat16", "bf16", "float16", "fp16", "half"}
MIXED = {"bf16-mixed", "16-mixed"}


def check_precision(cfg: DictConfig) -> None:
    """Trainable weights are fp32 master weights: refuse settings that would make them half, or
    that would run a half-precision prior without the autocast that mixes the two."""
    precision = str(cfg.trainer.precision)
    if precision in {"bf16-true", "16-true", "bf16", "16", "half", "64-true", "64", "transformer-engine"}:
        raise TrainConfigError(
            f"trainer.precision={precision} would train {precision.split('-')[0]} master weights (AdamW updates "
            "at lr 1e-5 round away in half precision); use trainer.precision=bf16-mixed (or 16-mixed), and "
            "prior.dtype=bfloat16 to keep the frozen parts in half precision")
    dtype = str(cfg.prior.dtype).replace("torch.", "")
    if dtype in HALF and precision not in MIXED:
        raise TrainConfigError(
            f"prior.dtype={dtype} with trainer.precision={precision}: the frozen parts would run in {dtype} "
            "and the fp32 trainable weights beside them without autocast; set trainer.precision=bf16-mixed "
            "(or 16-mixed), or prior.dtype=float32")
    if precision == "16-mixed" and dtype == "bfloat16":
        raise TrainConfigError("trainer.precision=16-mixed with prior.dtype=bfloat16 mixes two half formats; "
                               "use bf16-mixed, or prior.dtype=float16")


def prior_prediction_type(cfg: DictConfig) -> str | None:
    """The prior's ``prediction_type``, read from its scheduler config alone (None when that cannot be
    read here: `load_prior` then says why the prior cannot load)."""
    try:
        scheduler = DDPMScheduler.load_config(str(cfg.prior.path), subfolder="scheduler",
                                              local_files_only=not bool(cfg.prior.get("allow_download", False)))
    except (OSError, ValueError):
        return None
    return scheduler.get("prediction_type", DDPMScheduler().config.prediction_type)


def check_training_options(cfg: DictConfig, training: TrainingConfig, method_cls: type[Method]) -> None:
    """The module's options against ``trainer.max_steps``, the prior's prediction type and the method
    (docs/training.md); the one check of them, before any weights load."""
    optim, loss = training.optim, training.loss
    try:
        check_optimizer_name(str(optim.name))
        check_lr_schedule(str(optim.lr_scheduler), optim.lr, optim.warmup_steps, cfg.trainer.get("max_steps", -1),
                          optim.num_cycles, optim.power)
        prediction_type = prior_prediction_type(cfg) if loss.snr_gamma is not None else None
        check_loss_options(loss.snr_gamma, loss.noise_offset, prediction_type)
    except ConfigError as err:
        raise TrainConfigError(str(err)) from None
    tf32 = training.allow_tf32
    if tf32 is not None and not isinstance(tf32, bool):
        raise TrainConfigError(f"trainer.allow_tf32={tf32!r} must be true, false or null (null: leave torch's setting)")
    if training.prior_preservation.enabled and not hasattr(method_cls, "use_class_prompt"):
        supported = sorted(name for name, c in TRAINABLE.items() if hasattr(c, "use_class_prompt"))
        raise TrainConfigError(f"prior_preservation.enabled=true: method {cfg.method.name!r} does not support prior "
                               f"preservation (supported: {', '.join(supported)}); set prior_preservation.enabled=false")


def precision_plugins(trainer_cfg: DictConfig) -> tuple[str | None, list]:
    """(precision, plugins) for the Trainer. fp16 autocast on the CPU gets its own GradScaler
    (Lightning would silently switch ``16-mixed`` to bf16 there)."""
    precision = str(trainer_cfg.precision)
    if precision == "16-mixed" and trainer_cfg.accelerator == "cpu":
        from lightning.pytorch.plugins import MixedPrecision

        return None, [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]
    return precision, []


def rank_device(trainer_cfg: DictConfig) -> torch.device:
    """This process's training device before `fit` (torchrun and Lightning's launcher set
    LOCAL_RANK, SLURM sets SLURM_LOCALID): the null-text calibration runs there, not on the CPU."""
    if trainer_cfg.accelerator not in ("gpu", "cuda", "auto") or not torch.cuda.is_available():
        return torch.device("cpu")
    local = local_rank()
    devices = trainer_cfg.devices
    index = devices[local] if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices) else local
    return torch.device("cuda", int(index))


DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0  # torch's and Lightning's own default (30 minutes)


def collective_timeout(trainer_cfg: DictConfig) -> timedelta:
    """``trainer.collective_timeout_s``: how long a rank waits in one collective (all-reduce,
    barrier) for the others before it fails; it bounds the hang when a node is lost."""
    value = trainer_cfg.get("collective_timeout_s", DEFAULT_COLLECTIVE_TIMEOUT_S)
    if value is None:
        value = DEFAULT_COLLECTIVE_TIMEOUT_S
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise TrainConfigError(f"trainer.collective_timeout_s={value!r} must be a positive number of seconds "
                               "(longer than any step, checkpoint save or rank-0-only phase, e.g. 1800)")
    return timedelta(seconds=float(value))


def build_strategy(trainer_cfg: DictConfig):
    """``trainer.strategy``: a registered strategy that takes a process-group timeout (ddp and its
    variants, fsdp, deepspeed) is built with ``trainer.collective_timeout_s``; any other value
    (auto, single_device, ...) goes to the Trainer as it is."""
    from lightning.pytorch.strategies import StrategyRegistry

    name = trainer_cfg.strategy
    timeout = collective_timeout(trainer_cfg)
    if not isinstance(name, str) or name not in StrategyRegistry:
        return name
    entry = StrategyRegistry[name]
    if "timeout" not in inspect.signature(entry["strategy"].__init__).parameters:
        return name
    return entry["strategy"](**{**entry["init_params"], "timeout": timeout})


@dataclass
class TrainingPlan:
    """What the checks found: the accumulation the global batch needs, the built callbacks, the
    data module with its folder already scanned, and the checked options of the module."""

    accumulate: int
    callbacks: list[L.Callback]
    datamodule: L.LightningDataModule | None = None
    training: TrainingConfig = TrainingConfig()


class SmallDatasetWarning(UserWarning):
    """A batch larger than the dataset: every item repeats within one optimizer step."""


GPU_ACCELERATORS = ("gpu", "cuda")


def check_hardware(trainer_cfg: DictConfig) -> None:
    """The trainer against this machine's devices, before the prior loads (Lightning would refuse
    only after the method is built: tens of minutes at SD v1.5 size on a CPU)."""
    accelerator = str(trainer_cfg.accelerator)
    if accelerator not in GPU_ACCELERATORS:
        return
    count = cuda_device_count()
    if count == 0:
        raise TrainConfigError(
            f"trainer.accelerator={accelerator} (trainer=gpu or ddp, or an experiment that sets it) but torch finds no "
            f"CUDA device here; add trainer=cpu to train on this CPU (slow at SD size), or trainer=auto to let the "
            "hardware choose, or run on a GPU node")
    devices = trainer_cfg.devices
    wanted = len(devices) if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices) else devices
    if isinstance(wanted, int) and not isinstance(wanted, bool) and wanted > count:
        raise TrainConfigError(f"trainer.devices={devices} but {count} CUDA device(s) found; set trainer.devices={count} "
                               "(or -1: every GPU of the node)")


def _positive_int(value, key: str, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TrainConfigError(f"{key}={value!r} must be a positive integer; set e.g. {key}={example}")
    return value


def check_data(cfg: DictConfig, global_batch: int) -> L.LightningDataModule:
    """The data module with its folder scanned (missing, empty or unreadable folders refused with
    the files and reasons), and a warning when one optimizer step would repeat the same items."""
    from ccp.distributed import rank_world

    try:
        datamodule = instantiate(cfg.data, seed=cfg.seed, _convert_="object")
    except InstantiationException as err:  # a refused data setting: its own message, which names the key
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise
    rank, world = rank_world()
    scan = datamodule.scan(rank, world)
    flips = 2 if cfg.data.get("random_flip", True) else 1
    items = len(scan.images) * flips
    if global_batch > items and rank == 0:
        import warnings

        what = f"{len(scan.images)} image(s) x 2 flips" if flips == 2 else f"{len(scan.images)} image(s)"
        message = (f"the global batch of {global_batch} (data.batch_size={cfg.data.batch_size} x devices x accumulation) is "
                   f"larger than the {items} training items ({what} in {cfg.data.path}): each item appears about "
                   f"{global_batch / items:.3g} times in every optimizer step; set trainer.global_batch_size (and "
                   f"data.batch_size) to at most {items}, or add images")
        log.warning(message)
        warnings.warn(message, SmallDatasetWarning, stacklevel=2)
    return datamodule


def check_config(cfg: DictConfig, run_dir: str | Path = ".") -> TrainingPlan:
    """Everything that can be checked without weights (each callback checks its own settings)."""
    cfg = run_config(cfg, run_dir)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise TrainConfigError(f"required value(s) not set: {', '.join(missing)} (e.g. data.path=/path/to/images)")
    check_hardware(cfg.trainer)
    method_cls = method_class_of(cfg)
    settings = {k: v for k, v in OmegaConf.to_container(cfg.method.module, resolve=True).items() if not k.startswith("_")}
    check_method_keys(method_cls, settings)
    method_cls.check_settings(**settings)
    unset = [f"data.{key}={example}" for key, example in method_cls.needs_data.items() if cfg.data.get(key) is None]
    if unset:
        raise TrainConfigError(f"method={cfg.method.name} trains on what its items carry; set {' '.join(unset)}")
    check_precision(cfg)
    from ccp.tracking import wandb_config

    wandb_config(cfg)  # bad logger.wandb settings fail here, not after the prior has loaded
    try:
        training = TrainingConfig.from_cfg(cfg)
    except ConfigError as err:
        raise TrainConfigError(str(err)) from None
    check_training_options(cfg, training, method_cls)
    collective_timeout(cfg.trainer)
    data_path = Path(str(cfg.data.path)).expanduser()
    if not data_path.is_dir():
        raise TrainConfigError(f"data.path {data_path} is not a folder; point data.path at a folder of images")
    batch_size = _positive_int(cfg.data.batch_size, "data.batch_size", "4")
    global_batch = _positive_int(cfg.trainer.global_batch_size, "trainer.global_batch_size", "32")
    prior = str(cfg.prior.path)
    family = prior_family(cfg)
    if looks_like_path(prior):
        check_prior_folder(prior, family)
        family = detect_family(prior)
    elif family is None and "xl" in prior.lower():  # a hub id: load_prior's own guess
        family = "sdxl"
    if family in FAMILIES:  # e.g. a method (setting) that does not train on SDXL, before any weights load
        method_cls.check_prior(family, **settings)
    try:
        accumulate = accumulation_steps(global_batch, batch_size, devices_count(cfg.trainer))
    except ValueError as err:
        raise TrainConfigError(str(err)) from None
    callbacks = build_callbacks(cfg)
    return TrainingPlan(accumulate, callbacks, check_data(cfg, global_batch), training)


def prior_family(cfg: DictConfig) -> str | None:
    """``prior.family`` (sd1, sd2, sdxl; auto or absent: None, found from the folder)."""
    family = OmegaConf.select(cfg, "prior.family", default=None)
    return None if family in (None, "", "auto") else str(family)


def template_from(cfg: DictConfig) -> PromptTemplate:
    return PromptTemplate(**OmegaConf.to_container(cfg.template, resolve=True))


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    from ccp.tracking import group_for, run_id, wandb_config

    loggers = []
    if cfg.logger.csv:
        from ccp.training.logs import csv_logger

        # one version per run: a resume appends to the newest one, a fresh run starts the next
        loggers.append(csv_logger(run_dir, resuming=resume_path(cfg, run_dir) is not None))
    wandb_cfg = wandb_config(cfg)
    if wandb_cfg is not None:
        # the id follows the run folder: a resume continues the same wandb run, another folder never does;
        # create_new: never reuse (or finish) a run another job of this process has open
        loggers.append(
            L.pytorch.loggers.WandbLogger(
                project=wandb_cfg.project, entity=wandb_cfg.entity, name=cfg.run_name,
                save_dir=str(run_dir), offline=wandb_cfg.mode == "offline", id=run_id("train", cfg.run_name, run_dir),
                resume="allow", config=OmegaConf.to_container(cfg, resolve=True),
                group=group_for(cfg, cfg.run_name), job_type="train", reinit="create_new",
                # the mode as an init argument: `offline` alone only sets WANDB_MODE, which wandb ignores once
                # an earlier run in this process (an eval or reproduce log) has set it up
                mode=str(wandb_cfg.mode),
            )
        )
    return loggers


def finish_wandb(trainer: L.Trainer) -> None:
    """End this run's wandb run: otherwise the next training in the same process (reproduce, the
    toy prior then the demo's concept model) logs into it."""
    for lg in trainer.loggers:
        run = getattr(lg, "_experiment", None) if isinstance(lg, L.pytorch.loggers.WandbLogger) else None
        if run is not None:  # None: never started (no step logged, or not rank 0)
            run.finish()


def resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    if cfg.resume == "auto":
        last = run_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    return str(cfg.resume) if cfg.resume else None


def build_method_on(device: torch.device, cfg: DictConfig, prior, template: PromptTemplate) -> Method:
    """Build the method with the prior's UNet and text encoder on `device` (the rank's own GPU:
    conversions and the null-text calibration run there), then put the prior's parts back on the
    CPU; the method's frozen copies keep sharing the device weights. Under DDP, rank 0's
    calibrated features reach every rank when DDP broadcasts the module state at wrap time."""
    if device.type == "cpu":
        return instantiate(cfg.method.module, _convert_="all")(prior, template)
    parts = [m for m in (prior.unet, prior.text_encoder, getattr(prior, "text_encoder_2", None)) if m is not None]
    for part in parts:
        part.to(device)
    try:
        return instantiate(cfg.method.module, _convert_="all")(prior, template)
    finally:
        for part in parts:
            part.to("cpu")


class StepAtStart(L.Callback):
    """The step training starts from in this process (None: nothing left to train, it never started)."""

    step: int | None = None

    def on_train_start(self, trainer, pl_module):
        self.step = trainer.global_step


def log_trainer_choice(trainer_cfg: DictConfig) -> str:
    """Say which hardware the run uses (and, under trainer=auto, why); returns the line."""
    t = trainer_cfg
    line = (f"trainer: accelerator={t.accelerator} devices={t.devices} num_nodes={t.num_nodes} strategy={t.strategy} "
            f"precision={t.precision}")
    if t.get("auto", False):
        count = cuda_device_count()
        line += (f" (trainer=auto: {count} CUDA device(s) found" if count else " (trainer=auto: no CUDA device found") \
            + "; name trainer=cpu|gpu|ddp to choose)"
    log.info(line)
    return line


def run_training(cfg: DictConfig, run_dir: str | Path) -> Path:
    """Train as configured in `run_dir` (resuming when possible) and export; returns the export folder."""
    run_dir = Path(run_dir)
    cfg = run_config(cfg, run_dir)
    plan = check_config(cfg, run_dir)
    callbacks = plan.callbacks
    L.seed_everything(cfg.seed, workers=True)

    prior = load_prior(cfg.prior.path, dtype=resolve_dtype(cfg.prior.dtype), family=prior_family(cfg),
                       allow_download=bool(cfg.prior.get("allow_download", False)))
    template = template_from(cfg)
    method = build_method_on(rank_device(cfg.trainer), cfg, prior, template)
    module = PersonalizationModule(method, DDPMScheduler.from_config(prior.scheduler.config), vae=prior.vae,
                                   prior=prior, config=plan.training)
    from ccp.training.callbacks import check_checkpoint_space

    check_checkpoint_space(module, run_dir / "checkpoints", callbacks)  # before any step: no room, no training
    datamodule = plan.datamodule.attach_vae(prior.vae, upcast=module.upcast_vae)
    if plan.training.prior_preservation.enabled:
        datamodule.attach_prior(prior, plan.training.prior_preservation)
    t = cfg.trainer
    log_trainer_choice(t)
    precision, plugins = precision_plugins(t)
    step_at_start = StepAtStart()
    trainer = L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=build_strategy(t), precision=precision,
        plugins=[*plugins, FileCheckpointIO()],
        max_steps=t.max_steps, accumulate_grad_batches=plan.accumulate, gradient_clip_val=t.gradient_clip_val,
        log_every_n_steps=t.log_every_n_steps, use_distributed_sampler=False,  # ResumableSampler shards ranks
        callbacks=[*callbacks, step_at_start], logger=build_loggers(cfg, run_dir) or False, default_root_dir=str(run_dir),
        enable_model_summary=False,
    )
    ckpt_path = resume_path(cfg, run_dir)
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    if trainer.is_global_zero:
        write_run_stamps(cfg, run_dir)
        remove_stale_temporaries(run_dir / "checkpoints")
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        finish_wandb(trainer)

    export_dir = run_dir / "export"
    ema = next((cb for cb in callbacks if isinstance(cb, EMACallback)), None)
    use_ema = ema is not None and cfg.export.use_ema
    template_node = OmegaConf.to_container(cfg.template)
    finished_before = ckpt_path is not None and step_at_start.step in (None, trainer.global_step)  # no step taken now
    if trainer.is_global_zero and finished_before and export_is_current(
            export_dir, cfg.method.name, cfg.prior.path, template_node, trainer.global_step, use_ema):
        log.info("%s already holds the export of step %d; kept as it is (what was measured on it stays valid)",
                 export_dir, trainer.global_step)
    elif trainer.is_global_zero:
        # the info file marks a finished export: gone while the folder is rewritten
        (export_dir / EXPORT_INFO).unlink(missing_ok=True)
        if use_ema:
            with ema.swapped_in(module):
                method.export(export_dir)
        else:
            method.export(export_dir)
        write_export_info(export_dir, cfg.method.name, cfg.prior.path, template_node, trainer.global_step, use_ema)
        log.info("exported %s (step %d%s) to %s", cfg.method.name, trainer.global_step, ", EMA" if use_ema else "", export_dir)
    return export_dir
