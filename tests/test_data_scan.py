"""The image-folder scan at FFHQ size (ccp.training.data.scan_image_folder): header checks instead of
full decodes, a cache written chunk by chunk so that a killed scan resumes where it was, changed files
found after a partial scan, bad files reported as before, and ranks that share the work without any
torch.distributed collective.

Every test here only uses what the scan had before (``scan_image_folder(root, progress, cache_dir)``
and a module-level ``check_image``) plus the chunk size, set with ``raising=False``; the two-rank tests
pass ``rank``/``world_size``, through the datamodule's trainer or as arguments.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from ccp.io import to_rgb8
from ccp.training import data as data_module
from ccp.training.data import BadImageError, BadImageWarning, ConceptDataModule, FolderScan, scan_image_folder

CHUNK = 4


class Interrupted(Exception):
    """Stands in for a kill in the middle of a scan."""


class Checks:
    """Wraps `check_image`: records each path it is asked about, optionally sleeps, and raises
    `Interrupted` on call number `fail_on` (later calls raise too: the scan is dead)."""

    def __init__(self, monkeypatch, fail_on: int | None = None, sleep: float = 0.0):
        self.real, self.fail_on, self.sleep = data_module.check_image, fail_on, sleep
        self.paths: list[str] = []
        self.lock = threading.Lock()
        monkeypatch.setattr(data_module, "check_image", self)

    def __call__(self, path):
        with self.lock:
            self.paths.append(Path(path).name)
            number = len(self.paths)
        if self.fail_on is not None and number >= self.fail_on:
            raise Interrupted(f"killed at check {number}")
        time.sleep(self.sleep)
        return self.real(path)

    def reset(self, fail_on: int | None = None) -> None:
        self.paths, self.fail_on = [], fail_on


@pytest.fixture
def chunked(monkeypatch):
    monkeypatch.setattr(data_module, "SCAN_CHUNK", CHUNK, raising=False)
    return CHUNK


def photo(seed: int, size=(12, 10)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def write_image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    photo(seed).save(path, quality=90) if path.suffix == ".jpg" else photo(seed).save(path)
    return path


def name(i: int) -> str:
    """The name of image `i` of `folder`: every third one a JPEG."""
    return f"f{i:02d}.{'png' if i % 3 else 'jpg'}"


@pytest.fixture
def folder(tmp_path) -> Path:
    """20 images, PNG and JPEG, in two subfolders; sorted names f00..f19."""
    root = tmp_path / "images"
    for i in range(20):
        write_image(root / ("a" if i < 10 else "b") / name(i), i)
    return root


def names(root: Path) -> list[str]:
    return [p.name for p in data_module.list_image_files(root)]


def fresh(root: Path) -> FolderScan:
    """An uninterrupted scan without any cache."""
    return scan_image_folder(root, progress=False)


def part_files(cache: Path) -> list[Path]:
    """What a scan has written so far: any non-temporary file below `cache`."""
    return [p for p in cache.rglob("*") if p.is_file() and not p.name.startswith(".")] if cache.is_dir() else []


# --- (1) a killed scan resumes ----------------------------------------------------------------
def test_an_interrupted_scan_resumes_with_the_chunks_it_had_not_finished(folder, tmp_path, monkeypatch, chunked):
    expected = fresh(folder)
    checks = Checks(monkeypatch, fail_on=11)  # checks 1-10 pass: chunks 0 and 1 (8 files) are finished
    with pytest.raises(Interrupted):
        scan_image_folder(folder, progress=False, cache_dir=tmp_path / "scans")
    checks.reset()
    resumed = scan_image_folder(folder, progress=False, cache_dir=tmp_path / "scans")
    assert resumed == expected
    assert checks.paths == names(folder)[8:]  # nothing of the two finished chunks is opened again
    checks.reset(fail_on=1)
    assert scan_image_folder(folder, progress=False, cache_dir=tmp_path / "scans") == expected  # whole now


KILLED_SCAN = """
import sys, time
from pathlib import Path
from ccp.training import data
data.SCAN_CHUNK = {chunk}
check, calls = data.check_image, []

def check_then_hang(path):
    calls.append(path)
    if len(calls) == {hang_on}:  # in the middle of chunk 3: tell the test, then wait for the kill
        Path(sys.argv[3]).touch()
        time.sleep(600)
    return check(path)

data.check_image = check_then_hang
data.scan_image_folder(sys.argv[1], progress=False, cache_dir=sys.argv[2])
"""


def test_a_scan_killed_with_sigkill_resumes_from_its_written_chunks(folder, tmp_path, monkeypatch, chunked):
    cache, hanging = tmp_path / "scans", tmp_path / "hanging"
    script = KILLED_SCAN.format(chunk=CHUNK, hang_on=3 * CHUNK + 2)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", script, str(folder), str(cache), str(hanging)], env=env)
    try:
        deadline = time.monotonic() + 300
        while not hanging.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert hanging.exists(), f"the scan did not get to its 14th file (exit {proc.poll()})"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(part_files(cache)) == 3  # chunks 0-2, written as each was done
    checks = Checks(monkeypatch)
    resumed = scan_image_folder(folder, progress=False, cache_dir=cache)
    checked = list(checks.paths)
    assert resumed == fresh(folder)
    assert checked == names(folder)[3 * CHUNK:]  # chunk 3, the one in flight, and the rest


# --- (2) a folder changed after a partial scan ----------------------------------------------------
def test_files_changed_added_or_removed_after_a_partial_scan_are_found(folder, tmp_path, monkeypatch, chunked):
    cache = tmp_path / "scans"
    checks = Checks(monkeypatch, fail_on=11)
    with pytest.raises(Interrupted):
        scan_image_folder(folder, progress=False, cache_dir=cache)  # f00-f07 done
    (folder / "a" / "f01.png").write_bytes(b"now junk")  # finished, then broken
    write_image(folder / "a" / "f03.jpg", seed=99)  # finished, then rewritten with other pixels
    os.utime(folder / "a" / "f03.jpg", ns=(1, 1))  # ... and another mtime even on a coarse clock
    (folder / "a" / "f04.png").unlink()  # finished, then removed
    write_image(folder / "a" / "f00b.png", seed=100)  # new, in a finished chunk (shifts every chunk)
    write_image(folder / "b" / "f19b.png", seed=101)  # new, at the end
    checks.reset()
    resumed = scan_image_folder(folder, progress=False, cache_dir=cache)
    checked = list(checks.paths)
    assert resumed == fresh(folder)
    assert "f04.png" not in {rel.split("/")[-1] for rel, *_ in resumed.images}
    assert [Path(rel).name for rel, _ in resumed.bad] == ["f01.png"]
    unfinished = [name(i) for i in range(8, 20)]
    assert sorted(checked) == sorted(["f00b.png", "f01.png", "f03.jpg", "f19b.png", *unfinished])

    # after a complete scan: a rewritten file is the one file checked again
    checks.reset()
    write_image(folder / "b" / "f13.png", seed=7)
    os.utime(folder / "b" / "f13.png", ns=(2, 2))
    assert scan_image_folder(folder, progress=False, cache_dir=cache) == fresh(folder)
    assert checks.paths[: 1] == ["f13.png"] and checks.paths.count("f13.png") == 2  # ours, then fresh()'s
    assert len(checks.paths) == 1 + len(names(folder))


# --- (3) bad files: the same verdicts, from headers ---------------------------------------------------
def full_decode_check(path) -> tuple[str | None, str | None]:
    """The check every file got before the header checks: verify(), a full decode, RGB conversion."""
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            mode = image.mode
            image.load()
            to_rgb8(image)
        return mode, None
    except Exception as err:
        return None, f"{type(err).__name__}: {err}"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def messy(tmp_path) -> Path:
    """Usable files of every mode the formats give, and every kind of bad file, by name:
    the bad ones all sort after "m" and the good ones before."""
    root = tmp_path / "messy"
    root.mkdir()
    good = photo(1, (40, 40))
    good.save(root / "a_rgb.png")
    Image.new("L", (16, 16), 77).save(root / "b_gray.png")
    good.convert("P").save(root / "c_palette.png")
    good.convert("P").save(root / "c_palette_transparent.png", transparency=3)
    good.save(root / "c_rgb_transparent.png", transparency=(1, 2, 3))
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(root / "d_cmyk.jpg")
    Image.fromarray(np.zeros((16, 16, 4), np.uint8), "RGBA").save(root / "e_rgba.png")
    good.convert("LA").save(root / "e_la.png")
    good.convert("1").save(root / "e_bilevel.png")
    Image.fromarray(np.full((16, 16), 65535, np.uint16)).save(root / "f_gray16.png")
    good.save(root / "g_progressive.jpg", progressive=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    photo(2, (64, 32)).save(root / "g_rotated.jpg", exif=exif)
    good.save(root / "h.webp")
    good.save(root / "h_png_named.jpg", format="PNG")
    raw = _png(good)
    corrupt = bytearray(raw)
    corrupt[corrupt.index(b"IDAT") + 20] ^= 0xFF
    (root / "x_corrupt.png").write_bytes(bytes(corrupt))
    (root / "x_truncated.png").write_bytes(raw[: len(raw) // 2])
    jpeg = io.BytesIO()
    photo(3, (64, 64)).save(jpeg, format="JPEG")
    (root / "x_truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "x_truncated_progressive.jpg").write_bytes((root / "g_progressive.jpg").read_bytes()[:400])
    (root / "x_truncated.webp").write_bytes((root / "h.webp").read_bytes()[:100])
    (root / "x_text.png").write_text("this is not a PNG")
    (root / "x_empty.jpg").write_bytes(b"")
    Image.fromarray(np.zeros((8, 8), np.float32), "F").save(root / "x_float_tiff.png", format="TIFF")
    return root


BAD = ["x_corrupt.png", "x_empty.jpg", "x_float_tiff.png", "x_text.png", "x_truncated.jpg", "x_truncated.png",
       "x_truncated.webp", "x_truncated_progressive.jpg"]


def test_header_checks_give_the_full_decodes_verdicts_without_decoding_pngs_or_full_size_jpegs(messy, monkeypatch):
    decoded, current = [], [""]
    load = ImageFile.ImageFile.load

    def recording_load(image):
        if image.fp is not None:  # a decode (later calls find the pixels loaded)
            decoded.append((current[0], image.format, image.size))
        return load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    files = data_module.list_image_files(messy)
    new = {}
    for path in files:
        current[0] = path.name
        new[path.name] = data_module.check_image(path)
    decoded_by_scan = list(decoded)
    monkeypatch.undo()
    assert new == {p.name: full_decode_check(p) for p in files}  # modes and reasons, bad files included
    assert sorted(name for name, (mode, reason) in new.items() if reason) == BAD
    assert new["x_float_tiff.png"][1] == "ValueError: 32-bit float images are not supported"
    assert "x_text.png" in new["x_text.png"][1]  # the message names the file, as PIL's did
    assert not [d for d in decoded_by_scan if d[1] == "PNG"]  # PNG: verify() reads every chunk's CRC, no inflate
    jpegs = [d for d in decoded_by_scan if d[1] == "JPEG"]
    assert {name for name, *_ in jpegs} >= {"d_cmyk.jpg", "g_progressive.jpg", "g_rotated.jpg", "x_truncated.jpg"}
    for name, _, (width, height) in jpegs:  # DCT-scaled to 1/8: every byte of the scan data still decoded
        with Image.open(messy / name) as image:
            assert (width, height) == ((image.width + 7) // 8, (image.height + 7) // 8), name


def test_bad_files_found_before_a_kill_are_reported_as_before_and_not_reopened(messy, tmp_path, monkeypatch, chunked):
    expected = fresh(messy)
    n = len(names(messy))
    checks = Checks(monkeypatch, fail_on=n - 1)  # killed at file n - 2, in the last chunk or the one before
    with pytest.raises(Interrupted):
        scan_image_folder(messy, progress=False, cache_dir=tmp_path / "scans")
    finished = (n - 2) // CHUNK * CHUNK
    assert len([name for name in names(messy)[:finished] if name in BAD]) >= 4
    checks.reset()
    resumed = scan_image_folder(messy, progress=False, cache_dir=tmp_path / "scans")
    assert resumed == expected and [Path(rel).name for rel, _ in resumed.bad] == BAD
    assert checks.paths == names(messy)[finished:]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.report("skip")
    assert sorted(Path(str(w.message).split(": ")[0].removeprefix("skipping ")).name for w in caught
                  if issubclass(w.category, BadImageWarning)) == BAD
    with pytest.raises(BadImageError) as err:
        resumed.report("fail")
    assert all(name in str(err.value) for name in BAD) and "a_rgb.png" not in str(err.value)
    assert f"{len(BAD)} of {n} files" in str(err.value)
    assert {rel: mode for rel, _, _, mode in resumed.images} == {
        "a_rgb.png": "RGB", "b_gray.png": "L", "c_palette.png": "P", "c_palette_transparent.png": "P",
        "c_rgb_transparent.png": "RGB", "d_cmyk.jpg": "CMYK", "e_bilevel.png": "1", "e_la.png": "LA",
        "e_rgba.png": "RGBA", "f_gray16.png": "I;16", "g_progressive.jpg": "RGB", "g_rotated.jpg": "RGB",
        "h.webp": "RGB", "h_png_named.jpg": "RGB",
    }


def test_a_png_with_valid_checksums_but_broken_compressed_data_passes_the_scan_and_fails_at_load(tmp_path):
    """The choice header checks make: verify() checks every chunk's CRC, not the deflate stream inside
    (inflating costs as much as decoding). Such a file comes only from a broken encoder; it passes
    the scan and the dataset says which file failed when it is read."""
    import struct
    import zlib

    raw = bytearray(_png(photo(5, (40, 40))))
    at = raw.index(b"IDAT")
    length = struct.unpack(">I", raw[at - 4:at])[0]
    payload = bytearray(raw[at + 4:at + 4 + length])
    payload[10] ^= 0xFF
    raw[at + 4:at + 4 + length] = payload
    raw[at + 4 + length:at + 8 + length] = struct.pack(">I", zlib.crc32(b"IDAT" + bytes(payload)))
    (tmp_path / "broken.png").write_bytes(bytes(raw))
    assert data_module.check_image(tmp_path / "broken.png") == ("RGB", None)
    dataset = data_module.ImageFolderDataset(tmp_path, 16, progress=False)
    with pytest.raises(OSError, match="broken.png.*passed the scan"):
        dataset.pixels(0)


# --- (4) ranks share the scan without collectives ------------------------------------------------
COLLECTIVES = ("barrier", "monitored_barrier", "broadcast", "broadcast_object_list", "all_reduce", "all_gather",
               "all_gather_object", "gather", "gather_object", "scatter", "reduce", "init_process_group")


@pytest.fixture
def no_collectives(monkeypatch):
    def refuse(name):
        def collective(*args, **kwargs):
            raise AssertionError(f"torch.distributed.{name} called during the scan")
        return collective

    for name in COLLECTIVES:
        monkeypatch.setattr(torch.distributed, name, refuse(name))


class FakeTrainer:
    """What ConceptDataModule reads of a trainer for its scan: the rank and the world size."""

    def __init__(self, rank: int, world_size: int):
        self.global_rank, self.world_size, self.local_rank = rank, world_size, rank


def _rank_process(rank: int, world_size: int, folder: str, cache: str, out: str, gate: str) -> None:
    """One rank as Lightning drives the datamodule: local rank 0 calls prepare_data, then every rank
    (after Lightning's pre_setup barrier) calls setup."""
    checks = Checks(pytest.MonkeyPatch(), sleep=0.1)
    dm = ConceptDataModule(folder, resolution=16, num_workers=1, cache_dir=cache)
    dm.trainer = FakeTrainer(rank, world_size)
    Path(gate, f"ready{rank}").touch()
    while len(list(Path(gate).iterdir())) < world_size:  # start together (the test's harness, not the code's)
        time.sleep(0.005)
    if rank == 0:
        dm.prepare_data()
    in_prepare = len(checks.paths)
    dm.setup("fit")
    Path(out).write_text(json.dumps({"images": dm._scan.images, "bad": dm._scan.bad, "checked": checks.paths,
                                     "in_prepare": in_prepare, "length": len(dm.train_dataset)}))


def test_two_ranks_each_check_their_share_and_end_with_the_same_complete_scan(folder, tmp_path, chunked, no_collectives):
    (folder / "b" / "f16.png").write_bytes(b"junk")
    (tmp_path / "gate").mkdir()
    expected = fresh(folder)
    fork = multiprocessing.get_context("fork")
    outs = [tmp_path / f"rank{rank}.json" for rank in range(2)]
    procs = [fork.Process(target=_rank_process, args=(rank, 2, str(folder), str(tmp_path / "cache"), str(out),
                                                      str(tmp_path / "gate")))
             for rank, out in enumerate(outs)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(300)
    assert [proc.exitcode for proc in procs] == [0, 0]
    results = [json.loads(out.read_text()) for out in outs]
    for result in results:
        assert [tuple(x) for x in result["images"]] == expected.images
        assert [tuple(x) for x in result["bad"]] == expected.bad
        assert result["length"] == len(expected.images)
    assert results[0]["in_prepare"] == 0  # local rank 0 does not scan while the others wait in a barrier
    checked = [set(result["checked"]) for result in results]
    assert checked[0] | checked[1] == set(names(folder))
    # each its own half (5 chunks of 4: rank 0 has chunks 0, 2, 4, rank 1 chunks 1, 3), give or take a chunk
    assert all(len(result["checked"]) <= 12 + CHUNK for result in results), [len(c) for c in checked]
    assert len(checked[0] & checked[1]) <= CHUNK


def test_a_rank_alone_takes_over_the_chunks_of_ranks_that_never_come(folder, tmp_path, chunked, no_collectives,
                                                                     monkeypatch):
    """A killed rank, or one on another node with its own cache_dir: nobody waits for it."""
    checks = Checks(monkeypatch)
    alone = scan_image_folder(folder, progress=False, cache_dir=tmp_path / "cache", rank=1, world_size=3)
    assert alone == fresh(folder)
    first = checks.paths[: len(checks.paths) - 20]  # fresh() checked the last 20
    chunks = [names(folder)[start:start + CHUNK] for start in range(0, 20, CHUNK)]
    assert first == chunks[1] + chunks[4] + chunks[3] + chunks[2] + chunks[0]  # its own, then the others' from the end
    checks.reset(fail_on=1)
    for rank in range(3):  # the other ranks, late: they read everything, they check nothing
        assert scan_image_folder(folder, progress=False, cache_dir=tmp_path / "cache", rank=rank, world_size=3) == alone
    with pytest.raises(ValueError, match="rank 3"):
        scan_image_folder(folder, progress=False, rank=3, world_size=3)
