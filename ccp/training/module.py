"""The one training loop: every personalization method trains through `PersonalizationModule`.

Per step: latents (cached, or encoded by the frozen VAE), noise and timesteps from a generator
seeded by (seed, step, rank) so that a resumed run repeats an uninterrupted one exactly, the
method's prediction under its own condition, MSE to the scheduler's target, AdamW. Options, off
by default (the paper's setting): Min-SNR-gamma loss weights, a noise offset, a learning-rate
schedule (`ccp.training.schedules`) and TF32 matmuls (docs/training.md).

Options reach the module as one `TrainingConfig`: a typed dataclass per section of the training
config (``optim``, ``loss``, ``speed``, ``prior_preservation``), filled by field name, so a new option
is its yaml key plus the field its user reads. ccp-train checks them once, before the prior loads.

Precision: trainable weights are fp32 master weights whatever dtype the prior was loaded in (frozen
parts may stay bf16/fp16); the compute dtype comes from the trainer's mixed precision.
Many processes: a non-finite loss on any rank stops every rank at the same optimizer step, before
the update, through one all-reduce per optimizer step (none per micro-step).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
from omegaconf import DictConfig, OmegaConf

from ccp.config import ConfigError
from ccp.methods.base import Method
from ccp.methods.export import TrainedModel, in_memory
from ccp.training.class_images import ClassImagesConfig, class_images_config
from ccp.training.data import split_class_batch
from ccp.training.latent_cache import needs_upcast
from ccp.training.optim import build_optimizer
from ccp.training.schedules import build_lr_scheduler, min_snr_weights

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message says what to change."""


class CheckpointMismatchError(ConfigError, RuntimeError):
    """A checkpoint's trainable tensors do not match the method being resumed."""


def to_fp32_master_weights(method: Method) -> int:
    """Cast the method's own tensors (its trainable parts) to fp32 in place; frozen prior parts,
    held outside its module tree, keep their dtype. Returns how many tensors were cast."""
    cast = 0
    for module in method.modules():
        for tensors in (module._parameters, module._buffers):
            for key, t in tensors.items():
                if t is not None and t.is_floating_point() and t.dtype != torch.float32:
                    if isinstance(t, torch.nn.Parameter):
                        t.data = t.data.float()
                    else:
                        tensors[key] = t.float()
                    cast += 1
    return cast


class UnknownOptionError(ConfigError, ValueError):
    """A key of a training-config section that no option takes (a misspelling, most often)."""


def section_from_cfg(cls, node, section: str):
    """The dataclass `cls` filled from the config section `node` by field name (an absent key keeps
    its default); a key that no field takes is refused, since nothing would ever read it."""
    values = OmegaConf.to_container(node, resolve=True) if node is not None else {}
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {section}.{close[0]}?" if close else f"{section} takes: {', '.join(names)}"
            raise UnknownOptionError(f"{section}.{key}: no training option reads it; {hint}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@dataclass(frozen=True)
class OptimConfig:
    """``optim.*``: the optimiser (`ccp.training.optim`) and its learning-rate schedule (`ccp.training.schedules`)."""

    name: str = "adamw"
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    num_cycles: int = 1
    power: float = 1.0


@dataclass(frozen=True)
class LossConfig:
    """``loss.*``: options of the MSE to the scheduler's target, off by default (the paper's loss)."""

    snr_gamma: float | None = None
    noise_offset: float = 0.0


@dataclass(frozen=True)
class SpeedConfig:
    """``speed.*``: memory and speed switches; none changes what a step computes."""

    gradient_checkpointing: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_backend: str | Callable = "inductor"


@dataclass(frozen=True)
class TrainingConfig:
    """What `PersonalizationModule` is configured with: one typed object per section of the
    training config, built once (and checked) before the prior loads."""

    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    speed: SpeedConfig = SpeedConfig()
    prior_preservation: ClassImagesConfig = ClassImagesConfig()
    seed: int = 0
    allow_tf32: bool | None = None  # trainer.allow_tf32; None leaves torch's process-wide setting

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> TrainingConfig:
        """From the composed ccp-train config (`ccp.training.run.check_config` checks the values)."""
        node = cfg.get("prior_preservation")
        return cls(
            optim=section_from_cfg(OptimConfig, cfg.optim, "optim"),
            loss=section_from_cfg(LossConfig, cfg.get("loss"), "loss"),
            speed=section_from_cfg(SpeedConfig, cfg.speed, "speed"),
            prior_preservation=class_images_config(OmegaConf.to_container(node, resolve=True) if node is not None else None),
            seed=cfg.seed,
            allow_tf32=cfg.trainer.get("allow_tf32"),
        )


class PersonalizationModule(L.LightningModule):
    """The training loop of every method. `config`'s values are not checked here: ccp-train checks
    them once, before the prior loads (`ccp.training.run.check_config`)."""

    def __init__(
        self,
        method: Method,
        noise_scheduler: DDPMScheduler,
        vae: AutoencoderKL | None = None,
        prior: StableDiffusionPipeline | None = None,
        config: TrainingConfig = TrainingConfig(),
    ):
        super().__init__()
        self.config = config
        # Prior preservation (batches with class images): the method conditions the class rows on
        # the class prompt (set before the fp32 cast, which then covers its cached embedding);
        # loss = mse(instance) + prior_loss_weight * mse(class).
        if config.prior_preservation.enabled:
            method.use_class_prompt(config.prior_preservation.class_prompt)
        cast = to_fp32_master_weights(method)
        if cast:
            log.info("%s: %d trainable tensor(s) cast to fp32 master weights (frozen parts keep their dtype)",
                     method.name, cast)
        self.method = method
        self.noise_scheduler = noise_scheduler
        self._vae = [vae]  # frozen; a list keeps it out of the module tree and the checkpoints
        self._vae_fp32 = None  # [fp32 copy] when an fp16 SDXL VAE encodes pixels
        self._prior = [prior]  # what validation and metric callbacks sample the method on
        self._tf32_before: tuple[bool, bool] | None = None
        self.strict_loading = False  # checkpoints hold only the trainable state; on_load_checkpoint checks it
        self._step_started = None
        self._nonfinite: torch.Tensor | None = None  # on the device: set by any micro-step since the last update
        self._apply_speedups(config.speed)
        # The training forward is compiled as a function; validation calls the plain modules, so
        # its other shapes and eval mode never recompile (or invalidate) the training graph.
        self._compiled_predict = (torch.compile(method.predict_noise, backend=config.speed.compile_backend)
                                  if config.speed.compile else None)

    @property
    def vae(self) -> AutoencoderKL | None:
        return self._vae[0]

    def trained_model(self) -> TrainedModel:
        """The method's current weights in a GCFG pipeline (callbacks sample it), sharing the
        method's modules; prior parts stay where they are (`sampling_on` moves them for a sample)."""
        prior = self._prior[0]
        if prior is None:
            raise RuntimeError("this PersonalizationModule was built without prior=; sampling callbacks need it")
        return in_memory(self.method, prior)

    def _apply_speedups(self, speed: SpeedConfig) -> None:
        # A text encoder the method trains (DreamBooth's train_text_encoder) recomputes its
        # activations too, as diffusers' train_dreambooth.py does with --gradient_checkpointing.
        encoder = getattr(self.method, "text_encoder", None)
        trained = isinstance(encoder, torch.nn.Module) and any(p.requires_grad for p in encoder.parameters())
        if speed.gradient_checkpointing and trained and hasattr(encoder, "gradient_checkpointing_enable"):
            encoder.gradient_checkpointing_enable()
        # The UNet, and a trained ControlNet (diffusers' train_controlnet.py checkpoints that one).
        for model in (getattr(self.method, "unet", None), getattr(self.method, "controlnet", None)):
            if model is None:
                continue
            if speed.gradient_checkpointing:
                model.enable_gradient_checkpointing()
            if speed.channels_last:
                model.to(memory_format=torch.channels_last)

    # --- devices ---------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        half = [n for n, p in self.method.named_parameters() if p.requires_grad and p.dtype != torch.float32]
        if half:  # e.g. trainer.precision=bf16-true converted the whole module
            raise TypeError(f"trainable weights must stay fp32 master weights, but {len(half)} are not (e.g. {half[0]}); "
                            "use trainer.precision=bf16-mixed (or 16-mixed) instead of a *-true half precision")
        self.method.move_frozen(self.device)
        if self.vae is not None:
            self.vae.to(self.device).requires_grad_(False).eval()
        self.noise_scheduler.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device)
        if self.config.allow_tf32 is not None:  # process-wide flags: restored when the fit ends
            self._tf32_before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(self.config.allow_tf32)

    def on_fit_end(self) -> None:
        if self._tf32_before is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self._tf32_before
            self._tf32_before = None

    # --- checkpoints hold only what was trained ----------------------------------------------
    def _checkpoint_keys(self) -> set[str]:
        return {f"method.{k}" for k in self.method.trainable_state_dict()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self._checkpoint_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # strict for what a checkpoint must hold (Lightning's own strict check would also demand
        # the frozen tensors it deliberately leaves out)
        expected, found = self._checkpoint_keys(), set(checkpoint.get("state_dict", {}))
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        if missing or unexpected:
            detail = "; ".join(part for part in (
                f"{len(missing)} trainable tensor(s) missing, e.g. {missing[:3]}" if missing else "",
                f"{len(unexpected)} unknown, e.g. {unexpected[:3]}" if unexpected else "") if part)
            raise CheckpointMismatchError(
                f"the checkpoint does not match method {self.method.name!r} ({detail}). It was written by "
                "another method or method settings; resume from a checkpoint of this run, or start fresh "
                "with resume=null (or a new run_name)")

    # --- the step --------------------------------------------------------------------------
    def _generator(self, batch_idx: int) -> torch.Generator:
        # One stream per (seed, optimizer step, micro-batch, rank): independent of restarts, since
        # checkpoints fall on optimizer-step boundaries.
        micro = batch_idx % (self.trainer.accumulate_grad_batches if self._trainer else 1)
        key = (self.config.seed * 1_000_003 + self.global_step) * 1_000_003 + micro * 1009 + self.global_rank
        return torch.Generator(device=self.device).manual_seed(key % (2**63))

    @torch.no_grad()
    def latents_from_batch(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """Scaled latents: as cached, sampled from a cached posterior, or encoded now by the VAE."""
        if "latents" in batch:
            return batch["latents"]
        if self.vae is None:
            raise ValueError("batches of pixels or posteriors need the prior's VAE (its scaling); pass vae=prior.vae")
        if "latent_mean" in batch:  # cached posterior: sample it as an encode would, from the step's generator
            mean = batch["latent_mean"]
            latents = mean + batch["latent_std"] * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        else:
            vae = self._encoding_vae()
            pixels = batch["pixel_values"].to(vae.dtype)
            latents = vae.encode(pixels).latent_dist.sample(generator=generator)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    @property
    def upcast_vae(self) -> bool:
        """SDXL's fp16 VAE overflows: it encodes in fp32 (force_upcast), as diffusers' SDXL scripts do."""
        return needs_upcast(self.vae, getattr(self.method, "sdxl", False))

    def _encoding_vae(self) -> AutoencoderKL:
        if not self.upcast_vae:
            return self.vae
        if self._vae_fp32 is None:  # an fp32 copy: the prior's VAE (shared) keeps its dtype
            self._vae_fp32 = [copy.deepcopy(self.vae).float()]
        return self._vae_fp32[0]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        generator = self._generator(batch_idx)
        batch, class_batch = split_class_batch(batch)
        latents = self.latents_from_batch(batch, generator).float()
        num_class = 0
        if class_batch:  # prior preservation: class rows after the instance rows, as diffusers concatenates
            class_latents = self.latents_from_batch(class_batch, generator).float()
            num_class = class_latents.shape[0]
            latents = torch.cat([latents, class_latents])
        noise = torch.randn(latents.shape, generator=generator, device=self.device)
        loss_options = self.config.loss
        if loss_options.noise_offset:  # drawn only when on, so runs without it keep their random streams
            offset = torch.randn((*latents.shape[:2], 1, 1), generator=generator, device=self.device)
            noise = noise + float(loss_options.noise_offset) * offset
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=self.device
        )
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        predict = self._compiled_predict or self.method.predict_noise
        inputs = self.method.batch_inputs(batch, generator)
        if num_class:  # the class rows' own inputs (SDXL: their images' time ids) after the instance rows'
            inputs = join_inputs(inputs, self.method.batch_inputs(class_batch, generator))
            inputs["num_class"] = num_class
        prediction = predict(noisy, timesteps, **inputs)
        prior_loss = None
        if num_class:
            n = latents.shape[0] - num_class
            prior_loss = F.mse_loss(prediction[n:].float(), target[n:].float())
            prediction, target, timesteps = prediction[:n], target[:n], timesteps[:n]
        if loss_options.snr_gamma is None:
            loss = F.mse_loss(prediction.float(), target.float())
        else:
            squared = F.mse_loss(prediction.float(), target.float(), reduction="none")
            per_sample = squared.mean(dim=tuple(range(1, squared.ndim)))
            loss = (per_sample * min_snr_weights(self.noise_scheduler, timesteps, loss_options.snr_gamma)).mean()
        if prior_loss is not None:  # Min-SNR weights (if on) apply to the instance part only
            self.log("train/prior_loss", prior_loss.detach(), on_step=True, batch_size=num_class)
            loss = loss + float(self.config.prior_preservation.prior_loss_weight) * prior_loss
        bad = ~torch.isfinite(loss.detach())  # stays on the device: checked once per optimizer step
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=latents.shape[0])
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """After every micro-step's backward, before the update: if any rank saw a non-finite loss,
        every rank raises here at the same step, so no weight (and no later checkpoint) is touched."""
        if self._nonfinite is None:
            return
        flag, self._nonfinite = self._nonfinite, None
        ranks = self.trainer.strategy.reduce(flag.float(), reduce_op="sum")  # one all-reduce per update
        if ranks.item() > 0:
            raise NonFiniteLossError(
                f"non-finite loss on {int(ranks.item())} of {self.trainer.world_size} rank(s) before optimizer step "
                f"{self.global_step + 1}; every rank stops here, without updating. The last checkpoint is intact. "
                "Lower optim.lr, enable gradient clipping (trainer.gradient_clip_val), or use bf16-mixed instead of 16-mixed."
            )

    def on_train_batch_start(self, batch, batch_idx):
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        elapsed = time.perf_counter() - (self._step_started or time.perf_counter())
        size = next(v for v in batch.values() if torch.is_tensor(v)).shape[0] * self.trainer.world_size
        self.log("train/step_time_s", elapsed, on_step=True, batch_size=1)
        self.log("train/images_per_s", size / max(elapsed, 1e-9), on_step=True, prog_bar=True, batch_size=1)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, batch_size=1)
        if self.device.type == "cuda":
            self.log("train/peak_memory_gb", torch.cuda.max_memory_allocated(self.device) / 2**30, on_step=True, batch_size=1)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Gradients are not needed until the next backward: freed now, they take no memory during
        # validation, metrics and checkpoint saves (Lightning would only zero them before the next step).
        optimizer.zero_grad(set_to_none=True)
        self.method.on_after_optimizer_step()

    def configure_optimizers(self):
        # A method may train some parameters at their own learning rate (extra_param_groups:
        # [{"params": [...], "lr": ...}]); the rest form the first group, at optim.lr.
        extra = self.method.extra_param_groups() if hasattr(self.method, "extra_param_groups") else []
        grouped = {id(p) for group in extra for p in group["params"]}
        params = [p for p in self.method.trainable_parameters() if id(p) not in grouped]
        if not params:
            raise ValueError(f"method {self.method.name!r} has no trainable parameters")
        optim = self.config.optim
        optimizer = build_optimizer(params, optim.name, lr=optim.lr, betas=optim.betas,
                                    weight_decay=optim.weight_decay, eps=optim.eps)
        for group in extra:
            optimizer.add_param_group(dict(group))
        max_steps = self.trainer.max_steps if self._trainer is not None else None
        schedule = build_lr_scheduler(optimizer, optim.lr_scheduler, int(optim.warmup_steps), max_steps,
                                      optim.num_cycles, optim.power)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def join_inputs(rows: dict, class_rows: dict) -> dict:
    """`predict_noise` inputs of instance rows and class rows, tensors concatenated in that order."""
    if rows.keys() != class_rows.keys():
        raise ValueError(f"instance and class batches gave different inputs: {sorted(rows)} vs {sorted(class_rows)}")
    return {k: torch.cat([v, class_rows[k]]) for k, v in rows.items()}


def accumulation_steps(global_batch: int, per_device_batch: int, world_size: int) -> int:
    """Gradient accumulation that makes per-device x devices x accumulation == global batch."""
    per_step = per_device_batch * world_size
    if global_batch % per_step:
        raise ValueError(
            f"global batch {global_batch} is not a multiple of per-device batch {per_device_batch} x {world_size} "
            f"device(s) = {per_step}; change trainer.global_batch_size or data.batch_size"
        )
    return global_batch // per_step
