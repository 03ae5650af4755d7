"""Shared by tests: a method for the training loop alone, a counting feature extractor, and real
images prepared by hand as the FID/KID reference (PIL bicubic, optional centre square)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch

from ccp.evaluation.fid import RandomConvFeatures
from ccp.methods.base import Method


class CountingExtractor(RandomConvFeatures):
    """The seeded random conv net standing in for Inception, recording the size of each batch it sees."""

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self.batches: list[int] = []

    @property
    def calls(self) -> int:
        return len(self.batches)

    def forward(self, images):
        self.batches.append(images.shape[0])
        return super().forward(images)


class TrainingOnlyMethod(Method):
    """A `Method` that the training loop can drive but that has nothing to export or sample: the
    loop never calls these four, so a test that reaches one fails loudly."""

    def export(self, out_dir):
        raise AssertionError("the training loop does not export")

    def sampling_pipeline(self, prior):
        raise AssertionError("the training loop does not sample")

    @classmethod
    def load_export(cls, prior, export_dir):
        raise AssertionError("the training loop does not load exports")

    @classmethod
    def default_guidance(cls, denoiser, template, control_prompt=None, concept_weight=1.0, control_weight=5.0):
        raise AssertionError("the training loop does not sample")


def pil_reference_images(files, resolution: int | None, center_crop: bool = False) -> torch.Tensor:
    """uint8 [n, 3, H, W]: each file as RGB, its central square cut first when asked, PIL-bicubic
    resized to `resolution` unless it already has that size (None: kept as it is)."""
    out = []
    for p in files:
        image = PIL.Image.open(p).convert("RGB")
        if center_crop:
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side))
        if resolution is not None and image.size != (resolution, resolution):
            image = image.resize((resolution, resolution), PIL.Image.Resampling.BICUBIC)
        out.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
    return torch.stack(out)
