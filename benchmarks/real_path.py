"""The GPU check's real-path sections: `ccp-train` and `ccp-eval` themselves, in this process.

`benchmarks/gpu_check.py` runs these first. Nothing here re-implements a training step or a sampler:
the config is composed as the command line composes it (`experiment=table1 dataset=face method=<method>`
of ccp-train, `metric=fid` of ccp-eval), and `ccp.training.run.run_training` / `ccp.evaluation.run.run_eval`
run it: the Lightning Trainer with its precision plugin, EMA, checkpoint, DataLoader workers and
latent cache; the GCFG pipeline down to VAE decode, then Inception and the Frechet distance.
Speed is read from what the run itself writes (the CSV log's ``train/images_per_s``); a few class
methods are wrapped only to time them (checkpoint save, Trainer.fit, each sampling call, scheduler step
and VAE decode, the Frechet distance).

Inputs are written offline into a work folder: a prior folder with SD v1.5's architecture and random
weights (the tiny prior at smoke size), a folder of random images, and stand-in Inception weights
(tests/stand_ins.py: a random network in the real file format; the FID value means nothing, its
speed does).
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from common import patched, sync

ROOT = Path(__file__).resolve().parents[1]
TRAIN_STEADY_SKIP = 0.2  # the first fifth of the steps (at least 2) is warm-up; the last step holds the checkpoint save
SYNC_COUNTED_STEPS = 3  # steps right after the warm-up run under torch.cuda.set_sync_debug_mode("warn"), left out of the rates
SYNC_WARNING = "synchroniz"  # torch's "called a synchronizing CUDA operation"
BATCH_HEADROOM = 0.92  # the largest batch is sized to this fraction of the device's memory (allocator slack, fragmentation)
PROJECTED_FID = {"num_samples": 50_000, "steps": 100}  # Table 1's FID (App. D.2)


@contextlib.contextmanager
def timed(owner, name: str, device: torch.device, record: list, starts: list | None = None):
    """`owner.name` (a class's method or a module's function) wrapped so that each call's seconds,
    device synchronised, are appended to `record` (and the time each call began to `starts`)."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        sync(device)
        start = time.perf_counter()
        if starts is not None:
            starts.append(start)
        try:
            return original(*args, **kwargs)
        finally:
            sync(device)
            record.append(time.perf_counter() - start)

    with patched(owner, name, wrapper):
        yield record


@contextlib.contextmanager
def kept_threads():
    """torch's thread count and OMP_NUM_THREADS as they were: Lightning's DDP launcher sets both (to the
    cores per process) when OMP_NUM_THREADS is unset, which would change every section after it."""
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp


# --- inputs ----------------------------------------------------------------------------------------
def write_prior(size: str, out_dir: Path) -> Path:
    """A prior folder as SD v1.5 is distributed (one file per component): at "sd15" its UNet, VAE and
    ViT-L/14-shaped text encoder with random weights (benchmarks/memory.py); "tiny": `save_tiny_prior`."""
    if (out_dir / "model_index.json").is_file():
        return out_dir
    if size == "tiny":
        from ccp.priors.tiny import save_tiny_prior

        return save_tiny_prior(out_dir, seed=0)
    from memory import build_prior

    build_prior("sd15").save_pretrained(out_dir)
    return out_dir


def write_images(out_dir: Path, count: int, resolution: int, seed: int = 0) -> Path:
    import numpy as np
    import PIL.Image

    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        path = out_dir / f"{i:05d}.png"
        if not path.is_file():
            pixels = (rng.random((resolution, resolution, 3)) * 255).astype(np.uint8)
            PIL.Image.fromarray(pixels).save(path)
    return out_dir


def write_inception(out_dir: Path) -> Path:
    """Stand-in FID Inception weights (the tests' writer: benchmarks and tests share one definition)."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.append(tests)
    from stand_ins import write_stand_in_inception

    from ccp.evaluation.fid import INCEPTION_WEIGHTS_FILE

    path = out_dir / INCEPTION_WEIGHTS_FILE
    return path if path.is_file() else write_stand_in_inception(out_dir)


# --- ccp-train -------------------------------------------------------------------------------------
def read_csv_log(run_dir: Path) -> list[dict[str, float]]:
    """The run's metrics.csv as one dict per logged step (empty cells left out)."""
    files = sorted(run_dir.glob("csv/version_*/metrics.csv"))
    if not files:
        raise FileNotFoundError(f"no CSV log under {run_dir / 'csv'}")
    by_step: dict[int, dict[str, float]] = {}
    with open(files[-1], newline="") as file:
        for row in csv.DictReader(file):
            if not row.get("step"):
                continue
            values = {k: float(v) for k, v in row.items() if v not in ("", None)}
            by_step.setdefault(int(values["step"]), {}).update(values)
    return [by_step[s] for s in sorted(by_step)]


def warmup_steps(steps: int) -> int:
    return min(steps - 2, max(2, math.ceil(TRAIN_STEADY_SKIP * steps)))


def sync_window(steps: int) -> range:
    """The batch indices whose host syncs are counted: right after the warm-up, before the steady read,
    never the last (checkpoint) step; empty when the run is too short to spare them."""
    start = warmup_steps(steps)
    if steps - 1 - start < SYNC_COUNTED_STEPS + 3:  # keep at least 3 steady steps to read rates from
        return range(0)
    return range(start, start + SYNC_COUNTED_STEPS)


def steady_rates(rows: list[dict[str, float]], exclude: range = range(0)) -> dict:
    """Median images/s and step time over the steady steps: warm-up, the sync-counted steps (`exclude`)
    and the final (checkpoint) step left out."""
    rates = [r["train/images_per_s"] for r in rows if "train/images_per_s" in r]
    times = [r["train/step_time_s"] for r in rows if "train/step_time_s" in r]
    if len(rates) < 3:
        raise RuntimeError(f"the CSV log holds {len(rates)} train/images_per_s rows; a steady read needs at least 3")
    skip = max(warmup_steps(len(rates)), exclude.stop)
    steady_rates_, steady_times = rates[skip:-1], times[skip:-1]
    median_time = statistics.median(steady_times)
    p90 = sorted(steady_times)[min(len(steady_times) - 1, math.ceil(0.9 * len(steady_times)) - 1)]
    return {"images_per_s": statistics.median(steady_rates_), "step_time_s": median_time,
            "p90_over_median": p90 / median_time, "steady_steps": len(steady_rates_), "warmup_steps": skip,
            "first_step_s": times[0], "last_step_s_with_checkpoint": times[-1],
            "images_per_s_each_step": rates}


class StepProbe:
    """What a Trainer's steps do besides their arithmetic, read by wrapping the module's
    `on_train_batch_start` (the first hook of a step; the window of batch i runs until batch i+1 starts):

    - host syncs: during the `window` batches, torch.cuda.set_sync_debug_mode("warn") makes every
      synchronizing CUDA call warn; the warnings are counted per batch, with the Python line that made
      them. On the CPU nothing syncs and nothing is counted (`counted` false).
    - memory: allocated device memory at the start of each batch after the first (weights, optimizer
      state, EMA, frozen parts: what does not grow with the batch), and the trainable parameters' bytes
      (the gradients of the backward pass).
    """

    def __init__(self, device: torch.device, window: range):
        self.device, self.window = device, window
        self.batch = -1
        self.syncs: dict[int, int] = {i: 0 for i in window}
        self.where: dict[str, int] = {}
        self.static_bytes: int | None = None
        self.trainable_bytes: int | None = None

    def on_batch_start(self, module) -> None:
        self.batch += 1
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode(1 if self.batch in self.window else 0)
            if self.batch >= 1:
                allocated = torch.cuda.memory_allocated(self.device)
                self.static_bytes = allocated if self.static_bytes is None else max(self.static_bytes, allocated)
        if self.trainable_bytes is None:
            self.trainable_bytes = sum(p.numel() * p.element_size() for p in module.method.trainable_parameters())

    def record(self, message, filename: str, lineno: int) -> bool:
        """True when `message` is a sync warning of a counted batch (then it is not shown)."""
        if SYNC_WARNING not in str(message) or self.batch not in self.window:
            return False
        self.syncs[self.batch] += 1
        where = f"{Path(filename).name}:{lineno}"
        self.where[where] = self.where.get(where, 0) + 1
        return True

    @contextlib.contextmanager
    def installed(self):
        import warnings

        from ccp.training.module import PersonalizationModule

        original_hook = PersonalizationModule.on_train_batch_start
        probe = self

        def on_train_batch_start(module, *args, **kwargs):
            probe.on_batch_start(module)
            return original_hook(module, *args, **kwargs)

        with warnings.catch_warnings():
            warnings.filterwarnings("always", message=f".*{SYNC_WARNING}")  # every one, not once per line
            shown = warnings.showwarning

            def showwarning(message, category, filename, lineno, file=None, line=None):
                if not probe.record(message, filename, lineno):
                    shown(message, category, filename, lineno, file, line)

            warnings.showwarning = showwarning
            PersonalizationModule.on_train_batch_start = on_train_batch_start
            try:
                yield self
            finally:
                PersonalizationModule.on_train_batch_start = original_hook
                if self.device.type == "cuda":
                    torch.cuda.set_sync_debug_mode(0)

    def host_syncs(self) -> dict:
        if self.device.type != "cuda":
            return {"counted": False, "reason": "a CPU run: torch.cuda.set_sync_debug_mode sees CUDA syncs only"}
        if not self.window:
            return {"counted": False, "reason": "too few steps to spare the counted ones"}
        per_step = [self.syncs[i] for i in self.window]
        return {"counted": True, "steps": list(self.window), "per_step": per_step,
                "median_per_step": statistics.median(per_step),
                "where": dict(sorted(self.where.items(), key=lambda kv: -kv[1]))}


def largest_batch(batch: int, peak_bytes: int, static_bytes: int, trainable_bytes: int, capacity_bytes: int,
                  headroom: float = BATCH_HEADROOM) -> dict:
    """The largest per-GPU batch predicted to fit, from one measured run at `batch`: peak = base + b x
    per_image, base = what does not grow with the batch (allocated at a step's start) + the gradients,
    per_image = the rest of the measured peak over `batch` (activations kept for the backward pass)."""
    base = static_bytes + trainable_bytes
    per_image = (peak_bytes - base) / batch
    if per_image <= 0:
        raise ValueError(f"the measured peak ({peak_bytes / 2**30:.2f} GiB) is not above the batch-independent part "
                         f"({base / 2**30:.2f} GiB): no per-image memory to extrapolate from")
    fits = int((headroom * capacity_bytes - base) // per_image)
    return {"batch": max(fits, 0), "measured_batch": batch, "base_gib": base / 2**30, "per_image_gib": per_image / 2**30,
            "capacity_gib": capacity_bytes / 2**30, "headroom": headroom,
            "predicted_peak_gib": (base + max(fits, 0) * per_image) / 2**30}


def table1_face(method: str) -> list[str]:
    """Table 1's face row of `method`, as ccp-train's command line composes it."""
    return ["experiment=table1", "dataset=face", f"method={method}"]


def train_overrides(method: str, prior: Path, images: Path, work: Path, *, steps: int, batch: int, resolution: int,
                    smoke: bool, extra: tuple[str, ...] = ()) -> list[str]:
    overrides = [
        *table1_face(method), *extra, f"prior.path={prior}", f"data.path={images}",
        f"data.cache_dir={work / 'cache'}",
        # one GPU's batch and no accumulation: every step is what one of Table 1's 8 GPUs does (batch 4)
        f"data.batch_size={batch}", f"trainer.global_batch_size={batch}", "trainer.devices=1",
        f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1",
        f"checkpoint.every_n_steps={steps}", "checkpoint.keep_last=0",  # one checkpoint: last.ckpt at the end
        "validation.every_n_steps=0", "logger.wandb.enabled=false",
    ]
    if smoke:  # the experiment's DDP strategy and bf16-mixed plugin on the CPU (gloo), at the tiny prior's size
        overrides += ["trainer.accelerator=cpu", f"data.resolution={resolution}", "data.num_workers=1"]
    return overrides


@contextlib.contextmanager
def memory_cap(device: torch.device, cap_gib: float | None):
    """The process may allocate at most `cap_gib` of the device (a smaller card), restored after."""
    if cap_gib is None or device.type != "cuda":
        yield None
        return
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, cap_gib * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    try:
        yield fraction
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def run_train(method: str, prior: Path, images: Path, work: Path, device: torch.device, *, steps: int, batch: int | None,
              resolution: int, smoke: bool, extra: tuple[str, ...] = (), name: str | None = None,
              cap_gib: float | None = None) -> dict:
    """One `run_training` of `experiment=table1 dataset=face method=<method>` (with `extra` overrides after it, e.g. a
    preset); speed from its CSV log, host syncs and memory from a StepProbe. `batch` None: the composed
    config's data.batch_size (the preset's), without accumulation."""
    import lightning as L
    from ccp.config import compose
    from ccp.training import run as train_run
    from ccp.training.callbacks import FileCheckpointIO

    if batch is None:
        batch = int(compose("train", [*table1_face(method), *extra]).data.batch_size)
    overrides = train_overrides(method, prior, images, work, steps=steps, batch=batch, resolution=resolution, smoke=smoke,
                                extra=extra)
    cfg = compose("train", overrides)
    run_dir = work / "train" / (name or f"face_{method}")
    shutil.rmtree(run_dir, ignore_errors=True)  # a kept --work-dir: start fresh, never resume a finished run
    saves, fits = [], []
    probe = StepProbe(device, sync_window(steps))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with (kept_threads(), timed(FileCheckpointIO, "save_checkpoint", device, saves), timed(L.Trainer, "fit", device, fits),
          probe.installed(), memory_cap(device, cap_gib) as fraction):
        export = train_run.run_training(cfg, run_dir)
    total = time.perf_counter() - start
    rows = read_csv_log(run_dir)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    last = run_dir / "checkpoints" / "last.ckpt"
    result = {
        "entry_point": "ccp.training.run.run_training (ccp-train)", "overrides": overrides, "run_dir": str(run_dir),
        "export_dir": str(export), "method": method, "accelerator": cfg.trainer.accelerator,
        "strategy": cfg.trainer.strategy, "precision": cfg.trainer.precision, "prior_dtype": cfg.prior.dtype,
        "ema": bool(cfg.ema.enabled), "latent_cache": bool(cfg.data.latent_cache.enabled),
        "num_workers": cfg.data.num_workers, "per_gpu_batch": batch, "accumulation": 1, "steps": steps,
        "resolution": cfg.data.resolution, "optimizer": cfg.optim.name, "ema_device": cfg.ema.get("device"),
        "gradient_checkpointing": bool(cfg.speed.gradient_checkpointing),
        **steady_rates(rows, exclude=probe.window),
        "host_syncs": probe.host_syncs(),
        "memory": {"static_gib": None if probe.static_bytes is None else probe.static_bytes / 2**30,
                   "trainable_gib": probe.trainable_bytes / 2**30 if probe.trainable_bytes else None,
                   "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                   "cap_gib": cap_gib, "cap_fraction": fraction},
        "losses": losses, "losses_finite": bool(losses) and all(math.isfinite(v) for v in losses),
        "checkpoint": {"path": str(last), "exists": last.is_file(), "bytes": last.stat().st_size if last.is_file() else None,
                       "save_s": sum(saves), "saves": len(saves)},
        "run_training_s": total, "fit_s": sum(fits),
        # before fit: the prior's load, the method's build (ours: the null-text conversion), the data scan;
        # after it: the export
        "outside_fit_s": total - sum(fits),
        "csv_log": str(next(iter(sorted(run_dir.glob("csv/version_*/metrics.csv"))))),
    }
    peaks = [r["train/peak_memory_gb"] for r in rows if "train/peak_memory_gb" in r]
    if peaks:
        result["peak_memory_gb"] = max(peaks)
    if not result["losses_finite"]:
        raise RuntimeError(f"non-finite training loss: {losses}")
    return result


def remove_checkpoints(run_dir: Path) -> None:
    """Gone once measured, so the next run has the disk (ours at full size: 815M fp32 weights, AdamW state
    and EMA, ~13 GB by arithmetic)."""
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


# --- ccp-eval --------------------------------------------------------------------------------------
def eval_overrides(model: Path, prior: Path, images: Path, inception: Path, work: Path, *, num_samples: int, steps: int,
                   resolution: int, batch: int | None, device: torch.device, smoke: bool) -> list[str]:
    model_keys = ([f"export.path={model}"] if model is not None else ["model=prior", f"prior.path={prior}"])
    overrides = ["metric=fid", *model_keys, f"fid.real_path={images}", f"fid.inception_weights={inception}",
                 f"fid.num_samples={num_samples}", f"fid.shard_size={min(num_samples, 1000)}", f"sampling.steps={steps}",
                 f"sampling.height={resolution}", f"sampling.width={resolution}", f"fid.stats_cache_dir={work / 'fid_stats'}",
                 f"device={device.type}", "logger.wandb.enabled=false"]
    if batch:
        overrides.append(f"sampling.batch_size={batch}")
    if smoke:
        overrides.append("fid.num_workers=0")
    return overrides


def run_fid(export: Path | None, prior: Path, images: Path, inception: Path, work: Path, device: torch.device, *,
            num_samples: int, steps: int, resolution: int, batch: int | None, smoke: bool) -> dict:
    """One `run_eval` with metric=fid; samples/s, and the projected time of Table 1's FID (50k samples,
    100 steps) from its timed parts: one denoising step (between the scheduler steps of a sampling call),
    what each sampling call pays besides its steps, VAE decode, the rest per sample (Inception, shards),
    and what is paid once (loading, real statistics, the distance)."""
    from diffusers import AutoencoderKL

    from ccp.config import compose
    from ccp.evaluation import fid as fid_lib
    from ccp.evaluation import run as eval_run
    from ccp.evaluation.generation import PipelineSampler
    from ccp.models.denoisers import Denoiser
    from ccp.pipelines.run import sampling_precision

    if steps < 2:
        raise ValueError("--fid-steps must be >= 2: a denoising step is timed between two scheduler steps")
    overrides = eval_overrides(export, prior, images, inception, work, num_samples=num_samples, steps=steps,
                               resolution=resolution, batch=batch, device=device, smoke=smoke)
    cfg = compose("eval", overrides)
    out_dir = work / "eval" / "fid"
    shutil.rmtree(out_dir, ignore_errors=True)  # a kept --work-dir: its result.json would be reused, not measured
    calls: list[dict] = []  # per sampling call: start, end, scheduler-step marks, decode seconds, images
    distances: list[float] = []

    def active() -> dict | None:
        return calls[-1] if calls and "end" not in calls[-1] else None

    with contextlib.ExitStack() as stack:
        def patch(owner, name, make):
            original = getattr(owner, name)
            setattr(owner, name, make(original))
            stack.callback(setattr, owner, name, original)

        def marking_step(original):
            def step(self, *args, **kwargs):
                if (call := active()) is not None:
                    sync(device)
                    call["marks"].append(time.perf_counter())
                return original(self, *args, **kwargs)
            return step

        def timed_decode(original):
            def decode(self, *args, **kwargs):
                sync(device)
                begin = time.perf_counter()
                try:
                    return original(self, *args, **kwargs)
                finally:
                    sync(device)
                    if (call := active()) is not None:
                        call["decode_s"] += time.perf_counter() - begin
            return decode

        patched_schedulers = set()

        def timed_call(original):
            def call(self, indices, seed):
                scheduler = type(self.pipe.scheduler)
                if scheduler not in patched_schedulers:  # known only once the pipeline exists
                    patched_schedulers.add(scheduler)
                    patch(scheduler, "step", marking_step)
                sync(device)
                calls.append({"start": time.perf_counter(), "marks": [], "decode_s": 0.0, "images": len(indices),
                              "unet_rows": 0})
                try:
                    return original(self, indices, seed)
                finally:
                    sync(device)
                    calls[-1]["end"] = time.perf_counter()
            return call

        def counted_rows(original):
            def denoise(self, latents, *args, **kwargs):
                if (call := active()) is not None:
                    call["unet_rows"] += latents.shape[0]
                return original(self, latents, *args, **kwargs)
            return denoise

        def denoiser_classes(cls):
            for sub in cls.__subclasses__():
                yield sub
                yield from denoiser_classes(sub)

        patch(PipelineSampler, "__call__", timed_call)
        for cls in set(denoiser_classes(Denoiser)):  # every denoiser of the plan: the prior's and the concept model's
            if "__call__" in vars(cls):
                patch(cls, "__call__", counted_rows)
        patch(AutoencoderKL, "decode", timed_decode)
        stack.enter_context(timed(fid_lib, "fid_from_shards", device, distances))
        start = time.perf_counter()
        result = eval_run.run_eval(cfg, out_dir)
        end = time.perf_counter()
    if not calls:
        raise RuntimeError("run_eval generated no sample (a result.json of this config was already there?)")
    batch_size = int(cfg.sampling.batch_size)
    setup_s = calls[0]["start"] - start  # model, Inception, real statistics
    distance_s = sum(distances)  # the 2048-d Frechet distance: once per FID, whatever the sample count
    generation_s = end - calls[0]["start"] - distance_s
    sampling_s = sum(c["end"] - c["start"] for c in calls)
    # full-batch calls after the first (which pays one-time costs: kernel selection, allocator growth)
    timed_calls = [c for c in calls[1:] if c["images"] == batch_size] or calls
    intervals = [b - a for c in timed_calls for a, b in zip(c["marks"], c["marks"][1:])]
    if len(intervals) != len(timed_calls) * (steps - 1):
        raise RuntimeError(f"{len(intervals)} denoising steps timed in {len(timed_calls)} sampling calls of {steps} steps: "
                           "the pipeline did not step its scheduler once per step")
    step_s = statistics.median(intervals)  # one denoising step of a full batch: every UNet row, guidance, scheduler
    decode_per_call = statistics.fmean(c["decode_s"] for c in timed_calls)
    overhead_per_call = statistics.fmean(c["end"] - c["start"] - c["decode_s"] for c in timed_calls) - steps * step_s
    rest_per_sample = (generation_s - sampling_s) / num_samples  # Inception features, shards
    rows_per_sample_step = sum(c["unet_rows"] for c in timed_calls) / sum(c["images"] * steps for c in timed_calls)
    n, s = PROJECTED_FID["num_samples"], PROJECTED_FID["steps"]
    per_sample = (s * step_s + overhead_per_call + decode_per_call) / batch_size + rest_per_sample
    projected = setup_s + distance_s + n * per_sample
    return {
        "entry_point": "ccp.evaluation.run.run_eval (ccp-eval metric=fid)", "overrides": overrides,
        "model": "export" if export is not None else "prior", "result_json": str(out_dir / "result.json"),
        "fid_value_meaningless": result["value"], "stand_in_weights": bool(result["details"].get("stand_in_weights")),
        "num_samples": num_samples, "steps": steps, "resolution": resolution, "batch": batch_size,
        "sampling_dtype": str(sampling_precision(str(cfg.prior.dtype), device)).replace("torch.", ""),
        "samples_per_s": num_samples / generation_s, "setup_s": setup_s, "generation_s": generation_s,
        "distance_s": distance_s, "sampling_calls": len(calls), "sampling_s": sampling_s,
        "vae_decode_s": sum(c["decode_s"] for c in calls), "denoising_steps_timed": len(intervals),
        "denoise_step_s": step_s, "denoise_s_per_sample_step": step_s / batch_size,
        "call_overhead_s_per_sample": overhead_per_call / batch_size, "vae_decode_s_per_sample": decode_per_call / batch_size,
        "inception_and_rest_s_per_sample": rest_per_sample, "unet_rows_per_sample_step": rows_per_sample_step,
        "projected": {**PROJECTED_FID, "seconds_per_sample": per_sample, "seconds": projected, "hours": projected / 3600,
                      "samples_per_s": 1 / per_sample, "unet_rows_per_s": s * rows_per_sample_step / per_sample,
                      "how": "setup + distance + samples x (steps x denoise per sample-step + call overhead + decode + "
                             "Inception and rest, per sample); rates from the full-batch sampling calls after the first; "
                             "setup holds the real statistics of the small random-image folder (FFHQ's are computed "
                             "once and cached)"},
        "wall_s": end - start,
    }
