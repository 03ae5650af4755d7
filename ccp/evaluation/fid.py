"""FID of Table 1 (App. D.3): torchmetrics' FrechetInceptionDistance over 50,000 samples.

Features are the standard 2048-d pool features of the TF-ported InceptionV3 that torchmetrics'
``FrechetInceptionDistance(feature=2048)`` uses (torch-fidelity's ``FeatureExtractorInceptionV3``
and its file ``weights-inception-2015-12-05-6726825d.pth``), read from a local file only:
``fid.inception_weights`` or the torch hub cache; never downloaded here.

Choices that change the number (docs/evaluation.md says why):

* images enter the network as uint8, floats rounded as a saved PNG would be;
* resize to 299 with torch-fidelity's TF1-compatible bilinear (``antialias=False``), which is what
  every torchmetrics release before 1.8 did (so what the paper used); torchmetrics >= 1.8
  defaults to ``antialias=True`` and gives different values;
* real images: every image of the folder, PIL-bicubic resized to the sample resolution as the
  training data is (`ccp.training.data`).

Real statistics (feature sum, outer-product sum, count, and mean/covariance) are computed once per
(folder listing, resolution, crop, feature extractor) and cached; generated samples go through
`ccp.evaluation.generation` in resumable shards; the distance is torchmetrics' own ``compute()``
on a metric whose states are filled with the combined statistics.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ccp.config import ConfigError
from ccp.distributed import barrier, meets, rank_world, rank_zero_computes
from ccp.evaluation.generation import (
    GenerateFn,
    generate_shards,
    iter_shard_features,
    prepare_shard_dir,
    run_meta,
    to_uint8_images,
)
from ccp.evaluation.stand_in import warn_if_stand_in
from ccp.io import BadImageWarning, content_hash, default_cache_root, list_image_files, load_rgb8, resize_to_square, write_atomic

log = logging.getLogger(__name__)

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
# torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3 (a test checks they agree)
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
INCEPTION_FEATURES = 2048
STATS_FORMAT_VERSION = 1
REAL_PREPROCESS = "pil-rgb8-bicubic-resize-uint8"
# after the barrier, how long a rank keeps looking for the shards of other nodes: a Cloud Storage FUSE
# mount caches "not found" for a few seconds (docs/storage.md)
SHARDS_VISIBLE_WAIT_S = 120.0


class InceptionWeightsError(ConfigError, FileNotFoundError):
    """The Inception weights file is missing or unusable; the message says what to put where."""


class FIDConfigError(ConfigError, ValueError):
    """An FID setting that cannot run; the message says how to fix it."""


# --- the Inception feature extractor ------------------------------------------------------------
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


# --- sufficient statistics -------------------------------------------------------------------------
@dataclass
class FeatureStats:
    """What torchmetrics' FID keeps per side: feature sum, sum of outer products (float64), count."""

    features_sum: torch.Tensor
    features_cov_sum: torch.Tensor
    count: int
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def zeros(cls, num_features: int) -> "FeatureStats":
        dim = int(num_features)
        return cls(torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64), 0)

    @classmethod
    def from_features(cls, features: torch.Tensor) -> "FeatureStats":
        """As ``FrechetInceptionDistance.update`` accumulates: ``f.double()``, ``f.sum(0)``, ``f.T @ f``."""
        f = features.detach().to("cpu").double()
        if f.dim() == 1:
            f = f.unsqueeze(0)
        return cls(f.sum(dim=0), f.t().mm(f), f.shape[0])

    @property
    def num_features(self) -> int:
        return self.features_sum.shape[0]

    def add_(self, other: "FeatureStats") -> "FeatureStats":
        if other.num_features != self.num_features:
            raise ValueError(f"cannot add statistics of {other.num_features}-d features to {self.num_features}-d ones")
        self.features_sum += other.features_sum
        self.features_cov_sum += other.features_cov_sum
        self.count += other.count
        return self

    @property
    def mean(self) -> torch.Tensor:
        return self.features_sum / self.count

    @property
    def cov(self) -> torch.Tensor:
        """Unbiased covariance, computed as ``FrechetInceptionDistance.compute`` does."""
        mean = self.mean.unsqueeze(0)
        return (self.features_cov_sum - self.count * mean.t().mm(mean)) / (self.count - 1)

    def save(self, path: str | Path) -> None:
        """safetensors, atomically: the sums, ``mu`` and ``sigma``; count and info in the metadata."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "features_sum": self.features_sum.contiguous(),
            "features_cov_sum": self.features_cov_sum.contiguous(),
            "mu": self.mean.contiguous(),
            "sigma": self.cov.contiguous(),
        }
        metadata = {"format": str(STATS_FORMAT_VERSION), "count": str(self.count), "info": json.dumps(self.info)}
        write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStats":
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != str(STATS_FORMAT_VERSION):
                raise ValueError(f"{path} is not a ccp feature-statistics file (format {meta.get('format')!r})")
            return cls(f.get_tensor("features_sum"), f.get_tensor("features_cov_sum"), int(meta["count"]),
                       json.loads(meta.get("info", "{}")))


def fill_metric_state(metric, stats: FeatureStats, real: bool = True) -> None:
    """Add `stats` to one side of a torchmetrics ``FrechetInceptionDistance`` (its public
    ``merge_state``): e.g. cached real statistics into a metric made with
    ``reset_real_features=False``, which then only ever sees generated images."""
    side, other = ("real", "fake") if real else ("fake", "real")
    state = getattr(metric, f"{side}_features_sum")
    if state.shape[0] != stats.num_features:
        raise ValueError(f"the metric has {state.shape[0]}-d features, the statistics {stats.num_features}-d")
    incoming = {
        f"{side}_features_sum": stats.features_sum.to(state),
        f"{side}_features_cov_sum": stats.features_cov_sum.to(getattr(metric, f"{side}_features_cov_sum")),
        f"{side}_features_num_samples": torch.tensor(stats.count, device=state.device),
    }
    for name in ("features_sum", "features_cov_sum", "features_num_samples"):
        incoming[f"{other}_{name}"] = torch.zeros_like(getattr(metric, f"{other}_{name}"))
    metric.merge_state(incoming)


class _FeatureDim(nn.Module):
    """Stands in for the network when the metric only combines statistics."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features


def frechet_distance(real: FeatureStats, fake: FeatureStats) -> float:
    """FID between two sets of statistics, by torchmetrics' ``FrechetInceptionDistance.compute``."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real.num_features != fake.num_features:
        raise ValueError(f"real statistics are {real.num_features}-d, generated {fake.num_features}-d")
    metric = FrechetInceptionDistance(feature=_FeatureDim(real.num_features), sync_on_compute=False)
    fill_metric_state(metric, real, real=True)
    fill_metric_state(metric, fake, real=False)
    metric.orig_dtype = torch.float64  # update() would set it; the result stays float64
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
        return float(metric.compute())


# --- real statistics ----------------------------------------------------------------------------
class _FolderImages(Dataset):
    def __init__(self, files: list[Path], resolution: int | None, center_crop: bool):
        self.files, self.resolution, self.center_crop = files, resolution, center_crop

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        try:
            image = load_rgb8(self.files[index])
            if self.resolution is not None:
                image = resize_to_square(image, self.resolution, self.center_crop)
            return index, to_uint8_images([image])[0], None
        except Exception as err:  # reported (or refused) in the main process
            return index, None, f"{type(err).__name__}: {err}"


class _DatasetImages(Dataset):
    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return index, to_uint8_images(self.dataset[index])[0], None


def _collate(items):
    good = [image for _, image, _ in items if image is not None]
    bad = [(index, reason) for index, _, reason in items if reason is not None]
    return (torch.stack(good) if good else None), bad


def real_stats_key(source: str | Path | Dataset, feature_extractor: nn.Module, resolution: int | None,
                   center_crop: bool = False, max_images: int | None = None, cache_key: str | None = None,
                   fingerprint: str | None = None) -> tuple[dict[str, Any], str] | None:
    """(what the statistics depend on, its hash), or None for a dataset without `cache_key`."""
    parts: dict[str, Any] = {
        "format": STATS_FORMAT_VERSION,
        "resolution": resolution,
        "center_crop": bool(center_crop),
        "max_images": max_images,
        "features": fingerprint or extractor_fingerprint(feature_extractor),
    }
    if isinstance(source, (str, Path)):
        root = Path(source).expanduser().resolve()
        files = list_image_files(root)[:max_images]
        listing = [[p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
        parts.update(source=str(root), listing=content_hash(listing), num_files=len(files), preprocess=REAL_PREPROCESS)
    elif cache_key is not None:
        parts.update(source=f"dataset:{cache_key}", num_files=len(source), preprocess="dataset-items-as-uint8")
    else:
        return None
    return parts, content_hash(parts)[:16]


def real_statistics(
    source: str | Path | Dataset,
    feature_extractor: nn.Module,
    *,
    resolution: int | None,
    center_crop: bool = False,
    max_images: int | None = None,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    cache_key: str | None = None,
    batch_size: int = 50,
    num_workers: int = 0,
    on_bad_image: str = "skip",
    progress: bool = True,
) -> FeatureStats:
    """Feature statistics of the real images, cached per (files, resolution, crop, extractor).

    `source`: an image folder (recursive, as `ccp.training.data` reads it; every image is PIL-bicubic
    resized to `resolution` x `resolution`, `center_crop` first cuts the central square), or a
    Dataset of images (uint8/float [0, 1] tensors or PIL images, used as they are; cached only with a
    `cache_key` naming its contents). Cache: ``<cache_dir or $CCP_CACHE_DIR/fid_stats>/
    <folder>-<res>px-<key>.safetensors``, written atomically; a changed file list (paths, sizes,
    mtimes), resolution or extractor is a new key. No collective: under DDP call it through
    `ccp.distributed.rank_zero_computes` (as `run_fid` and the training callback do).
    Bad files are skipped with a `BadImageWarning` each, or with ``on_bad_image="fail"`` refused.
    """
    if on_bad_image not in ("skip", "fail"):
        raise ValueError(f"on_bad_image must be 'skip' or 'fail', got {on_bad_image!r}")
    fingerprint = extractor_fingerprint(feature_extractor)
    keyed = real_stats_key(source, feature_extractor, resolution, center_crop, max_images, cache_key, fingerprint)
    path = None
    if cache and keyed is not None:
        parts, key = keyed
        name = Path(str(source)).name if isinstance(source, (str, Path)) else str(cache_key)
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:48] or "images"
        folder = Path(cache_dir).expanduser() if cache_dir else default_cache_root() / "fid_stats"
        size = f"{resolution}px" if resolution else "native"
        path = folder / f"{name}-{size}-{key}.safetensors"

    return _load_or_compute(path, source, feature_extractor, keyed, resolution, center_crop, max_images,
                            batch_size, num_workers, on_bad_image, progress)


def _load_or_compute(path, source, extractor, keyed, resolution, center_crop, max_images, batch_size, num_workers,
                     on_bad_image, progress) -> FeatureStats:
    if path is not None and path.is_file():
        log.info("real FID statistics from cache %s", path)
        return FeatureStats.load(path)
    if isinstance(source, (str, Path)):
        root = Path(source).expanduser().resolve()
        files = list_image_files(root)[:max_images]
        images = _FolderImages(files, resolution, center_crop)
        describe = lambda index: str(files[index])  # noqa: E731
    else:
        images = _DatasetImages(source)
        describe = lambda index: f"dataset item {index}"  # noqa: E731
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    stats = FeatureStats.zeros(num_features_of(extractor))
    bad: list[str] = []
    with tqdm(total=len(images), unit="img", desc="real FID statistics", disable=not progress, dynamic_ncols=True) as bar:
        for batch, failures in loader:
            for index, reason in failures:
                bad.append(f"{describe(index)}: {reason}")
                if on_bad_image == "skip":
                    warnings.warn(f"skipping {describe(index)}: {reason}", BadImageWarning, stacklevel=2)
            if batch is not None:
                stats.add_(FeatureStats.from_features(extract_features(extractor, batch)))
            bar.update(len(failures) + (0 if batch is None else batch.shape[0]))
    if bad and on_bad_image == "fail":
        raise ValueError(f"{len(bad)} unreadable image(s) (on_bad_image=fail): " + "; ".join(bad[:20]))
    if stats.count < 2:
        raise ValueError(f"FID needs at least 2 real images, got {stats.count}")
    if bad:
        log.warning("real FID statistics: skipped %d unreadable image(s)", len(bad))
    parts = keyed[0] if keyed is not None else {"features": extractor_fingerprint(extractor), "resolution": resolution}
    stats.info = {**parts, "count": stats.count, "skipped": len(bad)}
    if path is not None:
        stats.info["cache_file"] = str(path)
        stats.save(path)
        log.info("real FID statistics of %d images cached in %s", stats.count, path)
    return stats


# --- generated samples ------------------------------------------------------------------------------
def _check_real_stats(real_stats: FeatureStats, fingerprint: str, dim: int) -> None:
    if real_stats.num_features != dim:
        raise ValueError(f"real statistics are {real_stats.num_features}-d, the feature extractor gives {dim}-d")
    made_with = real_stats.info.get("features")
    if made_with is not None and made_with != fingerprint:
        raise ValueError(
            f"the real statistics were computed with another feature extractor ({made_with}, now {fingerprint}); "
            "compute them again with this one (real_statistics)"
        )


def fake_statistics(shard_dir: str | Path, num_samples: int, wait_s: float = 0.0) -> FeatureStats:
    """Combined statistics of samples 0 .. num_samples-1 from a shard folder, shard by shard in
    index order: the same whichever ranks (and how many) wrote the shards (`wait_s`: see
    `iter_shard_features`)."""
    shard_dir = Path(shard_dir)
    meta_file = shard_dir / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{shard_dir} is not a sample shard folder (no meta.json)")
    meta = json.loads(meta_file.read_text())
    stats = None
    for features in iter_shard_features(shard_dir, num_samples, meta["shard_size"], meta["hash"], wait_s=wait_s):
        part = FeatureStats.from_features(features)
        stats = part if stats is None else stats.add_(part)
    stats.info = {"features": meta["features"], "count": stats.count, "shard_dir": str(shard_dir)}
    return stats


def fid_from_shards(shard_dir: str | Path, num_samples: int, real_stats: FeatureStats, wait_s: float = 0.0) -> float:
    """FID of finished shards against real statistics (e.g. after independent per-rank jobs)."""
    fake = fake_statistics(shard_dir, num_samples, wait_s=wait_s)
    _check_real_stats(real_stats, fake.info["features"], fake.num_features)
    return frechet_distance(real_stats, fake)


# --- KID: the same features, unbiased at small counts ----------------------------------------------
KID_FORMAT_VERSION = 1


def real_features(
    source: str | Path,
    feature_extractor: nn.Module,
    *,
    resolution: int | None,
    center_crop: bool = False,
    max_images: int | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 50,
    num_workers: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """[n, D] features of every image of a real folder (what KID needs; FID keeps only the moments),
    preprocessed as `real_statistics` does and cached beside its statistics under the same key
    (``<folder>-<res>px-<key>.features.safetensors``). Unreadable files are skipped."""
    keyed = real_stats_key(source, feature_extractor, resolution, center_crop, max_images)
    parts, key = keyed
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(source)).name)[:48] or "images"
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_root() / "fid_stats"
    path = folder / f"{name}-{f'{resolution}px' if resolution else 'native'}-{key}.features.safetensors"
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("format") == str(KID_FORMAT_VERSION):
                return f.get_tensor("features")
    root = Path(source).expanduser().resolve()
    files = list_image_files(root)[:max_images]
    loader = DataLoader(_FolderImages(files, resolution, center_crop), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_collate)
    chunks = []
    with tqdm(total=len(files), unit="img", desc="real KID features", disable=not progress, dynamic_ncols=True) as bar:
        for batch, failures in loader:
            if batch is not None:
                chunks.append(extract_features(feature_extractor, batch).detach().to("cpu").float())
            bar.update(len(failures) + (0 if batch is None else batch.shape[0]))
    if not chunks:
        raise ValueError(f"no readable image in {root} for KID")
    features = torch.cat(chunks).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: save_file({"features": features}, tmp, metadata={
        "format": str(KID_FORMAT_VERSION), "info": json.dumps(parts)}))
    return features


def fake_features(shard_dir: str | Path, num_samples: int) -> torch.Tensor:
    """[num_samples, D] features of samples 0 .. num_samples-1 of a finished shard folder."""
    meta_file = Path(shard_dir) / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{shard_dir} is not a sample shard folder (no meta.json)")
    meta = json.loads(meta_file.read_text())
    return torch.cat(list(iter_shard_features(shard_dir, num_samples, meta["shard_size"], meta["hash"])))


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
        metric = KernelInceptionDistance(feature=_FeatureDim(real.shape[1]), subsets=int(subsets),
                                         subset_size=int(subset_size), degree=int(degree), gamma=gamma,
                                         coef=float(coef), sync_on_compute=False)
    metric.real_features.append(real.detach().to("cpu").double())
    metric.fake_features.append(fake.detach().to("cpu").double())
    metric._update_count = 1  # states filled directly, as `update` would have
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        mean, std = metric.compute()
    return float(mean), float(std)


def fid_over_samples(
    generate_fn: GenerateFn,
    num_samples: int,
    real_stats: FeatureStats,
    feature_extractor: nn.Module,
    shard_dir: str | Path,
    shard_size: int = 1000,
    rank: int | None = None,
    world_size: int | None = None,
    *,
    batch_size: int | None = None,
    base_seed: int = 0,
    keep_images: bool = False,
    run_key: Any = None,
    progress: bool = True,
) -> float:
    """FID of `num_samples` generated images against `real_stats`.

    Image i is image i of seed `base_seed`: ``generate_fn([.., i, ..], base_seed)`` in calls of
    `batch_size` indices; this rank (default: torch.distributed's, or RANK/WORLD_SIZE)
    generates its unfinished shards, then, after a barrier when torch.distributed is initialised,
    the statistics of all shards are combined; a shard another rank has not written yet raises
    `MissingShardsError` (run that rank, then `fid_from_shards`). Defaults read from `generate_fn`
    when it has them (`PipelineSampler` does): ``batch_size``, ``run_key``.
    """
    default_rank, default_world = rank_world()
    rank = default_rank if rank is None else rank
    world_size = default_world if world_size is None else world_size
    fingerprint = extractor_fingerprint(feature_extractor)
    dim = num_features_of(feature_extractor)
    _check_real_stats(real_stats, fingerprint, dim)
    batch_size = int(batch_size or getattr(generate_fn, "batch_size", 16))
    run_key = run_key if run_key is not None else getattr(generate_fn, "run_key", None)

    meta = run_meta(shard_size, base_seed, fingerprint, run_key)
    run_hash = prepare_shard_dir(shard_dir, meta)
    generate_shards(
        generate_fn,
        lambda images: extract_features(feature_extractor, images),
        num_samples,
        shard_dir,
        run_hash,
        shard_size,
        batch_size=batch_size,
        base_seed=base_seed,
        rank=rank,
        world_size=world_size,
        keep_images=keep_images,
        progress=progress,
    )
    wait_s = 0.0
    if world_size > 1 and meets():
        barrier()
        wait_s = SHARDS_VISIBLE_WAIT_S
    return fid_from_shards(shard_dir, num_samples, real_stats, wait_s=wait_s)


# --- config-driven ----------------------------------------------------------------------------------
@dataclass
class FIDConfig:
    """The ``fid:`` settings of an evaluation config (Table 1: 50,000 samples at 512 px)."""

    real_path: str | None = None  # folder of real images (FFHQ, AFHQv2)
    shard_dir: str | None = None  # where the per-shard features (and kept images) go
    resolution: int = 512  # real images are resized to this; samples must have this size
    num_samples: int = 50_000
    shard_size: int = 1000
    batch_size: int = 16  # images per generate_fn call
    seed: int = 0  # image i of this seed (ccp.pipelines.sampling)
    keep_images: bool = False  # also write shard_dir/images/<i>.png
    inception_weights: str | None = None  # local weights-inception-2015-12-05-6726825d.pth (else the torch hub cache)
    antialias: bool = False  # False: TF-compatible resize to 299, as torchmetrics < 1.8 (the paper's numbers)
    center_crop: bool = False
    max_real_images: int | None = None  # null: every image of the folder
    stats_cache_dir: str | None = None  # null: $CCP_CACHE_DIR/fid_stats
    feature_batch_size: int = 50  # real images per Inception call
    num_workers: int = 4  # image decoding workers for the real statistics

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "FIDConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise FIDConfigError(f"unknown fid setting(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(values))

    def check(self, need_weights: bool = True) -> Path | None:
        """Everything checkable without models; returns the Inception weights path."""
        for key in ("resolution", "num_samples", "shard_size", "batch_size", "feature_batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FIDConfigError(f"fid.{key} must be a positive integer, got {value!r}")
        if self.num_samples < 2:
            raise FIDConfigError("fid.num_samples must be at least 2")
        if not self.shard_dir:
            raise FIDConfigError("fid.shard_dir is not set; set fid.shard_dir=/path/for/sample/shards")
        if not self.real_path or not Path(self.real_path).expanduser().is_dir():
            raise FIDConfigError(f"fid.real_path={self.real_path} is not a folder; set it to the real images (e.g. data/ffhq)")
        return resolve_inception_weights(self.inception_weights) if need_weights else None


def run_fid(
    cfg: FIDConfig | Mapping[str, Any],
    generate_fn: GenerateFn,
    *,
    feature_extractor: nn.Module | None = None,
    device: str | torch.device | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    run_key: Any = None,
    progress: bool = True,
) -> float:
    """Check the config and the Inception weights, build the extractor, get the (cached) real
    statistics, then generate and measure. Nothing is generated before all checks pass; a CLI
    should call ``FIDConfig.check()`` itself before it loads the diffusion model."""
    cfg = cfg if isinstance(cfg, FIDConfig) else FIDConfig.from_mapping(cfg)
    weights = cfg.check(need_weights=feature_extractor is None)
    for axis in ("height", "width"):
        size = getattr(generate_fn, axis, None)
        if size is not None and size != cfg.resolution:
            raise FIDConfigError(
                f"samples are {axis} {size} but fid.resolution={cfg.resolution}: the real images are resized to "
                "fid.resolution, so sample at that size (or set fid.resolution to the sample size)"
            )
    if feature_extractor is None:
        feature_extractor = inception_feature_extractor(weights, device, antialias=cfg.antialias)
    real = rank_zero_computes(lambda: real_statistics(
        cfg.real_path,
        feature_extractor,
        resolution=cfg.resolution,
        center_crop=cfg.center_crop,
        max_images=cfg.max_real_images,
        cache_dir=cfg.stats_cache_dir,
        batch_size=cfg.feature_batch_size,
        num_workers=cfg.num_workers,
        progress=progress,
    ))
    return fid_over_samples(
        generate_fn,
        cfg.num_samples,
        real,
        feature_extractor,
        cfg.shard_dir,
        cfg.shard_size,
        rank,
        world_size,
        batch_size=cfg.batch_size,
        base_seed=cfg.seed,
        keep_images=cfg.keep_images,
        run_key=run_key,
        progress=progress,
    )
