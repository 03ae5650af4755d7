"""Files: atomic writes, folder stamps, content hashes, the cache root, and image listing/loading.

Long jobs never leave a half-written file or folder that a later run would take as finished:
everything is written to a temporary name beside its target, then renamed over it. That holds for a
file on Cloud Storage FUSE too (a file's rename is a server-side copy, then a delete: the target
object appears whole or not at all), but a folder's rename there moves one object at a time. So a
published folder counts as finished only once its completion record (the sizes of its files,
written after the rename) is present and matches: `dir_complete`. See docs/storage.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


# --- writing ---------------------------------------------------------------------------------
def write_atomic(path: str | Path, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` then rename over `path`: readers see the old file or the whole new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1, sort_keys=True)))


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Text file written atomically, parents created, world-readable (mkstemp makes it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: (Path(tmp).write_text(text), os.chmod(tmp, 0o644)))
    return path


COMPLETE_RECORD = ".ccp_complete.json"


def file_sizes(folder: str | Path) -> dict[str, int]:
    """Every file under `folder` (relative POSIX path -> bytes), the completion record excepted."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != COMPLETE_RECORD}


def write_dir_atomic(folder: str | Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp_folder)`, rename it to `folder` (replacing an old one), then write its completion
    record. Readers ask `dir_complete`: an interrupted write or rename (not atomic for a folder on
    an object store) never leaves a `folder` that a later run would take as finished."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        sizes = file_sizes(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json_atomic(folder / COMPLETE_RECORD, {"files": sizes})  # the commit point: last
    return folder


def dir_complete(folder: str | Path) -> bool:
    """Whether `folder` was published whole by `write_dir_atomic`: its completion record exists and
    every file it lists is there with its recorded size."""
    folder = Path(folder)
    try:
        files = json.loads((folder / COMPLETE_RECORD).read_text())["files"]
        return all((folder / rel).is_file() and (folder / rel).stat().st_size == size for rel, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def remove_stale_temporaries(folder: str | Path, sparing: str | None = None) -> list[Path]:
    """Delete the temporaries that killed writers left in `folder` (`.<name>.*.tmp` files of
    `write_atomic` and the checkpoint writer): on a Cloud Storage FUSE mount they are uploaded on
    close, and a checkpoint's can be gigabytes. Only while nothing else writes to `folder`, except
    the file named `sparing`, whose temporaries are left alone (another rank may be writing it now)."""
    folder = Path(folder)
    stale = [p for p in folder.glob(".*.tmp") if p.is_file()] if folder.is_dir() else []
    if sparing is not None:
        stale = [p for p in stale if not p.name.startswith(f".{sparing}.")]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


# --- stamps ----------------------------------------------------------------------------------
def content_hash(data: Any) -> str:
    """sha256 of `data` as sorted JSON (anything JSON cannot hold is written as its str)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def folder_stamp(folder: str | Path) -> str:
    """Hash of a folder's listing (names, sizes, mtimes): changes whenever its files are rewritten,
    without reading them (a model folder of gigabytes is stamped in milliseconds)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE_RECORD)
    listing = [[p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return content_hash(listing)[:16]


def default_cache_root() -> Path:
    """``$CCP_CACHE_DIR`` or ``~/.cache/ccp``."""
    return Path(os.environ.get("CCP_CACHE_DIR", "~/.cache/ccp")).expanduser()


# --- images ----------------------------------------------------------------------------------
class BadImageWarning(UserWarning):
    """One per image file that cannot be used; the message names the file and the reason."""


def list_image_files(root: str | Path) -> list[Path]:
    """Image files below `root` (recursive, symlinks followed, hidden files skipped), sorted."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"data folder {root} does not exist (or is not a folder); set data.path to a folder of images "
            f"({', '.join(IMAGE_EXTENSIONS)}, any case)"
        )
    files = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [Path(folder, n) for n in names if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise FileNotFoundError(
            f"no images found in {root}: looked recursively for files ending in {', '.join(IMAGE_EXTENSIONS)} "
            "(any case)"
        )
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def to_rgb8(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit gray scaled to 8 bits, transparency composited on white, EXIF rotation applied."""
    image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        gray = np.asarray(image).astype(np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(gray), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        raise ValueError("32-bit float images are not supported")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def load_rgb8(path: str | Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return to_rgb8(image)


def resize_to_square(image: Image.Image, resolution: int, center_crop: bool = False) -> Image.Image:
    if center_crop:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return image
