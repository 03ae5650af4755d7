"""A few random images: as a Lightning datamodule (training-loop tests that need no files) or
as a folder of PNG files (tests that train through ccp-train)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset

from ccp.training.sampler import resumable_loader


class Pixels(Dataset):
    def __init__(self, n: int = 6, size: int = 64):
        self.images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i]}


class PixelData(L.LightningDataModule):
    """`Pixels` through the resumable loader (batch 2, seed 3), positioned by the trainer on resume."""

    def __init__(self, n: int = 6, size: int = 64):
        super().__init__()
        self.n, self.size = n, size

    def train_dataloader(self):
        return resumable_loader(Pixels(self.n, self.size), batch_size=2, trainer=self.trainer, seed=3)


def write_random_pngs(folder: Path, count: int = 6, seed: int = 0, size: int = 64) -> Path:
    """`count` random size x size RGB PNGs 0.png, 1.png, ... in `folder` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        PIL.Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder
