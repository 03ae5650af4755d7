"""Canny edge maps: the condition of canny ControlNets, computed one way for everything in ccp.

Here, below ccp.training and ccp.evaluation, so that the conditions a ControlNet trains on
(``data.condition=canny``) and the ones Table 2's spatial metric scores against
(`ccp.evaluation.canny`) come from the same function and thresholds.
"""

from __future__ import annotations

import cv2
import numpy as np
import PIL.Image
import torch

DEFAULT_LOW_THRESHOLD = 100  # diffusers' ControlNet canny examples (and lllyasviel's annotator)
DEFAULT_HIGH_THRESHOLD = 200


def to_uint8_rgb(image) -> np.ndarray:
    """[H, W, 3] uint8 from a PIL image, an HxW(x3) uint8 array, or a [3, H, W] / [H, W, 3] float
    array or tensor in [0, 1]."""
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float().numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
            image = image.transpose(1, 2, 0)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"expected uint8 or float pixels, got {array.dtype}")
        array = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3):
        raise ValueError(f"expected an HxW, HxWx1 or HxWx3 image, got shape {array.shape}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array)


def canny_edges(image, low_threshold: int = DEFAULT_LOW_THRESHOLD, high_threshold: int = DEFAULT_HIGH_THRESHOLD) -> np.ndarray:
    """[H, W] uint8 edge map (0 or 255): ``cv2.Canny`` on the 8-bit RGB image, as diffusers'
    ControlNet canny examples compute their conditions (OpenCV takes, per pixel, the colour
    channel with the strongest gradient)."""
    if not 0 <= low_threshold <= high_threshold:
        raise ValueError(f"canny thresholds must satisfy 0 <= low <= high, got {low_threshold}, {high_threshold}")
    return cv2.Canny(to_uint8_rgb(image), low_threshold, high_threshold)
