"""Shared by tests: a method for the training loop alone, a counting feature extractor, real
images prepared by hand as the FID/KID reference (PIL bicubic, optional centre square), and
stand-in weight files (`write_stand_in_inception`, `write_stand_in_clip`: random networks in the
exact format and under the file names of the weights users download; tests/conftest.py caches one
of each per session as the fixtures ``stand_in_inception`` and ``stand_in_clip``)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

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


# --- stand-in weight files: random networks in the exact format of the weights users download ------
# Every number measured with them means nothing, and is labelled so (ccp.evaluation.stand_in).
STAND_IN_SEED = 0
# CLIP shapes `write_stand_in_clip` can write; clip's build_model reads the architecture from the
# tensor shapes, so "small" goes through the same loader and checks as OpenAI's ViT-L/14 ("ViT-L/14").
# Kept: 224 px input, 14 px patches, the 77-token context and the 49408-token vocabulary of ViT-L/14.
CLIP_SHAPES = {
    "small": dict(embed_dim=64, image_resolution=224, vision_layers=2, vision_width=64, vision_patch_size=14,
                  context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2),
    "ViT-L/14": dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024, vision_patch_size=14,
                     context_length=77, vocab_size=49408, transformer_width=768, transformer_heads=12,
                     transformer_layers=12),
}


def _target(path, file_name: str) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _marker_info(network: str, seed: int) -> dict:
    from ccp.evaluation.stand_in import STAND_IN_LABEL

    return {"network": network, "seed": int(seed), "written_by": "tests/stand_ins.py", "note": STAND_IN_LABEL}


def stand_in_inception_state_dict(seed: int = STAND_IN_SEED) -> "OrderedDict[str, torch.Tensor]":
    """The state dict of torch-fidelity's FID InceptionV3 (``inception-v3-compat``: the keys, shapes
    and dtypes of ``weights-inception-2015-12-05-6726825d.pth``), every tensor drawn from `seed`:
    He-normal convolutions and identity batch norms, so the 2048-d features are O(1), not vanishing."""
    import math
    import tempfile

    from torch import nn
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # nothing to load: the weights are drawn below

    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    generator = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in))
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.fill_(1.0)
                module.bias.zero_()
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
                module.num_batches_tracked.zero_()
            elif isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / math.sqrt(module.in_features))
                module.bias.zero_()
    return net.state_dict()


def write_stand_in_inception(path, *, seed: int = STAND_IN_SEED, marker: bool = True) -> Path:
    """A randomly initialised FID InceptionV3 saved as users download it: ``torch.save`` of the state
    dict torchmetrics' ``NoTrainInceptionV3(name="inception-v3-compat", feature_extractor_weights_path=...)``
    (torch-fidelity) loads strictly. `path`: the file, or a folder to write
    ``weights-inception-2015-12-05-6726825d.pth`` into. `marker=False` leaves out the stand-in marker
    (a real-looking file, for tests of the unlabelled path only). Returns the file."""
    from ccp.evaluation.fid import INCEPTION_WEIGHTS_FILE
    from ccp.evaluation.stand_in import mark_state_dict

    path = _target(path, INCEPTION_WEIGHTS_FILE)
    state_dict = stand_in_inception_state_dict(seed)
    torch.save(mark_state_dict(state_dict, _marker_info("inception-v3-compat", seed)) if marker else state_dict, path)
    return path


def stand_in_clip_model(architecture: str = "small", seed: int = STAND_IN_SEED) -> torch.nn.Module:
    """clip-anytorch's ``CLIP`` of `architecture` (`CLIP_SHAPES`), initialised by its own
    ``initialize_parameters`` from `seed` and converted to fp16 as OpenAI's files are, with the
    ``input_resolution``, ``context_length`` and ``vocab_size`` tensors that clip's ``build_model``
    removes from a loaded state dict (and clip.load's ``jit=True`` path reads)."""
    from ccp.evaluation.attributes import clip_module  # not `import clip`: that needs pkg_resources

    model_py = clip_module("model")
    shape = CLIP_SHAPES[architecture]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = model_py.CLIP(**shape)
    model_py.convert_weights(model)
    # the three entries clip's build_model drops from a loaded state dict (ints after __init__, which is done with them)
    for key, source in (("input_resolution", "image_resolution"), ("context_length", "context_length"),
                        ("vocab_size", "vocab_size")):
        if hasattr(model, key):
            delattr(model, key)
        model.register_buffer(key, torch.tensor(shape[source]))
    return model.eval().requires_grad_(False)


def write_stand_in_clip(path, *, architecture: str = "small", seed: int = STAND_IN_SEED, marker: bool = True,
                        torchscript: bool = True) -> Path:
    """A randomly initialised CLIP saved as OpenAI ships ``ViT-L-14.pt``: a TorchScript archive
    (traced ``forward``, ``encode_image``, ``encode_text``; fp16 weights), which ``clip.load(path,
    jit=False)`` and `ccp.evaluation.attributes.load_clip` read through its state dict;
    ``torchscript=False`` writes the plain state dict clip.load also accepts. `path`: the file, or a
    folder to write ``ViT-L-14.pt`` into. `architecture`: "small" (default, fast) or "ViT-L/14" (the
    real shapes, ~0.9 GB). `marker=False`: a real-looking file without the stand-in marker. Returns the file."""
    import warnings

    from ccp.evaluation.attributes import clip_tokenize
    from ccp.evaluation.stand_in import mark_state_dict, stand_in_extra_files

    path = _target(path, "ViT-L-14.pt")
    model = stand_in_clip_model(architecture, seed)
    info = _marker_info(f"CLIP {architecture}", seed)
    if not torchscript:
        state_dict = model.state_dict()
        torch.save(mark_state_dict(state_dict, info) if marker else state_dict, path)
        return path
    image = torch.zeros(1, 3, model.visual.input_resolution, model.visual.input_resolution, dtype=torch.float16)
    text = clip_tokenize(["a photo of a face"])
    with warnings.catch_warnings():  # torch.jit is deprecated, and the trace warns about python control flow
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(model, {"forward": (image, text), "encode_image": image, "encode_text": text},
                                        check_trace=False)
        torch.jit.save(traced, str(path), _extra_files=stand_in_extra_files(info) if marker else {})
    return path


# The start of a script run in a fresh interpreter where `import pkg_resources` fails, as with setuptools >= 81.
WITHOUT_PKG_RESOURCES = """
import json, sys
sys.modules["pkg_resources"] = None
try:
    import pkg_resources
except ImportError:
    pass
else:
    raise SystemExit("pkg_resources is still importable")
"""
