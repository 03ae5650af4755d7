"""The first scan of an FFHQ-size image folder (ccp.training.data.scan_image_folder), on this CPU.

Generates N 512x512 JPEGs (smooth gradients + noise, about 39 KB each, like photos) into a folder
(once: an existing complete folder is reused), then times, each with its own empty cache:

- the first scan (header checks, the cache written part by part);
- a scan killed with SIGKILL once half of its parts are written, then resumed: the resume's time;
- the start after a complete scan (the whole-result file);
- the scan before this change (`ccp/training/data.py` at --old-ref, imported from git), when given.

Writes benchmarks/results/data_scan_cpu.json: the CPU (model name, avx2 / avx512_bf16 / amx_bf16
flags, cores), N, threads, the times and images/s. The page cache is warm for every scan (the
folder was just written or read), which favours no variant; a bucket mount adds a round trip per file.

    make bench-data-scan ARGS="--n 70000"
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_info, machine, write_json  # noqa: E402
from ccp.training import data as data_module  # noqa: E402

SIZE = 512
COMPLETE = ".generated.json"


# --- the folder -----------------------------------------------------------------------------
_grid = _bank = None


def _image(index: int) -> bytes:
    """JPEG bytes of image `index`: per-channel gradients and low-frequency waves plus noise, q=90."""
    global _grid, _bank
    from PIL import Image

    if _grid is None:
        _grid = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
        _bank = np.random.default_rng(0).normal(0, 1, (2 * SIZE, 2 * SIZE, 3)).astype(np.float32)
    y, x = _grid
    rng = np.random.default_rng(index)
    a = rng.uniform(-1, 1, (3, 6)).astype(np.float32)
    f = rng.uniform(2, 9, 3).astype(np.float32)
    pixels = np.empty((SIZE, SIZE, 3), np.float32)
    for c in range(3):
        wave = np.sin(f[c] * (a[c, 2] * x + a[c, 3] * y) + 6 * a[c, 4]) * np.cos(f[c] * a[c, 5] * y * x)
        pixels[..., c] = 128 + 60 * (a[c, 0] * x + a[c, 1] * y) + 40 * wave
    oy, ox = rng.integers(0, SIZE, 2)
    pixels += 4 * _bank[oy:oy + SIZE, ox:ox + SIZE]
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _path(folder: Path, index: int) -> Path:
    return folder / f"{index // 1000:05d}" / f"{index:05d}.jpg"  # FFHQ's layout: 1000 per subfolder


def _write(args: tuple[str, int]) -> int:
    folder, index = Path(args[0]), args[1]
    path = _path(folder, index)
    if not path.is_file():
        data = _image(index)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path.stat().st_size


def generate(folder: Path, n: int, processes: int) -> dict:
    """The folder of `n` images, written unless a complete one is there; its size."""
    record = folder / COMPLETE
    if record.is_file() and json.loads(record.read_text()).get("n") == n:
        info = json.loads(record.read_text())
        print(f"reusing {n} images in {folder}")
        return {**info, "generate_s": None}
    for index in range(0, n, 1000):
        _path(folder, index).parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        sizes = []
        for k, size in enumerate(pool.imap(_write, [(str(folder), i) for i in range(n)], chunksize=64), 1):
            sizes.append(size)
            if k % 5000 == 0:
                print(f"generated {k}/{n} ({time.perf_counter() - start:.0f} s)", flush=True)
    info = {"n": n, "bytes": int(sum(sizes)), "mean_kb": round(sum(sizes) / n / 1000, 1)}
    record.write_text(json.dumps(info))
    return {**info, "generate_s": round(time.perf_counter() - start, 1)}


# --- the scans ------------------------------------------------------------------------------
LOAD: dict[str, float] = {}  # the 1-minute load average after each timed phase (a shared machine)


def timed(fn, phase: str) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    LOAD[phase] = round(os.getloadavg()[0], 2)
    return time.perf_counter() - start, result


def parts(cache: Path) -> list[Path]:
    return list(cache.glob("*.parts/part-*.json"))


KILLED = """
import sys
sys.path.insert(0, {repo!r})
from ccp.training.data import scan_image_folder
scan_image_folder(sys.argv[1], workers=int(sys.argv[2]), progress=False, cache_dir=sys.argv[3])
"""


def kill_at_half(folder: Path, cache: Path, n: int, workers: int) -> dict:
    """A scan in a subprocess, SIGKILLed once half of its parts are written."""
    half = -(-n // data_module.SCAN_CHUNK) // 2
    proc = subprocess.Popen([sys.executable, "-c", KILLED.format(repo=str(REPO)), str(folder), str(workers), str(cache)])
    start = time.perf_counter()
    try:
        while len(parts(cache)) < half and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    if proc.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the scan to kill ended by itself (exit {proc.returncode}) before {half} parts")
    written = len(parts(cache))
    return {"parts_at_kill": written, "images_done_at_kill": min(n, written * data_module.SCAN_CHUNK),
            "killed_after_s": round(time.perf_counter() - start, 1)}


def old_module(ref: str):
    """ccp/training/data.py as it was at `ref`, importable beside today's ccp."""
    source = subprocess.run(["git", "show", f"{ref}:ccp/training/data.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "ccp_data_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("ccp_data_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=70000, help="images (FFHQ: 70,000)")
    parser.add_argument("--folder", type=Path, default=REPO / "outputs" / "scan-bench", help="reused when complete")
    parser.add_argument("--workers", type=int, default=4, help="scan threads (the datamodule: data.num_workers, 4)")
    parser.add_argument("--processes", type=int, default=2, help="processes that generate the images")
    parser.add_argument("--old-ref", default="e06f3ba", help="git ref of the scan to compare with; '' skips it")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    folder = args.folder.resolve()
    generated = generate(folder, args.n, args.processes)
    load_at_start = os.getloadavg()[0]  # this machine's 2 cores are shared: other work slows every variant
    caches = folder.parent / f"{folder.name}-caches"
    shutil.rmtree(caches, ignore_errors=True)
    scan = lambda module, cache: module.scan_image_folder(folder, workers=args.workers, progress=True, cache_dir=cache)

    print("first scan", flush=True)
    first_s, first = timed(lambda: scan(data_module, caches / "first"), "first_scan")
    assert first.num_checked == args.n, first.num_checked
    cached_s, again = timed(lambda: scan(data_module, caches / "first"), "cached_start")
    assert again == first
    print("scan killed at half, then resumed", flush=True)
    killed = kill_at_half(folder, caches / "killed", args.n, args.workers)
    resume_s, resumed = timed(lambda: scan(data_module, caches / "killed"), "resume")
    assert resumed == first
    results = {
        "first_scan_s": round(first_s, 1), "first_scan_images_per_s": round(args.n / first_s),
        "killed_at_half": killed,
        "resume_after_kill_s": round(resume_s, 1),
        "resume_images_per_s": round((args.n - killed["images_done_at_kill"]) / resume_s),
        "start_with_complete_cache_s": round(cached_s, 2),
    }
    if args.old_ref:
        print(f"the scan at {args.old_ref}", flush=True)
        old = old_module(args.old_ref)
        old_s, before = timed(lambda: scan(old, caches / "before"), "before")
        assert before.images == first.images and before.bad == first.bad
        results.update({"before_ref": args.old_ref, "before_first_scan_s": round(old_s, 1),
                        "before_images_per_s": round(args.n / old_s), "speedup": round(old_s / first_s, 2)})
    shutil.rmtree(caches, ignore_errors=True)
    payload = {
        "benchmark": "data_scan", "machine": machine(), "cpu": cpu_info(), "python": platform.python_version(),
        "n": args.n, "image": f"{SIZE}x{SIZE} JPEG q90", "mean_kb": generated["mean_kb"],
        "generate_s": generated["generate_s"], "workers": args.workers, "scan_chunk": data_module.SCAN_CHUNK,
        "page_cache": "warm", "load_average_1m_at_start": round(load_at_start, 2), "load_average_1m_after": LOAD,
        **results,
    }
    path = write_json(args.out, "data_scan_cpu.json", payload)
    print(json.dumps(payload, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
