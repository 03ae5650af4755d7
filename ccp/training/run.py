"""The ccp-train job: train one method as configured (resuming when possible) and export it.

Checks that need no weights (data folder, method, batch arithmetic, prior folder, every callback's
settings) run before anything is loaded. The method and the callbacks are built from the config
with `hydra.utils.instantiate` (``method.module``, ``callbacks.*``); the run folder holds
``config.yaml``, checkpoints (``checkpoints/last.ckpt``: the same call resumes), logs, validation
grids and, at the end, the (EMA) weights in ``export/`` with `EXPORT_INFO`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from diffusers import DDPMScheduler
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from ccp.config import ConfigError
from ccp.methods import TRAINABLE
from ccp.methods.base import Method, PromptTemplate
from ccp.methods.export import write_export_info
from ccp.priors.loading import check_prior_folder, load_prior, looks_like_path, resolve_dtype
from ccp.training.callbacks import EMACallback
from ccp.training.module import PersonalizationModule, accumulation_steps
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


@dataclass
class TrainingPlan:
    """What the checks found: the accumulation the global batch needs and the built callbacks."""

    accumulate: int
    callbacks: list[L.Callback]


def check_config(cfg: DictConfig, run_dir: str | Path = ".") -> TrainingPlan:
    """Everything that can be checked without weights (each callback checks its own settings)."""
    cfg = run_config(cfg, run_dir)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise TrainConfigError(f"required value(s) not set: {', '.join(missing)} (e.g. data.path=/path/to/images)")
    method_class_of(cfg)
    data_path = Path(str(cfg.data.path)).expanduser()
    if not data_path.is_dir():
        raise TrainConfigError(f"data.path {data_path} is not a folder; point data.path at a folder of images")
    prior = str(cfg.prior.path)
    if looks_like_path(prior):
        check_prior_folder(prior)
    try:
        accumulate = accumulation_steps(int(cfg.trainer.global_batch_size), int(cfg.data.batch_size),
                                        devices_count(cfg.trainer))
    except ValueError as err:
        raise TrainConfigError(str(err)) from None
    return TrainingPlan(accumulate, build_callbacks(cfg))


def template_from(cfg: DictConfig) -> PromptTemplate:
    return PromptTemplate(**OmegaConf.to_container(cfg.template, resolve=True))


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    loggers = []
    if cfg.logger.csv:
        # version_N per launch, so a resume never overwrites earlier logs
        loggers.append(L.pytorch.loggers.CSVLogger(save_dir=str(run_dir), name="csv"))
    if cfg.logger.wandb.enabled:
        loggers.append(
            L.pytorch.loggers.WandbLogger(
                project=cfg.logger.wandb.project, entity=cfg.logger.wandb.entity, name=cfg.run_name,
                save_dir=str(run_dir), offline=cfg.logger.wandb.mode == "offline", id=cfg.run_name.replace("/", "-"),
                resume="allow", config=OmegaConf.to_container(cfg, resolve=True),
            )
        )
    return loggers


def finish_wandb(trainer: L.Trainer) -> None:
    """End this run's wandb run: otherwise the next training in the same process (reproduce, the
    toy prior then the demo's concept model) logs into it."""
    if any(isinstance(lg, L.pytorch.loggers.WandbLogger) for lg in trainer.loggers):
        import wandb

        wandb.finish()


def resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    if cfg.resume == "auto":
        last = run_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    return str(cfg.resume) if cfg.resume else None


def run_training(cfg: DictConfig, run_dir: str | Path) -> Path:
    """Train as configured in `run_dir` (resuming when possible) and export; returns the export folder."""
    run_dir = Path(run_dir)
    cfg = run_config(cfg, run_dir)
    plan = check_config(cfg, run_dir)
    callbacks = plan.callbacks
    L.seed_everything(cfg.seed, workers=True)

    prior = load_prior(cfg.prior.path, dtype=resolve_dtype(cfg.prior.dtype))
    template = template_from(cfg)
    method = instantiate(cfg.method.module, _convert_="all")(prior, template)
    if cfg.speed.compile and getattr(method, "unet", None) is not None:
        method.unet.compile()  # in place: parameter names (and checkpoints) stay the same
    module = PersonalizationModule(
        method, DDPMScheduler.from_config(prior.scheduler.config), vae=prior.vae, lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps,
        warmup_steps=cfg.optim.warmup_steps, seed=cfg.seed, gradient_checkpointing=cfg.speed.gradient_checkpointing,
        channels_last=cfg.speed.channels_last, prior=prior,
    )
    datamodule = instantiate(cfg.data, seed=cfg.seed, _convert_="object").attach_vae(prior.vae)
    t = cfg.trainer
    trainer = L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy, precision=t.precision,
        max_steps=t.max_steps, accumulate_grad_batches=plan.accumulate, gradient_clip_val=t.gradient_clip_val,
        log_every_n_steps=t.log_every_n_steps, use_distributed_sampler=False,  # ResumableSampler shards ranks
        callbacks=callbacks, logger=build_loggers(cfg, run_dir) or False, default_root_dir=str(run_dir),
        enable_model_summary=False,
    )
    ckpt_path = resume_path(cfg, run_dir)
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    if trainer.is_global_zero:
        write_run_stamps(cfg, run_dir)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        finish_wandb(trainer)

    export_dir = run_dir / "export"
    if trainer.is_global_zero:
        ema = next((cb for cb in callbacks if isinstance(cb, EMACallback)), None)
        use_ema = ema is not None and cfg.export.use_ema
        if use_ema:
            with ema.swapped_in(module):
                method.export(export_dir)
        else:
            method.export(export_dir)
        write_export_info(export_dir, cfg.method.name, cfg.prior.path, OmegaConf.to_container(cfg.template),
                          trainer.global_step, use_ema)
        log.info("exported %s (step %d%s) to %s", cfg.method.name, trainer.global_step, ", EMA" if use_ema else "", export_dir)
    return export_dir
