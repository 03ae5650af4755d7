"""Canny edge maps and the edge-F1 score used for spatial-guided alignment (Table 2).

The paper (Appendix D.3) computes "the discrepancy between the canny conditions and the
corresponding generative results" without defining it. We use a boundary F1 score with a
distance tolerance, as in edge-detection benchmarks (BSDS):

* ``C`` = the condition's edge map, ``G`` = the canny map of the generated image (same size,
  same thresholds), both boolean;
* a pixel is *within r* of a map when some edge pixel of that map lies at Euclidean distance
  ``<= r`` from it (dilation by a disk of radius ``r``; ``r = 0`` is exact pixel overlap);
* precision = share of ``G``'s edge pixels within ``r`` of ``C``;
  recall = share of ``C``'s edge pixels within ``r`` of ``G``;
  F1 = 2PR / (P + R), and 0 when P + R = 0;
* empty maps: both empty -> P = R = F1 = 1 (nothing to match, nothing spurious); exactly one
  empty -> P = R = F1 = 0.

Scores are per image; a set of images is summarised by the mean of the per-image scores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np
import PIL.Image

# The edge maps themselves live in ccp.io.edges, where training (data.condition=canny) reaches them too.
from ccp.io.edges import DEFAULT_HIGH_THRESHOLD, DEFAULT_LOW_THRESHOLD, canny_edges, to_uint8_rgb

__all__ = ["DEFAULT_HIGH_THRESHOLD", "DEFAULT_LOW_THRESHOLD", "DEFAULT_TOLERANCE", "EdgeScore", "canny_edges", "disk",
           "edge_f1", "edge_map_image", "to_edge_mask", "to_uint8_rgb", "within"]

DEFAULT_TOLERANCE = 2


def edge_map_image(edges: np.ndarray) -> PIL.Image.Image:
    """The 3-channel image a canny ControlNet takes (white edges on black), from an [H, W] map."""
    edges = np.asarray(edges)
    if edges.ndim != 2:
        raise ValueError(f"expected an [H, W] edge map, got shape {edges.shape}")
    return PIL.Image.fromarray(np.repeat(to_edge_mask(edges)[:, :, None], 3, axis=2).astype(np.uint8) * 255)


def to_edge_mask(edges) -> np.ndarray:
    """Boolean [H, W]: nonzero pixels of an edge map (a 3-channel map: any channel nonzero)."""
    mask = np.asarray(edges)
    if mask.ndim == 3:
        mask = mask.any(axis=-1)
    if mask.ndim != 2:
        raise ValueError(f"expected an [H, W] or [H, W, C] edge map, got shape {mask.shape}")
    return mask != 0


def disk(radius: int) -> np.ndarray:
    """uint8 structuring element: offsets (dy, dx) with dy^2 + dx^2 <= radius^2."""
    if radius < 0 or int(radius) != radius:
        raise ValueError(f"tolerance radius must be a non-negative integer, got {radius}")
    radius = int(radius)
    offsets = np.arange(-radius, radius + 1)
    return ((offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius * radius).astype(np.uint8)


def within(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels at Euclidean distance <= radius from some True pixel of `mask`."""
    if radius == 0:
        return mask.copy()
    return cv2.dilate(mask.astype(np.uint8), disk(radius), borderType=cv2.BORDER_CONSTANT, borderValue=0) != 0


@dataclass(frozen=True)
class EdgeScore:
    precision: float
    recall: float
    f1: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def edge_f1(condition_edges, generated_edges, tolerance: int = DEFAULT_TOLERANCE) -> EdgeScore:
    """Edge precision, recall and F1 of `generated_edges` against `condition_edges` (see module
    docstring); both [H, W] (or [H, W, C]) maps of the same size, nonzero = edge."""
    cond = to_edge_mask(condition_edges)
    gen = to_edge_mask(generated_edges)
    if cond.shape != gen.shape:
        raise ValueError(f"edge maps differ in size: condition {cond.shape}, generated {gen.shape}")
    n_cond, n_gen = int(cond.sum()), int(gen.sum())
    if n_cond == 0 and n_gen == 0:
        return EdgeScore(1.0, 1.0, 1.0)
    if n_cond == 0 or n_gen == 0:
        return EdgeScore(0.0, 0.0, 0.0)
    precision = float((gen & within(cond, tolerance)).sum()) / n_gen
    recall = float((cond & within(gen, tolerance)).sum()) / n_cond
    f1 = 0.0 if precision + recall == 0 else 2.0 * precision * recall / (precision + recall)
    return EdgeScore(precision, recall, f1)
