"""Class images for prior preservation (DreamBooth [37], as diffusers' ``train_dreambooth.py``):
generated once by the untrained prior from the class prompt, then trained on beside the concept.

Image ``i`` is sample ``i`` of seed ``seed`` through the one sampling primitive
(`ccp.pipelines.sampling.sample_batches`: classifier-free guidance on the prior with the class
prompt), so it is the same image whichever rank draws it and however often a run is resumed.

Layout of the folder (``prior_preservation.class_data_dir``, default
``<data cache>/class_images/<key>``, the key hashing the prior's weights and the settings)::

    meta.json            what is generated (prompt, count, size, steps, guidance, seed, prior hash)
    00000.png ...        one file per image, each written atomically
    .ccp_complete.json   written last: every image is there, with its size (`ccp.io.dir_complete`)

Images are drawn in fixed blocks of ``sample_batch_size`` (block b: images b*bs .. b*bs + bs - 1),
so every image comes from the same batch whichever rank draws it and however the run was
interrupted (a batch's numerics can differ in the last bit with its size). Finished images are
kept: a rerun draws only the blocks with missing images and writes only those. The folder is a
`ccp.io.shards.ShardedFolder` whose shards are the blocks: under DDP rank r draws blocks r, r + W,
... and all ranks meet at a barrier before the completion record is written, as the latent cache
does; the folder must be visible to every rank.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from ccp.config import ConfigError
from ccp.distributed import barrier_or_none
from ccp.guidance import Condition, GuidanceSpec, GuidanceTerm, Source
from ccp.io import COMPLETE_RECORD, content_hash, dir_complete, write_atomic
from ccp.io.shards import ShardedFolder, open_meta

log = logging.getLogger(__name__)

META = "meta.json"
FORMAT_VERSION = 1


class PriorPreservationConfigError(ConfigError, ValueError):
    """Prior-preservation settings that cannot run; the message names the key and the fix."""


@dataclass(frozen=True)
class ClassImagesConfig:
    """``prior_preservation.*`` of the training config (docs/training.md)."""

    enabled: bool = False
    class_prompt: str | None = None
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    class_data_dir: str | None = None  # null: <data cache>/class_images/<key>
    sample_batch_size: int = 4
    steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0

    def __post_init__(self):
        check_class_images(self)


def _number(value, key: str, minimum: float, integer: bool, example: str) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value < minimum:
        what = "a whole number" if integer else "a number"
        raise PriorPreservationConfigError(
            f"prior_preservation.{key}={value!r}: must be {what} >= {minimum}; set e.g. prior_preservation.{key}={example}")


def check_class_images(cfg: ClassImagesConfig) -> None:
    """Refuse bad values with the key and a fix (nothing is checked when prior preservation is off)."""
    if not isinstance(cfg.enabled, bool):
        raise PriorPreservationConfigError(f"prior_preservation.enabled={cfg.enabled!r}: must be true or false")
    if not cfg.enabled:
        return
    if not isinstance(cfg.class_prompt, str) or not cfg.class_prompt.strip():
        raise PriorPreservationConfigError(
            f"prior_preservation.enabled=true needs a class prompt (got class_prompt={cfg.class_prompt!r}): the prior "
            "generates the class images from it; set e.g. prior_preservation.class_prompt=\"a photo of face\"")
    _number(cfg.num_class_images, "num_class_images", 1, True, "100")
    _number(cfg.prior_loss_weight, "prior_loss_weight", 0, False, "1.0")
    _number(cfg.sample_batch_size, "sample_batch_size", 1, True, "4")
    _number(cfg.steps, "steps", 1, True, "50")
    _number(cfg.guidance_scale, "guidance_scale", 0, False, "7.5")
    _number(cfg.seed, "seed", 0, True, "0")


def class_guidance(class_prompt: str, guidance_scale: float) -> GuidanceSpec:
    """Classifier-free guidance on the prior with the class prompt (what a diffusers pipeline
    called with the prompt does): unconditional = the prior on ""."""
    return GuidanceSpec(
        terms=(GuidanceTerm("prompt", Source("prior", Condition(prompt=class_prompt)), float(guidance_scale)),),
        unconditional=Source("prior", Condition(prompt="")),
    )


def prior_hash(prior) -> str:
    """Hash of what the class images depend on: the prior's UNet, text encoder and VAE (configs
    and weights), so a retrained prior at the same path gets new class images."""
    digest = hashlib.sha256()
    for name in ("unet", "text_encoder", "vae"):
        module = getattr(prior, name)
        config = getattr(module, "config", {})
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config)  # transformers' or diffusers'
        config = {k: v for k, v in config.items() if not str(k).startswith("_") and not str(k).endswith("_version")}
        digest.update(f"{name}:{type(module).__name__}:{json.dumps(config, sort_keys=True, default=str)};".encode())
        for key, tensor in sorted(module.state_dict().items()):
            tensor = tensor.detach().to("cpu").contiguous()
            digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def image_name(index: int) -> str:
    return f"{index:05d}.png"


def _meta(cfg: ClassImagesConfig, resolution: int, prior_digest: str) -> dict:
    return {
        "version": FORMAT_VERSION,
        "class_prompt": cfg.class_prompt,
        "num_class_images": int(cfg.num_class_images),
        "resolution": int(resolution),
        "steps": int(cfg.steps),
        "guidance_scale": float(cfg.guidance_scale),
        "seed": int(cfg.seed),
        "prior": prior_digest,
    }


def class_images_folder(cfg: ClassImagesConfig, resolution: int, prior_digest: str, cache_root: str | Path) -> Path:
    """``class_data_dir`` as given, else ``<cache_root>/class_images/<key of the settings and prior>``."""
    if cfg.class_data_dir is not None:
        return Path(str(cfg.class_data_dir)).expanduser()
    return Path(cache_root).expanduser() / "class_images" / content_hash(_meta(cfg, resolution, prior_digest))[:24]


def _image_ok(path: Path, resolution: int) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
            return image.size == (resolution, resolution)
    except Exception:  # missing, truncated or unreadable: draw it again
        return False


def generate_class_images(
    prior,
    cfg: ClassImagesConfig,
    resolution: int,
    cache_root: str | Path,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
    barrier: Callable[[], None] | None = None,
    progress: bool = True,
) -> Path:
    """Generate the class images of `cfg` with `prior` (a loaded SD pipeline) and return their folder.

    A complete folder returns at once without running the prior. Otherwise rank `rank` of
    `world_size` draws its blocks with missing images (blocks rank, rank + world_size, ...) on `device`
    (default: where the prior's UNet is; the prior's parts go back where they were), then
    `barrier` (default: `ccp.distributed.barrier` when a process group is up) is called and the completion
    record is written once every image is there. Without a barrier, the last rank to finish
    completes the folder.
    """
    from ccp.pipelines.gcfg import GCFGPipeline
    from ccp.pipelines.sampling import sample_batches

    check_class_images(cfg)
    digest = prior_hash(prior)
    folder = class_images_folder(cfg, resolution, digest, cache_root)
    meta = _meta(cfg, resolution, digest)
    if (folder / META).is_file():
        found = json.loads((folder / META).read_text())
        if found != meta:
            changed = sorted(k for k in meta if found.get(k) != meta[k])
            raise PriorPreservationConfigError(
                f"prior_preservation.class_data_dir={folder} holds class images made with other settings "
                f"({', '.join(changed)} differ); point prior_preservation.class_data_dir at another folder, "
                "or set it to null (a folder keyed by the settings under the data cache)")
    if dir_complete(folder):
        log.info("class images %s are complete; reusing them", folder)
        return folder
    open_meta(folder, meta)

    # a shard is a block of sample_batch_size images: sample_batches' batches are exactly the blocks
    store = class_image_blocks(folder, cfg, resolution)
    blocks = store.ranges
    todo = store.pending(rank, world_size)
    missing = {i for b in todo for i in blocks[b] if not _image_ok(folder / image_name(i), resolution)}
    mine = [i for b in todo for i in blocks[b]]
    if mine:
        parts = [prior.unet, prior.text_encoder, prior.vae]
        places = [next(m.parameters()).device for m in parts]
        device = torch.device(device) if device is not None else places[0]
        pipe = GCFGPipeline.from_prior(prior)
        pipe.set_progress_bar_config(disable=True)
        for module in parts:
            module.to(device)
        try:
            done = 0
            for indices, images in sample_batches(
                pipe, class_guidance(cfg.class_prompt, cfg.guidance_scale), mine, seed=cfg.seed,
                batch_size=cfg.sample_batch_size, num_inference_steps=cfg.steps, height=resolution, width=resolution,
            ):
                for index, image in zip(indices, images):
                    if index in missing:
                        write_atomic(folder / image_name(index), lambda tmp, image=image: image.save(tmp, format="PNG"))
                done += len(indices)
                if progress:
                    log.info("class images: %d of %d drawn on rank %d", done, len(mine), rank)
        finally:
            for module, place in zip(parts, places):
                module.to(place)

    barrier = barrier or (barrier_or_none() if world_size > 1 else None)
    if barrier is not None:
        barrier()
    store.finish({}, met=barrier is not None)
    return folder


def class_image_blocks(folder: Path, cfg: ClassImagesConfig, resolution: int) -> ShardedFolder:
    """The class-image folder as a sharded store: shard b is block b; its record is `COMPLETE_RECORD`."""
    return ShardedFolder(
        folder, cfg.num_class_images, cfg.sample_batch_size,
        shard_done=lambda b, block: all(_image_ok(folder / image_name(i), resolution) for i in block),
        shard_files=lambda b, block: [image_name(i) for i in block], record=COMPLETE_RECORD)


def class_images_config(node) -> ClassImagesConfig:
    """`ClassImagesConfig` from a config mapping (``prior_preservation`` of the training config)."""
    if node is None:
        return ClassImagesConfig()
    if isinstance(node, ClassImagesConfig):
        return node
    values = dict(node)
    known = set(asdict(ClassImagesConfig()))
    unknown = sorted(set(values) - known)
    if unknown:
        raise PriorPreservationConfigError(f"prior_preservation has unknown key(s) {unknown}; known: {sorted(known)}")
    return ClassImagesConfig(**values)
