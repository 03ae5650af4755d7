"""KID: the same Inception features as FID, unbiased at small sample counts (the toy's 359 images).

A metric function: features in, numbers out; who extracts them and where is the caller's business.
"""

from __future__ import annotations

import warnings

import torch

from ccp.evaluation.inception import FIDConfigError, GivenFeatures


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
                              degree: int = 3, gamma: float | None = None, coef: float = 1.0,
                              seed: int = 0) -> tuple[float, float]:
    """(mean, std) of KID over `subsets` random subsets of `subset_size` of each side, by torchmetrics'
    ``KernelInceptionDistance.compute`` (polynomial-kernel unbiased MMD^2; std with ddof=0 as
    torchmetrics reports it) on given features, in float64. The subsets are drawn from torch's
    generator seeded with `seed`, inside a forked RNG state (the caller's state is untouched)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(len(real), len(fake))
    if subset_size > size:
        raise FIDConfigError(f"KID subset_size={subset_size} exceeds the {size} features available on one side; "
                             f"set kid.subset_size <= {size}")
    with warnings.catch_warnings():  # "will save all extracted features": these are already in memory
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=GivenFeatures(real.shape[1]), subsets=int(subsets),
                                         subset_size=int(subset_size), degree=int(degree), gamma=gamma,
                                         coef=float(coef), sync_on_compute=False)
    metric.update(real.detach().to("cpu").double(), real=True)
    metric.update(fake.detach().to("cpu").double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        mean, std = metric.compute()
    return float(mean), float(std)
