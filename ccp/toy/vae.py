"""The toy prior's VAE: a small `diffusers.AutoencoderKL` (4x down, 4 latent channels, like SD's
8x / 4) trained from scratch with Lightning on the prior's plain digit images.

Loss: L1 reconstruction of a posterior sample plus a small KL term (SD's VAE also keeps the KL
weight tiny, so latents stay informative); no perceptual or GAN loss at this size. After
training, the scaling factor is set as SD's was: 1 / std of the training latents, so that the
diffusion UNet sees unit-variance latents.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from diffusers import AutoencoderKL

from ccp.io import write_dir_atomic
from ccp.training.progress import StepProgressBar

log = logging.getLogger(__name__)

TOY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
    scaling_factor=1.0,  # replaced by 1 / latent std after training
)


class ToyVAEModule(L.LightningModule):
    def __init__(self, vae: AutoencoderKL, images: torch.Tensor, batch_size: int, lr: float, kl_weight: float, seed: int):
        super().__init__()
        self.vae = vae
        self.images = images  # float [N, 3, H, W] in [-1, 1]
        self.batch_size, self.lr, self.kl_weight, self.seed = batch_size, lr, kl_weight, seed

    def train_dataloader(self):
        # Indices from a seeded generator: one batch per step, the same on every run.
        generator = torch.Generator().manual_seed(self.seed)
        steps = self.trainer.max_steps
        order = torch.randint(0, len(self.images), (steps, self.batch_size), generator=generator)
        return torch.utils.data.DataLoader(order, batch_size=None)

    def training_step(self, index, batch_idx):
        pixels = self.images[index].to(self.device)
        generator = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + self.global_step)
        posterior = self.vae.encode(pixels).latent_dist
        reconstruction = self.vae.decode(posterior.sample(generator=generator)).sample
        l1 = (reconstruction - pixels).abs().mean()
        loss = l1 + self.kl_weight * posterior.kl().mean()
        self.log("vae/l1", l1, prog_bar=True, batch_size=len(index))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.vae.parameters(), lr=self.lr, weight_decay=0.0)


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float in [-1, 1]."""
    return images_uint8.float() / 127.5 - 1.0


@torch.no_grad()
def latent_std(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> float:
    means = [vae.encode(images[i : i + batch_size]).latent_dist.mean for i in range(0, len(images), batch_size)]
    return float(torch.cat(means).std())


@torch.no_grad()
def reconstruction_l1(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> float:
    """Mean absolute error in [-1, 1] units of decode(posterior mean)."""
    total = 0.0
    for i in range(0, len(images), batch_size):
        part = images[i : i + batch_size]
        total += float((vae.decode(vae.encode(part).latent_dist.mean).sample - part).abs().sum())
    return total / images.numel()


def train_toy_vae(
    images_uint8: torch.Tensor,
    out_dir: str | Path,
    steps: int = 400,
    batch_size: int = 32,
    lr: float = 2e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
    progress: bool = True,
) -> AutoencoderKL:
    """Train, set the scaling factor, and save to `out_dir` (written to a temporary folder first,
    so an interrupted run leaves no half-saved VAE). Short enough to redo rather than resume."""
    out_dir = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**TOY_VAE_CONFIG)
    images = to_model_range(images_uint8)
    module = ToyVAEModule(vae, images, batch_size, lr, kl_weight, seed)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_model_summary=False, callbacks=[StepProgressBar()] if progress else [], enable_progress_bar=progress,
    )
    trainer.fit(module)
    vae.eval()
    std = latent_std(vae, images)
    vae.register_to_config(scaling_factor=1.0 / std)
    log.info("toy VAE: %d steps, reconstruction L1 %.4f, latent std %.3f", steps, reconstruction_l1(vae, images[:512]), std)
    write_dir_atomic(out_dir, vae.save_pretrained)
    return vae
