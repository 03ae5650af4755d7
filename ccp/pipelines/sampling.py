"""The one definition of "image i of a run with seed s", and the batch loop every sampler uses.

Image ``i`` of seed ``s`` starts from the noise of ``torch.Generator("cpu").manual_seed(s + i)``:
a CPU generator, so the same on any device, and one per image, so the same in any batch and on
any rank. It is also what diffusers users write (``generator=torch.Generator().manual_seed(s)``),
so image 0 of seed s equals diffusers' image for seed s. ccp-sample, FID shards, text and spatial
alignment, drift, figures, validation grids and the demo all sample through `sample_batches`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ccp.guidance import GuidanceSpec
from ccp.pipelines.validation import check_init_inputs


def noise_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image: image ``i`` of seed ``seed`` draws from ``seed + i``."""
    return [torch.Generator("cpu").manual_seed(int(seed) + int(i)) for i in indices]


def sample_batches(
    pipe: Any,
    guidance: GuidanceSpec,
    indices: Sequence[int],
    *,
    seed: int = 0,
    batch_size: int = 8,
    num_inference_steps: int = 50,
    height: int | None = None,
    width: int | None = None,
    eta: float = 0.0,
    output_type: str = "pil",
    image: Any = None,
    strength: float = 1.0,
    mask_image: Any = None,
) -> Iterator[tuple[list[int], Any]]:
    """``(batch indices, images)`` for `indices` in calls of at most `batch_size` images.

    Image to image: `image` (and `mask_image`) is one image for every output or a list of one per
    entry of `indices`; so are ControlNet terms' image lists. Each batch gets its outputs' own."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    indices = [int(i) for i in indices]
    total = len(indices)
    # every check the first call would make, now, over the whole run
    check_init_inputs(image, mask_image, strength, total, num_inference_steps)
    if hasattr(pipe, "check_guidance"):
        pipe.check_guidance(guidance, total)
    for start in range(0, total, batch_size):
        batch = indices[start : start + batch_size]
        positions = list(range(start, start + len(batch)))
        per_output = lambda value: [value[p] for p in positions] if _is_per_output(value, total) else value  # noqa: E731
        extra = {} if image is None else dict(image=per_output(image), strength=strength,
                                              mask_image=None if mask_image is None else per_output(mask_image))
        images = pipe(
            guidance=guidance.for_outputs(positions, total) if total > 1 else guidance,
            num_images=len(batch),
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            generator=noise_generators(seed, batch),
            eta=eta,
            output_type=output_type,
            **extra,
        ).images
        yield batch, images


def _is_per_output(value: Any, total: int) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == total and total > 1


def sample_images(pipe: Any, guidance: GuidanceSpec, indices: Sequence[int], **settings) -> Any:
    """All images of `indices` (`sample_batches` settings), as one pipeline call would return
    them: a list of PIL images, or one tensor / array for ``output_type`` "pt", "latent", "np"."""
    batches = [images for _, images in sample_batches(pipe, guidance, indices, **settings)]
    if batches and isinstance(batches[0], torch.Tensor):
        return torch.cat(batches)
    if batches and isinstance(batches[0], np.ndarray):
        return np.concatenate(batches)
    return [image for images in batches for image in images]
