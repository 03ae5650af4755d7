"""Feature statistics for FID and the features KID needs: the real-image path (one, for both) with
its cache, and the generated side read back from a shard folder (`ccp.evaluation.generation`).

Real images: every image of the folder, PIL-bicubic resized to the sample resolution as the
training data is (`ccp.training.data`), entering the extractor as uint8. Statistics (feature sum,
outer-product sum, count, and mean/covariance) and KID's raw features are computed once per
(folder listing, resolution, crop, feature extractor) and cached side by side under one key.
Nothing here calls a collective: under DDP the caller has rank 0 compute them
(`ccp.distributed.rank_zero_computes`).
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ccp.evaluation.generation import iter_shard_features, to_uint8_images
from ccp.evaluation.inception import extract_features, extractor_fingerprint, num_features_of
from ccp.io import BadImageWarning, content_hash, default_cache_root, list_image_files, load_rgb8, resize_to_square, write_atomic

log = logging.getLogger(__name__)

STATS_FORMAT_VERSION = 1
KID_FORMAT_VERSION = 1
REAL_PREPROCESS = "pil-rgb8-bicubic-resize-uint8"


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


def real_cache_path(source: str | Path | Dataset, key: str, resolution: int | None, cache_dir: str | Path | None,
                    cache_key: str | None = None, suffix: str = ".safetensors") -> Path:
    """``<cache_dir or $CCP_CACHE_DIR/fid_stats>/<folder>-<res>px-<key><suffix>``, the folder name
    (or the dataset's `cache_key`) sanitised and cut at 48 characters."""
    name = Path(str(source)).name if isinstance(source, (str, Path)) else str(cache_key)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:48] or "images"
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_root() / "fid_stats"
    return folder / f"{name}-{f'{resolution}px' if resolution else 'native'}-{key}{suffix}"


def _real_images(source: str | Path | Dataset, resolution: int | None, center_crop: bool,
                 max_images: int | None) -> tuple[Dataset, Any]:
    """(the images as a dataset of (index, uint8 image or None, failure or None), index -> name)."""
    if isinstance(source, (str, Path)):
        root = Path(source).expanduser().resolve()
        files = list_image_files(root)[:max_images]
        return _FolderImages(files, resolution, center_crop), lambda index: str(files[index])
    return _DatasetImages(source), lambda index: f"dataset item {index}"


def real_feature_batches(images: Dataset, extractor: nn.Module, batch_size: int, num_workers: int, desc: str,
                         progress: bool) -> Iterator[tuple[torch.Tensor | None, list[tuple[int, str]]]]:
    """(features of a batch, or None when none of it was readable; its unreadable items as (index,
    reason)) for every batch of `images`, in order: the one real-image path of FID and KID."""
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    with tqdm(total=len(images), unit="img", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for batch, failures in loader:
            features = None if batch is None else extract_features(extractor, batch)
            bar.update(len(failures) + (0 if batch is None else batch.shape[0]))
            yield features, failures


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
        path = real_cache_path(source, keyed[1], resolution, cache_dir, cache_key)
    if path is not None and path.is_file():
        log.info("real FID statistics from cache %s", path)
        return FeatureStats.load(path)

    images, describe = _real_images(source, resolution, center_crop, max_images)
    stats = FeatureStats.zeros(num_features_of(feature_extractor))
    bad: list[str] = []
    for features, failures in real_feature_batches(images, feature_extractor, batch_size, num_workers,
                                                   "real FID statistics", progress):
        for index, reason in failures:
            bad.append(f"{describe(index)}: {reason}")
            if on_bad_image == "skip":
                warnings.warn(f"skipping {describe(index)}: {reason}", BadImageWarning, stacklevel=2)
        if features is not None:
            stats.add_(FeatureStats.from_features(features))
    if bad and on_bad_image == "fail":
        raise ValueError(f"{len(bad)} unreadable image(s) (on_bad_image=fail): " + "; ".join(bad[:20]))
    if stats.count < 2:
        raise ValueError(f"FID needs at least 2 real images, got {stats.count}")
    if bad:
        log.warning("real FID statistics: skipped %d unreadable image(s)", len(bad))
    parts = keyed[0] if keyed is not None else {"features": fingerprint, "resolution": resolution}
    stats.info = {**parts, "count": stats.count, "skipped": len(bad)}
    if path is not None:
        stats.info["cache_file"] = str(path)
        stats.save(path)
        log.info("real FID statistics of %d images cached in %s", stats.count, path)
    return stats


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
    parts, key = real_stats_key(source, feature_extractor, resolution, center_crop, max_images)
    path = real_cache_path(source, key, resolution, cache_dir, suffix=".features.safetensors")
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("format") == str(KID_FORMAT_VERSION):
                return f.get_tensor("features")
    images, _ = _real_images(source, resolution, center_crop, max_images)
    chunks = [features.detach().to("cpu").float() for features, _ in real_feature_batches(
        images, feature_extractor, batch_size, num_workers, "real KID features", progress) if features is not None]
    if not chunks:
        raise ValueError(f"no readable image in {Path(source).expanduser().resolve()} for KID")
    features = torch.cat(chunks).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: save_file({"features": features}, tmp, metadata={
        "format": str(KID_FORMAT_VERSION), "info": json.dumps(parts)}))
    return features


# --- generated samples ------------------------------------------------------------------------------
def check_real_stats(real_stats: FeatureStats, fingerprint: str, dim: int) -> None:
    """Refuse real statistics of another width or of another feature extractor than the samples'."""
    if real_stats.num_features != dim:
        raise ValueError(f"real statistics are {real_stats.num_features}-d, the feature extractor gives {dim}-d")
    made_with = real_stats.info.get("features")
    if made_with is not None and made_with != fingerprint:
        raise ValueError(
            f"the real statistics were computed with another feature extractor ({made_with}, now {fingerprint}); "
            "compute them again with this one (real_statistics)"
        )


def _sample_meta(shard_dir: str | Path) -> dict[str, Any]:
    meta_file = Path(shard_dir) / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{shard_dir} is not a sample shard folder (no meta.json)")
    return json.loads(meta_file.read_text())


def fake_statistics(shard_dir: str | Path, num_samples: int, wait_s: float = 0.0) -> FeatureStats:
    """Combined statistics of samples 0 .. num_samples-1 from a shard folder, shard by shard in
    index order: the same whichever ranks (and how many) wrote the shards (`wait_s`: see
    `iter_shard_features`)."""
    meta = _sample_meta(shard_dir)
    stats = None
    for features in iter_shard_features(shard_dir, num_samples, meta["shard_size"], meta["hash"], wait_s=wait_s):
        part = FeatureStats.from_features(features)
        stats = part if stats is None else stats.add_(part)
    stats.info = {"features": meta["features"], "count": stats.count, "shard_dir": str(Path(shard_dir))}
    return stats


def fake_features(shard_dir: str | Path, num_samples: int) -> torch.Tensor:
    """[num_samples, D] features of samples 0 .. num_samples-1 of a finished shard folder."""
    meta = _sample_meta(shard_dir)
    return torch.cat(list(iter_shard_features(shard_dir, num_samples, meta["shard_size"], meta["hash"])))
