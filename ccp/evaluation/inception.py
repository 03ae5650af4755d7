"""Inception features for FID and KID (App. D.3): torchmetrics' 2048-d ``NoTrainInceptionV3``,
loaded from a local file only, and what identifies a feature extractor.

Features are the standard 2048-d pool features of the TF-ported InceptionV3 that torchmetrics'
``FrechetInceptionDistance(feature=2048)`` uses (torch-fidelity's ``FeatureExtractorInceptionV3``
and its file ``weights-inception-2015-12-05-6726825d.pth``), read from a local file only:
``fid.inception_weights`` or the torch hub cache; never downloaded here. Images enter the network
as uint8; the resize to 299 is torch-fidelity's TF1-compatible bilinear (``antialias=False``),
what every torchmetrics release before 1.8 did (docs/evaluation.md says why).
"""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ccp.config import ConfigError
from ccp.evaluation.stand_in import warn_if_stand_in

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
# torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3 (a test checks they agree)
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
INCEPTION_FEATURES = 2048


class InceptionWeightsError(ConfigError, FileNotFoundError):
    """The Inception weights file is missing or unusable; the message says what to put where."""


class FIDConfigError(ConfigError, ValueError):
    """An FID setting that cannot run; the message says how to fix it."""


def hub_weights_path() -> Path:
    """Where torch hub (and torchmetrics, when it may download) keeps the file: $TORCH_HOME/hub/checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def resolve_inception_weights(path: str | Path | None = None, key: str = "fid.inception_weights") -> Path:
    """The local Inception weights: `path` if given, else the torch hub cache; cheap, so a CLI
    calls it before loading any model. Raises `InceptionWeightsError` saying how to get the file and
    naming the entry point's config `key`."""
    hub = hub_weights_path()
    if path:
        given = Path(path).expanduser()
        if given.is_file():
            return given
        problem = f"{key}={path} does not exist"
    elif hub.is_file():
        return hub
    else:
        problem = f"{key} is not set and the torch hub cache has no {hub}"
    raise InceptionWeightsError(
        f"FID needs the InceptionV3 weights file {INCEPTION_WEIGHTS_FILE} (the TF FID Inception that "
        f"torchmetrics' FrechetInceptionDistance loads through torch-fidelity), and nothing is downloaded "
        f"here: {problem}. On a machine with network access download {INCEPTION_WEIGHTS_URL} "
        f"(e.g. wget or curl -LO), copy it to this machine and either set "
        f"{key}=/path/to/{INCEPTION_WEIGHTS_FILE} or put it at {hub} "
        "(the torch hub cache, $TORCH_HOME/hub/checkpoints/)."
    )


def _require_torch_fidelity() -> None:
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        raise ModuleNotFoundError(
            "the InceptionV3 feature extractor needs torch-fidelity: pip install -c constraints.txt torch-fidelity"
        )


def inception_feature_extractor(
    weights: str | Path | None = None, device: str | torch.device | None = None, antialias: bool = False
) -> nn.Module:
    """torchmetrics' ``NoTrainInceptionV3`` with 2048-d features, loaded from a local file.

    Takes uint8 [n, 3, H, W], returns [n, 2048] float32: the same module (and forward) that
    ``FrechetInceptionDistance(feature=2048, antialias=antialias)`` builds. A stand-in file
    (`ccp.evaluation.stand_in`) loads too, with a warning, and the module gets ``stand_in_weights = True``.
    """
    path = resolve_inception_weights(weights)
    _require_torch_fidelity()
    from torchmetrics.image.fid import NoTrainInceptionV3

    kwargs = {}
    if "antialias" in inspect.signature(NoTrainInceptionV3.__init__).parameters:
        kwargs["antialias"] = antialias
    elif antialias:
        raise FIDConfigError("this torchmetrics has no antialiased resize (added in 1.8); use antialias=false")
    try:
        net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=[str(INCEPTION_FEATURES)],
            feature_extractor_weights_path=str(path),
            **kwargs,
        )
    except Exception as err:  # torch.load / load_state_dict: not the right file
        raise InceptionWeightsError(
            f"{path} could not be loaded as torch-fidelity's InceptionV3 weights ({type(err).__name__}: {err}); "
            f"download {INCEPTION_WEIGHTS_URL} again"
        ) from err
    net.num_features = INCEPTION_FEATURES
    if warn_if_stand_in(path, "FID Inception weights"):
        net.stand_in_weights = True  # its features (and every FID/KID of them) mean nothing
    return net.to(device) if device is not None else net


class RandomConvFeatures(nn.Module):
    """FOR TESTS ONLY (``fid.feature_extractor=random_conv``): a fixed, seeded random conv net,
    uint8 [n, 3, H, W] -> 8-d features, so the FID pipeline runs without the Inception weights.
    Its numbers are not FID and are not comparable with anything."""

    num_features = 8

    def __init__(self, seed: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2)
        self.fc = nn.Linear(6 * 4, self.num_features)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
        self.requires_grad_(False).eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float() / 127.5 - 1, size=(16, 16), mode="bilinear", align_corners=False)
        return self.fc(F.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 2).flatten(1))


def extractor_fingerprint(module: nn.Module) -> str:
    """Hash of what determines the features: class, settings (resize mode, layer) and weights."""
    digest = hashlib.sha256()
    cls = type(module)
    digest.update(f"{cls.__module__}.{cls.__qualname__};".encode())
    for attr in ("num_features", "features_list", "use_antialias", "INPUT_IMAGE_SIZE", "fid_fingerprint"):
        if hasattr(module, attr):
            digest.update(f"{attr}={getattr(module, attr)!r};".encode())
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


def num_features_of(module: nn.Module) -> int:
    dim = getattr(module, "num_features", None)
    if isinstance(dim, torch.Tensor):
        dim = int(dim.item())
    if not isinstance(dim, int) or dim < 1:
        raise TypeError(f"the feature extractor needs an integer `num_features` (its output size), got {dim!r}")
    return dim


def _device_of(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


def extract_features(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[n, D] features of uint8 [n, 3, H, W] images, on the extractor's device."""
    with torch.inference_mode():
        features = module(images.to(_device_of(module)))
    return features.reshape(images.shape[0], -1)


class GivenFeatures(nn.Module):
    """The network of a torchmetrics metric fed features already extracted: returns its input, so
    the metric's public ``update`` stores them as they are."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features
