"""One prepared check for a CUDA machine: SD v1.5-size speed, memory and training stability.

At SD v1.5 size with random weights (no download), 512 px, bfloat16, in one process, each section
written to the JSON as soon as it ends (so a killed run keeps what finished). First the real entry
points (benchmarks/real_path.py: ccp-train and ccp-eval themselves), then the isolated measurements:

  train_ccp          ccp.training.run.run_training with experiment=table1 dataset=face method=ours (Trainer,
                     bf16-mixed, EMA, DataLoader workers, latent cache, one checkpoint) at Table 1's
                     per-GPU batch 4 on a random-weight SD v1.5 prior folder and random images:
                     steady images/s from the run's CSV log, checkpoint save time and size, host
                     syncs per steady step (torch.cuda.set_sync_debug_mode, with the lines making them);
  eval_fid           ccp.evaluation.run.run_eval with metric=fid on train_ccp's export (N samples, a
                     few steps, stand-in Inception weights): samples/s, UNet rows per sample-step,
                     and the projected time of Table 1's FID (50k samples, 100 steps) from its timed parts;
  sampling           benchmarks/sampling.py's (a)-(d) at batch 1, 8, 16 (few steps and repeats);
  null_text_forward  one forward of the null-text concept UNet vs. the prior UNet: seconds and
                     FLOPs (benchmarks/null_text_init.py's time_and_count);
  train_dreambooth   as train_ccp with method=dreambooth;
  cost               benchmarks/cost.py's device-hours of the full recipe: training from train_ccp and
                     train_dreambooth (ccp-train at batch 4), sampling from the sampling section;
  train_ccp_largest  as train_ccp at the largest batch predicted to fit the device (from train_ccp's
                     memory: batch-independent part + per-image part), measured peak beside the prediction;
  train_ccp_gpu_24gb as train_ccp with preset=gpu_24gb (its batch 2, 8-bit AdamW, EMA on the host,
                     gradient checkpointing), the process capped to 24 GiB (set_per_process_memory_fraction);
  train_dreambooth_largest  as train_ccp_largest for train_dreambooth;
  training           benchmarks/training.py's step, ours (cached latents) vs. DreamBooth-style, at
                     batch 8 and 16, eager, with and without channels_last: images/s, peak memory;
  host_sync_cost     ours' isolated step chained without any sync, and again with one host read of a
                     loss-sized flag per step (what ccp-train's non-finite check does): the cost of a sync;
  training_steady    50 steps of ours (bf16 autocast, fp32 master weights, AdamW): finite loss,
                     steady step time (median, p90/median, first vs. last 10 steps);
  sampling_sdxl      benchmarks/sampling.py's (a)-(d) on SDXL base's architecture (random weights) at
                     1024 px, batch 1 and 4 (the smoke run: the tiny SDXL prior);
  training_compile   the training variants again under torch.compile (with and without
                     channels_last). Last, because compile time is the one thing that cannot be
                     predicted: it never pushes the sections above out of the budget;
  targets            pass/fail of each speed target, recomputed whenever a section ends.

A wall-clock budget (--budget-s) skips what would not fit, recorded as skipped with the reason.

    python3 benchmarks/gpu_check.py --out benchmarks/results     # CUDA: gpu_check_<gpu name>.json
    python3 benchmarks/gpu_check.py --smoke --out /tmp/x         # CPU, tiny prior: the same code path
    python3 benchmarks/gpu_check.py --preflight-only             # every import, in seconds; exit 1 names the fix
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib
import importlib.util
import math
import os
import signal
import statistics
import sys
import time
import traceback
import types
from pathlib import Path

PROCESS_START = time.perf_counter()  # the budget counts from here, torch's import included

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
if str(BENCH_DIR.parent) not in sys.path:  # ccp from the checkout when it is not installed
    sys.path.insert(1, str(BENCH_DIR.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: never reach for the hub

# What each section is expected to take (seconds), before anything was measured; later estimates
# come from the measured variants. Full: an H100/H200; smoke: a 2-core CPU.
ESTIMATES = {
    "full": {"train_ccp": 100, "eval_fid": 90, "train_dreambooth": 70, "train_ccp_largest": 80, "train_ccp_gpu_24gb": 80,
             "train_dreambooth_largest": 80,
             "sampling": 80, "null_text_forward": 15, "eager_variant": 20, "compile_variant": 120, "steady": 40,
             "host_sync_cost": 25, "cost": 5, "validation_memory": 45, "sampling_sdxl": 150},
    "smoke": {"train_ccp": 15, "eval_fid": 15, "train_dreambooth": 8, "train_ccp_largest": 10, "train_ccp_gpu_24gb": 10,
              "train_dreambooth_largest": 10,
              "sampling": 15, "null_text_forward": 5, "eager_variant": 6, "compile_variant": 20, "steady": 8,
              "host_sync_cost": 5, "cost": 3, "validation_memory": 15, "sampling_sdxl": 15},
}
TARGETS = {
    "ours_training_images_per_s": (">=", 80.0),
    "gcfg_three_term_unet_rows_per_s": (">=", 300.0),
    "gcfg_a_over_d": ("<=", 1.05),
    "null_text_forward_time_ratio_minus_flop_ratio": ("<=", 0.02),
    # UNet rows/s of the FID job (projected to Table 1's 100 steps) over the sampling section's: decode,
    # Inception and shard writes must cost little beside the UNet
    "fid_rows_per_s_over_sampling_rows_per_s": ("within", 0.10),
    # one host sync per training step (ccp-train's non-finite check): kept while it costs at most this
    "host_sync_cost_fraction_of_step": ("<=", 0.02),
    "gpu_24gb_preset_fits_24_gib": ("==", True),
}
STEADY_LIMITS = {"p90_over_median": 1.25, "last10_over_first10_median": 0.15}  # the second: allowed |ratio - 1|
HARD_STOP_GRACE_S = 10  # a section still running this long after the budget is stopped (SIGALRM)
# the real entry points first (most important first), then the isolated measurements
SECTIONS = ("train_ccp", "eval_fid", "sampling", "null_text_forward", "train_dreambooth", "cost", "train_ccp_largest",
            "train_ccp_gpu_24gb", "train_dreambooth_largest", "training", "host_sync_cost", "training_steady", "validation_memory",
            "sampling_sdxl", "training_compile")


def log(message: str, started: float) -> None:
    print(f"[gpu-check +{time.perf_counter() - started:6.1f}s] {message}", flush=True)


PREFLIGHT_FIX = ("on a machine with the package index: make gpu-wheels, then carry .whl/ beside the Makefile "
                 "(make gpu-check installs it); torch, torchvision, lightning, transformers, peft, torchmetrics, "
                 "scipy and opencv must be the machine's own")


# --- environment ---------------------------------------------------------------------------------
def ensure_clip_tokenizer() -> str:
    """ccp's CLIP tokenizer reads clip-anytorch's BPE file through `clip.simple_tokenizer`.

    `import clip` also imports torchvision and pkg_resources (setuptools < 81), which a bare
    torch machine may lack; the tokenizer needs neither, so on failure the `clip` package is
    registered without running its ``__init__`` and only ``clip.simple_tokenizer`` is imported.
    """
    try:
        importlib.import_module("clip")
        return "clip-anytorch"
    except Exception as err:  # ImportError, or pkg_resources failing on a newer Python
        for name in [m for m in sys.modules if m == "clip" or m.startswith("clip.")]:
            del sys.modules[name]
        spec = importlib.util.find_spec("clip")
        if spec is None or not spec.submodule_search_locations:
            raise
        stub = types.ModuleType("clip")
        stub.__path__ = list(spec.submodule_search_locations)
        sys.modules["clip"] = stub
        importlib.import_module("clip.simple_tokenizer")
        return f"clip.simple_tokenizer only (import clip failed: {type(err).__name__}: {err})"


def preflight() -> dict:
    """Import everything the sections need and say at once what is missing (and how to get it)."""
    found, missing = {}, {}
    try:
        found["clip"] = ensure_clip_tokenizer()
    except Exception as err:
        missing["clip-anytorch"] = f"{type(err).__name__}: {err}"
    # the real-path sections import ccp-train's and ccp-eval's own modules: what they need is checked here
    for module in ("torch", "diffusers", "transformers", "lightning", "omegaconf", "hydra", "torch_fidelity", "bitsandbytes",
                   "ccp.priors.tokenizer", "ccp.training.run", "ccp.evaluation.run"):
        try:
            imported = __import__(module, fromlist=["_"])
            found[module] = getattr(imported, "__version__", "ok")
        except Exception as err:
            missing[module] = f"{type(err).__name__}: {err}"
    return {"found": found, "missing": missing}


def preflight_only() -> int:
    """--preflight-only: every import the sections need, before torch is imported by anything else."""
    pre = preflight()
    if pre["missing"]:
        for name, error in pre["missing"].items():
            print(f"gpu_check preflight: MISSING {name}: {error}", file=sys.stderr)
        print(f"gpu_check preflight: fix: {PREFLIGHT_FIX}", file=sys.stderr)
        return 1
    print(f"gpu_check preflight: ok: {pre['found']}", flush=True)
    return 0


if __name__ == "__main__" and "--preflight-only" in sys.argv[1:]:
    sys.exit(preflight_only())

import torch  # noqa: E402

from common import device_slug, machine, patched, step_times, sync, write_json  # noqa: E402

# --- budget --------------------------------------------------------------------------------------
class DeadlineExceeded(BaseException):
    """Raised by SIGALRM at the hard stop; a BaseException, so library `except Exception` cannot swallow it."""


def _on_alarm(signum, frame):
    raise DeadlineExceeded(f"hard stop: still running {HARD_STOP_GRACE_S} s after the budget")


class PartialFailure(RuntimeError):
    """A section that failed part-way; `result` holds what it measured."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


class Budget:
    def __init__(self, seconds: float, started: float):
        self.seconds, self.started = seconds, started

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.started)

    def skip_reason(self, need_s: float, what: str, reserve_s: float = 0.0) -> str | None:
        left = self.left()
        if left - reserve_s >= need_s:
            return None
        kept = f", keeping {reserve_s:.0f} s for the sections after it" if reserve_s else ""
        return f"{what} needs about {need_s:.0f} s; {left:.0f} s of the {self.seconds:.0f} s budget left{kept}"


# --- hooks into training.run_variant -------------------------------------------------------------
@contextlib.contextmanager
def instrumented_training(training, channels_last: bool, compile_backend: str | None, losses: list, times: list,
                          frames: list):
    """training.run_variant with channels_last and torch.compile applied, every loss and step time kept.

    run_variant builds its `PersonalizationModule` from ``ccp.training.module`` and times with its
    module's `median_seconds`; both are swapped here for the duration of one call. `frames` gets
    the count of frames Dynamo has compiled after each step (it grows after the first: recompiles).
    Compilation is the module's own (``compile=``, what ccp-train's speed.compile uses).
    """
    from torch._dynamo.utils import counters as dynamo_counters

    from ccp.training import module as module_lib

    base = module_lib.PersonalizationModule

    class Instrumented(base):
        def __init__(self, method, *args, config=module_lib.TrainingConfig(), **kwargs):
            speed = dataclasses.replace(config.speed, channels_last=channels_last)
            if compile_backend:
                speed = dataclasses.replace(speed, compile=True, compile_backend=compile_backend)
            super().__init__(method, *args, config=dataclasses.replace(config, speed=speed), **kwargs)

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            losses.append(loss.detach())
            frames.append(dynamo_counters["frames"]["ok"])
            return loss

    def recording_median(fn, device, repeats, warmup=1):
        measured = step_times(fn, device, repeats, warmup)
        times.extend(measured)
        return statistics.median(measured)

    with patched(module_lib, "PersonalizationModule", Instrumented), patched(training, "median_seconds", recording_median):
        yield


def free_memory(device: torch.device) -> None:
    torch._dynamo.reset()  # compiled graphs hold the variant's parameters
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_memory_kind": "torch.cuda.max_memory_allocated"}
    return {"peak_memory_gb": peak_rss_gb(), "peak_memory_kind": "process peak RSS (ru_maxrss; never reset on CPU)"}


def finite_or_str(value):
    """JSON without NaN/Infinity (not valid JSON): non-finite floats become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite_or_str(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_str(v) for v in value]
    return value


# --- the check -----------------------------------------------------------------------------------
class GPUCheck:
    def __init__(self, args):
        self.args = args
        self.started = PROCESS_START
        self.mode = "smoke" if args.smoke else "full"
        self.estimates = dict(ESTIMATES[self.mode])
        self.device = torch.device(args.device)
        self.budget = Budget(args.budget_s, self.started)
        self.size = "tiny" if args.smoke else "sd15"
        self.file_name = "gpu_check_smoke_cpu.json" if args.smoke else f"gpu_check_{device_slug(self.device)}.json"
        extra = {}
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            extra = {"gpu_memory_gb": props.total_memory / 2**30, "capability": f"{props.major}.{props.minor}",
                     "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                     "cudnn_benchmark": torch.backends.cudnn.benchmark}
        self.payload = {
            "benchmark": "gpu_check",
            "mode": self.mode,
            "machine": machine(self.device) | extra,
            "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": {k: v for k, v in vars(args).items() if k != "out"} | {"size": self.size},
            "sections": {},
            "targets": {},
        }
        self.training_rows: list[dict] = []
        self._work: Path | None = None  # inputs and runs of the real-path sections (made by the first)
        self._inputs: dict[str, Path] = {}
        self._ccp_export: Path | None = None
        self._sampling_prior = None  # kept from the sampling section for null_text_forward, then released
        self._sampling_result = None  # cost.py's sampling input

    # JSON --------------------------------------------------------------------------------------
    def write(self) -> Path:
        self.payload["targets"] = self.targets()
        self.payload["elapsed_s"] = time.perf_counter() - self.started
        sections = self.payload["sections"]
        self.payload["complete"] = all(sections.get(s, {}).get("status") == "done" and not sections[s].get("skipped_variants")
                                       for s in SECTIONS)
        return write_json(self.args.out, self.file_name, finite_or_str(self.payload))

    def log(self, message: str) -> None:
        log(message, self.started)

    def section(self, name: str, fn, need_s: float, reserve_s: float = 0.0) -> None:
        reason = self.budget.skip_reason(need_s, f"section {name}", reserve_s)
        if reason is None and name in self.args.skip:
            reason = "--skip"
        if reason:
            self.payload["sections"][name] = {"status": "skipped", "reason": reason}
            self.log(f"{name}: skipped ({reason})")
        else:
            self.log(f"{name}: start (about {need_s:.0f} s; {self.budget.left():.0f} s of budget left)")
            start = time.perf_counter()
            begun = start - self.started
            threads = torch.get_num_threads()  # what it ran with: a section before it may have changed it
            try:
                result = fn()
                status = {"status": "done"}
            except DeadlineExceeded as err:
                signal.alarm(0)
                partial = self.payload["sections"].get(name, {})  # variants written so far
                self.payload["sections"][name] = partial | {"status": "stopped", "reason": str(err), "started_s": begun,
                                                            "wall_s": time.perf_counter() - start}
                self.log(f"{name}: {err}")
                raise
            except Exception as err:
                result = getattr(err, "result", {})
                status = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                          "traceback": traceback.format_exc()[-4000:]}
                self.log(f"{name}: FAILED: {type(err).__name__}: {err}")
            self.payload["sections"][name] = status | {"started_s": begun, "wall_s": time.perf_counter() - start,
                                                       "torch_threads": threads} | result
            self.log(f"{name}: {status['status']} in {time.perf_counter() - start:.1f} s")
        self.log(f"wrote {self.write()}")

    # real entry points (benchmarks/real_path.py) ---------------------------------------------
    def work_dir(self) -> Path:
        """--work-dir, or a temporary folder removed at the end (full size: a 4 GB prior, checkpoints, exports)."""
        if self._work is None:
            import tempfile

            given = self.args.work_dir
            self._work = Path(given) if given else Path(tempfile.mkdtemp(prefix="ccp-gpu-check-"))
            self._work.mkdir(parents=True, exist_ok=True)
            self.payload["work_dir"] = {"path": str(self._work), "kept": bool(given)}
        return self._work

    def real_inputs(self) -> dict[str, Path]:
        """The prior folder and the image folder, written once; each part's seconds in the JSON."""
        import real_path

        if not self._inputs:
            work, a = self.work_dir(), self.args
            timings = {}
            start = time.perf_counter()
            self._inputs["prior"] = real_path.write_prior(self.size, work / "prior")
            timings["prior_write_s"] = time.perf_counter() - start
            start = time.perf_counter()
            self._inputs["images"] = real_path.write_images(work / "images", a.real_images, a.resolution)
            timings["images_write_s"] = time.perf_counter() - start
            self.payload["real_path_inputs"] = {
                "prior": f"{'SD v1.5 architecture (UNet, VAE, CLIP ViT-L/14 text encoder)' if self.size == 'sd15' else 'tiny'}"
                         ", random weights", "images": f"{a.real_images} random PNGs at {a.resolution} px", **timings}
        return self._inputs

    def _train(self, method: str, batch: int | None, steps: int | None = None, **kwargs) -> dict:
        import real_path

        a = self.args
        inputs = self.real_inputs()
        try:
            result = real_path.run_train(method, inputs["prior"], inputs["images"], self.work_dir(), self.device,
                                         steps=steps or a.train_steps, batch=batch, resolution=a.resolution,
                                         smoke=a.smoke, **kwargs)
        finally:
            free_memory(self.device)  # the Trainer's module and optimizer state, before the next section
        syncs = result["host_syncs"]
        self.log(f"train {method} batch {result['per_gpu_batch']}: {result['images_per_s']:.2f} images/s (median of "
                 f"{result['steady_steps']} steady steps), checkpoint {result['checkpoint']['save_s']:.1f} s, host syncs "
                 f"per step: {syncs['median_per_step'] if syncs['counted'] else 'not counted'}")
        if not a.work_dir:  # a full-size checkpoint is ~13 GB: the disk is needed for the next run
            real_path.remove_checkpoints(Path(result["run_dir"]))
        return result

    def train_ccp(self) -> dict:
        result = self._train("ours", self.args.train_batch)
        self._ccp_export = Path(result["export_dir"])
        # the other runs are the same path: estimated from this one (DreamBooth: no null-text conversion)
        self.estimates["train_dreambooth"] = result["run_training_s"] * 1.1
        self.estimates["train_ccp_largest"] = result["run_training_s"] * 1.5
        self.estimates["train_ccp_gpu_24gb"] = result["run_training_s"] * 1.5
        self._ccp_train = result
        return result

    def train_dreambooth(self) -> dict:
        result = self._train("dreambooth", self.args.train_batch)
        self.estimates["train_dreambooth_largest"] = result["run_training_s"] * 1.5
        self._dreambooth_train = result
        return result

    def train_ccp_largest(self) -> dict:
        return self._train_largest("ours", self._ccp_train)

    def train_dreambooth_largest(self) -> dict:
        return self._train_largest("dreambooth", self._dreambooth_train)

    def _train_largest(self, method: str, measured: dict) -> dict:
        """`method` at the largest batch predicted to fit, from its batch-4 run's memory; a batch that still
        runs out of memory is retried once at four fifths of it. The smoke run (no device memory): twice the batch."""
        import real_path

        a = self.args
        if self.device.type != "cuda":
            plan = {"batch": 2 * a.train_batch, "how": "smoke: twice the batch (a CPU has no device memory to fill)"}
        else:
            memory = measured["memory"]
            plan = real_path.largest_batch(
                measured["per_gpu_batch"], int(memory["peak_allocated_gib"] * 2**30), int(memory["static_gib"] * 2**30),
                int(memory["trainable_gib"] * 2**30), torch.cuda.get_device_properties(self.device).total_memory)
            plan["how"] = "linear in the batch from the batch-4 run's peak (real_path.largest_batch)"
        self.log(f"{method} largest: batch {plan['batch']} ({plan['how']})")
        tries = []
        batch = plan["batch"]
        for _ in range(2):
            try:
                result = self._train(method, batch, steps=a.largest_steps, name=f"face_{method}_largest")
                break
            except torch.cuda.OutOfMemoryError as err:
                tries.append({"batch": batch, "error": f"out of memory: {str(err)[:200]}"})
                batch = max(1, batch * 4 // 5)
                self.log(f"{method} largest: out of memory, retrying at batch {batch}")
        else:
            raise RuntimeError(f"out of memory at every batch tried: {tries}")
        return {"plan": plan, "out_of_memory_tries": tries, **result}

    def train_ccp_gpu_24gb(self) -> dict:
        """Ours with preset=gpu_24gb (its own batch, no accumulation), the process capped to 24 GiB."""
        try:
            result = self._train("ours", None, steps=self.args.preset_steps, extra=("preset=gpu_24gb",),
                                 name="face_ours_gpu_24gb", cap_gib=24.0)
        except torch.cuda.OutOfMemoryError as err:
            return {"fits": False, "cap_gib": 24.0, "error": f"out of memory under the 24 GiB cap: {str(err)[:400]}"}
        return {"fits": True, **result}

    def eval_fid(self) -> dict:
        import real_path

        a = self.args
        inputs = self.real_inputs()
        start = time.perf_counter()
        inception = real_path.write_inception(self.work_dir() / "inception")
        written = time.perf_counter() - start
        try:
            result = real_path.run_fid(self._ccp_export, inputs["prior"], inputs["images"], inception, self.work_dir(),
                                       self.device, num_samples=a.fid_samples, steps=a.fid_steps, resolution=a.resolution,
                                       batch=a.fid_batch, smoke=a.smoke)
        finally:
            free_memory(self.device)
        projected = result["projected"]
        self.log(f"eval_fid: {result['samples_per_s']:.2f} samples/s at {a.fid_steps} steps; projected "
                 f"{projected['num_samples']} samples x {projected['steps']} steps: {projected['hours']:.2f} h")
        return {"inception_write_s": written, **result}

    def remove_work_dir(self) -> None:
        if self._work is not None and not self.args.work_dir:
            import shutil

            shutil.rmtree(self._work, ignore_errors=True)

    # sections ----------------------------------------------------------------------------------
    def sampling(self) -> dict:
        import sampling

        from ccp.priors.loading import resolve_dtype

        a = self.args
        built = []
        original = sampling.build_prior

        def build_and_keep(size, family="sd1"):  # the null-text forward section measures this prior's UNet
            built.append(original(size, family))
            return built[-1]

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with patched(sampling, "build_prior", build_and_keep):
            result = sampling.run(self.size, self.device, resolve_dtype(a.sampling_dtype), a.resolution,
                                  a.sampling_batches, a.sampling_steps, a.sampling_repeats)
        self._sampling_prior = built[-1]
        self._sampling_result = result
        rows = {}
        for row in result["results"]:
            per_image = row["per_image_s"]
            rows[str(row["batch"])] = {
                # three UNet rows per image per step: unconditional + control (prior), concept (null-text)
                "a_three_term_unet_rows_per_s": 3 * result["steps"] / per_image["a_batched_gcfg"],
                "d_forwards_only_unet_rows_per_s": 3 * result["steps"] / per_image["d_forwards_only"],
                "a_over_d": row["ratios"]["a_over_d"],
                "b_over_a": row["ratios"]["b_over_a"],
            }
            self.log(f"sampling batch {row['batch']}: " + ", ".join(f"{k}={v:.3f}" for k, v in rows[str(row["batch"])].items()))
        return {"summary": rows, **peak_memory(self.device), "result": result}

    def sampling_sdxl(self) -> dict:
        """GCFG's three terms on SDXL: the batched plan's overhead (a/d) and the unbatched ratio (b/a)."""
        import sampling

        from ccp.priors.loading import resolve_dtype

        a = self.args
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        size, resolution = ("tiny", 64) if self.mode == "smoke" else ("full", 1024)
        result = sampling.run(size, self.device, resolve_dtype(a.sampling_dtype), resolution, [1, 4],
                              a.sampling_steps, a.sampling_repeats, family="sdxl")
        rows = {str(row["batch"]): {"a_per_image_s": row["per_image_s"]["a_batched_gcfg"], **row["ratios"]}
                for row in result["results"]}
        for batch, row in rows.items():
            self.log(f"sampling SDXL batch {batch}: " + ", ".join(f"{k}={v:.3f}" for k, v in row.items()))
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return {"summary": rows, **peak_memory(self.device), "result": result}

    def null_text_forward(self) -> dict:
        from null_text_init import time_and_count

        from ccp.models.null_text_unet import NullTextUNet2DConditionModel, empty_prompt_embedding

        prior = self._sampling_prior
        unet = prior.unet
        concept = NullTextUNet2DConditionModel.from_prior(unet, prior.text_encoder, prior.tokenizer,
                                                          definition="value_mean")
        concept = concept.to(device=unet.device, dtype=unet.dtype).eval()
        batch = self.args.forward_batch
        latent_hw = self.args.resolution // prior.vae_scale_factor
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 4, latent_hw, latent_hw, generator=generator).to(unet.device, unet.dtype)
        text = empty_prompt_embedding(prior.text_encoder, prior.tokenizer).to(dtype=unet.dtype).expand(batch, -1, -1)
        t = torch.tensor(500, device=unet.device)
        result = time_and_count(unet, concept, x, t, text, self.args.forward_repeats)
        result["time_ratio_minus_flop_ratio"] = (result["time_ratio_null_text_over_prior"]
                                                 - result["flop_ratio_null_text_over_prior"])
        self.log(f"null-text/prior forward: time {result['time_ratio_null_text_over_prior']:.3f}, "
                 f"FLOPs {result['flop_ratio_null_text_over_prior']:.3f}")
        del concept, x, text
        self._release_sampling()
        return {"dtype": str(unet.dtype).replace("torch.", ""), "resolution": self.args.resolution, **result}

    def _release_sampling(self) -> None:
        self._sampling_prior = None
        free_memory(self.device)

    def run_training_variant(self, method: str, batch: int, channels_last: bool, compile_backend: str | None,
                             steps: int, warmup: int) -> dict:
        import training

        from torch._dynamo.utils import counters as dynamo_counters

        losses, times, frames = [], [], []
        dynamo_counters.clear()
        start = time.perf_counter()
        with instrumented_training(training, channels_last, compile_backend, losses, times, frames):
            row = training.run_variant(method, self.size, str(self.device), self.args.training_dtype, self.args.resolution,
                                       batch, steps, warmup, torch.get_num_threads())
        wall = time.perf_counter() - start
        memory = row["memory"]
        row.update(
            name=f"{method}_b{batch}_{'compile' if compile_backend else 'eager'}{'_channels_last' if channels_last else ''}",
            batch=batch, channels_last=channels_last, compile_backend=compile_backend,
            peak_memory_gb=memory.get("peak_gb", memory.get("max_rss_gb")), peak_memory_kind=memory["kind"],
            step_times_s=times, losses=[float(v.float().cpu()) for v in losses], wall_s=wall,
            setup_and_compile_s=wall - sum(times), dynamo_frames_compiled_after_each_step=frames,
            recompiled_after_first_step=bool(frames and frames[-1] > frames[0]),
        )
        free_memory(self.device)
        return row

    def _variants(self, compile_backend: str | None, phase: str, reserve_s) -> dict:
        """Every (channels_last, batch, method) variant that fits the budget; the JSON is rewritten after each."""
        a = self.args
        rows, skipped = [], []
        result = {"dtype": a.training_dtype, "resolution": a.resolution, "timed_steps": a.training_steps,
                  "warmup_steps": a.warmup, "variants": rows, "skipped_variants": skipped}
        key = "compile_variant" if compile_backend else "eager_variant"
        for channels_last in (False, True):
            for batch in sorted(a.training_batches, reverse=True):  # the largest first: cost and targets use it
                for method in ("ours", "dreambooth"):
                    name = f"{method}_b{batch}_{'compile' if compile_backend else 'eager'}{'_channels_last' if channels_last else ''}"
                    reason = self.budget.skip_reason(self.estimates[key], name, reserve_s())
                    if reason:
                        skipped.append({"name": name, "reason": reason})
                        self.log(f"{phase}: {name} skipped ({reason})")
                        continue
                    try:
                        row = self.run_training_variant(method, batch, channels_last, compile_backend,
                                                        a.training_steps, a.warmup)
                    except Exception as err:
                        free_memory(self.device)
                        row = {"name": name, "error": f"{type(err).__name__}: {err}",
                               "traceback": traceback.format_exc()[-4000:]}
                        self.log(f"{phase}: {name} FAILED: {row['error']}")
                    else:
                        # the next variant of this kind is estimated from the last one (the first compile is the slowest)
                        self.estimates[key] = 1.1 * row["wall_s"]
                        self.log(f"{phase}: {name}: {row['images_per_s']:.2f} images/s, "
                                 f"peak {row['peak_memory_gb']:.2f} GB, wall {row['wall_s']:.1f} s")
                    rows.append(row)
                    self.training_rows.append(row)
                    # what has finished survives a kill or the hard stop in the middle of the next variant
                    self.payload["sections"][phase] = {"status": "running"} | result
                    self.write()
        ratios = {}
        for row in rows:
            other = next((r for r in rows if r.get("name") == row.get("name", "").replace("ours_", "dreambooth_", 1)
                          and "images_per_s" in r), None)
            if row.get("variant") == "ours" and other and "images_per_s" in row:
                ratios[row["name"]] = row["images_per_s"] / other["images_per_s"]
        result["images_per_s_ratio_ours_over_dreambooth"] = ratios
        failed = [r for r in rows if "error" in r]
        if failed:
            raise PartialFailure(f"{len(failed)} variant(s) failed: " + "; ".join(f"{r['name']}: {r['error']}" for r in failed),
                                 result)
        return result

    def training(self) -> dict:
        return self._variants(None, "training", reserve_s=lambda: self.steady_estimate() + self.estimates["cost"])

    def training_compile(self) -> dict:
        return self._variants(self.args.compile_backend, "training_compile", reserve_s=lambda: 2.0)

    def host_sync_cost(self) -> dict:
        """Ours' isolated step (eager, contiguous) at the steady batch, `training_steps` steps chained with
        one device sync at the end, then the same with a host read of a one-element flag after each step's
        loss (the `.item()` of ccp-train's non-finite check): their difference is what a sync per step costs."""
        import training

        a = self.args
        reads = {"on": False, "count": 0}
        measured = {}

        def chained(fn, device, repeats, warmup=1):
            for _ in range(warmup):
                fn()
            for label, on in (("without", False), ("with", True)):
                reads["on"] = on
                sync(device)
                start = time.perf_counter()
                for _ in range(repeats):
                    fn()
                sync(device)
                measured[label] = (time.perf_counter() - start) / repeats
            reads["on"] = False
            return measured["without"]

        from ccp.training import module as module_lib

        base = module_lib.PersonalizationModule

        class Reading(base):
            def training_step(self, batch, batch_idx):
                loss = super().training_step(batch, batch_idx)
                if reads["on"]:
                    reads["count"] += 1
                    (~torch.isfinite(loss.detach())).float().item()  # the sync under test
                return loss

        with patched(module_lib, "PersonalizationModule", Reading), patched(training, "median_seconds", chained):
            row = training.run_variant("ours", self.size, str(self.device), a.training_dtype, a.resolution,
                                       a.steady_batch, a.training_steps, a.warmup, torch.get_num_threads())
        free_memory(self.device)
        fraction = (measured["with"] - measured["without"]) / measured["without"]
        self.log(f"host_sync_cost: {measured['without'] * 1000:.1f} ms per step without a sync, "
                 f"{measured['with'] * 1000:.1f} ms with one ({fraction:+.1%})")
        return {"batch": a.steady_batch, "steps_each": a.training_steps, "host_reads": reads["count"],
                "step_s_without_sync": measured["without"], "step_s_with_one_sync": measured["with"],
                "cost_fraction_of_step": fraction, "images_per_s_without_sync": row["images_per_s"],
                "where": "after the loss, before backward (ccp-train's read is after backward, before the "
                         "optimizer step: one sync either way)"}

    def steady_estimate(self) -> float:
        batch = self.args.steady_batch
        measured = [r for r in self.training_rows if r.get("variant") == "ours" and r.get("batch") == batch
                    and not r["channels_last"] and "step_s" in r]
        if not measured:
            return self.estimates["steady"]
        r = measured[0]
        return r["setup_and_compile_s"] + (self.args.steady_steps + self.args.warmup) * r["step_s"] * 1.2

    def validation_memory(self) -> dict:
        """Peak memory of ours' training steps (bf16 prior parts on the CPU, fp32 master weights)
        without and with a validation grid after every step (`benchmarks/validation_memory.py`)."""
        import validation_memory

        a = self.args
        batch = a.steady_batch
        rows = []
        for every in (0, 1):
            free_memory(self.device)
            rows.append(validation_memory.run_variant(self.size, str(self.device), a.resolution, batch, 2, every, 4))
            self.log(f"validation_memory: validation every {every or 'never'}: peak {rows[-1]['peak_gb']:.2f} GB")
        return {"batch": batch, "steps": 2, "grid": "3 rows x 4 images, 4 denoising steps", "rows": rows,
                "with_over_without": rows[1]["peak_gb"] / rows[0]["peak_gb"]}

    def training_steady(self) -> dict:
        import training

        a = self.args
        row = self.run_training_variant("ours", a.steady_batch, False, None, a.steady_steps, a.warmup)
        times, losses = row["step_times_s"], row["losses"]
        n = min(10, len(times) // 2)
        median = statistics.median(times)
        p90 = sorted(times)[min(len(times) - 1, math.ceil(0.9 * len(times)) - 1)]
        first, last = statistics.median(times[:n]), statistics.median(times[-n:])
        all_finite = all(math.isfinite(v) for v in losses)
        stats = {
            "median_s": median, "p90_s": p90, "p90_over_median": p90 / median,
            "first_n": n, "first_median_s": first, "last_median_s": last,
            "first_mean_s": statistics.fmean(times[:n]), "last_mean_s": statistics.fmean(times[-n:]),
            "last_over_first_median": last / first,
        }
        checks = {
            "loss_all_finite": all_finite,
            "p90_over_median_ok": stats["p90_over_median"] <= STEADY_LIMITS["p90_over_median"],
            "first_vs_last_ok": abs(stats["last_over_first_median"] - 1) <= STEADY_LIMITS["last10_over_first10_median"],
        }
        checks["steady"] = checks["p90_over_median_ok"] and checks["first_vs_last_ok"]
        self.log(f"training_steady: median {median * 1000:.1f} ms, p90/median {stats['p90_over_median']:.2f}, "
                 f"last/first {stats['last_over_first_median']:.2f}, losses finite: {all_finite}")
        if not all_finite:
            raise RuntimeError(f"non-finite training loss: {losses}")
        return {"method": "ours (null-text concept UNet, value_mean init)", "batch": a.steady_batch,
                "precision": f"{a.training_dtype} (autocast; fp32 master weights), AdamW lr {training.LR}",
                "warmup_steps": a.warmup, "timed_steps": a.steady_steps, "losses": losses,
                "losses_include_warmup": a.warmup, "step_times_s": times, "images_per_s": row["images_per_s"],
                "peak_memory_gb": row["peak_memory_gb"], "peak_memory_kind": row["peak_memory_kind"],
                "step_time": stats, "limits": STEADY_LIMITS, "checks": checks}

    def cost_training_rows(self) -> dict | None:
        """cost.py's training input: ccp-train's own images/s of ours and DreamBooth (train_ccp and
        train_dreambooth, Table 1's per-GPU batch)."""
        sections = self.payload["sections"]
        runs = {k: sections.get(f"train_{k if k == 'dreambooth' else 'ccp'}", {}) for k in ("ours", "dreambooth")}
        if not all(r.get("status") == "done" for r in runs.values()):
            return None
        return runs

    def cost(self) -> dict:
        import cost

        sampling = self._sampling_result
        runs = self.cost_training_rows()
        b = runs["ours"]["per_gpu_batch"]
        training = {"benchmark": "training", "machine": self.payload["machine"], "model": {"size": self.size},
                    "dtype": self.args.training_dtype, "resolution": self.args.resolution, "batch": b,
                    "results": {k: {"images_per_s": r["images_per_s"]} for k, r in runs.items()}}
        allow_other = self.size != "sd15"
        cost.check(training, "training", allow_other)
        cost.check(sampling, "sampling", allow_other)
        r = cost.recipe()
        estimate = cost.estimate(training, sampling, r)
        table = cost.markdown(estimate, r)
        print(table, flush=True)
        return {"inputs": f"training: ccp-train's steady images/s at per-GPU batch {b} (train_ccp, train_dreambooth); "
                          f"sampling: the sampling section's {sampling['steps']}-step run, its largest batch",
                "recipe": r, **estimate, "markdown": table}

    # targets -----------------------------------------------------------------------------------
    def targets(self) -> dict:
        sections = self.payload["sections"]
        values = {}
        real = [(name, sections[name]) for name in ("train_ccp_largest", "train_ccp")
                if sections.get(name, {}).get("status") == "done"]
        if real:  # through ccp-train: the largest batch when it ran
            name, run = real[0]
            values["ours_training_images_per_s"] = (run["images_per_s"], f"ccp-train ({name}), per-GPU batch "
                                                                         f"{run['per_gpu_batch']}")
        summary = sections.get("sampling", {}).get("summary")
        if summary:
            largest = max(summary, key=int)
            values["gcfg_three_term_unet_rows_per_s"] = (summary[largest]["a_three_term_unet_rows_per_s"],
                                                         f"(a) at batch {largest}")
            values["gcfg_a_over_d"] = (summary[largest]["a_over_d"], f"batch {largest}")
            fid = sections.get("eval_fid", {})
            if fid.get("status") == "done":
                rows = fid["projected"]["unet_rows_per_s"]
                values["fid_rows_per_s_over_sampling_rows_per_s"] = (
                    rows / summary[largest]["a_three_term_unet_rows_per_s"],
                    f"FID {rows:.1f} UNet rows/s ({fid['unet_rows_per_sample_step']:g} rows per sample-step, projected "
                    f"to {fid['projected']['steps']} steps) over (a) at batch {largest}")
        sync_cost = sections.get("host_sync_cost", {})
        if sync_cost.get("status") == "done":
            values["host_sync_cost_fraction_of_step"] = (sync_cost["cost_fraction_of_step"],
                                                         f"batch {sync_cost['batch']}, isolated step")
        preset = sections.get("train_ccp_gpu_24gb", {})
        if preset.get("status") == "done":
            values["gpu_24gb_preset_fits_24_gib"] = (preset["fits"], "ccp-train preset=gpu_24gb under the cap"
                                                     if self.device.type == "cuda" else "CPU: no cap applies")
        forward = sections.get("null_text_forward", {})
        if "time_ratio_minus_flop_ratio" in forward:
            values["null_text_forward_time_ratio_minus_flop_ratio"] = (
                forward["time_ratio_minus_flop_ratio"],
                f"time ratio {forward['time_ratio_null_text_over_prior']:.4f} vs FLOPs ratio "
                f"{forward['flop_ratio_null_text_over_prior']:.4f} at batch {forward['batch']}")
        out = {}
        for name, (op, bound) in TARGETS.items():
            if name not in values:
                out[name] = {"target": f"{op} {bound}", "value": None, "pass": None, "reason": "not measured"}
                continue
            value, where = values[name]
            ok = {">=": lambda: value >= bound, "<=": lambda: value <= bound, "==": lambda: value == bound,
                  "within": lambda: abs(value - 1) <= bound}[op]()
            out[name] = {"target": f"{op} {bound}", "value": value, "pass": bool(ok), "measured": where}
        return out

    # all ---------------------------------------------------------------------------------------
    def run(self) -> Path:
        self.log(f"{self.mode} run on {self.payload['machine'].get('gpu', self.device)}; budget {self.args.budget_s:.0f} s")
        pre = preflight()
        self.payload["preflight"] = pre
        if pre["missing"]:
            path = self.write()
            raise SystemExit(f"gpu_check: missing packages: {pre['missing']}; wrote {path}. Fix: {PREFLIGHT_FIX}.")
        self.log(f"preflight: {pre['found']}")
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.alarm(max(1, math.ceil(self.budget.left() + HARD_STOP_GRACE_S)))
        try:
            self.run_sections()
        except DeadlineExceeded:
            for name in SECTIONS:
                self.payload["sections"].setdefault(name, {"status": "skipped", "reason": "hard stop reached before it"})
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
            self.remove_work_dir()
        path = self.write()
        self.log(f"done: {'complete' if self.payload['complete'] else 'INCOMPLETE'}; targets: "
                 + ", ".join(f"{k}={v['pass']}" for k, v in self.payload["targets"].items()))
        return path

    def run_sections(self) -> None:
        e = self.estimates
        sections = self.payload["sections"]
        self.section("train_ccp", self.train_ccp, e["train_ccp"])
        self.section("eval_fid", self.eval_fid, e["eval_fid"])  # train_ccp's export; the prior if it has none
        self.section("sampling", self.sampling, e["sampling"])
        if sections["sampling"]["status"] == "done":
            self.section("null_text_forward", self.null_text_forward, e["null_text_forward"])
        else:
            sections["null_text_forward"] = {"status": "skipped", "reason": "needs the sampling section's prior"}
        self._release_sampling()
        self.section("train_dreambooth", self.train_dreambooth, e["train_dreambooth"])
        if sections["sampling"]["status"] != "done":
            sections["cost"] = {"status": "skipped", "reason": "needs the sampling section"}
        elif self.cost_training_rows() is None:
            sections["cost"] = {"status": "skipped", "reason": "needs train_ccp and train_dreambooth"}
        else:
            self.section("cost", self.cost, e["cost"])
        for name, after in (("train_ccp_largest", "train_ccp"), ("train_ccp_gpu_24gb", None),
                            ("train_dreambooth_largest", "train_dreambooth")):
            if after and sections[after]["status"] != "done":
                sections[name] = {"status": "skipped", "reason": f"sized from {after}'s memory"}
            else:
                self.section(name, getattr(self, name), e[name])
        self.section("training", self.training, e["eager_variant"])
        self.section("host_sync_cost", self.host_sync_cost, e["host_sync_cost"])
        self.section("training_steady", self.training_steady, self.steady_estimate())
        self.section("validation_memory", self.validation_memory, e["validation_memory"])
        self.section("sampling_sdxl", self.sampling_sdxl, e["sampling_sdxl"])
        self.section("training_compile", self.training_compile, e["compile_variant"])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny prior on the CPU, 64 px, batches 1-2, few steps")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--budget-s", type=float, default=400.0, help="wall-clock budget; what would not fit is skipped")
    parser.add_argument("--device", help="default: cuda (cpu with --smoke)")
    parser.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections to leave out")
    parser.add_argument("--compile-backend", help="torch.compile backend; default inductor (eager with --smoke)")
    parser.add_argument("--preflight-only", action="store_true", help="check every import and exit (1: something is missing)")
    parser.add_argument("--work-dir", help="prior, images and runs of the real-path sections, kept; default: a temporary "
                                           "folder removed at the end")
    for name, kind, help_ in [
        ("resolution", int, "pixels"), ("sampling-steps", int, None), ("sampling-repeats", int, None),
        ("training-steps", int, "timed steps per variant"), ("warmup", int, "untimed steps first"),
        ("steady-steps", int, None), ("steady-batch", int, None), ("forward-batch", int, None),
        ("forward-repeats", int, None), ("sampling-dtype", str, None), ("training-dtype", str, None),
        ("train-steps", int, "steps of each ccp-train run"), ("train-batch", int, "ccp-train's per-GPU batch"),
        ("real-images", int, "random images: the training data and FID's real folder"),
        ("fid-samples", int, "ccp-eval's FID samples"), ("fid-steps", int, "their sampling steps"),
        ("fid-batch", int, "sampling batch (default: ccp-eval's)"),
        ("largest-steps", int, "steps of the largest-batch ccp-train run"),
        ("preset-steps", int, "steps of the preset=gpu_24gb ccp-train run"),
    ]:
        parser.add_argument(f"--{name}", type=kind, help=help_)
    parser.add_argument("--sampling-batches", type=int, nargs="+")
    parser.add_argument("--training-batches", type=int, nargs="+")
    args = parser.parse_args(argv)
    defaults = dict(
        device="cpu", compile_backend="eager", resolution=64, sampling_steps=2, sampling_repeats=1, sampling_batches=[1, 2],
        training_batches=[2], training_steps=2, warmup=1, steady_steps=6, steady_batch=2, forward_batch=2,
        forward_repeats=3, sampling_dtype="bfloat16", training_dtype="bf16-mixed",
        train_steps=10, train_batch=2, real_images=4, fid_samples=4, fid_steps=2, fid_batch=2, largest_steps=6,
        preset_steps=6,
    ) if args.smoke else dict(
        device="cuda", compile_backend="inductor", resolution=512, sampling_steps=8, sampling_repeats=2,
        sampling_batches=[1, 8, 16], training_batches=[8, 16], training_steps=5, warmup=2, steady_steps=50,
        steady_batch=16, forward_batch=8, forward_repeats=10, sampling_dtype="bfloat16", training_dtype="bf16-mixed",
        train_steps=40, train_batch=4, real_images=64, fid_samples=2000, fid_steps=2, fid_batch=None, largest_steps=30,
        preset_steps=20,
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.resolution % 8:
        parser.error("--resolution must be a multiple of 8")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; --smoke runs the same code path on the CPU")
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    if args.preflight_only:
        sys.exit(preflight_only())
    if args.smoke:
        torch.set_num_threads(1)  # tiny models: one thread is the fastest and steadiest on a shared CPU
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the threads and processes torch's setting does not reach
    torch.manual_seed(0)
    check = GPUCheck(args)
    path = check.run()
    failed = [name for name, sec in check.payload["sections"].items() if sec.get("status") == "failed"]
    if failed:
        sys.exit(f"gpu_check: section(s) failed: {', '.join(failed)} (tracebacks in {path})")
    return path


if __name__ == "__main__":
    main()
