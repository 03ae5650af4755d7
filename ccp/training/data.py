"""Image-only training data (paper App. D.1): an image folder, resized without crop, and its latents.

`ImageFolderDataset` reads every .jpg/.jpeg/.png/.webp (any case) below a folder, in sorted order,
and gives ``{"pixel_values": [3, H, W] in [-1, 1], "original_size", "crop_top_left"}``; the last two
(LongTensor [2], (h, w) of the file and (y, x)) are SDXL's size/crop conditioning, unused on SD v1.x. Images are resized straight to
(resolution, resolution): FFHQ's 1024x1024 becomes 512x512 with nothing cut, and a non-square
image is squashed, unless ``center_crop`` first cuts its central square.

Before training, a scan checks every file (`check_image`: PIL ``verify()``, which for PNG checks
every chunk's CRC without inflating pixels; JPEGs decoded at 1/8 scale; other formats decoded in
full). Files that convert to 8-bit RGB are kept: grayscale, palette, CMYK, 16-bit grayscale (scaled
65535 -> 255), and anything with transparency (composited on white). Corrupt, truncated and
non-image files are skipped with one `BadImageWarning` each and a logged count, or, with
``on_bad_image="fail"``, refused in one error that lists them. Scan results are cached by file
(path, size, mtime) in parts written as the scan goes, so a killed scan resumes where it was, and
under several processes every rank checks its share and reads the others' parts (no collective).

`ConceptDataModule` wires this to Lightning, optionally through the latent cache of
`ccp.training.latent_cache` (batches then hold ``latents`` and the VAE never runs in training).
With prior preservation (`ccp.training.class_images`) every item also carries a class image
under ``class_``-prefixed keys (``class_pixel_values``, ``class_latent_mean``, ...).
Concept data has no captions; a prior trained from scratch (the toy prior) reads them from a
``captions.jsonl`` beside the images (`read_captions`), and its items then carry ``caption``.
With ``condition="canny"`` (a ControlNet's training data) every item also carries ``condition``:
the Canny edges of the image as it is trained (`WithConditions`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ccp.config import ConfigError
from ccp.training.sampler import resumable_loader
from ccp.io import BadImageWarning, default_cache_root, list_image_files, load_rgb8, resize_to_square, to_rgb8, write_json_atomic
from ccp.io.edges import canny_edges
from ccp.distributed import rank_world
from ccp.training.class_images import ClassImagesConfig, class_images_config, generate_class_images
from ccp.training.latent_cache import CachedLatentDataset, LatentCache, LatentCacheConfig, build_latent_cache

log = logging.getLogger(__name__)

ON_BAD_IMAGE = ("skip", "fail")
CONDITIONS = (None, "canny")  # data.condition: what a ControlNet's items are conditioned on
SCAN_VERSION = 2  # 2: header checks (check_image) and the per-chunk parts of `_ScanParts`
SCAN_CHUNK = 512  # files per part of the scan cache: a killed scan loses at most its chunks in flight


class BadImageError(ConfigError, ValueError):
    """Unreadable images with data.on_bad_image=fail; the message lists them."""


class NoImagesError(ConfigError, FileNotFoundError):
    """A data folder that is missing, holds no image files, or only unreadable ones."""


class DataConfigError(ConfigError, ValueError):
    """A data setting that cannot be used; the message names the key and its valid values."""


# --- files and pixels ------------------------------------------------------------------------
class _FileBytes(io.BytesIO):
    """A file's bytes, read once (one download on a bucket mount); PIL's messages name the file."""

    def __init__(self, data: bytes, path: str | Path):
        super().__init__(data)
        self.path = str(path)

    def __repr__(self) -> str:
        return repr(self.path)  # as PIL writes a path: "cannot identify image file '/data/x.png'"


@functools.lru_cache(maxsize=None)
def _mode_converts(mode: str, transparent: bool) -> bool:
    """Whether `to_rgb8` takes an image of `mode` (1x1 stand-in; with transparency if `transparent`)."""
    try:
        stand_in = Image.new(mode, (1, 1))
        if transparent:
            stand_in.info["transparency"] = (0,) * len(stand_in.getbands()) if len(stand_in.getbands()) > 1 else 0
        to_rgb8(stand_in)
        return True
    except Exception:
        return False


def check_image(path: str | Path) -> tuple[str | None, str | None]:
    """(original mode, None) for a usable image, (None, reason) for one to skip.

    The file is read once (one download on a bucket mount), then by format: JPEG, whose
    ``verify()`` checks nothing, is decoded at 1/8 scale (libjpeg's DCT scaling still reads all of
    the entropy-coded data, so a truncated or corrupt file fails as in a full decode, in a third of
    the time) and converted to RGB. PNG: ``verify()`` reads every chunk to IEND and checks each CRC
    (truncated and corrupted files fail; no pixels are inflated: a 1024x1024 PNG takes 1 ms instead
    of 23), and its mode must convert to RGB. Anything else (WebP, MPO, a misnamed file, a PNG of a
    mode that does not convert): ``verify()``, a full decode and the conversion, as every file had.
    """
    try:
        data = Path(path).read_bytes()
        with Image.open(_FileBytes(data, path)) as image:
            mode, fmt = image.mode, image.format
            if fmt == "JPEG":
                image.draft(None, (1, 1))  # the smallest scale libjpeg decodes to (1/8)
                image.load()
                to_rgb8(image)
                return mode, None
            image.verify()  # structure and checksums, without decoding
            transparent = "transparency" in image.info
        if fmt == "PNG" and _mode_converts(mode, transparent):
            return mode, None
        with Image.open(_FileBytes(data, path)) as image:
            image.load()  # catches truncated data that verify() lets through
            to_rgb8(image)
        return mode, None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return None, f"{type(err).__name__}: {err}"


def to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 HWC RGB -> float [3, H, W] in [-1, 1]."""
    array = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)
    return array.float().div(127.5).sub(1.0)


# --- the scan --------------------------------------------------------------------------------
@dataclass
class FolderScan:
    """What a scan of an image folder found: usable files (with size, mtime, mode) and bad ones."""

    root: str
    images: list[tuple[str, int, int, str]] = field(default_factory=list)  # (relative path, size, mtime_ns, mode)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)

    @property
    def num_checked(self) -> int:
        return len(self.images) + len(self.bad)

    def report(self, on_bad_image: str = "skip", warn: bool = True) -> None:
        """Warn once per bad file and log the count; with on_bad_image="fail", raise listing them."""
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"data.on_bad_image must be one of {ON_BAD_IMAGE}, not {on_bad_image!r}")
        if self.bad and on_bad_image == "fail":
            listing = "\n".join(f"  {Path(self.root, rel)}: {reason}" for rel, reason in self.bad)
            raise BadImageError(
                f"{len(self.bad)} of {self.num_checked} files in {self.root} cannot be read as images:\n{listing}\n"
                "Fix or remove them, or set data.on_bad_image=skip to train without them."
            )
        if warn:
            for rel, reason in self.bad:
                warnings.warn(f"skipping {Path(self.root, rel)}: {reason}", BadImageWarning, stacklevel=2)
            if self.bad:
                log.warning("skipped %d of %d files in %s (unreadable images)", len(self.bad), self.num_checked, self.root)
            else:
                log.info("all %d files in %s are usable", self.num_checked, self.root)
            converted = Counter(mode for *_, mode in self.images if mode != "RGB")
            if converted:
                log.info("converted %d images to RGB: %s", sum(converted.values()), dict(converted))
        if not self.images:
            listing = "\n".join(f"  {Path(self.root, rel)}: {reason}" for rel, reason in self.bad)
            raise NoImagesError(f"no usable images in {self.root}: all {len(self.bad)} image files are unreadable:\n"
                                f"{listing}\nFix them, or point data.path at a folder of readable images.")


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:24]


FileKey = tuple[str, int, int]  # (relative path, size, mtime_ns): a changed file is a new key
Verdict = tuple[str | None, str | None]  # check_image's (mode, None) or (None, reason)


class _ScanParts:
    """The scan's resumable cache: ``<cache_dir>/<root hash>.parts/part-<chunk hash>.json``, one file
    per chunk of `SCAN_CHUNK` consecutive files of the listing, written atomically (one object on a
    bucket mount) as soon as the chunk is checked. A part holds each file's key (path, size, mtime)
    and verdict: a changed or removed file's old verdict matches no key of the new listing."""

    def __init__(self, cache_dir: Path, root: Path):
        self.root = str(root)
        self.folder = cache_dir / f"{_digest([SCAN_VERSION, self.root])}.parts"
        self.loaded: dict[Path, list[FileKey]] = {}

    def path(self, keys: list[FileKey]) -> Path:
        return self.folder / f"part-{_digest([SCAN_VERSION, self.root, keys])}.json"

    def read(self, path: Path) -> dict[FileKey, Verdict] | None:
        """A part's verdicts; None if it is absent or not one of this scan's (another version, root)."""
        try:
            data = json.loads(path.read_text())
            if data["version"] != SCAN_VERSION or data["root"] != self.root:
                return None
            verdicts = {(rel, size, mtime): (mode, reason) for rel, size, mtime, mode, reason in data["records"]}
        except (OSError, ValueError, KeyError, TypeError):
            return None
        self.loaded[path] = list(verdicts)
        return verdicts

    def read_all(self, pool: ThreadPoolExecutor) -> dict[FileKey, Verdict]:
        verdicts: dict[FileKey, Verdict] = {}
        for part in pool.map(self.read, sorted(self.folder.glob("part-*.json"))):
            verdicts.update(part or {})
        return verdicts

    def write(self, keys: list[FileKey], verdicts: Mapping[FileKey, Verdict]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        records = [[*key, *verdicts[key]] for key in keys]
        write_json_atomic(self.path(keys), {"version": SCAN_VERSION, "root": self.root, "records": records})

    def remove_stale(self, current: set[FileKey], older_than_s: float = 3600.0) -> None:
        """Delete the parts none of whose files are in the listing any more (rewritten or removed),
        and killed writers' temporaries older than `older_than_s`."""
        for path, keys in self.loaded.items():
            if not current.intersection(keys):
                path.unlink(missing_ok=True)
        now = time.time()
        for tmp in self.folder.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > older_than_s:
                    tmp.unlink()


def scan_image_folder(
    root: str | Path,
    max_images: int | None = None,
    workers: int = 1,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> FolderScan:
    """Check every image below `root` (`check_image`; stopping after `max_images` usable ones, in
    sorted order) in `workers` threads (PIL and file reads release the GIL).

    With `cache_dir`, the scan is resumable and shared: the files are checked in chunks of
    `SCAN_CHUNK`, each chunk's verdicts written to its own part file as soon as it is done
    (`_ScanParts`), so a killed scan resumes with the chunks it had not finished, and after a
    change only the changed and added files are checked (verdicts are looked up per file).
    Rank `rank` of `world_size` processes sharing `cache_dir` checks chunks rank, rank + world_size,
    ... first, then, from the last one backwards, any chunk whose part no other rank has written
    yet; a chunk whose part is there is read instead of checked. Every rank so ends with the whole
    scan and no rank ever waits for another (no collective, no polling for the others' parts): a
    slow or killed rank's chunks are taken over, and a rank that does not see the others' parts
    (a node-local `cache_dir`) checks them itself. Rank 0 also writes the whole result as ``<cache_dir>/<hash>.json``, keyed
    by the listing (relative paths, sizes, mtimes) and `max_images`, read back by the next start
    instead of the parts.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not one of world_size={world_size} ranks")
    root = Path(root).expanduser().resolve()
    try:
        files = list_image_files(root)
    except FileNotFoundError as err:
        raise NoImagesError(str(err)) from None
    keys: list[FileKey] = [(p.relative_to(root).as_posix(), *_stat(p)) for p in files]
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        result_file, parts, verdicts = None, None, {}
        if cache_dir is not None:
            cache_dir = Path(cache_dir).expanduser()
            listing = json.dumps([SCAN_VERSION, str(root), max_images, [[*key] for key in keys]])
            result_file = cache_dir / f"{hashlib.sha256(listing.encode()).hexdigest()[:24]}.json"
            if result_file.is_file():
                data = json.loads(result_file.read_text())
                return FolderScan(data["root"], [tuple(x) for x in data["images"]], [tuple(x) for x in data["bad"]])
            parts = _ScanParts(cache_dir, root)
            verdicts = parts.read_all(pool)
        else:
            rank, world_size = 0, 1  # nothing to share: every process checks every file
        _check_chunks(files, keys, verdicts, pool, parts, max_images, rank, world_size,
                      progress and f"scanning images in {root.name}")
    finally:
        pool.shutdown(cancel_futures=True)  # interrupted: drop the queued checks, wait for the running ones

    scan = FolderScan(str(root))
    for key in keys:
        if max_images is not None and len(scan.images) >= max_images:
            break
        mode, reason = verdicts[key]
        if reason is None:
            scan.images.append((*key, mode))
        else:
            scan.bad.append((key[0], reason))
    if result_file is not None and rank == 0:
        result_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(result_file, asdict(scan))
        parts.remove_stale(set(keys))
    return scan


def _check_chunks(
    files: list[Path],
    keys: list[FileKey],
    verdicts: dict[FileKey, Verdict],
    pool: ThreadPoolExecutor,
    parts: _ScanParts | None,
    max_images: int | None,
    rank: int,
    world_size: int,
    progress: str | bool,
) -> None:
    """Fill `verdicts` for every file `scan_image_folder` needs (all, or up to `max_images` usable
    ones), chunk by chunk: read a chunk's part where there is one, else check its files and write it."""
    chunk_size = max(1, int(SCAN_CHUNK))
    chunks = [list(range(start, min(start + chunk_size, len(keys)))) for start in range(0, len(keys), chunk_size)]

    def unchecked(chunk: list[int]) -> list[int]:
        return [i for i in chunk if keys[i] not in verdicts]

    def needed() -> int:
        """How many chunks hold the first `max_images` usable files, counting unchecked files as usable."""
        usable = 0
        for number, chunk in enumerate(chunks if max_images is not None else [], 1):
            usable += sum(verdicts.get(keys[i], (None, None))[1] is None for i in chunk)
            if usable >= max_images:
                return number
        return len(chunks)

    def count(number: int) -> tuple[int, int]:
        return sum(map(len, chunks[:number])), sum(keys[i] in verdicts for chunk in chunks[:number] for i in chunk)

    total, done = count(needed())
    desc = f"{progress} (rank {rank} of {world_size})" if world_size > 1 else str(progress)
    with tqdm(total=total, initial=done, desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        while todo := [c for c in range(needed()) if unchecked(chunks[c])]:  # max_images: may need more chunks
            # Shared through files, not a collective: no rank waits on a clock while another reads a bucket.
            mine = [c for c in todo if c % world_size == rank]
            others = [c for c in reversed(todo) if c % world_size != rank]
            for c in mine + others:  # the others' chunks from the last: a slow rank's tail, not its next one
                missing = unchecked(chunks[c])
                if not missing:
                    continue
                found = parts.read(parts.path([keys[i] for i in chunks[c]])) if parts is not None else None
                if found is not None:  # another rank's part, or one written since this scan listed them
                    verdicts.update(found)
                    bar.update(len(missing))
                    continue
                for i, verdict in zip(missing, pool.map(check_image, [files[i] for i in missing])):
                    verdicts[keys[i]] = verdict
                    bar.update(1)
                if parts is not None:
                    parts.write([keys[i] for i in chunks[c]], verdicts)
            bar.total, bar.n = count(needed())
            bar.refresh()


def read_captions(root: str | Path, scan: FolderScan, file_name: str) -> list[str]:
    """One caption per usable image of `scan`, in its order, from ``<root>/<file_name>``: JSON
    lines with ``file`` (path relative to root) and ``caption``. Every image needs one."""
    path = Path(root).expanduser() / file_name
    if not path.is_file():
        raise FileNotFoundError(
            f"data.captions={file_name}: no {path}; write one JSON line per image, "
            '{"file": "<path relative to the folder>", "caption": "..."}, or set data.captions=null'
        )
    by_file = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if "file" not in row or "caption" not in row:
                raise ValueError(f"{path}:{number}: a caption row needs 'file' and 'caption', got {sorted(row)}")
            by_file[Path(row["file"]).as_posix()] = str(row["caption"])
    missing = [rel for rel, *_ in scan.images if rel not in by_file]
    if missing:
        raise ValueError(f"{path} has no caption for {len(missing)} of {len(scan.images)} images, e.g. {missing[:3]}")
    return [by_file[rel] for rel, *_ in scan.images]


class WithCaptions(Dataset):
    """Adds ``caption`` (a string; batches hold a list) to the items of an image or latent dataset."""

    def __init__(self, dataset, captions: list[str]):
        if len(captions) != len(dataset):
            raise ValueError(f"{len(captions)} captions for {len(dataset)} items")
        self.dataset, self.captions = dataset, captions

    def __len__(self) -> int:
        return len(self.dataset)

    def item(self, index: int, flipped: bool) -> dict[str, Any]:
        return {**self.dataset.item(index, flipped), "caption": self.captions[index]}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.item(index, self.dataset.random_flip and bool(torch.rand(()) < 0.5))


def check_condition(condition: str | None) -> str | None:
    """``data.condition`` as given, or `DataConfigError` naming the key and the valid values."""
    if condition not in CONDITIONS:
        valid = ", ".join("null" if c is None else c for c in CONDITIONS)
        raise DataConfigError(f"data.condition={condition!r} is not one of: {valid} (canny: each item carries the "
                              "Canny edges of its image, for method=controlnet)")
    return condition


def edge_condition(image: Image.Image, flipped: bool) -> torch.Tensor:
    """[3, H, W] float in [0, 1]: the Canny edges of `image` (mirrored first if `flipped`), white on
    black and replicated to 3 channels, as diffusers' canny ControlNets take their conditions."""
    array = np.asarray(image)
    if flipped:  # edges of the mirrored image: Canny's tie-breaking is not mirror-symmetric
        array = array[:, ::-1]
    edges = torch.from_numpy(canny_edges(np.ascontiguousarray(array))).float().div(255.0)
    return edges.unsqueeze(0).expand(3, -1, -1).contiguous()


class WithConditions(Dataset):
    """Adds ``condition`` (`edge_condition` of the item's image, same resize, crop and flip) to the items
    of an image or latent dataset; the image is read from `images` also when the items hold latents."""

    def __init__(self, dataset, images: ImageFolderDataset):
        if len(images) != len(dataset):
            raise ValueError(f"{len(images)} images for {len(dataset)} items")
        self.dataset, self.images = dataset, images
        self.random_flip = images.random_flip

    def __len__(self) -> int:
        return len(self.dataset)

    def item(self, index: int, flipped: bool) -> dict[str, Any]:
        return {**self.dataset.item(index, flipped), "condition": edge_condition(self.images.image(index), flipped)}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.item(index, self.random_flip and bool(torch.rand(()) < 0.5))


# --- datasets --------------------------------------------------------------------------------
def crop_top_left(height: int, width: int, resolution: int, center_crop: bool) -> tuple[int, int]:
    """(y, x) of the crop as diffusers' SDXL scripts report it: the centre crop's top-left in the image
    resized to `resolution` on its short side (torchvision's Resize); (0, 0) without crop (squashed)."""
    if not center_crop:
        return 0, 0
    short, long = min(height, width), max(height, width)
    resized_long = int(resolution * long / short)
    h, w = (resolution, resized_long) if height <= width else (resized_long, resolution)
    return max(0, int(round((h - resolution) / 2.0))), max(0, int(round((w - resolution) / 2.0)))


class ImageFolderDataset(Dataset):
    """``{"pixel_values": [3, resolution, resolution]}`` in [-1, 1] for every usable image below `root`.

    Flips (p = 0.5) use the global torch RNG, which DataLoader seeds per worker.
    Pass `scan` to reuse a `FolderScan`; otherwise the folder is scanned here and reported
    (warnings, count, `on_bad_image`).
    """

    def __init__(
        self,
        root: str | Path,
        resolution: int,
        center_crop: bool = False,
        random_flip: bool = True,
        max_images: int | None = None,
        on_bad_image: str = "skip",
        scan: FolderScan | None = None,
        scan_workers: int = 1,
        progress: bool = True,
    ):
        if scan is None:
            scan = scan_image_folder(root, max_images=max_images, workers=scan_workers, progress=progress)
            scan.report(on_bad_image)
        self.root = Path(scan.root)
        self.scan = scan
        self.resolution = int(resolution)
        self.center_crop = bool(center_crop)
        self.random_flip = bool(random_flip)

    @property
    def files(self) -> list[Path]:
        return [self.root / rel for rel, *_ in self.scan.images]

    def __len__(self) -> int:
        return len(self.scan.images)

    def image(self, index: int) -> Image.Image:
        """Image `index` as 8-bit RGB at the training size (resized, cropped if so set), never flipped."""
        path = self.root / self.scan.images[index][0]
        try:
            image = load_rgb8(path)
        except Exception as err:
            raise OSError(f"cannot read {path} (it passed the scan; did it change since?): {err}") from err
        return resize_to_square(image, self.resolution, self.center_crop)

    def pixels(self, index: int) -> torch.Tensor:
        """Image `index` resized and normalised, never flipped."""
        return to_tensor(self.image(index))

    def geometry(self, index: int) -> dict[str, torch.Tensor]:
        """``original_size`` (h, w of the file) and ``crop_top_left`` (`crop_top_left`), LongTensor [2] each."""
        with Image.open(self.root / self.scan.images[index][0]) as image:  # the header only
            width, height = image.size
        crop = crop_top_left(height, width, self.resolution, self.center_crop)
        return {"original_size": torch.tensor([height, width]), "crop_top_left": torch.tensor(crop)}

    def item(self, index: int, flipped: bool) -> dict[str, torch.Tensor]:
        pixels = self.pixels(index)
        return {"pixel_values": pixels.flip(-1) if flipped else pixels, **self.geometry(index)}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.item(index, self.random_flip and bool(torch.rand(()) < 0.5))

    def cache_fingerprint(self) -> dict[str, Any]:
        listing = json.dumps([[rel, size, mtime] for rel, size, mtime, _ in self.scan.images])
        return {
            "files": hashlib.sha256(listing.encode()).hexdigest(),
            "num_images": len(self),
            "resolution": self.resolution,
            "center_crop": self.center_crop,
        }


class WithClassImages(Dataset):
    """Item ``i`` of `dataset` plus class image ``i mod len(class_dataset)``, mirrored alike, under
    ``class_``-prefixed keys: diffusers' ``DreamBoothDataset`` pairs them the same way, and the
    pairing follows the sampler's reproducible order (exact resume)."""

    PREFIX = "class_"

    def __init__(self, dataset, class_dataset):
        if len(class_dataset) == 0:
            raise ValueError("prior preservation needs at least one class image")
        self.dataset, self.class_dataset = dataset, class_dataset
        self.random_flip = getattr(dataset, "random_flip", False)

    def __len__(self) -> int:
        return len(self.dataset)

    def item(self, index: int, flipped: bool) -> dict[str, Any]:
        extra = self.class_dataset.item(index % len(self.class_dataset), flipped)
        return {**self.dataset.item(index, flipped), **{self.PREFIX + k: v for k, v in extra.items()}}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.item(index, self.random_flip and bool(torch.rand(()) < 0.5))


def split_class_batch(batch: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(instance part, class part with the prefix removed) of a `WithClassImages` batch."""
    prefix = WithClassImages.PREFIX
    own = {k: v for k, v in batch.items() if not k.startswith(prefix)}
    return own, {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}


class FlipVariants(Dataset):
    """Index ``i < n`` is item ``i``, ``i >= n`` is item ``i - n`` mirrored: the flip becomes part
    of the sampler's reproducible order instead of worker randomness (exact resume). Each image
    then appears once plain and once mirrored per pass, which is a random flip in expectation."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return 2 * len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self.dataset)
        return self.dataset.item(index % n, flipped=index >= n)


# --- Lightning -------------------------------------------------------------------------------
class ConceptDataModule(L.LightningDataModule):
    """Train batches of ``pixel_values`` or, with ``latent_cache.enabled``, of cached ``latents``.

    The VAE (needed only to build or look up the latent cache) comes at runtime: `attach_vae`,
    the `vae` argument, or else the trainer's LightningModule's ``vae`` attribute. `batch_size` is
    per device. Training order is a `ResumableSampler` over ranks (pass
    ``use_distributed_sampler=False`` to the Trainer), flips included, so a resumed run repeats
    an uninterrupted one exactly.
    """

    def __init__(
        self,
        path: str | Path,
        resolution: int = 512,
        center_crop: bool = False,
        random_flip: bool = True,
        batch_size: int = 4,
        num_workers: int = 4,
        persistent_workers: bool = True,
        max_images: int | None = None,
        on_bad_image: str = "skip",
        latent_cache: Mapping[str, Any] | LatentCacheConfig | None = None,
        cache_dir: str | Path | None = None,
        captions: str | None = None,
        scan_cache: bool = True,
        vae: torch.nn.Module | None = None,
        seed: int = 0,
        class_images: Mapping[str, Any] | ClassImagesConfig | None = None,
        prior: Any = None,
        condition: str | None = None,
    ):
        super().__init__()
        self.condition = check_condition(condition)
        self.seed = int(seed)
        self.class_images = class_images_config(class_images)
        self._prior = prior  # generates the class images; `attach_prior`
        self.class_images_dir: Path | None = None
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"data.on_bad_image must be one of {ON_BAD_IMAGE}, not {on_bad_image!r}")
        self.path = Path(path).expanduser()
        self.resolution = int(resolution)
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.persistent_workers = persistent_workers
        self.max_images = max_images
        self.on_bad_image = on_bad_image
        self.captions = captions
        if latent_cache is None or isinstance(latent_cache, LatentCacheConfig):
            self.latent_cache = latent_cache or LatentCacheConfig()
        else:
            self.latent_cache = LatentCacheConfig(**dict(latent_cache))
        self.cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
        self.scan_cache = scan_cache
        self._vae = vae
        self._upcast_vae = False
        self._scan: FolderScan | None = None
        self.train_dataset: Dataset | None = None
        self.image_dataset: ImageFolderDataset | None = None
        self.latent_cache_dir: Path | None = None

    def attach_vae(self, vae: torch.nn.Module, upcast: bool = False) -> ConceptDataModule:
        """The prior's VAE for the latent cache; `upcast`: an SDXL prior's (an fp16 one encodes in fp32)."""
        self._vae, self._upcast_vae = vae, bool(upcast)
        return self

    def attach_prior(self, prior, class_images: Mapping[str, Any] | ClassImagesConfig | None = None) -> ConceptDataModule:
        """The prior pipeline that draws the class images (prior preservation only), and their
        settings when given (`ccp.training.class_images.ClassImagesConfig`)."""
        self._prior = prior
        if class_images is not None:
            self.class_images = class_images_config(class_images)
        return self

    # --- distributed context (works without a trainer) ---
    @property
    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return rank_world()

    def _barrier(self) -> Callable[[], None] | None:
        if self.trainer is not None and self.trainer.world_size > 1:
            return lambda: self.trainer.strategy.barrier("ccp_latent_cache")
        return None

    def _lightning_module(self):
        return self.trainer.lightning_module if self.trainer is not None else None

    def _resolve_vae(self) -> torch.nn.Module:
        vae = self._vae
        if vae is None and self.trainer is not None:
            vae = getattr(self.trainer.lightning_module, "vae", None)
        if vae is None:
            raise ValueError(
                "data.latent_cache.enabled=true needs the prior's VAE: call datamodule.attach_vae(vae) before "
                "fitting (or give the LightningModule a `vae` attribute)"
            )
        return vae

    def scan(self, rank: int = 0, world_size: int = 1) -> FolderScan:
        """Check the folder now (before any model loads: ccp-train's checks call it) and keep the
        result for `setup`; raises `NoImagesError` or `BadImageError` naming the files and the fix."""
        if self._scan is None:
            self._scan = self._scan_folder(warn=rank == 0, rank_world=(rank, world_size))
        return self._scan

    # --- hooks ---
    def _scan_folder(self, warn: bool, rank_world: tuple[int, int] | None = None) -> FolderScan:
        rank, world_size = rank_world or self._rank_world
        scan = scan_image_folder(
            self.path,
            max_images=self.max_images,
            workers=max(1, self.num_workers),
            progress=warn,
            cache_dir=self.cache_root / "scans" if self.scan_cache else None,
            rank=rank,
            world_size=world_size,
        )
        scan.report(self.on_bad_image, warn=warn)
        return scan

    def prepare_data(self) -> None:
        # One process: scan here (and cache the scan). Several: not here, where the other ranks would wait
        # for local rank 0 in Lightning's "pre_setup" barrier under the collective timeout; every rank scans
        # its share in `setup` and reads the others' parts of the scan cache from the filesystem instead.
        if self._scan is None and self._rank_world[1] == 1:
            self._scan = self._scan_folder(warn=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        rank, world_size = self._rank_world
        if self._scan is None:
            self._scan = self._scan_folder(warn=rank == 0)
        self.image_dataset = ImageFolderDataset(
            self.path, self.resolution, self.center_crop, self.random_flip, scan=self._scan
        )
        dataset = self._captioned(self._cached(self.image_dataset, rank, world_size, own=True))
        if self.condition == "canny":
            dataset = WithConditions(dataset, self.image_dataset)
        if self.class_images.enabled:
            dataset = WithClassImages(dataset, self._class_dataset(rank, world_size))
        self.train_dataset = dataset

    def _class_dataset(self, rank: int, world_size: int):
        """The class images (drawn by the prior once, every rank its share), as the concept's are read."""
        if self._prior is None:
            raise ValueError("prior_preservation.enabled=true needs the prior pipeline: call "
                             "datamodule.attach_prior(prior) before fitting")
        device = self.trainer.strategy.root_device if self.trainer is not None else None
        self.class_images_dir = generate_class_images(
            self._prior, self.class_images, self.resolution, self.cache_root, rank=rank, world_size=world_size,
            device=device, barrier=self._barrier(), progress=rank == 0,
        )
        scan = scan_image_folder(self.class_images_dir, progress=False)
        scan.report("fail", warn=False)
        images = ImageFolderDataset(self.class_images_dir, self.resolution, self.center_crop, self.random_flip, scan=scan)
        return self._cached(images, rank, world_size, own=False)

    def _cached(self, image_dataset: ImageFolderDataset, rank: int, world_size: int, own: bool):
        """`image_dataset`, or its latents when the latent cache is on."""
        if not self.latent_cache.enabled:
            return image_dataset
        cfg = self.latent_cache
        device = self.trainer.strategy.root_device if self.trainer is not None else None
        folder = build_latent_cache(
            image_dataset,
            self._resolve_vae(),
            cache_dir=cfg.dir if cfg.dir is not None else self.cache_root / "latents",
            shard_size=cfg.shard_size,
            rank=rank,
            world_size=world_size,
            device=device,
            dtype=cfg.encode_dtype,
            storage_dtype=cfg.dtype,
            batch_size=cfg.batch_size,
            num_workers=self.num_workers,
            barrier=self._barrier(),
            progress=rank == 0,
            upcast=self._upcast_vae or bool(getattr(self._lightning_module(), "upcast_vae", False)),
        )
        if own:
            self.latent_cache_dir = folder
        return CachedLatentDataset(LatentCache(folder), self.random_flip, cfg.output)

    def _captioned(self, dataset):
        if self.captions is None:
            return dataset
        return WithCaptions(dataset, read_captions(self.path, self._scan, self.captions))

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        dataset = FlipVariants(self.train_dataset) if self.random_flip else self.train_dataset
        return resumable_loader(
            dataset,
            self.batch_size,
            trainer=self.trainer,
            seed=self.seed,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
