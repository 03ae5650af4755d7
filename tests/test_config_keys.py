"""Every documented key of ccp-train, ccp-sample and ccp-eval reaches the object that uses it.

The keys are found by walking the composed configs (``train`` with every option of its groups,
``sample`` with every guidance preset, ``eval``), so a key added to a yaml without a check here
fails `test_every_key_has_a_reach_check_or_an_exemption`. Each key in `TRAIN`, `SAMPLE` and `EVAL`
is set to a value that is not its default through `ccp.config.compose` (the entry points' own
composition) and observed on the object the entry point builds from it: the PersonalizationModule,
the method, the Trainer, the callbacks, the data module and the loggers of `run_training`; the
pipeline, its scheduler and the sampler call of `run_sampling`; the model, sampling/FID/alignment
configs and the wandb run of `run_eval`. A key that is read nowhere, or read and then replaced by a
default, fails `test_keys_reach_their_code[<entry>]`, which names every such key at once.

Nothing heavy runs: the entry functions run on the tiny prior, ``Trainer.fit`` records its
arguments and stops, the metric functions record what they are given, and ``wandb.init`` records
its arguments. Checks that can share a run do (`packs`): one run observes many keys.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
import types
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import lightning as L
import numpy as np
import PIL.Image
import pytest
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ccp.config import CONF_DIR, by_gpus, compose, with_output_dir
from ccp.methods import method_class

# --- walking the configs -----------------------------------------------------------------------
TRAIN_GROUPS = ("paths", "prior", "data", "method", "trainer", "callbacks", "logger", "preset")
SAMPLE_GROUPS = ("paths", "guidance")
EVAL_GROUPS = ("paths", "logger")
ENTRY_GROUPS = {"train": TRAIN_GROUPS, "sample": SAMPLE_GROUPS, "eval": EVAL_GROUPS}
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")  # ${a.b}, not a resolver call ${name:args}


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> raw value (interpolations unresolved); an empty mapping is a key of its own
    (``loras: {}``: entries are added with ``+loras.NAME=...``)."""
    out: dict[str, Any] = {}
    for key in node.keys():
        child = node._get_node(key)
        path = f"{prefix}.{key}" if prefix else str(key)
        is_map = isinstance(child, DictConfig) and not (child._is_none() or child._is_missing() or child._is_interpolation())
        if is_map and len(child):
            out.update(leaves(child, path))
        elif is_map:
            out[path] = {}
        elif isinstance(child, (DictConfig, ListConfig)):
            out[path] = child._value() if (child._is_none() or child._is_missing() or child._is_interpolation()) \
                else OmegaConf.to_container(child)
        else:
            out[path] = child._value()
    return out


def walk(entry: str) -> dict[str, list[str]]:
    """Every key of `entry`'s config with every option of its groups -> the options that have it."""
    found: dict[str, list[str]] = {}
    for group in ENTRY_GROUPS[entry]:
        for option in group_options(group):
            for key in leaves(compose(entry, [f"{group}={option}"])):
                found.setdefault(key, []).append(f"{group}={option}")
    return found


def references(raw: dict[str, Any]) -> dict[str, set[str]]:
    """Key -> every key it interpolates, transitively (``callbacks.ema.decay`` -> {``ema.decay``})."""
    direct = {k: set(INTERPOLATION.findall(v)) if isinstance(v, str) else set() for k, v in raw.items()}
    closed: dict[str, set[str]] = {}

    def close(key, seen=()):
        if key not in closed:
            out = set()
            for ref in direct.get(key, ()):
                if ref not in seen:
                    out |= {ref} | close(ref, (*seen, key))
            closed[key] = out
        return closed[key]

    for key in direct:
        close(key)
    return closed


# --- the table ---------------------------------------------------------------------------------
SAME = object()


@dataclass
class Reach:
    """Set `key` (or the overrides `sets`) to `value`; `seen(world)` must then give `want` (default:
    the value itself). `needs`: other overrides the observation requires; `scenario`: a group
    choice the key lives in (e.g. method=lora); `level`: how far the entry point runs; `alone`: the
    run is expected to stop (a refusal that names the key), so it shares its run with nothing.
    Values may be callables of the test files (paths made per session)."""

    value: Any
    seen: Callable[[Any], Any]
    want: Any = SAME
    needs: dict = field(default_factory=dict)
    scenario: tuple = ()
    level: str = "run"
    alone: bool = False
    sets: dict | None = None  # overrides instead of {key: value} (new entries of an empty mapping)
    default: bool = False  # `value` is the yaml default, checked too because the code's own fallback is the other value


def both(value, default, seen, **kw) -> list[Reach]:
    """A two-valued key whose non-default value is also the code's fallback: dropping the key would
    go unseen with that value alone, so the yaml default must reach as well."""
    return [Reach(value, seen, **kw), Reach(default, seen, default=True, **kw)]


def refused(*fragments: str):
    """Observed: the run stopped with an error naming every fragment (the key that was read)."""
    return lambda w: w.error is not None and all(f in str(w.error) for f in fragments)


def refusal(value, *fragments, **kw) -> Reach:
    return Reach(value, refused(*fragments), want=True, alone=True, **kw)


def only(items, cls):
    found = [x for x in items if isinstance(x, cls)]
    assert len(found) == 1, f"expected one {cls.__name__}, found {len(found)}"
    return found[0]


def _cb(name: str):
    """The built callback of class `name` (lazy imports keep collection light)."""
    def get(w):
        import ccp.evaluation.callbacks as ec
        import ccp.training.callbacks as tc
        from lightning.pytorch.callbacks import ModelCheckpoint

        cls = {"ModelCheckpoint": ModelCheckpoint, "SaveLastOnInterrupt": tc.SaveLastOnInterrupt, "EMACallback": tc.EMACallback,
               "ValidationGrid": tc.ValidationGrid, "SampleMetrics": ec.SampleMetrics}[name]
        return only(w.callbacks, cls)
    return get


ckpt, save_last, ema_cb, grid, metrics = (_cb(n) for n in ("ModelCheckpoint", "SaveLastOnInterrupt", "EMACallback",
                                                          "ValidationGrid", "SampleMetrics"))


def has_ema(w):
    """(an EMA callback was built, the checkpoint callback was built): the second shows callbacks were built at all."""
    names = {type(c).__name__ for c in w.callbacks}
    return "EMACallback" in names, "ModelCheckpoint" in names


def trainer_line_says_auto(w):
    """Whether the line run_training logs about the hardware it chose says trainer=auto chose it."""
    lines = [line for line in w.log.splitlines() if line.startswith("trainer: ")]
    return "trainer=auto" in lines[0] if len(lines) == 1 else f"<{len(lines)} trainer lines logged>"


def logger_names(w):
    return sorted(type(x).__name__ for x in w.loggers)


def wandb_logger(w):
    return only(w.loggers, L.pytorch.loggers.WandbLogger)._wandb_init


def lr_factor(step):
    return lambda w: round(float(w.lr_schedule.lr_lambdas[0](step)), 3)


def channels_last(w):
    nets = [w.method.unet, *([w.method.controlnet] if hasattr(w.method, "controlnet") else [])]
    return all(net.conv_in.weight.is_contiguous(memory_format=torch.channels_last) for net in nets)


def checkpointed(w):
    """Per network the method runs and trains (its UNet, and a text encoder it trains): whether it
    recomputes activations in the backward pass."""
    nets = {"unet": w.method.unet}
    encoder = getattr(w.method, "text_encoder", None)
    if isinstance(encoder, torch.nn.Module) and any(p.requires_grad for p in encoder.parameters()):
        nets["text_encoder"] = encoder
    if isinstance(getattr(w.method, "controlnet", None), torch.nn.Module):  # method=controlnet trains one
        nets["controlnet"] = w.method.controlnet
    return {name: bool(net.is_gradient_checkpointing) for name, net in nets.items()}


HALF_STEPS = 50  # trainer.max_steps of the schedule checks: factors read at step 25
SCHED = {"trainer.max_steps": HALF_STEPS, "optim.warmup_steps": 0}
ONE_DEVICE = {"trainer.devices": 1, "trainer.num_nodes": 1}
BATCH = {"data.batch_size": 4, "trainer.global_batch_size": 32}  # the keys the accumulation is derived from
WANDB_ON = {"logger.wandb.enabled": True}  # the WandbLogger is built only then
EMA_ON = {"ema.enabled": True}  # the EMA callback is built only then
RANDOM_CONV = {"eval.feature_extractor": "random_conv"}
METRICS_ON = {"callbacks.sample_metrics.every_n_steps": 5, "callbacks.sample_metrics.feature_extractor": "random_conv"}
DREAMBOOTH = ("method=dreambooth",)
TEXT_TO_IMAGE = ("method=text_to_image", "data.captions=captions.jsonl")
# ours: the default; dreambooth_prior: DreamBooth's module (its class images are prior_preservation's keys)
# A method's scenario sets the data keys it needs (text_to_image: captions; controlnet: captions and conditions).
METHODS = [() if m == "ours" else (f"method={m}", *(f"data.{key}={value}" for key, value in method_class(m).needs_data.items()))
           for m in group_options("method") if m != "dreambooth_prior"]
ZERO_STEPS = {"trainer.max_steps": 0, "logger.wandb.enabled": False, "data.latent_cache.enabled": False, "data.num_workers": 0,
              "data.persistent_workers": False, "data.resolution": 64, "data.batch_size": 2, "trainer.global_batch_size": 2}
PRESERVE = {"prior_preservation.enabled": True, "prior_preservation.class_prompt": "a photo of a dog"}

# ccp-train: train.yaml and its groups. Observed on run_training's objects ("run": up to Trainer.fit,
# whose arguments are recorded), on check_config's plan ("check"), on the export ("export": a real
# fit of zero steps) or on Hydra's run folder ("hydra").
TRAIN: dict[str, Reach | list[Reach]] = {
    "paths.data_dir": Reach(lambda f: f.root2, lambda w: w.datamodule.path, want=lambda f: f.root2 / "ffhq"),
    "paths.log_dir": Reach("/elsewhere/logs", lambda w: w.hydra.run.dir, want="/elsewhere/logs/train/face_ours", level="hydra"),
    "prior.path": Reach(lambda f: f.prior_link, lambda w: w.module._prior[0].name_or_path, want=lambda f: str(f.prior_link)),
    "prior.allow_download": Reach(True, lambda w: w.load_prior[-1]["allow_download"]),
    "prior.dtype": Reach("bfloat16", lambda w: w.module._prior[0].unet.dtype, want=torch.bfloat16,
                         needs={"trainer.precision": "bf16-mixed"}),
    "prior.family": refusal("sdxl", "sdxl", level="check"),
    "data.path": Reach(lambda f: f.images, lambda w: w.datamodule.path),
    "data.resolution": Reach(96, lambda w: w.datamodule.resolution),
    "data.center_crop": Reach(True, lambda w: w.datamodule.center_crop),
    "data.random_flip": Reach(False, lambda w: w.datamodule.random_flip),
    "data.batch_size": Reach(8, lambda w: (w.datamodule.batch_size, w.trainer.accumulate_grad_batches), want=(8, 4),
                             needs={**ONE_DEVICE, "trainer.global_batch_size": 32}),
    "data.num_workers": Reach(1, lambda w: w.datamodule.num_workers),
    "data.persistent_workers": Reach(False, lambda w: w.datamodule.persistent_workers),
    "data.max_images": Reach(5, lambda w: w.datamodule.max_images),
    "data.on_bad_image": Reach("fail", lambda w: w.datamodule.on_bad_image),
    "data.cache_dir": Reach(lambda f: f.root / "cache", lambda w: w.datamodule.cache_root),
    "data.scan_cache": Reach(False, lambda w: w.datamodule.scan_cache),
    "data.latent_cache.enabled": both(False, True, lambda w: w.datamodule.latent_cache.enabled),
    "data.latent_cache.dir": Reach("/latents", lambda w: w.datamodule.latent_cache.dir),
    "data.latent_cache.shard_size": Reach(7, lambda w: w.datamodule.latent_cache.shard_size),
    "data.latent_cache.dtype": Reach("float32", lambda w: w.datamodule.latent_cache.dtype),
    "data.latent_cache.encode_dtype": Reach("bfloat16", lambda w: w.datamodule.latent_cache.encode_dtype),
    "data.latent_cache.batch_size": Reach(3, lambda w: w.datamodule.latent_cache.batch_size),
    "data.latent_cache.output": both("latents", "posterior", lambda w: w.datamodule.latent_cache.output),
    "data.captions": Reach("captions.jsonl", lambda w: w.datamodule.captions),
    "data.condition": Reach("canny", lambda w: w.datamodule.condition),
    "method.name": refusal("lora", "does not build method 'lora'", level="check"),
    "method.ema": Reach(False, has_ema, want=(False, True), level="check"),
    "method.module.definition": Reach("value_mean", lambda w: w.method.unet.config.null_text_definition),
    "method.module.train_q_out": both(False, True, lambda w: w.method.train_q_out, scenario=("method=custom_diffusion",)),
    "method.module.encode_prompt_every_step": Reach(True, lambda w: w.method.encode_prompt_every_step, scenario=DREAMBOOTH,
                                                    needs={"method.module.train_text_encoder": False}),
    "method.module.train_text_encoder": Reach(True, lambda w: (w.method.train_text_encoder, hasattr(w.method, "text_encoder")),
                                              want=(True, True), scenario=DREAMBOOTH),
    "method.module.text_encoder_lr": Reach(3e-4, lambda w: w.optimizer.param_groups[-1]["initial_lr"], scenario=DREAMBOOTH,
                                           needs={"method.module.train_text_encoder": True}),
    "method.module.rank": Reach(2, lambda w: w.method.rank, scenario=("method=lora",)),
    "method.module.alpha": Reach(8.0, lambda w: w.method.alpha, scenario=("method=lora",)),
    "method.module.r": Reach(2, lambda w: w.method.peft_unet.peft_config["default"].r, scenario=("method=oft",)),
    "method.module.coft": Reach(True, lambda w: w.method.peft_unet.peft_config["default"].coft, scenario=("method=oft",)),
    "method.module.caption_dropout": Reach(0.3, lambda w: w.method.caption_dropout, scenario=TEXT_TO_IMAGE),
    "method.module.caption_templates": Reach(["a {caption}", "{caption}!"], lambda w: list(w.method.caption_templates),
                                             scenario=TEXT_TO_IMAGE),
    "trainer.accelerator": Reach("auto", lambda w: w.trainer_kwargs["accelerator"]),
    "trainer.devices": Reach(2, lambda w: w.trainer.num_devices,
                             needs={**BATCH, "trainer.accelerator": "cpu", "trainer.num_nodes": 1}),
    "trainer.num_nodes": Reach(2, lambda w: w.trainer.num_nodes, needs={**BATCH, "trainer.devices": 1}),
    "trainer.strategy": Reach("ddp", lambda w: type(w.trainer.strategy).__name__, want="DDPStrategy"),
    "trainer.collective_timeout_s": Reach(123, lambda w: w.trainer.strategy._timeout, want=timedelta(seconds=123),
                                          needs={"trainer.strategy": "ddp"}),
    "trainer.precision": Reach("16-mixed", lambda w: w.trainer.precision),
    "trainer.max_steps": Reach(7, lambda w: w.trainer.max_steps),
    "trainer.global_batch_size": Reach(8, lambda w: w.trainer.accumulate_grad_batches, want=2,
                                       needs={**ONE_DEVICE, "data.batch_size": 4}),
    "trainer.gradient_clip_val": Reach(0.5, lambda w: w.trainer.gradient_clip_val),
    "trainer.log_every_n_steps": Reach(3, lambda w: w.trainer.log_every_n_steps),
    "trainer.allow_tf32": Reach(lambda f: not by_gpus(False, True, True), lambda w: w.module.config.allow_tf32),
    "trainer.auto": both(False, True, trainer_line_says_auto),
    "callbacks.model_checkpoint.dirpath": Reach(lambda f: f.root / "ckpts", lambda w: Path(ckpt(w).dirpath),
                                                want=lambda f: (f.root / "ckpts").resolve(), level="check"),
    "callbacks.model_checkpoint.every_n_train_steps": Reach(7, lambda w: ckpt(w)._every_n_train_steps, level="check"),
    "callbacks.model_checkpoint.save_last": Reach(False, lambda w: ckpt(w).save_last, level="check"),
    "callbacks.model_checkpoint.save_top_k": Reach(5, lambda w: ckpt(w).save_top_k, level="check"),
    "callbacks.model_checkpoint.monitor": Reach("train/loss", lambda w: ckpt(w).monitor, level="check"),
    "callbacks.model_checkpoint.mode": both("min", "max", lambda w: ckpt(w).mode, level="check"),
    "callbacks.model_checkpoint.filename": Reach("ckpt-{step}", lambda w: ckpt(w).filename, level="check"),
    "callbacks.model_checkpoint.auto_insert_metric_name": both(True, False, lambda w: ckpt(w).auto_insert_metric_name,
                                                               level="check"),
    "callbacks.save_last_on_interrupt.checkpoint_dir": Reach("/sig", lambda w: save_last(w).path, want=Path("/sig/last.ckpt"),
                                                           level="check"),
    "callbacks.ema.decay": Reach(0.5, lambda w: ema_cb(w).kwargs["decay"], level="check", needs=EMA_ON),
    "callbacks.ema.use_ema_warmup": both(False, True, lambda w: ema_cb(w).kwargs["use_ema_warmup"], level="check",
                                         needs=EMA_ON),
    "callbacks.ema.power": Reach(0.5, lambda w: ema_cb(w).kwargs["power"], level="check", needs=EMA_ON),
    "callbacks.ema.device": Reach("cpu", lambda w: ema_cb(w).device, level="check", needs=EMA_ON),
    "callbacks.validation_grid.out_dir": Reach("/grids", lambda w: grid(w).out_dir, want=Path("/grids"), level="check"),
    "callbacks.validation_grid.every_n_steps": Reach(7, lambda w: grid(w).every_n_steps, level="check"),
    "callbacks.validation_grid.at_start": Reach(True, lambda w: grid(w).at_start, level="check"),
    "callbacks.validation_grid.num_images": Reach(2, lambda w: grid(w).num_images, level="check"),
    "callbacks.validation_grid.steps": Reach(3, lambda w: grid(w).steps, level="check"),
    "callbacks.validation_grid.control_prompt": Reach("smiling", lambda w: grid(w).control_prompt, level="check"),
    "callbacks.validation_grid.concept_weight": Reach(1.5, lambda w: grid(w).concept_weight, level="check"),
    "callbacks.validation_grid.control_weight": Reach(2.5, lambda w: grid(w).control_weight, level="check"),
    "callbacks.validation_grid.resolution": Reach(32, lambda w: grid(w).resolution, level="check"),
    "callbacks.sample_metrics.every_n_steps": Reach(5, lambda w: metrics(w).every_n_steps, level="check",
                                                    needs={"callbacks.sample_metrics.feature_extractor": "random_conv"}),
    "callbacks.sample_metrics.num_samples": Reach(16, lambda w: metrics(w).num_samples, level="check"),
    "callbacks.sample_metrics.real_path": Reach(lambda f: f.images, lambda w: Path(metrics(w).real_path), level="check",
                                                needs=METRICS_ON),
    "callbacks.sample_metrics.feature_extractor": Reach("random_conv", lambda w: metrics(w).feature_extractor, level="check"),
    "callbacks.sample_metrics.inception_weights": Reach(
        lambda f: f.inception, lambda w: metrics(w)._inception_weights, level="check",
        needs={"callbacks.sample_metrics.every_n_steps": 5, "callbacks.sample_metrics.feature_extractor": "inception"}),
    "callbacks.sample_metrics.steps": Reach(3, lambda w: metrics(w).steps, level="check"),
    "callbacks.sample_metrics.batch_size": Reach(3, lambda w: metrics(w).batch_size, level="check"),
    "callbacks.sample_metrics.resolution": Reach(32, lambda w: metrics(w).resolution, level="check"),
    "callbacks.sample_metrics.concept_weight": Reach(1.5, lambda w: metrics(w).concept_weight, level="check"),
    "callbacks.sample_metrics.control_weight": Reach(2.5, lambda w: metrics(w).control_weight, level="check"),
    "logger.csv": Reach(False, logger_names, want=["WandbLogger"], needs=WANDB_ON),
    "logger.wandb.enabled": Reach(False, logger_names, want=["ContinuingCSVLogger"], needs={"logger.csv": True}),
    "logger.wandb.mode": Reach("online", lambda w: wandb_logger(w)["mode"], needs=WANDB_ON),
    "logger.wandb.project": Reach("elsewhere", lambda w: wandb_logger(w)["project"], needs=WANDB_ON),
    "logger.wandb.entity": Reach("my-team", lambda w: wandb_logger(w)["entity"], needs=WANDB_ON),
    "seed": Reach(7, lambda w: (w.module.config.seed, w.datamodule.seed), want=(7, 7)),
    "dataset_name": Reach("animal", lambda w: wandb_logger(w)["name"], want="animal_ours", needs=WANDB_ON),
    "run_name": Reach("my_run", lambda w: wandb_logger(w)["name"], needs=WANDB_ON),
    "resume": Reach("/some/where/last.ckpt", lambda w: w.fit["ckpt_path"]),
    "template.template": Reach("a picture of {token} face", lambda w: w.method.template.template),
    "template.placeholder": Reach("<face>", lambda w: w.method.template.placeholder),
    "template.initializer": Reach("person", lambda w: w.method.template.initializer),
    "optim.name": Reach("adamw8bit", lambda w: type(w.optimizer).__name__, want="AdamW8bit"),
    "optim.lr": Reach(3e-4, lambda w: w.optimizer.param_groups[0]["initial_lr"]),
    "optim.betas": Reach([0.8, 0.99], lambda w: list(w.optimizer.param_groups[0]["betas"])),
    "optim.weight_decay": Reach(0.1, lambda w: w.optimizer.param_groups[0]["weight_decay"]),
    "optim.eps": Reach(1e-6, lambda w: w.optimizer.param_groups[0]["eps"]),
    "optim.lr_scheduler": Reach("cosine", lr_factor(HALF_STEPS // 2), want=0.5, needs=SCHED),
    "optim.warmup_steps": Reach(10, lr_factor(0), want=0.1, needs={**SCHED, "optim.lr_scheduler": "constant"}),
    "optim.num_cycles": Reach(2, lr_factor(HALF_STEPS // 2), want=1.0,
                              needs={**SCHED, "optim.lr_scheduler": "cosine_with_restarts"}),
    "optim.power": Reach(2.0, lr_factor(HALF_STEPS // 2), want=round(((1e-5 - 1e-7) * 0.5**2 + 1e-7) / 1e-5, 3),
                         needs={**SCHED, "optim.lr_scheduler": "polynomial", "optim.lr": 1e-5}),  # decays to 1e-7
    "loss.snr_gamma": Reach(5.0, lambda w: w.module.config.loss.snr_gamma),
    "loss.noise_offset": Reach(0.1, lambda w: w.module.config.loss.noise_offset),
    "prior_preservation.enabled": Reach(True, lambda w: (w.datamodule.class_images.enabled,
                                                         hasattr(w.method, "class_prompt_ids")),
                                        want=(True, True), scenario=DREAMBOOTH,
                                        needs={"prior_preservation.class_prompt": "a photo of a dog"}),
    "prior_preservation.class_prompt": Reach("a photo of a cat", lambda w: w.datamodule.class_images.class_prompt,
                                             scenario=DREAMBOOTH, needs={"prior_preservation.enabled": True}),
    "prior_preservation.num_class_images": Reach(3, lambda w: w.datamodule.class_images.num_class_images,
                                                 scenario=DREAMBOOTH, needs=PRESERVE),
    "prior_preservation.prior_loss_weight": Reach(0.5, lambda w: w.module.config.prior_preservation.prior_loss_weight,
                                                  scenario=DREAMBOOTH, needs=PRESERVE),
    "prior_preservation.class_data_dir": Reach("/class_images", lambda w: w.datamodule.class_images.class_data_dir,
                                               scenario=DREAMBOOTH, needs=PRESERVE),
    "prior_preservation.sample_batch_size": Reach(2, lambda w: w.datamodule.class_images.sample_batch_size,
                                                  scenario=DREAMBOOTH, needs=PRESERVE),
    "prior_preservation.steps": Reach(3, lambda w: w.datamodule.class_images.steps, scenario=DREAMBOOTH, needs=PRESERVE),
    "prior_preservation.guidance_scale": Reach(3.0, lambda w: w.datamodule.class_images.guidance_scale,
                                               scenario=DREAMBOOTH, needs=PRESERVE),
    "prior_preservation.seed": Reach(4, lambda w: w.datamodule.class_images.seed, scenario=DREAMBOOTH, needs=PRESERVE),
    "ema.enabled": Reach(False, has_ema, want=(False, True), level="check"),
    "ema.decay": Reach(0.5, lambda w: ema_cb(w).kwargs["decay"], level="check", needs=EMA_ON),
    "ema.use_ema_warmup": both(False, True, lambda w: ema_cb(w).kwargs["use_ema_warmup"], level="check", needs=EMA_ON),
    "ema.power": Reach(0.5, lambda w: ema_cb(w).kwargs["power"], level="check", needs=EMA_ON),
    "ema.device": Reach("cpu", lambda w: ema_cb(w).device, level="check", needs=EMA_ON),
    # what the speed options reach depends on the method: one check per method file
    "speed.gradient_checkpointing": [Reach(True, checkpointed, scenario=sc,
                                           want={"unet": True, **({"controlnet": True} if "method=controlnet" in sc else {})})
                                     for sc in METHODS] + [
        Reach(True, checkpointed, want={"unet": True, "text_encoder": True}, scenario=DREAMBOOTH,
              needs={"method.module.train_text_encoder": True})],
    "speed.channels_last": [Reach(True, channels_last, scenario=sc) for sc in METHODS],
    "speed.compile": Reach(True, lambda w: w.module._compiled_predict is not None),
    "speed.compile_backend": refusal("no_such_backend", "no_such_backend", needs={"speed.compile": True}),
    "checkpoint.every_n_steps": Reach(7, lambda w: ckpt(w)._every_n_train_steps, level="check"),
    "checkpoint.keep_last": Reach(5, lambda w: ckpt(w).save_top_k, level="check"),
    "validation.every_n_steps": Reach(7, lambda w: grid(w).every_n_steps, level="check"),
    "validation.at_start": Reach(True, lambda w: grid(w).at_start, level="check"),
    "validation.num_images": Reach(2, lambda w: grid(w).num_images, level="check"),
    "validation.steps": Reach(3, lambda w: grid(w).steps, level="check"),
    "validation.control_prompt": Reach("smiling", lambda w: grid(w).control_prompt, level="check"),
    "validation.concept_weight": Reach(1.5, lambda w: (grid(w).concept_weight, metrics(w).concept_weight), want=(1.5, 1.5),
                                       level="check"),
    "validation.control_weight": Reach(2.5, lambda w: (grid(w).control_weight, metrics(w).control_weight), want=(2.5, 2.5),
                                       level="check"),
    "eval.every_n_steps": Reach(5, lambda w: metrics(w).every_n_steps, level="check", needs=RANDOM_CONV),
    "eval.num_samples": Reach(16, lambda w: metrics(w).num_samples, level="check"),
    "eval.real_path": Reach(lambda f: f.images, lambda w: Path(metrics(w).real_path), level="check",
                            needs={"eval.every_n_steps": 5, **RANDOM_CONV}),
    "eval.inception_weights": Reach(lambda f: f.inception, lambda w: metrics(w)._inception_weights, level="check",
                                    needs={"eval.every_n_steps": 5, "eval.feature_extractor": "inception"}),
    "eval.feature_extractor": Reach("random_conv", lambda w: metrics(w).feature_extractor, level="check"),
    "eval.steps": Reach(3, lambda w: metrics(w).steps, level="check"),
    "eval.batch_size": Reach(3, lambda w: metrics(w).batch_size, level="check"),
    "export.use_ema": Reach(False, lambda w: w.export_info["ema"], level="export", needs=ZERO_STEPS),
}
TRAIN_EXEMPT = {
    "paths.output_dir": "the job's own folder: run_training sets it to its run folder (ccp.training.runs.run_config); "
                        "the yaml holds only Hydra's ${hydra:runtime.output_dir}",
    "*._target_": "Hydra's instantiate: the class it builds (callbacks.*, data, method.module; the built objects' "
                  "types are what the checks above observe, and method_class_of checks method.module._target_)",
    "*._partial_": "Hydra's instantiate: method.module is built as a partial that run_training completes with the "
                   "prior and the template",
    "hydra.*": "Hydra's own settings (run/sweep folders, job), read by Hydra before the entry function runs",
}

# ccp-sample: sample.yaml with every guidance preset. Observed on run_sampling's pipeline (its
# scheduler and denoisers), on the call of the sampler (`sample_batches`: guidance spec, seed, steps,
# sizes, init images) and on the files it writes.
CONCEPT = {"concept.path": lambda f: f.concept}
OTHER = {"+denoiser_checkpoints.other": lambda f: f.prior_dir}
INIT = {"init.image": lambda f: f.photo}
MODELS = {**CONCEPT, "controlnet.path": lambda f: f.controlnet, **OTHER, "+denoiser_checkpoints.single": lambda f: f.single_file,
          "+controlnets.edges": lambda f: f.controlnet}
CONTROLNET = {**CONCEPT, "controlnet.path": lambda f: f.controlnet, "guidance.terms.controlnet.control_image": lambda f: f.edges}
# a term for each of MODELS' denoisers: a denoiser no term uses (with a nonzero weight) is not loaded
USES_MODELS = {**MODELS, "+guidance.terms.c": {"denoiser": "concept", "weight": 0.5},
               "+guidance.terms.k": lambda f: {"denoiser": "controlnet", "control_image": f.edges, "weight": 0.5},
               "+guidance.terms.o": {"denoiser": "other", "weight": 0.5},
               "+guidance.terms.s": {"denoiser": "single", "weight": 0.5},
               "+guidance.terms.e": lambda f: {"denoiser": "edges", "control_image": f.edges, "weight": 0.5}}


def term(name: str, attr: str):
    def seen(w):
        found = {t.name: t for t in w.spec.terms}
        if name not in found:
            return f"(no term {name!r}; terms: {sorted(found)})"
        t = found[name]
        return {"weight": t.weight, "denoiser": t.source.denoiser, "prompt": t.source.condition.prompt,
                "control_scale": t.source.condition.control_scale,
                "control_image": getattr(t.source.condition.control_image, "size", None)}[attr]
    return seen


def online_loads(local_files_only: bool):
    """The model and config loads of the run (outermost diffusers call each) that did not get
    ``local_files_only=<local_files_only>``: each may read the hub otherwise."""
    def seen(w):
        if not w.loads:
            return ["<nothing was loaded>"]
        return [f"{what}({path}) local_files_only={flag}" for what, path, flag in w.loads if flag is not local_files_only]
    return seen


def pipeline_dtypes(w):
    return sorted({str(p.dtype) for c in w.pipe.components.values() if isinstance(c, torch.nn.Module) for p in c.parameters()})


def image_size(w):
    return PIL.Image.open(w.out / "images" / "00000.png").size


SAMPLE: dict[str, Reach | list[Reach]] = {
    "paths.log_dir": Reach("/elsewhere/logs", lambda w: str(w.hydra.run.dir).startswith("/elsewhere/logs/sample/"),
                           want=True, level="hydra"),
    "prior.path": Reach(lambda f: f.prior_link, lambda w: w.pipe.unet.config._name_or_path,
                        want=lambda f: str(f.prior_link / "unet")),
    "prior.family": refusal("sdxl", "sdxl"),
    # every model the config names is loaded under these two (the prior, concept, ControlNets, checkpoints)
    "prior.allow_download": Reach(True, online_loads(False), want=[], needs=USES_MODELS),
    "prior.dtype": Reach("bfloat16", pipeline_dtypes, want=["torch.bfloat16"], needs=USES_MODELS),
    "device": refusal("bogus", "device='bogus'"),
    "concept.path": Reach(lambda f: f.concept, lambda w: w.pipe.concept_unet.config._name_or_path,
                          want=lambda f: str(f.concept), needs={"+guidance.terms.c": {"denoiser": "concept", "weight": 0.5}}),
    "controlnet.path": Reach(lambda f: f.controlnet, lambda w: w.pipe.controlnet.config._name_or_path,
                             want=lambda f: str(f.controlnet), needs={"+guidance.terms.k": lambda f: {
                                 "denoiser": "controlnet", "control_image": f.edges, "weight": 0.5}}),
    "denoiser_checkpoints": Reach(None, lambda w: w.pipe.denoisers["other"].unet.config._name_or_path,
                                  want=lambda f: str(f.prior_dir), sets=OTHER),  # its own copy (the prior's: <dir>/unet)
    "controlnets": Reach(None, lambda w: w.pipe.denoisers["edges"].controlnet.config._name_or_path,
                         want=lambda f: str(f.controlnet), sets={"+controlnets.edges": lambda f: f.controlnet},
                         scenario=("guidance=controlnet",), needs={**CONCEPT, "guidance.terms.controlnet.denoiser": "edges",
                                                                  "guidance.terms.controlnet.control_image": lambda f: f.edges}),
    "loras": Reach(None, lambda w: type(w.pipe.denoisers.get("style")).__name__, want="LoRADenoiser",
                   sets={"+loras.style": lambda f: f.lora}, needs={"+guidance.terms.l": {"denoiser": "style", "weight": 0.5}}),
    "control_images": Reach(None, term("controlnet", "control_image"), want=(40, 48), scenario=("guidance=controlnet",),
                            sets={"+control_images.edges": lambda f: f.odd_png},
                            needs={**CONTROLNET, "guidance.terms.controlnet.control_image": "edges"}),
    "sampling.num_images": Reach(2, lambda w: len(list((w.out / "images").glob("*.png")))),
    "sampling.batch_size": Reach(2, lambda w: w.sampler["batch_size"], needs={"sampling.num_images": 2}),
    "sampling.seed": Reach(7, lambda w: w.sampler["seed"]),
    "sampling.steps": Reach(3, lambda w: (w.sampler["num_inference_steps"], len(w.pipe.scheduler.timesteps)), want=(3, 3)),
    "sampling.height": Reach(32, lambda w: image_size(w)[1]),
    "sampling.width": Reach(32, lambda w: image_size(w)[0]),
    "sampling.scheduler": [Reach("EulerDiscreteScheduler", lambda w: type(w.pipe.scheduler).__name__),
                           Reach("prior", lambda w: type(w.pipe.scheduler).__name__, want="PNDMScheduler")],  # the tiny prior's
    "sampling.eta": Reach(0.5, lambda w: w.sampler["eta"], needs={"sampling.scheduler": "DDIMScheduler"}),
    "init.image": Reach(lambda f: f.photo, lambda w: w.sampler["image"].size, want=(64, 64)),
    "init.mask": Reach(lambda f: f.mask, lambda w: w.sampler["mask_image"].size, want=(64, 64), needs=INIT),
    "init.strength": Reach(0.5, lambda w: w.sampler["strength"], needs=INIT),
    "init.size": refusal("strict", "init.size=strict", needs={"init.image": lambda f: f.odd_png}),
    "output.grid_max_images": Reach(1, lambda w: PIL.Image.open(w.out / "grid.png").size, want=(64, 64),  # 2: (134, 68)
                                    needs={"sampling.num_images": 2, "sampling.height": 64, "sampling.width": 64}),
    "guidance.unconditional.denoiser": Reach("other", lambda w: w.spec.unconditional.denoiser, needs=OTHER),
    "guidance.unconditional.prompt": Reach("blurry", lambda w: w.spec.unconditional.condition.prompt),
    "guidance.rescale": Reach(0.5, lambda w: w.spec.rescale),
    "guidance.terms.text.denoiser": Reach("other", term("text", "denoiser"), needs=OTHER),
    "guidance.terms.text.prompt": Reach("a cat", term("text", "prompt")),
    "guidance.terms.text.weight": Reach(3.0, term("text", "weight")),
    "guidance.terms.concept.denoiser": Reach("other", term("concept", "denoiser"), scenario=("guidance=concept",),
                                             needs={**CONCEPT, **OTHER}),
    "guidance.terms.concept.weight": Reach(1.25, term("concept", "weight"), scenario=("guidance=concept",), needs=CONCEPT),
    "guidance.terms.control.denoiser": Reach("other", term("control", "denoiser"), scenario=("guidance=concept_control",),
                                             needs={**CONCEPT, **OTHER}),
    "guidance.terms.control.prompt": Reach("smiling", term("control", "prompt"), scenario=("guidance=concept_control",),
                                           needs=CONCEPT),
    "guidance.terms.control.weight": Reach(2.0, term("control", "weight"), scenario=("guidance=concept_control",),
                                           needs=CONCEPT),
    "guidance.terms.control.enabled": both(True, False, lambda w: "control" in {t.name for t in w.spec.terms},
                                           scenario=("guidance=translate",), needs={**CONCEPT, **INIT}),
    "guidance.terms.controlnet.denoiser": Reach("edges", term("controlnet", "denoiser"), scenario=("guidance=controlnet",),
                                                needs={**CONTROLNET, "+controlnets.edges": lambda f: f.controlnet}),
    "guidance.terms.controlnet.prompt": Reach("a face", term("controlnet", "prompt"), scenario=("guidance=controlnet",),
                                              needs=CONTROLNET),
    "guidance.terms.controlnet.control_image": Reach(lambda f: f.odd_png, term("controlnet", "control_image"), want=(40, 48),
                                                     scenario=("guidance=controlnet",), needs=CONTROLNET),
    "guidance.terms.controlnet.control_scale": Reach(0.5, term("controlnet", "control_scale"),
                                                     scenario=("guidance=controlnet",), needs=CONTROLNET),
    "guidance.terms.controlnet.weight": Reach(2.0, term("controlnet", "weight"), scenario=("guidance=controlnet",),
                                              needs=CONTROLNET),
    "guidance.terms.style.denoiser": Reach("other", term("style", "denoiser"), scenario=("guidance=stylize",),
                                           needs={**CONCEPT, **OTHER, "+loras.style": lambda f: f.lora}),
    "guidance.terms.style.prompt": Reach("in ink", term("style", "prompt"), scenario=("guidance=stylize",),
                                         needs={**CONCEPT, "+loras.style": lambda f: f.lora}),
    "guidance.terms.style.weight": Reach(1.0, term("style", "weight"), scenario=("guidance=stylize",),
                                         needs={**CONCEPT, "+loras.style": lambda f: f.lora}),
}
SAMPLE_EXEMPT = {
    "paths.output_dir": TRAIN_EXEMPT["paths.output_dir"].replace("run_training", "run_sampling"),
    "paths.data_dir": "read by ccp-train only (data.path defaults under it); ccp-sample shares the paths group",
    "hydra.*": TRAIN_EXEMPT["hydra.*"],
}

# ccp-eval: eval.yaml. Observed on what run_eval hands the metric (the model, the sampling, FID,
# text and spatial configs, the feature extractor, the image folder), on result.json and on the
# wandb run it starts.
FID = {"metric": "fid"}
TEXT = {"metric": "text"}
SPATIAL = {"metric": "spatial", "spatial.condition_path": lambda f: f.images, "spatial.num_conditions": 2,
           "spatial.controlnet_path": lambda f: f.controlnet}


def arg(name):
    return lambda w: w.metric["args"][name]


def sampling(attr):
    return lambda w: getattr(w.metric["args"]["sampling"], attr)


def fid(attr):
    return lambda w: getattr(w.metric["args"]["fid"], attr)


def config_of(attr):
    return lambda w: getattr(w.metric["args"]["config"], attr)


EVAL: dict[str, Reach | list[Reach]] = {
    "paths.log_dir": Reach("/elsewhere/logs", lambda w: str(w.hydra.run.dir).startswith("/elsewhere/logs/eval/"),
                           want=True, level="hydra"),
    "metric": Reach("text", lambda w: w.metric["name"], needs={"text.clip_weights": lambda f: f.clip}),
    "model": Reach("prior", lambda w: (w.metric["args"]["model"].method.name, w.metric["args"]["model"].export_dir),
                   want=("prior", None), needs={"prior.path": lambda f: f.prior_dir}),
    "run": Reach("my_row", lambda w: w.result["run"]),
    "export.path": Reach(lambda f: f.export_link, lambda w: w.metric["args"]["model"].export_dir,
                         needs={"model": "export"}),
    "prior.path": Reach(lambda f: f.prior_link, lambda w: w.metric["args"]["model"].pipe.unet.config._name_or_path,
                        want=lambda f: str(f.prior_link / "unet")),
    # the prior and the spatial metric's ControlNet are loaded under these two (an export is a local folder)
    "prior.allow_download": Reach(True, lambda w: [(c["fn"], c.get("allow_download")) for c in w.load_prior],
                                  want=[("load_prior", True), ("load_controlnet", True)], needs=SPATIAL),
    "prior.dtype": Reach("bfloat16", lambda w: (pipeline_dtypes(types.SimpleNamespace(pipe=w.metric["args"]["model"].pipe)),
                                                str(arg("controlnet")(w).dtype)),
                         want=(["torch.bfloat16"], "torch.bfloat16"), needs=SPATIAL),
    "device": refusal("bogus", "device='bogus'"),
    "template": Reach({"template": "a picture of {token}", "placeholder": "<x>", "initializer": "dog"},
                      lambda w: dict(w.metric["args"]["model"].template.__dict__)),
    "guidance.concept_weight": Reach(1.5, sampling("concept_weight"), needs=FID),
    "guidance.control_weight": Reach(3.0, sampling("control_weight"), needs=FID),
    "sampling.steps": Reach(3, sampling("steps"), needs=FID),
    "sampling.height": Reach(32, lambda w: (sampling("height")(w), fid("resolution")(w)), want=(32, 32), needs=FID),
    "sampling.width": Reach(32, sampling("width"), needs=FID),
    "sampling.batch_size": Reach(3, lambda w: (sampling("batch_size")(w), fid("batch_size")(w)), want=(3, 3), needs=FID),
    "sampling.seed": Reach(5, lambda w: (sampling("seed")(w), fid("seed")(w)), want=(5, 5), needs=FID),
    "fid.real_path": Reach(lambda f: f.images, lambda w: Path(fid("real_path")(w)), needs=FID),
    "fid.shard_dir": Reach("/shards", fid("shard_dir"), needs=FID),
    "fid.resolution": Reach(32, fid("resolution"), needs=FID),
    "fid.num_samples": Reach(10, fid("num_samples"), needs=FID),
    "fid.shard_size": Reach(5, fid("shard_size"), needs=FID),
    "fid.keep_images": Reach(True, fid("keep_images"), needs=FID),
    "fid.inception_weights": Reach(lambda f: f.inception2, lambda w: Path(fid("inception_weights")(w)), needs=FID),
    "fid.antialias": Reach(True, fid("antialias"), needs=FID),
    "fid.center_crop": Reach(True, fid("center_crop"), needs=FID),
    "fid.max_real_images": Reach(3, fid("max_real_images"), needs=FID),
    "fid.stats_cache_dir": Reach("/stats", fid("stats_cache_dir"), needs=FID),
    "fid.feature_batch_size": Reach(7, fid("feature_batch_size"), needs=FID),
    "fid.num_workers": Reach(1, fid("num_workers"), needs=FID),
    "fid.feature_extractor": Reach("random_conv", lambda w: type(arg("feature_extractor")(w)).__name__,
                                   want="RandomConvFeatures", needs=FID),
    "text.clip_weights": Reach(lambda f: f.clip, lambda w: (config_of("clip_weights")(w), w.clip_predictor),
                               want=lambda f: (str(f.clip), str(f.clip)), needs=TEXT),
    "text.prompts": Reach(["smiling"], lambda w: list(config_of("prompts")(w)), needs={**TEXT, "text.clip_weights": lambda f: f.clip}),
    "text.images_per_prompt": Reach(3, config_of("images_per_prompt"), needs={**TEXT, "text.clip_weights": lambda f: f.clip}),
    "spatial.condition_path": Reach(lambda f: f.images, lambda w: Path(arg("condition_dir")(w)), needs=SPATIAL),
    "spatial.controlnet_path": Reach(lambda f: f.controlnet_link, lambda w: arg("controlnet")(w).config._name_or_path,
                                     want=lambda f: str(f.controlnet_link), needs=SPATIAL),
    "spatial.num_conditions": Reach(1, config_of("num_conditions"), needs=SPATIAL),
    "spatial.samples_per_condition": Reach(2, config_of("samples_per_condition"), needs=SPATIAL),
    "spatial.selection_seed": Reach(3, config_of("selection_seed"), needs=SPATIAL),
    "spatial.canny_low": Reach(50, config_of("canny_low"), needs=SPATIAL),
    "spatial.canny_high": Reach(150, config_of("canny_high"), needs=SPATIAL),
    "spatial.tolerance": Reach(1, config_of("tolerance"), needs=SPATIAL),
    "spatial.control_scale": Reach(0.5, config_of("control_scale"), needs=SPATIAL),
    "spatial.control_prompt": Reach("smiling", config_of("control_prompt"), needs=SPATIAL),
    "output.save_images": Reach(True, lambda w: arg("image_dir")(w) == w.out / "images", want=True,
                                needs={**TEXT, "text.clip_weights": lambda f: f.clip}),
    "output.skip_done": Reach(False, lambda w: w.metric_calls, want=2, level="rerun"),
    "logger.wandb.enabled": Reach(False, lambda w: (w.wandb is None, w.result is not None), want=(True, True)),
    "logger.wandb.mode": Reach("online", lambda w: w.wandb["mode"], needs=WANDB_ON),
    "logger.wandb.project": Reach("elsewhere", lambda w: w.wandb["project"], needs=WANDB_ON),
    "logger.wandb.entity": Reach("my-team", lambda w: w.wandb["entity"], needs=WANDB_ON),
}
EVAL_EXEMPT = {
    "paths.output_dir": TRAIN_EXEMPT["paths.output_dir"].replace("run_training", "run_eval"),
    "paths.data_dir": SAMPLE_EXEMPT["paths.data_dir"].replace("ccp-sample", "ccp-eval"),
    "logger.csv": "Lightning's CSV logs are ccp-train's; ccp-eval writes result.json and logs to wandb only "
                  "(the logger group is shared)",
    "hydra.*": TRAIN_EXEMPT["hydra.*"],
}

TABLES: dict[str, tuple[dict, dict]] = {
    "train": (TRAIN, TRAIN_EXEMPT), "sample": (SAMPLE, SAMPLE_EXEMPT), "eval": (EVAL, EVAL_EXEMPT)}


def exemption(key: str, exempt: dict[str, str]) -> str | None:
    for pattern, reason in exempt.items():
        if fnmatch.fnmatchcase(key, pattern):
            return reason
    return None


@pytest.mark.parametrize("entry", ["train", "sample", "eval"])
def test_every_key_has_a_reach_check_or_an_exemption(entry):
    table, exempt = TABLES[entry]
    found = walk(entry)
    missing = [f"{entry}: key {key} ({', '.join(found[key][:3])}) has no reach check; add one to "
               f"tests/test_config_keys.py or exempt it with a reason" for key in found
               if key not in table and exemption(key, exempt) is None]
    stale = [f"{entry}: {key} is checked but no composed config has it" for key in table if key not in found]
    stale += [f"{entry}: {key} is checked under {' '.join(c.scenario)}, which does not have it" for key, c in entries(table)
              if key in found and c.scenario and not set(c.scenario) & set(found[key]) and c.sets is None
              and any(s.split("=")[0] in ENTRY_GROUPS[entry] for s in c.scenario)]
    overlap = [f"{entry}: {key} is both checked and exempt" for key in table if exemption(key, exempt)]
    assert not (missing + stale + overlap), "\n".join(missing + stale + overlap)
    assert all(reason.strip() for reason in exempt.values())


# --- running the entry points -----------------------------------------------------------------
def hydra_value(value: Any) -> str:
    """`value` as a Hydra override value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        plain = re.fullmatch(r"[A-Za-z_/][\w./-]*", value) and value.lower() not in ("true", "false", "null", "nan", "inf")
        return value if plain else "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no Hydra spelling for {value!r}")


def resolve(value: Any, files) -> Any:
    return value(files) if callable(value) else value


def overrides_of(check: Reach, key: str, files) -> dict[str, Any]:
    sets = check.sets if check.sets is not None else {key: check.value}
    return {k: resolve(v, files) for k, v in {**check.needs, **sets}.items()}


def _plain_key(key: str) -> str:
    return key.lstrip("+")


def entries(table: dict[str, Reach | list[Reach]]) -> list[tuple[str, Reach]]:
    """(key, check) pairs: a key whose reach depends on a group choice has one check per choice."""
    return [(key, check) for key, value in table.items() for check in (value if isinstance(value, list) else [value])]


def packs(table: dict[str, Reach | list[Reach]], files, raw: dict[str, Any]) -> list[tuple[str, tuple, dict, list]]:
    """The runs: (level, scenario, overrides, [(key, check)]). Checks share a run unless they set the same
    key differently, or one sets a key that the other's interpolates (or the reverse), or one is `alone`.
    Checks whose observation depends on another key's value say so in `needs`, which keeps them apart."""
    refs = references(raw)

    def related(a: str, b: str) -> bool:
        return (a == b or a.startswith(b + ".") or b.startswith(a + ".")
                or any(r == a or r.startswith(a + ".") for r in refs.get(b, ()))
                or any(r == b or r.startswith(b + ".") for r in refs.get(a, ())))

    runs: list[tuple[str, tuple, dict, list]] = []
    for key, check in entries(table):
        sets = overrides_of(check, key, files)
        for level, scenario, overrides, checks in runs:
            if check.alone or level != check.level or scenario != check.scenario or any(c.alone for _, c in checks):
                continue
            clash = any(related(_plain_key(a), _plain_key(b)) and not (a == b and overrides[a] == v)
                        for a in overrides for b, v in sets.items())
            if not clash:
                overrides.update(sets)
                checks.append((key, check))
                break
        else:
            runs.append((check.level, check.scenario, dict(sets), [(key, check)]))
    return runs


@dataclass
class World:
    """What one run of an entry point built (None where it did not get that far)."""

    cfg: Any = None
    error: BaseException | None = None
    out: Path | None = None
    # ccp-train
    callbacks: list = field(default_factory=list)
    trainer: Any = None
    trainer_kwargs: dict = field(default_factory=dict)
    module: Any = None
    datamodule: Any = None
    fit: dict = field(default_factory=dict)
    log: str = ""
    export_info: dict | None = None
    # ccp-sample
    pipe: Any = None
    spec: Any = None
    sampler: dict = field(default_factory=dict)
    # ccp-eval
    result: dict | None = None
    metric: dict | None = None
    metric_calls: int = 0
    clip_predictor: str | None = None
    wandb: dict | None = None
    # any
    load_prior: list = field(default_factory=list)
    loads: list = field(default_factory=list)  # (what, path, local_files_only) of each outermost diffusers load
    hydra: Any = None

    @property
    def method(self):
        return self.module.method

    @property
    def loggers(self):
        return self.trainer.loggers

    @property
    def optimizer(self):
        return self._optimizers()["optimizer"]

    @property
    def lr_schedule(self):
        return self._optimizers()["lr_scheduler"]["scheduler"]

    def _optimizers(self):
        if not hasattr(self, "_built"):
            self.module.trainer = self.trainer  # configure_optimizers reads trainer.max_steps
            self._built = self.module.configure_optimizers()
        return self._built


class _Stop(Exception):
    """Raised by the recording Trainer.fit: everything fit would use has been built."""


def _spy_loads(monkeypatch, calls: list) -> None:
    """Record (what, path, local_files_only) of every outermost diffusers model, pipeline or config load."""
    from diffusers import DiffusionPipeline, ModelMixin
    from diffusers.configuration_utils import ConfigMixin
    from diffusers.loaders.single_file_model import FromOriginalModelMixin

    depth = [0]
    for owner, name in ((DiffusionPipeline, "from_pretrained"), (ModelMixin, "from_pretrained"),
                        (ConfigMixin, "load_config"), (FromOriginalModelMixin, "from_single_file")):
        def spy(cls, *args, _real=owner.__dict__[name].__func__, _name=name, **kwargs):
            if depth[0] == 0:
                path = args[0] if args else next(iter(kwargs.values()), None)
                calls.append((f"{cls.__name__}.{_name}", str(path), kwargs.get("local_files_only")))
            depth[0] += 1
            try:
                return _real(cls, *args, **kwargs)
            finally:
                depth[0] -= 1

        monkeypatch.setattr(owner, name, classmethod(spy))


def _spy(monkeypatch, owner, name, calls: list):
    real = getattr(owner, name)

    def spy(*args, **kwargs):
        calls.append({"fn": name, "args": args, **kwargs})
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_prior_dir, tiny_prior):
    """Folders and files the checks point keys at."""
    from ccp.methods.base import PromptTemplate
    from ccp.methods.export import write_export_info
    from ccp.methods.ours import NullTextConcept
    from ccp.models.null_text_unet import NullTextUNet2DConditionModel
    from ccp.priors.single_file import save_unet_single_file

    root = tmp_path_factory.mktemp("keys")
    rng = np.random.default_rng(0)

    def png(path, h=64, w=64, mode="RGB"):
        path.parent.mkdir(parents=True, exist_ok=True)
        shape = (h, w, 3) if mode == "RGB" else (h, w)
        PIL.Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
        return path

    for folder in ("ffhq", "ffhq2/ffhq", "images"):
        for i in range(3):
            png(root / folder / f"{i}.png")
    f = types.SimpleNamespace(root=root, root2=root / "ffhq2", images=root / "images", prior_dir=Path(tiny_prior_dir),
                              controlnet=Path(tiny_prior_dir) / "controlnet")
    f.prior_link = root / "prior-link"
    f.prior_link.symlink_to(tiny_prior_dir, target_is_directory=True)
    f.controlnet_link = root / "controlnet-link"
    f.controlnet_link.symlink_to(f.controlnet, target_is_directory=True)
    f.photo, f.edges = png(root / "photo.png"), png(root / "edges.png")
    f.odd_png = png(root / "odd.png", h=48, w=40)
    f.mask = png(root / "mask.png", mode="L")
    for name in ("inception", "inception2", "clip"):
        setattr(f, name, root / f"{name}.pth")
        getattr(f, name).write_bytes(b"not read: the checks only need the file to exist")
    f.concept = root / "concept"
    NullTextUNet2DConditionModel.from_prior(tiny_prior.unet, tiny_prior.text_encoder, tiny_prior.tokenizer).save_pretrained(
        f.concept)
    f.lora = _write_lora(tiny_prior.unet, root / "lora")
    f.single_file = root / "single.safetensors"
    save_unet_single_file(tiny_prior.unet, f.single_file)
    f.export = root / "export"
    NullTextConcept(tiny_prior, PromptTemplate()).export(f.export)
    write_export_info(f.export, "ours", str(tiny_prior_dir), PromptTemplate(), 0, False)
    f.export_link = root / "export-link"
    f.export_link.symlink_to(f.export, target_is_directory=True)
    return f


def _write_lora(unet, folder: Path) -> Path:
    import copy

    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    trained = copy.deepcopy(unet)
    trained.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(trained))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


def hydra_config(entry: str, overrides: list[str]) -> DictConfig:
    """`entry`'s config with Hydra's own section (run folder), as the CLI composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(entry, overrides=overrides, return_hydra_config=True)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def run_train(files, overrides: list[str], level: str, run_dir: Path) -> World:
    from ccp.training import run as train_run

    w = World(out=run_dir)
    if level == "hydra":
        w.hydra = hydra_config("train", overrides).hydra
        return w
    with pytest.MonkeyPatch.context() as mp:
        w.cfg = cfg = compose("train", overrides)
        if level == "check":
            try:
                w.callbacks = train_run.check_config(cfg, run_dir).callbacks
            except Exception as err:  # noqa: BLE001 - refusals are observations
                w.error = err
            return w
        _spy(mp, train_run, "load_prior", w.load_prior)
        real_init = L.Trainer.__init__

        def init(trainer, *args, **kwargs):
            w.trainer, w.trainer_kwargs = trainer, kwargs
            real_init(trainer, *args, **kwargs)

        mp.setattr(L.Trainer, "__init__", init)
        if level != "export":
            def fit(trainer, model, datamodule=None, ckpt_path=None, **kwargs):
                w.module, w.datamodule, w.fit = model, datamodule, {"ckpt_path": ckpt_path, **kwargs}
                w.callbacks = trainer.callbacks
                raise _Stop

            mp.setattr(L.Trainer, "fit", fit)
        records, ccp_log = _Records(), logging.getLogger("ccp")
        level = ccp_log.level
        ccp_log.addHandler(records)
        ccp_log.setLevel(logging.INFO)
        try:
            export = train_run.run_training(cfg, run_dir)
            w.export_info = json.loads((export / "ccp_export.json").read_text())
        except _Stop:
            pass
        except Exception as err:  # noqa: BLE001
            w.error = err
        finally:
            ccp_log.removeHandler(records)
            ccp_log.setLevel(level)
        w.log = "\n".join(records.lines)
    return w


def run_sample(files, overrides: list[str], level: str, out: Path) -> World:
    from ccp.pipelines import run as sample_run

    w = World(out=out)
    if level == "hydra":
        w.hydra = hydra_config("sample", overrides).hydra
        return w
    with pytest.MonkeyPatch.context() as mp:
        _spy(mp, sample_run, "load_prior", w.load_prior)
        _spy_loads(mp, w.loads)
        real = sample_run.sample_batches

        def sample_batches(pipe, guidance, indices, **kwargs):
            w.pipe, w.spec, w.sampler = pipe, guidance, {"indices": list(indices), **kwargs}
            return real(pipe, guidance, indices, **kwargs)

        mp.setattr(sample_run, "sample_batches", sample_batches)
        try:
            w.cfg = cfg = compose("sample", overrides)
            sample_run.run_sampling(cfg, out)
        except Exception as err:  # noqa: BLE001
            w.error = err
    return w


def run_eval(files, overrides: list[str], level: str, out: Path) -> World:
    import wandb

    import ccp.evaluation.attributes as attributes
    import ccp.priors.loading as loading
    from ccp.evaluation import run as eval_run

    w = World(out=out)
    if level == "hydra":
        w.hydra = hydra_config("eval", overrides).hydra
        return w

    def recorder(name, params):
        def metric(*args, **kwargs):
            w.metric = {"name": name, "args": {**dict(zip(params, args)), **kwargs}}
            w.metric_calls += 1
            return 0.5, {"num_samples": 2}
        return metric

    class Predictor:
        def __init__(self, weights, device=None):
            w.clip_predictor = str(weights)

    def init(**kwargs):
        w.wandb = kwargs
        return types.SimpleNamespace(dir=str(out / "wandb" / "files"), log=lambda *a, **k: None, summary={},
                                     finish=lambda *a, **k: None)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(eval_run, "fid_metric", recorder("fid", ("model", "sampling", "fid")))
        mp.setattr(eval_run, "text_metric", recorder("text", ("model", "config", "predictor")))
        mp.setattr(eval_run, "spatial_metric", recorder("spatial", ("model", "config", "condition_dir", "controlnet")))
        mp.setattr(attributes, "CLIPAttributePredictor", Predictor)
        mp.setattr(wandb, "init", init)
        _spy(mp, eval_run, "load_prior", w.load_prior)
        _spy(mp, loading, "load_controlnet", w.load_prior)
        try:
            w.cfg = cfg = compose("eval", overrides)
            for _ in range(2 if level == "rerun" else 1):
                w.result = eval_run.run_eval(cfg, out)
        except Exception as err:  # noqa: BLE001
            w.error = err
    return w


RUNNERS = {"train": run_train, "sample": run_sample, "eval": run_eval}


def base_overrides(entry: str, files) -> dict[str, Any]:
    if entry == "train":
        return {"prior.path": files.prior_dir, "paths.data_dir": files.root}
    if entry == "sample":
        return {"prior.path": files.prior_dir, "sampling.height": 64, "sampling.width": 64, "sampling.steps": 2,
                "sampling.num_images": 1, "sampling.batch_size": 1}
    return {"export.path": files.export, "fid.real_path": files.images, "fid.inception_weights": files.inception,
            "sampling.height": 64, "sampling.width": 64, "sampling.steps": 2, "sampling.batch_size": 2,
            "fid.num_samples": 4}


def _equal(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - e.g. tensors
        return False


def composed_value(cfg: DictConfig, key: str) -> Any:
    try:
        value = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
    except Exception:  # noqa: BLE001 - Hydra-only resolvers outside Hydra
        return leaves(cfg).get(key)
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def reach_failures(entry: str, files, tmp_path: Path) -> list[str]:
    table, _ = TABLES[entry]
    base = base_overrides(entry, files)
    defaults: dict[tuple, DictConfig] = {}  # per scenario: the config a check's value must differ from
    raw: dict[str, Any] = {}
    for scenario in dict.fromkeys(check.scenario for _, check in entries(table)):
        cfg = compose(entry, [*scenario, *(f"{k}={hydra_value(v)}" for k, v in base.items())])
        defaults[scenario] = with_output_dir(cfg, tmp_path / "default")
        raw.update(leaves(cfg))
    failures = [f"{key}: no composed config has it any more (see the walk test)" for key, c in entries(table)
                if c.sets is None and key not in raw]
    present = {key: value for key, value in table.items() if key in raw or any(c.sets for _, c in entries({key: value}))}
    for i, (level, scenario, sets, checks) in enumerate(packs(present, files, raw)):
        merged = {**base, **sets}
        overrides = [*scenario, *(f"{k}={hydra_value(v)}" for k, v in merged.items())]
        where = f"[run {i}: {level}{', ' + ' '.join(scenario) if scenario else ''}]"
        try:
            compose(entry, overrides)
        except Exception as err:  # noqa: BLE001 - e.g. a `needs` key that no longer exists
            failures.append(f"{where} does not compose ({', '.join(k for k, _ in checks)} unobserved): {err}")
            continue
        world = RUNNERS[entry](files, overrides, level, tmp_path / f"run{i}")
        if world.error is not None and not any(c.alone for _, c in checks):
            failures.append(f"{where} stopped before its {len(checks)} key(s) could be observed "
                            f"({', '.join(k for k, _ in checks)}): {type(world.error).__name__}: {world.error}"
                            f"\n    overrides: {' '.join(overrides)}")
            continue
        for key, check in checks:
            value = resolve(check.value, files)
            default = composed_value(defaults[scenario], key)
            if check.sets is None and _equal(value, default) != check.default:
                failures.append(f"{key}: the check's value {value!r} is the default, so it cannot fail; pick another"
                                if not check.default else f"{key}: {value!r} is marked default=True but the default is {default!r}")
                continue
            want = value if check.want is SAME else resolve(check.want, files)
            try:
                seen = check.seen(world)
            except Exception as err:  # noqa: BLE001
                seen = f"<{type(err).__name__}: {err}>"
            if not _equal(seen, want):
                detail = f" (the run ended with {type(world.error).__name__}: {world.error})" if check.alone else ""
                failures.append(f"{key}={value!r} did not reach its code: observed {seen!r}, expected {want!r}{detail} {where}")
    return failures


@pytest.mark.parametrize("entry", ["train", "sample", "eval"])
def test_keys_reach_their_code(entry, files, tmp_path):
    failures = reach_failures(entry, files, tmp_path)
    assert not failures, f"{len(failures)} key(s) of {entry} did not reach their code:\n" + "\n".join(failures)
