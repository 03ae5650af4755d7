"""A few random images as a Lightning datamodule, for training-loop tests that need no files."""

from __future__ import annotations

import lightning as L
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
