"""Peak memory of a `ccp-train` run, phase by phase, on an SD v1.5-shaped prior in a user's folder.

The prior (SD v1.5's UNet, VAE and ViT-L/14-shaped text encoder with random weights, or the same
architecture at a fraction of the width: ``--size``) is written with ``save_pretrained`` to a
folder, as a downloaded SD v1.5 is laid out, next to a data folder of one 256 px image. Then, in a
fresh process, the ccp-train job (`ccp.training.run.run_training`, what ``ccp-train`` calls) trains
it for ``--steps`` steps with a checkpoint after every step and the export at the end, while this
script records the process's peak RSS per phase: imports, prior load, method build (ours: the
null-text conversion), module/data/trainer setup, each step's forward+backward, optimizer step
and checkpoint, and the export. Peak RSS per phase is exact (the kernel's high-water mark, reset at
every phase change); the anonymous part (what cannot be paged out) is sampled every 5 ms.

Next to the measurement it prints `ccp.methods.params.memory_estimate` for the run (weights,
gradients, optimizer state, EMA, frozen parts) and the activations measured in the first step, so
the excess over "estimate + activations" is visible phase by phase.

    python benchmarks/memory.py --size quarter --method ours                  # ~220M-parameter UNet
    python benchmarks/memory.py --size sd15 --method ours --optimizer adamw8bit --prior-dtype bfloat16
    python benchmarks/memory.py --size sd15 --method ours -- ema.enabled=true  # extra ccp-train overrides

Results: benchmarks/results/memory_<size>_<method>_<options>.json. Run one at a time: SD v1.5 in
fp32 with AdamW needs about 17 GiB before activations.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GIB = 2**30

# UNet widths: SD v1.5 (859.5M parameters) and narrower versions of the same architecture.
SIZES = {
    "sd15": (320, 640, 1280, 1280),
    "half": (224, 448, 896, 896),     # ~0.5x the parameters
    "quarter": (160, 320, 640, 640),  # ~0.25x
    "small": (64, 128, 256, 256),     # ~0.04x, seconds (smoke test)
}


# --- the prior ----------------------------------------------------------------------------------
def build_prior(size: str = "sd15", seed: int = 0, dtype=None):
    """SD v1.5's architecture with random weights: UNet (widths of `size`), the SD VAE, a
    ViT-L/14-shaped CLIP text encoder (123M), the CLIP tokenizer, SD's scheduler; initialised
    directly in `dtype` (default: fp32)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from ccp.priors.tiny import (SD15_SCHEDULER_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG,
                                 build_sd15_shaped_text_encoder)
    from ccp.priors.tokenizer import build_clip_tokenizer

    def seeded(offset, build):
        default = torch.get_default_dtype()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + offset)
            torch.set_default_dtype(dtype or default)  # initialised in `dtype`: no fp32 copy on the way
            try:
                return build().eval()
            finally:
                torch.set_default_dtype(default)

    config = {**SD15_UNET_CONFIG, "block_out_channels": SIZES[size]}
    return StableDiffusionPipeline(
        unet=seeded(0, lambda: UNet2DConditionModel(**config)),
        vae=seeded(1, lambda: AutoencoderKL(**SD15_VAE_CONFIG)),
        text_encoder=seeded(2, lambda: build_sd15_shaped_text_encoder(seed + 2)),
        tokenizer=build_clip_tokenizer(),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def prepare_inputs(root: Path, size: str, resolution: int = 256) -> tuple[Path, Path]:
    """A prior folder (save_pretrained: one file per component, as SD v1.5 is distributed) and a
    data folder of one image; reused when present."""
    import numpy as np
    from PIL import Image

    prior_dir, data_dir = root / f"prior_{size}", root / f"data_{resolution}"
    if not (prior_dir / "model_index.json").is_file():
        build_prior(size).save_pretrained(prior_dir)
    if not data_dir.is_dir():
        data_dir.mkdir(parents=True)
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(data_dir / "0.png")
    return prior_dir, data_dir


# --- what the benchmark can switch back, to measure what ccp-train's defaults save ------------------
def lightning_checkpoint_io():
    """Lightning's default CheckpointIO (`_atomic_save`: the whole checkpoint serialised into an
    in-memory buffer first), in place of ccp-train's `FileCheckpointIO`."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    return TorchCheckpointIO()


# --- measuring ----------------------------------------------------------------------------------
def read_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def children_uss() -> int:
    """Unique memory of this process's children (DataLoader workers), in bytes."""
    try:
        import psutil

        return sum(c.memory_full_info().uss for c in psutil.Process().children(recursive=True))
    except Exception:  # a child that just exited, or no psutil
        return 0


class PhaseMeter:
    """Peak RSS (exact) and peak anonymous RSS (sampled) per named phase of this process."""

    def __init__(self, interval: float = 0.005, watch_children: bool = False):
        self.phases: list[dict] = []
        self._current: dict | None = None
        self._lock = threading.Lock()
        self._interval, self._watch_children = interval, watch_children
        self._stop = threading.Event()
        self._exact = reset_peak()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        tick = 0
        while not self._stop.wait(self._interval):
            uss = children_uss() if self._watch_children and tick % 40 == 0 else None
            tick += 1
            with self._lock:  # read under the lock: a sample belongs to the phase it was taken in
                status = read_status()
                if self._current is not None:
                    c = self._current
                    c["peak_anon"] = max(c["peak_anon"], status["RssAnon"])
                    c["peak_rss_sampled"] = max(c["peak_rss_sampled"], status["VmRSS"])
                    if uss is not None:
                        c["peak_children_uss"] = max(c["peak_children_uss"], uss)

    def mark(self, name: str) -> None:
        status = read_status()
        with self._lock:
            if self._current is not None:
                c = self._current
                c["end_rss"], c["seconds"] = status["VmRSS"], time.perf_counter() - c.pop("_t")
                c["peak_anon"] = max(c["peak_anon"], status["RssAnon"])
                c["peak_rss"] = status["VmHWM"] if self._exact else max(c["peak_rss_sampled"], status["VmRSS"])
                self.phases.append(c)
            self._exact = reset_peak()
            status = read_status()
            self._current = None if name is None else {
                "phase": name, "start_rss": status["VmRSS"], "start_anon": status["RssAnon"], "peak_anon": status["RssAnon"],
                "peak_rss_sampled": status["VmRSS"], "peak_children_uss": 0, "_t": time.perf_counter()}

    def close(self) -> list[dict]:
        self.mark(None)
        self._stop.set()
        return self.phases


def format_phases(phases: list[dict]) -> str:
    lines = [f"{'phase':42s} {'start':>7s} {'peak':>7s} {'anon':>7s} {'end':>7s} {'s':>7s}"]
    for p in phases:
        lines.append(f"{p['phase'][:42]:42s} {p['start_rss'] / GIB:7.2f} {p['peak_rss'] / GIB:7.2f} "
                     f"{p['peak_anon'] / GIB:7.2f} {p['end_rss'] / GIB:7.2f} {p['seconds']:7.1f}"
                     + (f"  workers {p['peak_children_uss'] / GIB:.2f}" if p["peak_children_uss"] else ""))
    return "\n".join(lines) + "\n(GiB of RSS of the training process; anon: sampled anonymous RSS)"


# --- the measured run (child process) -----------------------------------------------------------
def child(args: argparse.Namespace) -> None:
    meter = PhaseMeter(watch_children=args.workers > 0)
    meter.mark("imports")
    import lightning as L
    import torch

    import ccp.training.run as run
    from ccp.config import compose
    from ccp.methods.params import memory_estimate
    from ccp.priors.loading import resolve_dtype

    torch.set_num_threads(args.threads)
    info: dict = {}

    class Phases(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            cfg = info["cfg"]
            estimate = memory_estimate(pl_module.method, pl_module._prior[0], optimizer=cfg.optim.get("name", "adamw"),
                                       ema=bool(cfg.ema.enabled), ema_on_cpu=cfg.ema.get("device") == "cpu",
                                       frozen_dtype=resolve_dtype(cfg.prior.dtype) or torch.float32)
            info["estimate"] = estimate
            meter.mark("fit start")

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            meter.mark(f"step {trainer.global_step + 1}: forward+backward")

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            meter.mark(f"step {trainer.global_step + 1}: optimizer step")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            meter.mark(f"step {trainer.global_step}: after step (EMA, logging)")

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            meter.mark(f"step {trainer.global_step}: checkpoint")

        def on_train_end(self, trainer, pl_module):
            meter.mark("fit end")

        def teardown(self, trainer, pl_module, stage):
            meter.mark("export")

    def wrap(name, before, after=None):
        original = getattr(run, name)

        def wrapped(*a, **k):
            meter.mark(before)
            out = original(*a, **k)
            if after:
                meter.mark(after)
            return out
        setattr(run, name, wrapped)

    from ccp.training import callbacks

    validation = callbacks.ValidationGrid._run

    def validation_run(self, trainer, pl_module):
        meter.mark(f"step {trainer.global_step}: validation grid")
        validation(self, trainer, pl_module)
        meter.mark(f"step {trainer.global_step}: after validation")
    callbacks.ValidationGrid._run = validation_run

    wrap("load_prior", "load prior", "build method (ours: null-text conversion)")
    wrap("PersonalizationModule", "module, data, trainer setup")
    wrap("write_export_info", "export info")
    if args.checkpoint_io == "lightning":
        from types import SimpleNamespace

        from ccp.training.callbacks import FileCheckpointIO

        def trainer(*a, plugins=None, **k):
            plugins = [p for p in plugins or [] if not isinstance(p, FileCheckpointIO)]
            return L.Trainer(*a, plugins=[*plugins, lightning_checkpoint_io()], **k)
        run.L = SimpleNamespace(**{**vars(L), "Trainer": trainer})
    if args.keep_grads:  # gradients kept until the next backward (Lightning's default), not freed after each update
        from ccp.training.module import PersonalizationModule

        def keeping_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            L.LightningModule.optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure)
            self.method.on_after_optimizer_step()
        PersonalizationModule.optimizer_step = keeping_step
    build_callbacks = run.build_callbacks
    run.build_callbacks = lambda cfg: [*build_callbacks(cfg), Phases()]

    overrides = [
        "trainer=cpu", f"prior.path={args.prior_dir}", f"prior.dtype={args.prior_dtype}", f"method={args.method}",
        "data=folder", f"data.path={args.data_dir}", f"data.resolution={args.resolution}", "data.batch_size=1",
        f"data.num_workers={args.workers}", f"data.cache_dir={args.run_dir}/cache", "trainer.global_batch_size=1",
        f"trainer.max_steps={args.steps}", "checkpoint.every_n_steps=1", "validation.every_n_steps=0",
        f"ema.enabled={str(args.ema).lower()}", "logger=none", "logger.csv=false", "resume=null",
        *([f"optim.name={args.optimizer}"] if args.optimizer != "adamw" else []), *args.overrides,
    ]
    cfg = compose("train", overrides)
    info["cfg"] = cfg
    start = time.perf_counter()
    error = None
    try:
        run.run_training(cfg, args.run_dir)
    except Exception as err:  # reported in the JSON, exit status 1
        error = f"{type(err).__name__}: {err}"
    meter.mark("done")
    phases = meter.close()
    Path(args.result).write_text(json.dumps({"overrides": overrides, "phases": phases, "estimate": info.get("estimate"),
                                             "seconds": time.perf_counter() - start, "error": error}, indent=2))
    if error:
        raise SystemExit(error)


def summarize(result: dict) -> dict:
    """Baseline (RSS after imports), activations (first forward+backward minus its gradients) and,
    per phase, the excess of the peak over baseline + estimate + activations."""
    phases, est = result["phases"], result["estimate"]
    baseline = next(p["end_rss"] for p in phases if p["phase"] == "imports")
    first = next((p for p in phases if p["phase"].endswith("forward+backward")), None)
    if est is None or first is None:
        return {"baseline": baseline}
    activations = max(0, first["peak_rss"] - first["start_rss"] - est["gradients"])
    budget = baseline + est["process"] + activations  # a CPU run: device and host are this process
    excess = {p["phase"]: p["peak_rss"] - budget for p in phases}
    return {"baseline": baseline, "activations": activations, "budget": budget,
            "peak": max(p["peak_rss"] for p in phases),
            "step_peak": max(p["peak_rss"] for p in phases if p["phase"].startswith("step") and "checkpoint" not in p["phase"]),
            "excess_by_phase": excess}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="quarter")
    parser.add_argument("--method", default="ours")
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw8bit"))
    parser.add_argument("--prior-dtype", default="float32")
    parser.add_argument("--ema", action="store_true")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (data.num_workers)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint-io", choices=("lightning", "file"), default="file",
                        help="file: ccp-train's torch.save straight to the file; lightning: Lightning's default, "
                             "which first serialises the checkpoint into memory")
    parser.add_argument("--keep-grads", action="store_true",
                        help="keep gradients until the next backward (Lightning's default) instead of ccp-train's freeing")
    parser.add_argument("--malloc-mmap-threshold", type=int, help="glibc MALLOC_MMAP_THRESHOLD_ for the run "
                        "(e.g. 131072: freed tensors go back to the OS at once)")
    parser.add_argument("--work", type=Path, default=Path("outputs/bench-memory"), help="prior and data folders (reused)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    parser.add_argument("overrides", nargs="*", help="extra ccp-train overrides (after --)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare:
        return prepare_inputs(args.work, args.size, args.resolution) and None
    if args.child:
        for key, value in json.loads(args.child.read_text()).items():
            setattr(args, key, value)
        return child(args)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    prior_dir, data_dir = args.work / f"prior_{args.size}", args.work / f"data_{args.resolution}"
    if not (prior_dir / "model_index.json").is_file() or not data_dir.is_dir():  # in its own process: its memory goes
        subprocess.run([sys.executable, __file__, "--prepare", "--work", str(args.work), "--size", args.size,
                        "--resolution", str(args.resolution)], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        spec = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "child"}
        spec.update(prior_dir=str(prior_dir.resolve()), data_dir=str(data_dir.resolve()), run_dir=f"{tmp}/run",
                    result=f"{tmp}/result.json")
        (Path(tmp) / "args.json").write_text(json.dumps(spec))
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        if args.malloc_mmap_threshold:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
        code = subprocess.run([sys.executable, __file__, "--child", f"{tmp}/args.json"], env=env).returncode
        result_path = Path(tmp) / "result.json"
        if not result_path.is_file():
            raise SystemExit(f"the measured run died (exit status {code}), e.g. killed for memory")
        result = json.loads(result_path.read_text())
    # paths as the command line gave them, not where this machine keeps them
    where = {str(args.work.resolve()): str(args.work), tmp: "<run dir>"}
    result["overrides"] = [next((o.replace(k, v) for k, v in where.items() if k in o), o) for o in result["overrides"]]
    from common import machine

    result.update(machine=machine(), size=args.size, method=args.method, optimizer=args.optimizer, prior_dtype=args.prior_dtype,
                  ema=args.ema, workers=args.workers, resolution=args.resolution, checkpoint_io=args.checkpoint_io,
                  malloc_mmap_threshold=args.malloc_mmap_threshold, keep_grads=args.keep_grads, summary=summarize(result))
    print(format_phases(result["phases"]))
    est, summary = result["estimate"], result["summary"]
    if est:
        print("estimate (GiB): " + ", ".join(f"{k} {est[k] / GIB:.2f}" for k in
                                              ("weights", "gradients", "optimizer_state", "ema", "ema_host", "frozen",
                                               "frozen_host", "process")))
        print(f"baseline after imports {summary['baseline'] / GIB:.2f} GiB, activations {summary['activations'] / GIB:.2f} GiB, "
              f"budget {summary['budget'] / GIB:.2f} GiB, peak {summary['peak'] / GIB:.2f} GiB "
              f"(training step {summary['step_peak'] / GIB:.2f} GiB)")
    name = "_".join(filter(None, ["memory", args.size, args.method, args.optimizer, args.prior_dtype,
                                  "ema" if args.ema else "", f"w{args.workers}" if args.workers else "",
                                  "fileckpt" if args.checkpoint_io == "file" else "",
                                  "mmap" if args.malloc_mmap_threshold else "", "keepgrads" if args.keep_grads else "",
                                  args.tag]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / f'{name}.json'}")
    if result["error"]:
        raise SystemExit(result["error"])


if __name__ == "__main__":
    main()
