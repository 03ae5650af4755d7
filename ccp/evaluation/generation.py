"""Sharded, resumable sample generation for sample-based metrics (FID over 50,000 images).

A metric run is a function of global sample indices ``0 .. N-1``: image ``i`` is image ``i`` of
seed ``base_seed`` as `ccp.pipelines.sampling` defines it (a CPU generator seeded ``base_seed + i``),
so which device, process, batch or shard makes it does not change it. The folder is a
`ccp.io.shards.ShardedFolder`: the indices are cut into shards of ``shard_size`` (the last may be
shorter), rank ``r`` of ``W`` takes shards ``r, r + W, r + 2W, ...`` (W counts the processes of
every node), and per shard the features of its images are written in one file, atomically, so a
rerun skips finished shards and an interrupted run resumes at the shard it was in. Nothing here
meets other ranks: the evaluation run does (`ccp.evaluation.fid`). Layout of a shard folder::

    meta.json                      what is generated: shard size, seed, noise, run key,
                                   feature extractor; a different run is refused, not mixed in
    features/shard-00000.safetensors  "features": [n, D] for indices start .. start + n - 1
    images/000000.png ...          only with keep_images=True

`generate_fn(indices, seed)` is the only thing a method provides: it returns images ``indices`` of
seed `seed` (uint8 [n, 3, H, W], float in [0, 1], a list of PIL images or an [n, H, W, 3] array).
`PipelineSampler` builds one from a `GCFGPipeline` and a `GuidanceSpec`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import PIL.Image
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ccp.io import write_atomic
from ccp.io.shards import ShardedFolder, as_ranges, open_meta
from ccp.pipelines.sampling import sample_images

log = logging.getLogger(__name__)

SHARD_FORMAT_VERSION = 1
META = "meta.json"


class GenerateFn(Protocol):
    """``images = generate_fn(indices, seed)``: image ``i`` of seed `seed` for every global index
    ``i`` (its noise from ``ccp.pipelines.sampling.noise_generators(seed, indices)``)."""

    def __call__(self, indices: list[int], seed: int) -> Any: ...


class ShardDirMismatchError(ValueError):
    """The shard folder holds another run (other seed, shard size, guidance or features)."""


class MissingShardsError(RuntimeError):
    """Some shards are not written yet (another rank has not finished, or a run was cut short)."""

    def __init__(self, message: str, missing: list[int]):
        super().__init__(message)
        self.missing = missing


# --- images ----------------------------------------------------------------------------------
def to_uint8_images(images: Any, count: int | None = None) -> torch.Tensor:
    """uint8 [n, 3, H, W] from uint8/float-[0, 1] tensors or arrays (NCHW, or NHWC arrays as
    diffusers' ``output_type="np"`` gives) or a list of PIL images.

    Floats are rounded (``round(x * 255)``), as diffusers does when it writes PIL images/PNGs, so
    features of in-memory samples equal the features of the same samples saved and reloaded.
    """
    if isinstance(images, PIL.Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if images and isinstance(images[0], PIL.Image.Image):
            images = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
        else:
            images = torch.stack([torch.as_tensor(im) for im in images])
    if isinstance(images, np.ndarray):
        array = images
        if array.ndim == 3:
            array = array[None]
        if array.ndim == 4 and array.shape[-1] in (1, 3) and array.shape[1] not in (1, 3):
            array = array.transpose(0, 3, 1, 2)  # NHWC -> NCHW
        images = torch.from_numpy(np.ascontiguousarray(array))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected images as a tensor, array or list of PIL images, got {type(images).__name__}")
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images shaped [n, 3, H, W] (or [n, H, W, 3] arrays), got {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise TypeError(f"integer images must be uint8 in [0, 255], got {images.dtype}")
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    if count is not None and images.shape[0] != count:
        raise ValueError(f"generate_fn returned {images.shape[0]} images for {count} indices")
    return images.contiguous()


def save_png(image: torch.Tensor, path: Path) -> None:
    """uint8 [3, H, W] -> PNG, written atomically."""
    array = image.permute(1, 2, 0).cpu().numpy()
    write_atomic(path, lambda tmp: PIL.Image.fromarray(array).save(tmp, format="PNG"))


# --- shards ----------------------------------------------------------------------------------
def shard_path(shard_dir: str | Path, index: int) -> Path:
    return Path(shard_dir) / shard_file(index)


def shard_file(index: int) -> str:
    return f"features/shard-{index:05d}.safetensors"


def image_path(shard_dir: str | Path, sample_index: int) -> Path:
    return Path(shard_dir) / "images" / f"{sample_index:06d}.png"


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {"__class__": type(value).__name__, **{k: _jsonable(v) for k, v in asdict(value).items()}}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, PIL.Image.Image):
        return f"PIL.Image:{hashlib.sha256(value.tobytes()).hexdigest()[:16]}"
    return repr(value)


def run_meta(shard_size: int, base_seed: int, features: str, run_key: Any) -> dict[str, Any]:
    """What must be equal for two processes to write into one shard folder."""
    return {
        "format": SHARD_FORMAT_VERSION,
        "shard_size": int(shard_size),
        "base_seed": int(base_seed),
        "generator_device": "cpu",  # image i's noise: ccp.pipelines.sampling (earlier runs could differ)
        "features": features,
        "run_key": _jsonable(run_key),
    }


def meta_hash(meta: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


def sample_shards(shard_dir: str | Path, num_samples: int, shard_size: int, run_hash: str,
                  with_images: bool = False) -> ShardedFolder:
    """The shard folder of samples 0 .. num_samples-1 of the run `run_hash` (`prepare_shard_dir`)."""
    return ShardedFolder(
        Path(shard_dir), num_samples, shard_size,
        shard_done=lambda k, indices: shard_done(shard_dir, k, indices, run_hash, with_images),
        shard_files=lambda k, indices: [shard_file(k)])


def prepare_shard_dir(shard_dir: str | Path, meta: dict[str, Any]) -> str:
    """Create the folder and its meta.json, or check that the existing one is the same run.

    Returns the meta hash every shard file of this run carries.
    """
    shard_dir = Path(shard_dir)
    (shard_dir / "features").mkdir(parents=True, exist_ok=True)
    meta = json.loads(json.dumps(meta, sort_keys=True))  # compare as it reads back from disk
    existing = open_meta(shard_dir, {**meta, "hash": meta_hash(meta)})
    existing.pop("hash", None)
    if existing != meta:
        keys = sorted(k for k in set(existing) | set(meta) if existing.get(k) != meta.get(k))
        raise ShardDirMismatchError(
            f"{shard_dir} holds samples of another run (differs in: {', '.join(keys)}; "
            f"there: {json.dumps({k: existing.get(k) for k in keys})}, now: {json.dumps({k: meta.get(k) for k in keys})}). "
            "Use a new shard folder for this run, or delete that one to start over."
        )
    return meta_hash(meta)


def shard_done(shard_dir: str | Path, index: int, indices: range, run_hash: str, with_images: bool = False) -> bool:
    path = shard_path(shard_dir, index)
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            ok = (
                meta.get("run") == run_hash
                and int(meta.get("start", -1)) == indices.start
                and int(meta.get("count", -1)) == len(indices)
                and f.get_slice("features").get_shape()[0] == len(indices)
            )
            if ok and with_images and meta.get("images") != "1":
                return False  # written without images; regenerate to keep them
            return ok
    except Exception as err:  # unreadable (e.g. disk trouble): regenerate it
        log.warning("shard file %s is unreadable (%s); regenerating it", path, err)
        return False


def pending_shards(shard_dir: str | Path, num_samples: int, shard_size: int, run_hash: str, rank: int = 0,
                   world_size: int = 1, keep_images: bool = False) -> list[int]:
    """Shards of `rank` not written yet."""
    return sample_shards(shard_dir, num_samples, shard_size, run_hash, keep_images).pending(rank, world_size)


def _write_shard(shard_dir: Path, index: int, indices: range, features: torch.Tensor, run_hash: str, images: bool) -> None:
    metadata = {"run": run_hash, "start": str(indices.start), "count": str(len(indices)), "images": "1" if images else "0"}
    tensors = {"features": features.detach().to("cpu").contiguous()}
    write_atomic(shard_path(shard_dir, index), lambda tmp: save_file(tensors, tmp, metadata=metadata))


@dataclass
class ShardRun:
    """What one `generate_shards` call did."""

    rank: int
    world_size: int
    written: list[int]  # shard indices generated by this call
    skipped: list[int]  # this rank's shards that were already finished
    images: int  # images generated by this call


def generate_shards(
    generate_fn: GenerateFn,
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    num_samples: int,
    shard_dir: str | Path,
    run_hash: str,
    shard_size: int = 1000,
    *,
    batch_size: int = 16,
    base_seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    keep_images: bool = False,
    progress: bool = True,
) -> ShardRun:
    """Generate this rank's unfinished shards and write their features.

    `feature_fn` maps uint8 [n, 3, H, W] images to [n, D] features. `run_hash` comes from
    `prepare_shard_dir`.
    """
    shard_dir = Path(shard_dir)
    store = sample_shards(shard_dir, num_samples, shard_size, run_hash, keep_images)
    ranges = store.ranges
    mine = store.owned(rank, world_size)
    todo = store.pending(rank, world_size)
    pending = set(todo)
    skipped = [k for k in mine if k not in pending]
    run = ShardRun(rank, world_size, [], skipped, 0)
    if skipped:
        log.info("rank %d: %d of its %d shards are already finished in %s", rank, len(skipped), len(mine), shard_dir)
    if not todo:
        return run
    if keep_images:
        (shard_dir / "images").mkdir(parents=True, exist_ok=True)
    total = sum(len(ranges[k]) for k in mine)
    bar = tqdm(
        total=total,
        initial=total - sum(len(ranges[k]) for k in todo),
        unit="img",
        desc=f"samples (rank {rank}/{world_size})" if world_size > 1 else "samples",
        disable=not progress,
        dynamic_ncols=True,
    )
    with bar:
        for done, k in enumerate(todo):
            bar.set_postfix_str(f"shard {k}, {done + 1} of {len(todo)} to do")
            features = []
            for start in range(ranges[k].start, ranges[k].stop, batch_size):
                indices = list(range(start, min(start + batch_size, ranges[k].stop)))
                images = to_uint8_images(generate_fn(indices, base_seed), len(indices))
                if keep_images:
                    for i, image in zip(indices, images):
                        save_png(image, image_path(shard_dir, i))
                with torch.inference_mode():
                    features.append(feature_fn(images).detach().to("cpu"))
                run.images += len(indices)
                bar.update(len(indices))
            _write_shard(shard_dir, k, ranges[k], torch.cat(features), run_hash, keep_images)
            run.written.append(k)
    return run


def iter_shard_features(shard_dir: str | Path, num_samples: int, shard_size: int, run_hash: str,
                        wait_s: float = 0.0) -> Iterator[torch.Tensor]:
    """The features of samples 0 .. num_samples-1, shard by shard in index order.

    Raises `MissingShardsError` (naming the shards and the ranks that owe them) before reading
    anything if a shard is missing. `wait_s`: how long to keep looking for shards other nodes have
    finished (after a barrier): a Cloud Storage FUSE mount may answer "not found" from its cache
    for a few seconds after another node's upload.
    """
    store = sample_shards(shard_dir, num_samples, shard_size, run_hash)
    missing = store.missing(wait_s)
    if missing:
        raise MissingShardsError(
            f"{len(missing)} of {len(store.ranges)} shards are not finished in {shard_dir} (shards {as_ranges(missing)}). "
            f"With W processes, shard k belongs to rank k mod W: run those ranks (or rerun with fewer ranks; "
            "finished shards are skipped), then combine again.",
            missing,
        )
    for k in range(len(store.ranges)):
        with safe_open(str(shard_path(shard_dir, k)), framework="pt") as f:
            yield f.get_tensor("features")


# --- a GenerateFn from a GCFG pipeline -----------------------------------------------------------
class PipelineSampler:
    """`GenerateFn` for a `GCFGPipeline` and a `GuidanceSpec`: uint8 images through the one
    sampling primitive (`ccp.pipelines.sampling.sample_batches`), `batch_size` per pipeline call.
    ``run_key`` describes the sampling (guidance, steps, size, scheduler, dtype) so that shards of
    another setting are never mixed into the same folder.
    """

    def __init__(self, pipe, guidance, num_inference_steps: int = 50, height: int | None = None,
                 width: int | None = None, batch_size: int = 16, eta: float = 0.0, step_progress: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        pipe.check_guidance(guidance)
        self.pipe = pipe
        self.guidance = guidance
        self.num_inference_steps = int(num_inference_steps)
        scale = pipe.vae_scale_factor
        self.height = int(height or pipe.unet.config.sample_size * scale)
        self.width = int(width or pipe.unet.config.sample_size * scale)
        self.batch_size = int(batch_size)
        self.eta = float(eta)
        if not step_progress:
            pipe.set_progress_bar_config(disable=True)

    @property
    def run_key(self) -> dict[str, Any]:
        scheduler = self.pipe.scheduler
        return {
            "guidance": _jsonable(self.guidance),
            "steps": self.num_inference_steps,
            "height": self.height,
            "width": self.width,
            "eta": self.eta,
            # "_diffusers_version" and the like are bookkeeping, not sampling settings
            "scheduler": {"class": type(scheduler).__name__,
                          **_jsonable({k: v for k, v in scheduler.config.items() if not k.startswith("_")})},
            "dtype": str(self.pipe.unet.dtype),
        }

    def __call__(self, indices: list[int], seed: int) -> torch.Tensor:
        return to_uint8_images(sample_images(
            self.pipe, self.guidance, indices, seed=seed, batch_size=self.batch_size,
            num_inference_steps=self.num_inference_steps, height=self.height, width=self.width, eta=self.eta,
            output_type="pt"), len(indices))
