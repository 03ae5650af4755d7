"""Toy data on real images: scikit-learn's handwritten digits as coloured RGB renderings.

`sklearn.datasets.load_digits()` ships 1,797 real 8x8 grayscale digits (values 0-16) inside the
package, so the data needs no network. Each digit is upsampled bicubically to `resolution`
pixels, turned into a soft stroke mask, optionally restyled, and painted in a palette colour on
black:

* the open-world prior's data is the ``plain`` style with captions naming the two attributes the
  prior learns to control, e.g. "a red digit 3" (`caption`);
* the concept styles (``bold``: the stroke mask dilated with `cv2.dilate`; ``outlined``: only a
  ring around the stroke) are distributions the prior never sees. Concept data is written without
  captions (unlabeled), still varying in digit class and colour; `labels.jsonl` beside the images
  is for evaluation only.

Everything is a function of (split, style, seed, resolution, copies): the same arguments give
byte-identical files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import PIL.Image

# Stroke colours, as data: name -> RGB on a black background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 240),
    "yellow": (235, 215, 30),
    "white": (240, 240, 240),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
PRIOR_STYLE = "plain"
CONCEPT_STYLES: tuple[str, ...] = ("bold", "outlined")
STYLES: tuple[str, ...] = (PRIOR_STYLE, *CONCEPT_STYLES)
SPLITS: tuple[str, ...] = ("train", "held_out")
DEFAULT_RESOLUTION = 32
DEFAULT_HELD_OUT_FRACTION = 0.2
# Soft threshold of the upsampled intensity (0..1): below LOW is background, above HIGH full stroke.
MASK_LOW, MASK_HIGH = 0.25, 0.55


@lru_cache(maxsize=1)
def load_digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [1797, 8, 8] in [0, 1], digits int64 [1797]) from scikit-learn."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images.astype(np.float32) / 16.0).clip(0.0, 1.0)
    images.setflags(write=False)
    targets = data.target.astype(np.int64)
    targets.setflags(write=False)
    return images, targets


def split_indices(split: str, seed: int = 0, held_out_fraction: float = DEFAULT_HELD_OUT_FRACTION) -> np.ndarray:
    """Sorted indices into `load_digit_arrays()` of `split`: a seeded permutation, the last
    `held_out_fraction` of it held out. The two splits are disjoint and cover every digit."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {SPLITS}")
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction={held_out_fraction}: must be in (0, 1)")
    n = len(load_digit_arrays()[1])
    order = np.random.default_rng(seed).permutation(n)
    n_held = int(round(n * held_out_fraction))
    chosen = order[: n - n_held] if split == "train" else order[n - n_held :]
    return np.sort(chosen)


def _kernel(resolution: int) -> np.ndarray:
    size = max(3, int(round(resolution / 10)) | 1)  # odd: 3 at 32 px, 7 at 64 px
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def stroke_mask(digit: np.ndarray, resolution: int = DEFAULT_RESOLUTION, style: str = PRIOR_STYLE) -> np.ndarray:
    """Soft stroke mask float32 [resolution, resolution] in [0, 1] of one 8x8 digit (values 0..1)."""
    if style not in STYLES:
        raise ValueError(f"style={style!r}: use one of {STYLES}")
    digit = np.asarray(digit, dtype=np.float32)
    if digit.shape != (8, 8):
        raise ValueError(f"a digit is 8x8, got {digit.shape}")
    # One pixel of black border first, so strokes touching the 8x8 edge stay inside the frame.
    padded = np.pad(digit, 1)
    up = cv2.resize(padded, (resolution, resolution), interpolation=cv2.INTER_CUBIC)
    mask = np.clip((up - MASK_LOW) / (MASK_HIGH - MASK_LOW), 0.0, 1.0).astype(np.float32)
    if style == "bold":
        mask = cv2.dilate(mask, _kernel(resolution), iterations=1)
    elif style == "outlined":
        mask = np.clip(cv2.dilate(mask, _kernel(resolution), iterations=1) - mask, 0.0, 1.0)
    return mask.astype(np.float32)


def render_digit(
    digit: np.ndarray, colour: str, style: str = PRIOR_STYLE, resolution: int = DEFAULT_RESOLUTION
) -> np.ndarray:
    """uint8 [resolution, resolution, 3]: the digit's stroke in `colour` on black."""
    if colour not in PALETTE:
        raise ValueError(f"colour={colour!r}: use one of {COLOURS}")
    mask = stroke_mask(digit, resolution, style)
    rgb = np.asarray(PALETTE[colour], dtype=np.float32)
    return np.rint(mask[..., None] * rgb).clip(0, 255).astype(np.uint8)


def caption(digit: int, colour: str) -> str:
    """The prior's caption: class and colour, e.g. ``"a red digit 3"``."""
    if colour not in PALETTE:
        raise ValueError(f"colour={colour!r}: use one of {COLOURS}")
    return f"a {colour} digit {int(digit)}"


@dataclass(frozen=True)
class ToySet:
    """Rendered images with their labels (the labels are for captions and evaluation)."""

    images: np.ndarray  # uint8 [N, H, W, 3]
    digits: np.ndarray  # int64 [N]
    colours: tuple[str, ...]  # N palette names
    sources: np.ndarray  # int64 [N]: index into load_digit_arrays()
    style: str
    split: str

    def __len__(self) -> int:
        return len(self.digits)

    def captions(self) -> list[str]:
        return [caption(d, c) for d, c in zip(self.digits.tolist(), self.colours)]

    def tensor(self):
        """uint8 torch tensor [N, 3, H, W] (the FID extractors' input)."""
        import torch

        return torch.from_numpy(np.ascontiguousarray(self.images.transpose(0, 3, 1, 2)))


def render_set(
    split: str = "train",
    style: str = PRIOR_STYLE,
    seed: int = 0,
    resolution: int = DEFAULT_RESOLUTION,
    copies: int = 1,
    colours: tuple[str, ...] | None = None,
    held_out_fraction: float = DEFAULT_HELD_OUT_FRACTION,
) -> ToySet:
    """Every digit of `split` rendered `copies` times in `style`, each copy in a colour drawn from
    `colours` (default: the whole palette) by a generator seeded with (seed, style, split)."""
    if style not in STYLES:
        raise ValueError(f"style={style!r}: use one of {STYLES}")
    if copies < 1:
        raise ValueError(f"copies={copies}: must be >= 1")
    colours = tuple(colours) if colours is not None else COLOURS
    unknown = [c for c in colours if c not in PALETTE]
    if not colours or unknown:
        raise ValueError(f"colours={colours!r}: use names of {COLOURS}")
    digits8, targets = load_digit_arrays()
    idx = split_indices(split, seed, held_out_fraction)
    sources = np.tile(idx, copies)
    rng = np.random.default_rng([seed, STYLES.index(style), SPLITS.index(split), resolution])
    picks = rng.integers(0, len(colours), size=len(sources))
    names = tuple(colours[p] for p in picks.tolist())
    images = np.stack([render_digit(digits8[s], c, style, resolution) for s, c in zip(sources.tolist(), names)])
    return ToySet(images, targets[sources].copy(), names, sources, style, split)


def _write_images(out_dir: Path, toy: ToySet) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for i, image in enumerate(toy.images):
        name = f"{i:05d}.png"
        PIL.Image.fromarray(image, mode="RGB").save(out_dir / name, format="PNG", optimize=False)
        files.append(name)
    return files


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def write_prior_dataset(
    out_dir: str | Path,
    split: str = "train",
    seed: int = 0,
    resolution: int = DEFAULT_RESOLUTION,
    copies: int = 1,
) -> Path:
    """The open-world prior's data: plain renderings as PNGs plus ``captions.jsonl`` with one
    ``{"file", "caption", "digit", "colour"}`` row per image. Returns `out_dir`."""
    out = Path(out_dir)
    toy = render_set(split, PRIOR_STYLE, seed, resolution, copies)
    files = _write_images(out, toy)
    rows = [
        {"file": f, "caption": cap, "digit": int(d), "colour": c}
        for f, cap, d, c in zip(files, toy.captions(), toy.digits.tolist(), toy.colours)
    ]
    _write_jsonl(out / "captions.jsonl", rows)
    return out


def write_concept_dataset(
    out_dir: str | Path,
    style: str = "bold",
    split: str = "train",
    seed: int = 0,
    resolution: int = DEFAULT_RESOLUTION,
    copies: int = 1,
) -> Path:
    """Unlabeled concept images (a style the prior never sees) as PNGs, varying in class and
    colour. ``labels.jsonl`` ({"file", "digit", "colour", "style"}) is for evaluation only; no
    captions are written. Returns `out_dir`."""
    if style not in CONCEPT_STYLES:
        raise ValueError(f"style={style!r}: a concept style is one of {CONCEPT_STYLES}")
    out = Path(out_dir)
    toy = render_set(split, style, seed, resolution, copies)
    files = _write_images(out, toy)
    rows = [
        {"file": f, "digit": int(d), "colour": c, "style": style}
        for f, d, c in zip(files, toy.digits.tolist(), toy.colours)
    ]
    _write_jsonl(out / "labels.jsonl", rows)
    return out
