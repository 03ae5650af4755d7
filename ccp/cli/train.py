"""`ccp-train`: train ours or a baseline with the one loop, from a Hydra config.

    ccp-train experiment=table1/face_ours
    ccp-train prior=tiny prior.path=outputs/tiny-prior data=tiny data.path=imgs method=dreambooth

Checks that need no weights (data folder, method, batch arithmetic, prior folder) run before
anything is loaded. The run folder is outputs/train/<run_name>; the same command resumes it.
At the end the (EMA) weights are exported to <run dir>/export and can be sampled with GCFG.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import hydra
import lightning as L
import torch
from diffusers import DDPMScheduler
from diffusers.utils import make_image_grid
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from ccp.guidance import GuidanceSpec
from ccp.methods import TRAINABLE, method_class
from ccp.methods.base import Method, PromptTemplate
from ccp.evaluation.fid import InceptionWeightsError, resolve_inception_weights
from ccp.priors.loading import PriorNotFoundError, looks_like_path, check_prior_folder, load_prior, resolve_dtype
from ccp.training.latent_cache import folder_stamp
from ccp.training.callbacks import EMACallback, SaveLastOnSigterm, ValidationGrid
from ccp.training.module import PersonalizationModule, accumulation_steps
from ccp.training.progress import StepProgressBar

log = logging.getLogger(__name__)
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
EXPORT_INFO = "ccp_export.json"
PRIOR_STAMP = "prior_stamp.txt"  # beside config.yaml: which prior files the run started from


class TrainConfigError(ValueError):
    """A training config that cannot run; the message says how to fix it."""


def devices_count(trainer_cfg: DictConfig) -> int:
    devices = trainer_cfg.devices
    if devices in (-1, "auto", "-1"):
        devices = torch.cuda.device_count() if trainer_cfg.accelerator in ("gpu", "cuda") else 1
    if isinstance(devices, (list, tuple)):
        devices = len(devices)
    return max(1, int(devices)) * int(trainer_cfg.get("num_nodes", 1))


def check_config(cfg: DictConfig) -> int:
    """Everything that can be checked without weights; returns gradient-accumulation steps."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise TrainConfigError(f"required value(s) not set: {', '.join(missing)} (e.g. data.path=/path/to/images)")
    if cfg.method.name not in TRAINABLE:
        raise TrainConfigError(f"method={cfg.method.name!r} is unknown; choose one of {sorted(TRAINABLE)}")
    data_path = Path(str(cfg.data.path)).expanduser()
    if not data_path.is_dir():
        raise TrainConfigError(f"data.path {data_path} is not a folder; point data.path at a folder of images")
    prior = str(cfg.prior.path)
    if looks_like_path(prior):
        check_prior_folder(prior)
    if cfg.eval.every_n_steps:
        if cfg.eval.feature_extractor not in ("inception", "random_conv"):
            raise TrainConfigError(f"eval.feature_extractor={cfg.eval.feature_extractor!r}; use inception")
        if cfg.eval.feature_extractor == "inception":
            resolve_inception_weights(cfg.eval.inception_weights)  # names the file and where to put it
        if not Path(str(cfg.eval.real_path)).expanduser().is_dir():
            raise TrainConfigError(f"eval.real_path {cfg.eval.real_path} is not a folder of real images")
    try:
        return accumulation_steps(int(cfg.trainer.global_batch_size), int(cfg.data.batch_size), devices_count(cfg.trainer))
    except ValueError as err:
        raise TrainConfigError(str(err)) from None


def template_from(cfg: DictConfig) -> PromptTemplate:
    return PromptTemplate(**OmegaConf.to_container(cfg.template, resolve=True))


def validation_specs(method: type[Method], denoiser: str, template: PromptTemplate, cfg: DictConfig) -> list[GuidanceSpec]:
    """Rows of the validation grid: the unconditional the method samples with, the concept
    alone, and concept + control prompt (for ours: prior unconditional, concept, concept + text)."""
    alone = method.default_guidance(denoiser, template, None, cfg.concept_weight, cfg.control_weight)
    control = method.default_guidance(denoiser, template, cfg.control_prompt, cfg.concept_weight, cfg.control_weight)
    return [GuidanceSpec(unconditional=alone.unconditional), alone, control]


def make_renderer(prior, template: PromptTemplate, cfg: DictConfig, resolution: int):
    def render(pl_module: PersonalizationModule):
        method = pl_module.method
        pipe, denoiser = method.sampling_pipeline(prior)
        pipe = pipe.to(pl_module.device)
        pipe.set_progress_bar_config(disable=True)
        images = []
        for spec in validation_specs(type(method), denoiser, template, cfg):
            generators = [torch.Generator(pl_module.device).manual_seed(i) for i in range(cfg.num_images)]
            images += pipe(spec, num_images=cfg.num_images, height=resolution, width=resolution,
                           num_inference_steps=cfg.steps, generator=generators).images
        return make_image_grid(images, rows=3, cols=cfg.num_images)

    return render


def sample_metrics_callback(cfg: DictConfig, prior, template: PromptTemplate, device: torch.device):
    """Periodic small-sample FID (`eval.every_n_steps`) through the method's own guidance."""
    from ccp.cli.eval import RandomConvFeatures
    from ccp.evaluation.callbacks import SampleMetrics
    from ccp.evaluation.fid import inception_feature_extractor, real_statistics

    e = cfg.eval
    if e.feature_extractor == "inception":
        extractor = inception_feature_extractor(resolve_inception_weights(e.inception_weights), device=device)
    else:
        extractor = RandomConvFeatures().to(device)
    real = real_statistics(str(e.real_path), extractor, resolution=cfg.data.resolution)
    return SampleMetrics(
        prior, template, real, extractor, every_n_steps=e.every_n_steps, num_samples=e.num_samples,
        concept_weight=cfg.validation.concept_weight, control_weight=cfg.validation.control_weight,
        steps=e.steps, height=cfg.data.resolution, width=cfg.data.resolution, batch_size=e.batch_size,
    )


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
    """End this run's wandb run: otherwise the next training in the same process (make
    reproduce-tables, the toy prior then the demo's concept model) logs into it."""
    if any(isinstance(lg, L.pytorch.loggers.WandbLogger) for lg in trainer.loggers):
        import wandb

        wandb.finish()


def run_training(cfg: DictConfig, run_dir: str | Path | None = None) -> Path:
    """Train as configured (resuming when possible) and export; returns the export folder."""
    accumulate = check_config(cfg)
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    L.seed_everything(cfg.seed, workers=True)

    prior = load_prior(cfg.prior.path, dtype=resolve_dtype(cfg.prior.dtype))
    template = template_from(cfg)
    method = method_class(cfg.method.name)(prior, template, **(cfg.method.get("kwargs") or {}))
    if cfg.speed.compile and getattr(method, "unet", None) is not None:
        method.unet.compile()  # in place: parameter names (and checkpoints) stay the same
    module = PersonalizationModule(
        method,
        DDPMScheduler.from_config(prior.scheduler.config),
        vae=prior.vae,
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        weight_decay=cfg.optim.weight_decay,
        eps=cfg.optim.eps,
        warmup_steps=cfg.optim.warmup_steps,
        seed=cfg.seed,
        gradient_checkpointing=cfg.speed.gradient_checkpointing,
        channels_last=cfg.speed.channels_last,
    )
    datamodule = instantiate(cfg.data, seed=cfg.seed, _convert_="object").attach_vae(prior.vae)

    ema = EMACallback(decay=cfg.ema.decay, use_ema_warmup=cfg.ema.use_ema_warmup, power=cfg.ema.power) if cfg.ema.enabled else None
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=cfg.checkpoint.every_n_steps, save_last=True,
                        save_top_k=cfg.checkpoint.keep_last, monitor="step", mode="max", filename="step={step:07d}",
                        auto_insert_metric_name=False),
        SaveLastOnSigterm(ckpt_dir),
        StepProgressBar(),
        *([ema] if ema else []),
    ]
    if cfg.validation.every_n_steps:
        callbacks.append(
            ValidationGrid(make_renderer(prior, template, cfg.validation, cfg.data.resolution), run_dir / "validation",
                           every_n_steps=cfg.validation.every_n_steps, at_start=cfg.validation.at_start)
        )
    if cfg.eval.every_n_steps:
        device = torch.device("cuda" if cfg.trainer.accelerator in ("gpu", "cuda") else "cpu")
        callbacks.append(sample_metrics_callback(cfg, prior, template, device))
    t = cfg.trainer
    trainer = L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy, precision=t.precision,
        max_steps=t.max_steps, accumulate_grad_batches=accumulate, gradient_clip_val=t.gradient_clip_val,
        log_every_n_steps=t.log_every_n_steps, use_distributed_sampler=False,  # ResumableSampler shards ranks
        callbacks=callbacks, logger=build_loggers(cfg, run_dir) or False, default_root_dir=str(run_dir),
        enable_model_summary=False,
    )
    last = ckpt_dir / "last.ckpt"
    ckpt_path = None
    if cfg.resume == "auto":
        ckpt_path = str(last) if last.is_file() else None
    elif cfg.resume:
        ckpt_path = str(cfg.resume)
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (run_dir / PRIOR_STAMP).write_text(prior_fingerprint(cfg.prior.path))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        finish_wandb(trainer)

    export_dir = run_dir / "export"
    if trainer.is_global_zero:
        use_ema = ema is not None and cfg.export.use_ema
        if use_ema:
            with ema.swapped_in(module):
                method.export(export_dir)
        else:
            method.export(export_dir)
        info = {"method": cfg.method.name, "prior": str(cfg.prior.path), "template": OmegaConf.to_container(cfg.template),
                "step": trainer.global_step, "ema": use_ema}
        (export_dir / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        log.info("exported %s (step %d%s) to %s", cfg.method.name, trainer.global_step, ", EMA" if use_ema else "", export_dir)
    return export_dir


def prior_fingerprint(path: str | Path) -> str:
    """Changes when the prior folder's files are rewritten (e.g. a toy prior retrained at the same
    path); a hub id stands for itself."""
    path = Path(str(path))
    return f"folder:{folder_stamp(path)}" if path.is_dir() else f"id:{path}"


def trained_with(run_dir: str | Path, cfg: DictConfig) -> bool:
    """Whether `run_dir` holds a training (finished or interrupted) of exactly `cfg`, started from
    the prior as its files are now. A run without these stamps (older ccp) counts as different."""
    run_dir = Path(run_dir)
    saved, stamp = run_dir / "config.yaml", run_dir / PRIOR_STAMP
    return (saved.is_file() and saved.read_text() == OmegaConf.to_yaml(cfg, resolve=True)
            and stamp.is_file() and stamp.read_text() == prior_fingerprint(cfg.prior.path))


def set_aside(run_dir: str | Path) -> Path | None:
    """Move a run that no longer matches its config to ``<run_dir>.old`` (replacing an older one)
    rather than delete it: what it trained stays inspectable until the next change."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return None
    old = run_dir.with_name(run_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    run_dir.rename(old)
    log.warning("%s was trained with another config or prior; moved to %s, training afresh", run_dir, old)
    return old


def load_trained(export_dir: str | Path, prior=None):
    """``(GCFGPipeline, denoiser_name, method_class)`` for an export written by ccp-train."""
    export_dir = Path(export_dir)
    info_path = export_dir / EXPORT_INFO
    if not info_path.is_file():
        raise FileNotFoundError(f"{export_dir} has no {EXPORT_INFO}; it was not written by ccp-train")
    info = json.loads(info_path.read_text())
    prior = prior if prior is not None else load_prior(info["prior"])
    cls = method_class(info["method"])
    pipe, denoiser = cls.load_export(prior, export_dir)
    return pipe, denoiser, cls


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run_training(cfg)
    except (TrainConfigError, PriorNotFoundError, InceptionWeightsError) as err:
        raise SystemExit(f"ccp-train: error: {err}") from None


if __name__ == "__main__":
    main()
