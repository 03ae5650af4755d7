"""Offline stand-ins for the tiny scale: random toy image folders, and a weightless colour
predictor in place of CLIP. Their numbers say nothing about the methods; they let the whole recipe
run on a CPU in minutes (FID features: `ccp.evaluation.fid.RandomConvFeatures`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from ccp.evaluation.attributes import AttributeQuestion, ZeroShotAttributePredictor
from ccp.io import write_dir_atomic

# Text features: directions in (chroma r, g, b, luminance - 0.5, constant) space.
_COLOUR_WORDS = {
    "red": (2.0, -1.0, -1.0, 0.0, 0.0), "green": (-1.0, 2.0, -1.0, 0.0, 0.0), "blue": (-1.0, -1.0, 2.0, 0.0, 0.0),
    "grey": (0.0, 0.0, 0.0, 0.0, 1.0), "bright": (0.0, 0.0, 0.0, 1.0, 0.0), "dark": (0.0, 0.0, 0.0, -1.0, 0.0),
}
_HUES = {"red": ("a red tint",), "green": ("a green tint",), "blue": ("a blue tint",), "grey": ("a grey tint",)}
_LIGHT = {"bright": ("bright light",), "dark": ("dark light",)}
COLOUR_QUESTIONS: dict[str, AttributeQuestion] = {
    "red tint": AttributeQuestion("red tint", _HUES, ("red",)),
    "green tint": AttributeQuestion("green tint", _HUES, ("green",)),
    "blue tint": AttributeQuestion("blue tint", _HUES, ("blue",)),
    "bright light": AttributeQuestion("bright light", _LIGHT, ("bright",)),
}


class MeanColourPredictor(ZeroShotAttributePredictor):
    """Zero-shot attribute predictor without weights (tiny scale), decided like CLIP's nearest class.

    Image feature: the mean RGB in [0, 1] as (chroma r, g, b = channel minus the mean of the
    channels, luminance - 0.5, 0.1); a text's feature: the mean of its colour words' directions
    (red/green/blue/grey/bright/dark). A hue question competes red, green, blue and grey (a
    colourless image is grey: its chroma is 0, so only the constant component matches); the light
    question bright vs dark. Prompts: ``COLOUR_QUESTIONS`` ("red tint", "green tint", "blue tint",
    "bright light")."""

    def __init__(self, questions=COLOUR_QUESTIONS):
        super().__init__(questions)

    def encode_images(self, images):
        features = []
        for im in images:
            rgb = np.asarray(im.convert("RGB"), np.float64).reshape(-1, 3).mean(0) / 255.0
            luminance = rgb.mean()
            features.append(np.concatenate([rgb - luminance, [luminance - 0.5, 0.1]]))
        return torch.tensor(np.stack(features))

    def encode_texts(self, texts):
        out = []
        for text in texts:
            words = [_COLOUR_WORDS[w] for w in text.lower().split() if w in _COLOUR_WORDS]
            if not words:
                raise ValueError(f"{text!r} names none of {sorted(_COLOUR_WORDS)}")
            out.append(np.mean(words, axis=0))
        return torch.tensor(np.array(out))


def write_toy_images(folder: Path, count: int, resolution: int, seed: int, tint: Sequence[float] = (0.5, 0.5, 0.5),
                     shapes: int = 3) -> Path:
    """`count` random PNGs: smooth coloured noise around `tint` with a few filled shapes (so canny
    finds edges), published with `write_dir_atomic`: a half-written folder never counts."""
    rng = np.random.default_rng(seed)

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            low = rng.random((resolution // 8, resolution // 8, 3)) * 0.5 + np.asarray(tint) - 0.25
            base = np.kron(low, np.ones((8, 8, 1)))
            image = PIL.Image.fromarray((base.clip(0, 1) * 255).astype(np.uint8))
            draw = PIL.ImageDraw.Draw(image)
            for _ in range(shapes):
                x0, y0 = rng.integers(0, resolution * 3 // 4, 2)
                size = rng.integers(resolution // 6, resolution // 3)
                colour = tuple(int(c) for c in rng.integers(0, 256, 3))
                (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + size, y0 + size], fill=colour)
            image.save(tmp / f"{i:03d}.png")

    return write_dir_atomic(folder, write)
