"""Data order: every image is read exactly once per pass over the data, summed over all ranks, for
sizes that divide neither the world size nor the batch, across pass boundaries and resumes.

Ranks are simulated: one loader per rank, built as ``ConceptDataModule.train_dataloader`` builds it
(``resumable_loader`` with the trainer's rank, world size, step and accumulation).
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Dataset

from ccp.training.data import FlipVariants
from ccp.training.sampler import ResumableSampler, resumable_loader


class Indices(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"index": i}

    def item(self, i, flipped):
        return {"index": i, "flipped": int(flipped)}


def trainer(rank, world, step=0, accumulate=1):
    return SimpleNamespace(global_rank=rank, world_size=world, global_step=step, accumulate_grad_batches=accumulate)


def batches(dataset, batch_size, world, steps, start_step=0, accumulate=1, seed=0, key="index"):
    """For each rank, the items of `steps` micro-batches from `start_step` (optimizer steps) on."""
    out = []
    for rank in range(world):
        loader = resumable_loader(dataset, batch_size, trainer=trainer(rank, world, start_step, accumulate), seed=seed)
        it = iter(loader)
        rank_batches = []
        for _ in range(steps):
            b = next(it)
            rank_batches.append(list(zip(b["index"].tolist(), b.get("flipped", torch.zeros_like(b["index"])).tolist())))
        out.append(rank_batches)
    return out


@pytest.mark.parametrize("n, world, batch_size", [(7, 3, 2), (10, 4, 3), (5, 1, 3), (11, 2, 4)])
def test_every_image_once_per_pass_over_all_ranks(n, world, batch_size):
    per_step = world * batch_size
    steps = 3 * n  # 3 * per_step passes: many pass boundaries fall inside a batch
    read = batches(Indices(n), batch_size, world, steps)
    counts = Counter()
    for s in range(steps):
        for rank in range(world):
            counts.update(i for i, _ in read[rank][s])
        total = (s + 1) * per_step
        # after T samples over all ranks, each image was read floor(T/n) or ceil(T/n) times ...
        assert max(counts.values()) - min(counts[i] for i in range(n)) <= 1, (s, counts)
        assert set(counts) <= set(range(n))
        # ... and exactly T/n times whenever a pass is complete
        if total % n == 0:
            assert all(counts[i] == total // n for i in range(n)), (s, counts)
    assert sum(counts.values()) == steps * per_step


def test_ranks_read_disjoint_items_within_a_pass():
    n, world, batch_size = 12, 3, 2  # one step = 6 items, two steps = one pass
    read = batches(Indices(n), batch_size, world, 2)
    items = [i for rank in read for b in rank for i, _ in b]
    assert sorted(items) == list(range(n))


def test_passes_are_reshuffled_and_depend_on_the_seed():
    n = 16
    one = ResumableSampler(n, seed=0)
    it = iter(one)
    first, second = [next(it) for _ in range(n)], [next(it) for _ in range(n)]
    assert sorted(first) == sorted(second) == list(range(n))
    assert first != second  # a new order each pass
    other = iter(ResumableSampler(n, seed=5))
    assert [next(other) for _ in range(n)] != first
    plain = iter(ResumableSampler(n, seed=0, shuffle=False))
    assert [next(plain) for _ in range(n + 3)] == list(range(n)) + [0, 1, 2]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_resume_continues_the_uninterrupted_order_on_every_rank(accumulate):
    n, world, batch_size = 7, 3, 2
    stop = 5  # optimizer steps done before the interruption
    straight = batches(Indices(n), batch_size, world, (stop + 4) * accumulate, accumulate=accumulate)
    resumed = batches(Indices(n), batch_size, world, 4 * accumulate, start_step=stop, accumulate=accumulate)
    for rank in range(world):
        assert resumed[rank] == straight[rank][stop * accumulate:]


def test_flip_variants_read_each_image_plain_and_mirrored_once_per_pass():
    n, world, batch_size = 5, 2, 3  # 10 variants, 6 per step
    read = batches(FlipVariants(Indices(n)), batch_size, world, 5)  # 30 samples = 3 passes of 10
    pairs = Counter(p for rank in read for b in rank for p in b)
    assert pairs == Counter({(i, f): 3 for i in range(n) for f in (0, 1)})


def test_empty_dataset_is_refused():
    with pytest.raises(ValueError):
        ResumableSampler(0)


def test_runs_that_differ_only_in_their_seed_never_share_an_epoch_order():
    # with the seed added to the epoch, seed s at epoch e + 1 repeated seed s + 1 at epoch e
    orders = {(seed, epoch): tuple(ResumableSampler(50, seed=seed)._epoch(epoch).tolist())
              for seed in range(4) for epoch in range(4)}
    assert len(set(orders.values())) == len(orders)
    assert all(sorted(order) == list(range(50)) for order in orders.values())
