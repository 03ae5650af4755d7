"""Latents precomputed once with the prior's VAE, so that training never runs the VAE.

Every image is encoded twice, as is and mirrored, and the VAE posterior's parameters (mean and
log-variance, as diffusers' `DiagonalGaussianDistribution` holds them) are stored: a training
step samples ``mean + exp(logvar / 2) * eps`` afresh, exactly what encoding every step would give.

Layout, under ``<root>/<key>/``::

    meta.json                     what was encoded (files, resolution, VAE, shapes, shard size)
    shard-00000.safetensors       "mean", "logvar": [K, 2, C, h, w], index 1 of dim 1 = mirrored;
                                  "original_size", "crop_top_left": [K, 2] (SDXL's time ids; flip-independent)
    ...
    manifest.json                 written last, with each shard's size: the cache is complete
                                  (a manifest written before sizes were recorded counts by its presence)

The key hashes the VAE (config and encoder weights), the resolution, the crop mode, the storage
and encoding dtypes and the file list (relative paths, sizes, mtimes): it does not depend on the
method, so every method and every later run with the same data and prior reuses one cache.
The folder is a `ccp.io.shards.ShardedFolder`: shards are written atomically, so an interrupted
build resumes where it stopped, and the manifest (with every shard's size) is its completion record. An fp16 VAE whose config says ``force_upcast`` encodes in fp32 on SDXL priors
(`needs_upcast`), as diffusers' SDXL pipelines and training scripts do (SDXL's fp16 VAE overflows).
Under DDP rank r builds shards r, r + W, ... and all ranks meet at a barrier;
the cache folder must be visible to all ranks (one node, or a shared filesystem).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ccp.distributed import barrier_or_none
from ccp.io import content_hash, default_cache_root, write_atomic
from ccp.io.shards import ShardedFolder, open_meta, record_complete
from ccp.priors.loading import resolve_dtype

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2  # 2: shards also hold each image's original size and crop
MANIFEST = "manifest.json"
GEOMETRY_KEYS = ("original_size", "crop_top_left")
META = "meta.json"


class EncodableDataset(Protocol):
    """What the cache needs from a dataset (`ccp.training.data.ImageFolderDataset` has it)."""

    def __len__(self) -> int: ...

    def pixels(self, index: int) -> torch.Tensor:
        """Image `index` as [3, H, W] in [-1, 1], never flipped."""

    def cache_fingerprint(self) -> dict[str, Any]:
        """JSON data that changes whenever `pixels` could: files, resolution, crop mode."""

    def geometry(self, index: int) -> dict[str, torch.Tensor]:
        """``original_size`` and ``crop_top_left`` of image `index` (LongTensor [2] each); optional."""


@dataclass
class LatentCacheConfig:
    enabled: bool = False
    dir: str | None = None  # null: <cache root>/latents
    shard_size: int = 1024  # images per shard file
    dtype: str = "float16"  # storage dtype of mean and logvar
    encode_dtype: str | None = None  # null: the VAE's own dtype
    batch_size: int = 16  # images per VAE call (each call encodes 2x this: both flips)
    output: str = "latents"  # latents: sampled and scaled; posterior: latent_mean/latent_std, unscaled

    def __post_init__(self):
        if self.output not in ("latents", "posterior"):
            raise ValueError(f"latent_cache.output must be 'latents' or 'posterior', not {self.output!r}")
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError("latent_cache.shard_size and latent_cache.batch_size must be positive")


def needs_upcast(vae: torch.nn.Module | None, sdxl: bool) -> bool:
    """An SDXL prior's fp16 VAE with ``force_upcast``: encode in fp32 (it overflows in fp16)."""
    if vae is None or not sdxl:
        return False
    return next(vae.parameters()).dtype == torch.float16 and bool(getattr(vae, "config", {}).get("force_upcast", False))


# --- keys ------------------------------------------------------------------------------------
def vae_config_hash(vae: torch.nn.Module) -> str:
    config = {k: v for k, v in dict(getattr(vae, "config", {})).items() if not k.startswith("_")}
    return content_hash({"class": type(vae).__name__, "config": config})


def vae_weights_hash(vae: torch.nn.Module) -> str:
    """Hash of the weights that determine latents: the encoder and quant_conv.

    A VAE whose decoder alone was fine-tuned (e.g. sd-vae-ft-mse) encodes identically and shares
    the cache; a VAE with no `encoder.` weights is hashed whole.
    """
    state = vae.state_dict()
    names = sorted(n for n in state if n.startswith(("encoder.", "quant_conv.")))
    digest = hashlib.sha256()
    for name in names or sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def latent_cache_key(
    dataset: EncodableDataset,
    vae: torch.nn.Module,
    storage_dtype: torch.dtype | str = torch.float16,
    encode_dtype: torch.dtype | str | None = None,
) -> str:
    """The cache folder name: changes with the VAE, the images, their preprocessing, the dtypes."""
    encode_dtype = resolve_dtype(encode_dtype) or next(vae.parameters()).dtype
    parts = {
        "version": CACHE_FORMAT_VERSION,
        "vae_config": vae_config_hash(vae),
        "vae_weights": vae_weights_hash(vae),
        "data": dataset.cache_fingerprint(),
        "storage_dtype": str(resolve_dtype(storage_dtype)),
        "encode_dtype": str(encode_dtype),
    }
    return content_hash(parts)[:24]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _shard_ok(path: Path, count: int) -> bool:
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return int(f.metadata().get("count", -1)) == count and f.get_slice("mean").get_shape()[0] == count
    except Exception as err:  # unreadable: rebuild it
        log.warning("latent cache shard %s is unreadable (%s); rebuilding it", path, err)
        return False


def latent_shards(folder: Path, num_images: int, shard_size: int) -> ShardedFolder:
    """The cache folder as a sharded store; its completion record is the manifest."""
    return ShardedFolder(folder, num_images, shard_size,
                         shard_done=lambda k, items: _shard_ok(folder / shard_name(k), len(items)),
                         shard_files=lambda k, items: [shard_name(k)], record=MANIFEST)


# --- building --------------------------------------------------------------------------------
class _Unflipped(Dataset):
    def __init__(self, dataset: EncodableDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, dict[str, torch.Tensor]]:
        geometry = getattr(self.dataset, "geometry", None)
        return index, self.dataset.pixels(index), geometry(index) if geometry is not None else {}


def build_latent_cache(
    dataset: EncodableDataset,
    vae: torch.nn.Module,
    cache_dir: str | Path | None = None,
    shard_size: int = 1024,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    storage_dtype: torch.dtype | str = torch.float16,
    batch_size: int = 16,
    num_workers: int = 0,
    barrier: Callable[[], None] | None = None,
    progress: bool = True,
    upcast: bool = False,
) -> Path:
    """Encode `dataset` with `vae` into ``<cache_dir>/<key>/`` (both flips) and return that folder.

    `cache_dir` defaults to ``<cache root>/latents``. Finished shards are kept, so a rerun builds
    only what is missing, and a complete cache (manifest present) returns at once without calling
    the VAE. Rank `rank` of `world_size` builds shards rank, rank + world_size, ...; then `barrier`
    (default: `ccp.distributed.barrier` when a process group is up) is called, and a rank that sees every
    shard writes the manifest. Without a barrier, the rank that finishes last completes the cache.
    `device`/`dtype` default to the VAE's (fp32 for an fp16 VAE with ``force_upcast`` when `upcast`,
    i.e. on SDXL priors); `vae` itself is left where it was.
    """
    storage_dtype = resolve_dtype(storage_dtype)
    vae_dtype = next(vae.parameters()).dtype
    dtype = resolve_dtype(dtype) or (torch.float32 if upcast and needs_upcast(vae, True) else vae_dtype)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root() / "latents"
    folder = cache_dir / latent_cache_key(dataset, vae, storage_dtype, dtype)
    if record_complete(folder, MANIFEST):
        log.info("latent cache %s is complete; reusing it", folder)
        return folder

    meta = _read_or_write_meta(folder, dataset, vae, shard_size, storage_dtype, dtype)
    store = latent_shards(folder, meta["num_images"], meta["shard_size"])
    mine = store.pending(rank, world_size)
    if mine:
        _encode_shards(
            dataset, vae, folder, meta["shard_size"], [(s, store.ranges[s]) for s in mine], device, dtype, storage_dtype,
            batch_size, num_workers, progress, desc=f"encoding latents (rank {rank}/{world_size})" if world_size > 1 else "encoding latents",
        )

    barrier = barrier or (barrier_or_none() if world_size > 1 else None)
    if barrier is not None:
        barrier()
    store.finish({"complete": True, "num_images": meta["num_images"],
                  "shards": [shard_name(s) for s in range(len(store.ranges))]}, met=barrier is not None)
    return folder


def _read_or_write_meta(folder: Path, dataset, vae, shard_size: int, storage_dtype, encode_dtype) -> dict[str, Any]:
    if (folder / META).is_file():  # resuming: keep the layout the first run chose
        meta = json.loads((folder / META).read_text())
        if meta["shard_size"] != shard_size:
            log.info("latent cache %s was started with shard_size=%d; keeping it", folder, meta["shard_size"])
        return meta
    config = getattr(vae, "config", {})
    factor = 2 ** (len(config["block_out_channels"]) - 1) if "block_out_channels" in config else 8
    resolution = dataset.cache_fingerprint()["resolution"]
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE's downsampling factor {factor}")
    meta = {
        "version": CACHE_FORMAT_VERSION,
        "num_images": len(dataset),
        "shard_size": shard_size,
        "latent_shape": [config.get("latent_channels", 4), resolution // factor, resolution // factor],
        "scaling_factor": config.get("scaling_factor", 1.0),
        "shift_factor": config.get("shift_factor"),
        "storage_dtype": str(storage_dtype).removeprefix("torch."),
        "encode_dtype": str(encode_dtype).removeprefix("torch."),
        "data": dataset.cache_fingerprint(),
    }
    return open_meta(folder, meta)


def _encode_shards(dataset, vae, folder, shard_size, shards, device, dtype, storage_dtype, batch_size, num_workers, progress, desc):
    vae_device = next(vae.parameters()).device
    device = torch.device(device) if device is not None else vae_device
    # Cast a copy, never the caller's VAE (the training module may share it); moving is undone below.
    encoder = copy.deepcopy(vae).to(dtype) if dtype != next(vae.parameters()).dtype else vae
    was_training = encoder.training
    encoder.to(device).eval()
    # Batches never cross a shard, so a shard's content does not depend on which rank built it.
    batches = [list(r[i : i + batch_size]) for _, r in shards for i in range(0, len(r), batch_size)]
    loader = DataLoader(_Unflipped(dataset), batch_sampler=batches, num_workers=num_workers)
    pending = {s: {"range": r, "mean": [], "logvar": [], "geometry": []} for s, r in shards}
    bar = tqdm(total=sum(len(r) for _, r in shards), desc=desc, unit="img", disable=not progress)
    try:
        with torch.inference_mode():
            for indices, pixels, geometry in loader:
                current = int(indices[0]) // shard_size
                pixels = pixels.to(device, dtype)
                posterior = encoder.encode(torch.cat([pixels, pixels.flip(-1)])).latent_dist
                n = len(indices)
                for name, value in (("mean", posterior.mean), ("logvar", posterior.logvar)):
                    value = value.to("cpu", storage_dtype)
                    pending[current][name].append(torch.stack([value[:n], value[n:]], dim=1))
                pending[current]["geometry"].append(geometry)
                bar.update(n)
                entry = pending[current]
                if sum(len(m) for m in entry["mean"]) == len(entry["range"]):
                    _write_shard(folder, current, entry)
                    del pending[current]
    finally:
        bar.close()
        encoder.to(vae_device).train(was_training)


def _write_shard(folder: Path, index: int, entry: dict[str, Any]) -> None:
    tensors = {name: torch.cat(entry[name]).contiguous() for name in ("mean", "logvar")}
    for key in entry["geometry"][0] if entry["geometry"] else ():
        tensors[key] = torch.cat([g[key] for g in entry["geometry"]]).long().contiguous()
    metadata = {"count": str(len(entry["range"])), "first_index": str(entry["range"].start)}
    write_atomic(folder / shard_name(index), lambda tmp: save_file(tensors, tmp, metadata=metadata))


# --- reading ---------------------------------------------------------------------------------
class LatentCache:
    """A complete cache folder; reads one image's posterior at a time from memory-mapped shards."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not record_complete(self.folder, MANIFEST):
            raise FileNotFoundError(
                f"latent cache {self.folder} is incomplete (no {MANIFEST}); build it with build_latent_cache"
            )
        self.meta = json.loads((self.folder / META).read_text())
        self.shard_size = self.meta["shard_size"]
        self.scaling_factor = float(self.meta["scaling_factor"])
        self.shift_factor = float(self.meta["shift_factor"] or 0.0)
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.meta["num_images"]

    def __getstate__(self):  # DataLoader workers open their own handles
        return {**self.__dict__, "_handles": {}}

    def _handle(self, shard: int):
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.folder / shard_name(shard)), framework="pt")
        return self._handles[shard]

    def posterior(self, index: int, flipped: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of image `index` (mirrored if `flipped`) as float32 [C, h, w], unscaled."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a cache of {len(self)} images")
        handle = self._handle(index // self.shard_size)
        j, f = index % self.shard_size, int(flipped)
        return tuple(handle.get_slice(name)[j : j + 1, f : f + 1][0, 0].float() for name in ("mean", "logvar"))

    def geometry(self, index: int) -> dict[str, torch.Tensor]:
        """``original_size`` and ``crop_top_left`` (LongTensor [2]) of image `index`, if the cache holds them."""
        handle = self._handle(index // self.shard_size)
        j = index % self.shard_size
        return {key: handle.get_slice(key)[j : j + 1][0] for key in GEOMETRY_KEYS if key in handle.keys()}

    def sample(self, index: int, flipped: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """A latent drawn from the posterior, scaled for the UNet: ``(z - shift) * scaling_factor``."""
        mean, logvar = self.posterior(index, flipped)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
        return (z - self.shift_factor) * self.scaling_factor


class CachedLatentDataset(Dataset):
    """Training items from a `LatentCache`: a random flip variant per item when `random_flip`.

    ``output="latents"`` gives ``{"latents": (z - shift) * scale}`` with z drawn afresh each time;
    ``output="posterior"`` gives ``{"latent_mean", "latent_std"}`` (unscaled) for the training
    module to sample with its own generator.
    """

    def __init__(self, cache: LatentCache | str | Path, random_flip: bool = True, output: str = "latents"):
        self.cache = cache if isinstance(cache, LatentCache) else LatentCache(cache)
        self.random_flip = random_flip
        self.output = output

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.item(index, self.random_flip and bool(torch.rand(()) < 0.5))

    def item(self, index: int, flipped: bool) -> dict[str, torch.Tensor]:
        if self.output == "posterior":
            mean, logvar = self.cache.posterior(index, flipped)
            item = {"latent_mean": mean, "latent_std": torch.exp(0.5 * logvar)}
        else:
            item = {"latents": self.cache.sample(index, flipped)}
        return {**item, **self.cache.geometry(index)}
