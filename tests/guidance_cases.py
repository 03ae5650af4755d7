"""What the GCFG step tests share: a three-term spec on two denoisers, and random images."""

from __future__ import annotations

import numpy as np
import PIL.Image

from ccp.guidance import Condition, GuidanceSpec, GuidanceTerm, Source

SIZE = 64
# the prior answers the unconditional and two prompts in one call; the concept model the third term
THREE_TERMS = GuidanceSpec(terms=(
    GuidanceTerm("concept", Source("concept"), 1.5),
    GuidanceTerm("control", Source("prior", Condition(prompt="wearing glasses")), 5.0),
    GuidanceTerm("negative", Source("prior", Condition(prompt="blurry")), -1.0),
))


def random_image(seed: int) -> PIL.Image.Image:
    return PIL.Image.fromarray((np.random.default_rng(seed).random((SIZE, SIZE, 3)) * 255).astype(np.uint8))


def right_half_mask() -> PIL.Image.Image:
    """An inpainting mask: repaint the right half."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, SIZE // 2 :] = 255
    return PIL.Image.fromarray(mask)
