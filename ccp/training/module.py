"""The one training loop: every personalization method trains through `PersonalizationModule`.

Per step: latents (cached, or encoded by the frozen VAE), noise and timesteps from a generator
seeded by (seed, step, rank) so that a resumed run repeats an uninterrupted one exactly, the
method's prediction under its own condition, MSE to the scheduler's target, AdamW.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline

from ccp.methods.base import Method
from ccp.methods.export import TrainedModel, in_memory


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message says what to change."""


class PersonalizationModule(L.LightningModule):
    def __init__(
        self,
        method: Method,
        noise_scheduler: DDPMScheduler,
        vae: AutoencoderKL | None = None,
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-2,
        eps: float = 1e-8,
        warmup_steps: int = 0,
        seed: int = 0,
        gradient_checkpointing: bool = False,
        channels_last: bool = False,
        prior: StableDiffusionPipeline | None = None,
    ):
        super().__init__()
        self.method = method
        self.noise_scheduler = noise_scheduler
        self._vae = [vae]  # frozen; a list keeps it out of the module tree and the checkpoints
        self._prior = [prior]  # what validation and metric callbacks sample the method on
        self.lr, self.betas, self.weight_decay, self.eps, self.warmup_steps = lr, tuple(betas), weight_decay, eps, warmup_steps
        self.seed = seed
        self.strict_loading = False  # checkpoints hold only the method's trainable state
        self._step_started = None
        self._apply_speedups(gradient_checkpointing, channels_last)

    @property
    def vae(self) -> AutoencoderKL | None:
        return self._vae[0]

    def trained_model(self) -> TrainedModel:
        """The method's current weights in a GCFG pipeline on this module's device (callbacks sample it)."""
        prior = self._prior[0]
        if prior is None:
            raise RuntimeError("this PersonalizationModule was built without prior=; sampling callbacks need it")
        model = in_memory(self.method, prior)
        model.pipe.to(self.device)
        return model

    def _apply_speedups(self, gradient_checkpointing: bool, channels_last: bool) -> None:
        unet = getattr(self.method, "unet", None)
        if unet is None:
            return
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if channels_last:
            unet.to(memory_format=torch.channels_last)

    # --- devices ---------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.method.move_frozen(self.device)
        if self.vae is not None:
            self.vae.to(self.device).requires_grad_(False).eval()
        self.noise_scheduler.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device)

    # --- checkpoints hold only what was trained ----------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = {f"method.{k}" for k in self.method.trainable_state_dict()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    # --- the step --------------------------------------------------------------------------
    def _generator(self, batch_idx: int) -> torch.Generator:
        # One stream per (seed, optimizer step, micro-batch, rank): independent of restarts, since
        # checkpoints fall on optimizer-step boundaries.
        micro = batch_idx % (self.trainer.accumulate_grad_batches if self._trainer else 1)
        key = (self.seed * 1_000_003 + self.global_step) * 1_000_003 + micro * 1009 + self.global_rank
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
            pixels = batch["pixel_values"].to(self.vae.dtype)
            latents = self.vae.encode(pixels).latent_dist.sample(generator=generator)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        generator = self._generator(batch_idx)
        latents = self.latents_from_batch(batch, generator).float()
        noise = torch.randn(latents.shape, generator=generator, device=self.device)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=self.device
        )
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        prediction = self.method.predict_noise(noisy, timesteps, **self.method.batch_inputs(batch, generator))
        loss = F.mse_loss(prediction.float(), target.float())
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss is {loss.item()} at step {self.global_step}; stopping. The last checkpoint is intact. "
                "Lower trainer.lr, enable gradient clipping (trainer.gradient_clip_val), or use bf16-mixed instead of fp16."
            )
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=latents.shape[0])
        return loss

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

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.method.on_after_optimizer_step()

    def configure_optimizers(self):
        params = list(self.method.trainable_parameters())
        if not params:
            raise ValueError(f"method {self.method.name!r} has no trainable parameters")
        optimizer = torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay, eps=self.eps)
        warmup = max(0, int(self.warmup_steps))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def accumulation_steps(global_batch: int, per_device_batch: int, world_size: int) -> int:
    """Gradient accumulation that makes per-device x devices x accumulation == global batch."""
    per_step = per_device_batch * world_size
    if global_batch % per_step:
        raise ValueError(
            f"global batch {global_batch} is not a multiple of per-device batch {per_device_batch} x {world_size} "
            f"device(s) = {per_step}; change trainer.global_batch_size or data.batch_size"
        )
    return global_batch // per_step
