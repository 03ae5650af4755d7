"""A data order that is a pure function of (seed, position), so a resumed run sees exactly the
batches an uninterrupted one would, on any number of ranks."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler


class ResumableSampler(Sampler[int]):
    """Infinite stream of dataset indices: epoch e is ``randperm(n, seed + e)``; rank r of W takes
    every W-th index of the stream. ``start`` (in samples per rank) skips what a checkpointed run
    already consumed. It has no length on purpose: Lightning then runs one endless epoch bounded
    by ``max_steps``, so gradient accumulation never meets a short epoch end.

    With ``flip_variants`` the index space is doubled: index ``i + n`` means image ``i`` flipped,
    so the flip is part of the reproducible order instead of worker randomness.
    """

    def __init__(self, num_items: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if num_items < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.num_items = num_items
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.start = 0

    def _epoch(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_items)
        # (seed, epoch) mixed, not added: seed + epoch would give seed s at epoch e + 1 the order of
        # seed s + 1 at epoch e, correlating runs that differ only in their seed
        mixed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)
        return torch.randperm(self.num_items, generator=torch.Generator().manual_seed(mixed))

    def __iter__(self) -> Iterator[int]:
        position = self.start * self.world_size + self.rank  # position in the global stream
        epoch, offset = divmod(position, self.num_items)
        order = self._epoch(epoch)
        while True:
            while offset < self.num_items:
                yield int(order[offset])
                offset += self.world_size
            epoch += 1
            offset -= self.num_items
            order = self._epoch(epoch)


def resumable_loader(dataset, batch_size: int, trainer=None, seed: int = 0, shuffle: bool = True, **loader_kwargs) -> DataLoader:
    """A DataLoader over `ResumableSampler` positioned after what `trainer` already consumed.

    Call it from a ``train_dataloader()`` hook: Lightning calls that after restoring a
    checkpoint, so ``trainer.global_step`` is the resumed step (checkpoints fall on optimizer
    steps, so consumed samples per rank = step x accumulation x batch).
    """
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    sampler = ResumableSampler(len(dataset), seed=seed, rank=rank, world_size=world, shuffle=shuffle)
    if trainer is not None:
        sampler.start = trainer.global_step * trainer.accumulate_grad_batches * batch_size
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **loader_kwargs)
