"""benchmarks/gpu_check.py: its --smoke run (the GPU check's code path, tiny, on the CPU) with the
real-path sections through ccp-train and ccp-eval themselves, its budget, its preflight, its
tokenizer fallback for a bare torch machine, and the Makefile's wheel pins and gpu-check recipe."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
ORDER = ["train_ccp", "eval_fid", "sampling", "null_text_forward", "train_dreambooth", "cost", "train_ccp_largest",
         "train_ccp_gpu_24gb", "train_dreambooth_largest", "training", "host_sync_cost", "training_steady", "validation_memory", "sampling_sdxl",
         "training_compile"]
SECTIONS = set(ORDER)
TARGETS = {"ours_training_images_per_s", "gcfg_three_term_unet_rows_per_s", "gcfg_a_over_d",
           "null_text_forward_time_ratio_minus_flop_ratio", "fid_rows_per_s_over_sampling_rows_per_s",
           "host_sync_cost_fraction_of_step", "gpu_24gb_preset_fits_24_gib"}


def strict_json(path: Path) -> dict:
    def reject(constant):
        raise ValueError(f"{path.name} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=reject)


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("gpu-check"), tmp_path_factory.mktemp("gpu-check-work")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--work-dir", str(work)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_check_smoke_cpu.json"], files  # no temporary file left behind, no run folder in --out
    return proc.stdout, strict_json(out / "gpu_check_smoke_cpu.json"), work


@pytest.fixture(scope="module")
def smoke(smoke_run):
    return smoke_run[:2]


def test_every_section_runs_and_is_written_as_it_ends(smoke):
    log, result = smoke
    sections = result["sections"]
    assert set(sections) == SECTIONS
    for name, section in sections.items():
        assert section["status"] == "done", (name, section.get("reason"), section.get("error"))
        assert not section.get("skipped_variants"), name
        assert section["wall_s"] >= 0
    assert result["complete"] is True and result["mode"] == "smoke"
    assert {name: s["torch_threads"] for name, s in sections.items()} == {name: 1 for name in SECTIONS}
    assert result["machine"]["device"] == "cpu" and result["preflight"]["missing"] == {}
    # one atomic write after each section, each logged with its progress line
    assert sum("] wrote " in line for line in log.splitlines()) >= len(SECTIONS)
    starts = [sections[name]["started_s"] for name in ORDER]
    # in this order: the real entry points first, the one whose time cannot be predicted (compile) last
    assert starts == sorted(starts)
    grids = sections["validation_memory"]["rows"]
    assert [r["grids"] for r in grids] == [0, 2] and all(r["peak_gb"] > 0 for r in grids)
    assert all(r["prior_unet_device_after"] == "cpu" for r in grids)  # validation moved the prior back


def test_training_variants_measure_speed_and_peak_memory(smoke):
    _, result = smoke
    rows = result["sections"]["training"]["variants"] + result["sections"]["training_compile"]["variants"]
    seen = {(r["variant"], r["channels_last"], r["compile_backend"]) for r in rows}
    assert seen == {(m, cl, c) for m in ("ours", "dreambooth") for cl in (False, True) for c in (None, "eager")}
    for row in rows:
        assert row["images_per_s"] > 0 and row["step_s"] > 0, row["name"]
        assert row["peak_memory_gb"] > 0 and "RSS" in row["peak_memory_kind"], row["name"]
        assert len(row["step_times_s"]) == result["config"]["training_steps"]
        assert row["losses"] and all(math.isfinite(v) for v in row["losses"])
        compiled = row["compile_backend"] is not None
        assert (row["dynamo_frames_compiled_after_each_step"][0] > 0) == compiled, row["name"]
        assert row["recompiled_after_first_step"] is False, row["name"]  # one compile, then the same graphs
    ours = next(r for r in rows if r["variant"] == "ours")
    dreambooth = next(r for r in rows if r["variant"] == "dreambooth")
    assert ours["frozen_calls_per_step"] == {"vae.encode": 0.0, "text_encoder": 0.0}  # cached latents, no text
    assert dreambooth["frozen_calls_per_step"] == {"vae.encode": 1.0, "text_encoder": 1.0}
    assert result["sections"]["training"]["images_per_s_ratio_ours_over_dreambooth"]


def test_training_steady_keeps_every_loss_and_step_time(smoke):
    _, result = smoke
    steady = result["sections"]["training_steady"]
    assert len(steady["step_times_s"]) == steady["timed_steps"] == result["config"]["steady_steps"]
    assert len(steady["losses"]) == steady["timed_steps"] + steady["warmup_steps"]
    assert all(isinstance(v, float) and math.isfinite(v) for v in steady["losses"])
    assert steady["checks"]["loss_all_finite"] is True
    assert all(isinstance(v, bool) for v in steady["checks"].values())
    stats = steady["step_time"]
    assert stats["p90_s"] >= stats["median_s"] > 0 and stats["p90_over_median"] >= 1
    assert stats["first_median_s"] > 0 and stats["last_median_s"] > 0
    assert steady["images_per_s"] > 0 and steady["peak_memory_gb"] > 0


def test_sampling_forward_cost_and_targets(smoke):
    _, result = smoke
    sections = result["sections"]
    summary = sections["sampling"]["summary"]
    assert set(summary) == {"1", "2"}
    assert all(row["a_three_term_unet_rows_per_s"] > 0 and row["a_over_d"] > 0 for row in summary.values())
    assert sections["sampling"]["result"]["benchmark"] == "sampling"
    forward = sections["null_text_forward"]
    assert 0 < forward["flop_ratio_null_text_over_prior"] < 1  # the null-text model drops cross-attention
    assert forward["null_text_s"] > 0 and forward["prior_s"] > 0

    cost = sections["cost"]
    # the recipe's training hours come from ccp-train's own images/s (train_ccp, train_dreambooth)
    images = cost["recipe"]["train_steps"] * cost["recipe"]["global_batch"] * len(cost["recipe"]["datasets"])
    assert cost["hours"]["train ours"] == pytest.approx(images / sections["train_ccp"]["images_per_s"] / 3600)
    assert cost["hours"]["train dreambooth"] == pytest.approx(images / sections["train_dreambooth"]["images_per_s"] / 3600)
    assert cost["hours"]["FID ours"] > 0
    assert cost["totals"]["all"] == pytest.approx(sum(cost["hours"].values()))
    assert set(cost["totals"]) == {"training", "FID", "alignment", "all"}
    assert cost["recipe"]["train_steps"] > 0 and "| **all** |" in cost["markdown"]

    targets = result["targets"]
    assert set(targets) == TARGETS
    for name, target in targets.items():
        assert isinstance(target["pass"], bool), name
        op, bound = target["target"].split()
        if op == "==":
            assert target["value"] is True and bound == "True" and target["pass"] is True  # the preset ran to its end
            continue
        value, bound = target["value"], float(bound)
        assert isinstance(value, float)
        assert target["pass"] == {">=": value >= bound, "<=": value <= bound, "within": abs(value - 1) <= bound}[op], name
    # the FID job's UNet rows/s (projected to 100 steps) over the sampling section's three-term rows/s
    fid, largest = sections["eval_fid"], max(summary, key=int)
    assert targets["fid_rows_per_s_over_sampling_rows_per_s"]["value"] == pytest.approx(
        fid["projected"]["unet_rows_per_s"] / summary[largest]["a_three_term_unet_rows_per_s"])
    assert fid["projected"]["unet_rows_per_s"] == pytest.approx(
        100 * fid["unet_rows_per_sample_step"] * fid["projected"]["samples_per_s"])
    # ours' target is read from ccp-train itself, at the largest batch it ran
    assert targets["ours_training_images_per_s"]["value"] == sections["train_ccp_largest"]["images_per_s"]


def test_a_budget_too_small_skips_every_section_with_its_reason(tmp_path, monkeypatch):
    gpu_check = load_gpu_check()
    monkeypatch.setattr(gpu_check, "preflight", lambda: {"found": {}, "missing": {}})  # its imports cost seconds here
    path = gpu_check.main(["--smoke", "--out", str(tmp_path), "--budget-s", "0"])
    result = strict_json(path)
    assert set(result["sections"]) == SECTIONS and result["complete"] is False
    for name, section in result["sections"].items():
        assert section["status"] == "skipped" and section["reason"], name
    assert "budget" in result["sections"]["sampling"]["reason"]
    assert all(t["pass"] is None and t["reason"] == "not measured" for t in result["targets"].values())


def test_the_hard_stop_keeps_what_finished(tmp_path, monkeypatch):
    """A section still running past the budget (an unexpectedly slow compile) is stopped; the JSON stays valid."""
    gpu_check = load_gpu_check()
    monkeypatch.setattr(gpu_check, "HARD_STOP_GRACE_S", 1)
    monkeypatch.setattr(gpu_check, "preflight", lambda: {"found": {}, "missing": {}})
    check = gpu_check.GPUCheck(gpu_check.parse_args(["--smoke", "--out", str(tmp_path), "--budget-s", "1"]))
    check.started = check.budget.started = time.perf_counter()
    check.estimates["sampling"] = 0

    def endless_sampling():
        check.payload["sections"]["sampling"] = {"status": "running", "measured_so_far": [1.0]}
        time.sleep(60)

    monkeypatch.setattr(check, "sampling", endless_sampling)
    start = time.perf_counter()
    result = strict_json(check.run())
    assert time.perf_counter() - start < 10
    assert result["sections"]["sampling"]["status"] == "stopped"
    assert result["sections"]["sampling"]["measured_so_far"] == [1.0] and "hard stop" in result["sections"]["sampling"]["reason"]
    assert {name: s["status"] for name, s in result["sections"].items() if name != "sampling"} == {
        name: "skipped" for name in SECTIONS - {"sampling"}}
    assert result["complete"] is False


def test_tokenizer_needs_neither_torchvision_nor_pkg_resources(monkeypatch):
    """`import clip` pulls in torchvision and pkg_resources; the GPU machine may have neither."""
    gpu_check = load_gpu_check()
    is_clip = lambda name: name == "clip" or name.startswith("clip.")  # noqa: E731
    before = {name: module for name, module in sys.modules.items() if is_clip(name)}
    for name in before:
        del sys.modules[name]
    monkeypatch.setitem(sys.modules, "pkg_resources", None)  # import pkg_resources -> ImportError
    monkeypatch.setitem(sys.modules, "torchvision", None)
    try:
        how = gpu_check.ensure_clip_tokenizer()
    finally:  # the stub package must not stay for a later `import clip` in this worker: it has no clip.load
        for name in [name for name in sys.modules if is_clip(name)]:
            del sys.modules[name]
        sys.modules.update(before)
    assert how.startswith("clip.simple_tokenizer only"), how
    from ccp.priors.tokenizer import _bpe_file

    assert Path(_bpe_file()).is_file()


def requirement_pins(text: str) -> dict[str, str]:
    return {re.sub(r"[-_.]+", "-", name).lower(): version
            for name, version in re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)\s*$", text, re.M)}


def test_gpu_wheels_are_pinned_as_in_constraints():
    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    line = next(l for l in makefile.splitlines() if l.startswith("GPU_WHEELS"))
    wheels = requirement_pins("\n".join(line.split(":=", 1)[1].split()))
    constraints = requirement_pins((ROOT / "constraints.txt").read_text())
    assert {"diffusers", "hydra-core", "omegaconf", "antlr4-python3-runtime", "clip-anytorch", "torch-fidelity"} <= set(wheels)
    assert {name: constraints.get(name) for name in wheels} == wheels


def test_sdxl_sampling_section_runs_the_sdxl_prior(smoke):
    _, result = smoke
    section = result["sections"]["sampling_sdxl"]
    model = section["result"]["model"]
    assert model["family"] == "sdxl" and model["size"] == "tiny" and model["resolution"] == 64
    # the null-text concept UNet of SDXL drops every cross-attention: fewer parameters than the prior's
    assert model["null_text_unet_params"] < model["unet_params"]
    assert set(section["summary"]) == {"1", "4"}
    for row in section["summary"].values():
        assert row["a_per_image_s"] > 0 and row["b_over_a"] > 0 and row["a_over_d"] > 0


# --- the real-path sections: ccp-train and ccp-eval themselves ---------------------------------------
def csv_column(path: Path, name: str) -> list[float]:
    with open(path, newline="") as file:
        return [float(row[name]) for row in csv.DictReader(file) if row.get(name)]


@pytest.mark.parametrize("section, method, ema, steps_key", [
    ("train_ccp", "ours", True, "train_steps"), ("train_dreambooth", "dreambooth", False, "train_steps"),
    ("train_ccp_largest", "ours", True, "largest_steps"),
    ("train_dreambooth_largest", "dreambooth", False, "largest_steps"),
    ("train_ccp_gpu_24gb", "ours", True, "preset_steps")])
def test_training_sections_run_ccp_train_and_read_its_csv_log(smoke_run, section, method, ema, steps_key):
    _, result, work = smoke_run
    train = result["sections"][section]
    config = result["config"]
    run_dir = Path(train["run_dir"])
    table1_face = ["experiment=table1", "dataset=face", f"method={method}"]
    assert run_dir.parent.parent == work and train["overrides"][:3] == table1_face
    # what only ccp-train's Lightning run leaves behind: its config, its one checkpoint, its CSV log, the export
    assert (run_dir / "config.yaml").is_file() and (run_dir / "export" / "ccp_export.json").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    assert train["checkpoint"]["saves"] == 1 and train["checkpoint"]["bytes"] == (run_dir / "checkpoints" / "last.ckpt").stat().st_size
    logged = csv_column(Path(train["csv_log"]), "train/images_per_s")
    assert len(logged) == config[steps_key] == train["steps"]  # one logged row per Trainer step
    assert train["images_per_s_each_step"] == pytest.approx(logged)
    steady = logged[train["warmup_steps"]:-1]  # warm-up and the checkpoint step left out
    assert train["images_per_s"] == pytest.approx(statistics.median(steady)) and train["steady_steps"] == len(steady)
    assert csv_column(Path(train["csv_log"]), "train/loss") == pytest.approx(train["losses"]) and train["losses_finite"]
    # Table 1's experiment as composed: DDP, bf16-mixed, latent cache, DataLoader workers; EMA for ours only
    assert (train["strategy"], train["precision"], train["latent_cache"], train["ema"]) == ("ddp", "bf16-mixed", True, ema)
    assert train["num_workers"] >= 1 and train["accumulation"] == 1
    assert train["fit_s"] > 0 and train["checkpoint"]["save_s"] > 0
    if section == "train_ccp_gpu_24gb":  # the preset's own batch, optimizer, EMA place and checkpointing
        assert "preset=gpu_24gb" in train["overrides"] and train["fits"] is True
        assert (train["per_gpu_batch"], train["optimizer"], train["ema_device"], train["gradient_checkpointing"]) == (
            2, "adamw8bit", "cpu", True)
    else:
        assert train["per_gpu_batch"] == config["train_batch"] * (2 if section.endswith("_largest") else 1)
        assert (train["optimizer"], train["gradient_checkpointing"]) == ("adamw", False)
    # a CPU has no CUDA syncs to count: said so, not reported as zero
    assert train["host_syncs"] == {"counted": False, "reason": "a CPU run: torch.cuda.set_sync_debug_mode sees CUDA syncs only"}


def test_eval_fid_runs_ccp_eval_on_the_trained_export(smoke_run):
    _, result, work = smoke_run
    fid = result["sections"]["eval_fid"]
    config = result["config"]
    on_disk = json.loads(Path(fid["result_json"]).read_text())
    assert Path(fid["result_json"]).is_relative_to(work)
    assert on_disk["metric"] == "fid" and on_disk["num_images"] == config["fid_samples"] == fid["num_samples"]
    assert on_disk["export"] == result["sections"]["train_ccp"]["export_dir"] and on_disk["method"] == "ours"
    assert on_disk["details"]["feature_extractor"] == "inception" and on_disk["details"]["stand_in_weights"] is True
    assert on_disk["config"]["sampling"]["steps"] == fid["steps"] == config["fid_steps"]
    # every sample went through the pipeline down to VAE decode, one timed sampling call per batch, each
    # denoising step timed between two scheduler steps (the first call, which warms up, left out)
    calls = math.ceil(fid["num_samples"] / fid["batch"])
    assert fid["sampling_calls"] == calls and fid["vae_decode_s"] > 0
    assert fid["denoising_steps_timed"] == max(1, calls - 1) * (fid["steps"] - 1) and fid["denoise_step_s"] > 0
    projected = fid["projected"]
    per_sample = (projected["steps"] * fid["denoise_s_per_sample_step"] + fid["call_overhead_s_per_sample"]
                  + fid["vae_decode_s_per_sample"] + fid["inception_and_rest_s_per_sample"])
    assert projected["seconds_per_sample"] == pytest.approx(per_sample)
    assert projected["seconds"] == pytest.approx(fid["setup_s"] + fid["distance_s"] + projected["num_samples"] * per_sample)
    assert (projected["num_samples"], projected["steps"]) == (50_000, 100)
    # ours at concept weight 1 without a control term: Eq. 3 gives the unconditional prediction weight 0,
    # so only the concept model runs, one row per sample and step (counted at the denoisers)
    assert fid["unet_rows_per_sample_step"] == 1.0


def test_host_sync_cost_reads_the_flag_once_per_step_and_reports_the_difference(smoke):
    _, result = smoke
    cost = result["sections"]["host_sync_cost"]
    assert cost["host_reads"] == result["config"]["training_steps"] == cost["steps_each"]
    assert cost["cost_fraction_of_step"] == pytest.approx(
        (cost["step_s_with_one_sync"] - cost["step_s_without_sync"]) / cost["step_s_without_sync"])


def test_real_path_sections_hand_the_composed_config_to_the_entry_points(tmp_path, monkeypatch):
    """The sections call run_training / run_eval with the experiment's config; nothing calls training_step
    itself; the thread count that Lightning's DDP launcher sets (OMP_NUM_THREADS unset) is put back."""
    import torch
    from lightning.fabric.utilities.distributed import _set_num_threads_if_needed

    import ccp.evaluation.run as eval_run
    import ccp.training.run as train_run
    from ccp.training.module import PersonalizationModule

    gpu_check = load_gpu_check()
    check = gpu_check.GPUCheck(gpu_check.parse_args(["--smoke", "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path)]))
    inputs = {"prior": tmp_path / "prior", "images": tmp_path / "images"}
    monkeypatch.setattr(check, "real_inputs", lambda: inputs)
    import real_path

    monkeypatch.setattr(real_path, "write_inception", lambda folder: folder / "weights.pth")
    calls = []

    class Called(Exception):
        pass

    def recording(name):
        def entry_point(cfg, out_dir, *args, **kwargs):
            calls.append((name, cfg, Path(out_dir)))
            _set_num_threads_if_needed(num_processes=1)  # what Lightning's DDP launcher does in fit
            raise Called(name)
        return entry_point

    monkeypatch.setattr(train_run, "run_training", recording("run_training"))
    monkeypatch.setattr(eval_run, "run_eval", recording("run_eval"))
    monkeypatch.setattr(PersonalizationModule, "training_step", lambda *a, **k: calls.append(("training_step",)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))  # not what the launcher would set (all cores)
    chosen = torch.get_num_threads()
    try:
        for section in (check.train_ccp, check.train_dreambooth, check.train_ccp_gpu_24gb):
            with pytest.raises(Called):
                section()
            assert torch.get_num_threads() == chosen and "OMP_NUM_THREADS" not in os.environ
        with pytest.raises(Called):
            check.eval_fid()
    finally:
        torch.set_num_threads(threads)
    assert [c[0] for c in calls] == ["run_training", "run_training", "run_training", "run_eval"]
    ours, dreambooth, preset, fid = (c[1] for c in calls)
    # preset=gpu_24gb over the experiment, at the preset's batch without accumulation
    assert (preset.optim.name, preset.ema.device, preset.speed.gradient_checkpointing) == ("adamw8bit", "cpu", True)
    assert preset.data.batch_size == preset.trainer.global_batch_size == 2 and preset.method.name == "ours"
    assert (ours.method.name, dreambooth.method.name) == ("ours", "dreambooth")
    assert ours.data.latent_cache.enabled and ours.ema.enabled and ours.trainer.strategy == "ddp"
    assert ours.trainer.precision == "bf16-mixed" and ours.checkpoint.keep_last == 0
    assert ours.data.path == str(inputs["images"]) and ours.prior.path == str(inputs["prior"])
    assert fid.metric == "fid" and fid.fid.num_samples == check.args.fid_samples
    assert calls[0][2] == tmp_path / "train" / "face_ours"


def shadowed(tmp_path: Path, package: str) -> Path:
    """A folder whose `package` fails to import, first on the path: a machine without it."""
    site = tmp_path / "site"
    (site / package).mkdir(parents=True)
    (site / package / "__init__.py").write_text(f"raise ImportError('no {package} on this machine')\n")
    return site


def test_gpu_check_recipe_stops_without_wheels_when_an_import_fails(tmp_path):
    """make gpu-check with no .whl/ and a package missing fails in the preflight (--preflight-only), before any
    section, naming what is missing and the fix."""
    checkout = tmp_path / "checkout"  # the checkout as carried without .whl/
    checkout.mkdir()
    for name in ("Makefile", "benchmarks", "ccp", "tests"):
        (checkout / name).symlink_to(ROOT / name)
    # torch, not diffusers, is the one missing: everything then fails at once, which keeps this test at seconds
    proc = subprocess.run(["make", "--no-print-directory", "gpu-check", f"GPU_PY={sys.executable}",
                           f"GPU_SITE={shadowed(tmp_path, 'torch')}", "ARGS=--smoke"],
                          cwd=checkout, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "no .whl/" in proc.stderr and "STOPPED before any section" in proc.stderr
    assert "MISSING torch" in proc.stderr and "MISSING diffusers" in proc.stderr  # each one named
    assert "make gpu-wheels" in proc.stderr and "[gpu-check" not in proc.stdout


def test_out_names_the_folder_that_comes_back():
    dry = subprocess.run(["make", "-n", "--no-print-directory", "gpu-check", "ARGS=--out /device/out"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30).stdout
    run_line = dry.strip().splitlines()[-1]
    assert run_line.count("--out") == 1 and run_line.endswith("--out /device/out")
    gpu_check = load_gpu_check()
    assert gpu_check.parse_args(["--smoke"]).out == "benchmarks/results"



# --- the pieces the GPU alone exercises, driven here with known inputs -------------------------------
def test_step_probe_counts_sync_warnings_of_the_window_steps_with_their_lines(monkeypatch):
    """torch.cuda.set_sync_debug_mode("warn") turns every synchronizing call into a warning with the
    Python line that made it; the probe counts them per step inside its window and shows every other warning."""
    import warnings

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import real_path
    from ccp.training.module import PersonalizationModule

    calls = []
    monkeypatch.setattr(PersonalizationModule, "on_train_batch_start", lambda self, *a: calls.append(a))

    class Module:  # what the probe reads of the LightningModule
        method = type("M", (), {"trainable_parameters": lambda self: [torch.zeros(3, dtype=torch.float32)]})()

    probe = real_path.StepProbe(torch.device("cpu"), range(1, 3))
    shown = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a filter set before the probe must not hide the counted warnings
        monkeypatch.setattr(warnings, "showwarning", lambda *a, **k: shown.append(str(a[0])))
        with probe.installed():
            for step, syncs in enumerate([2, 3, 1, 4]):
                PersonalizationModule.on_train_batch_start(Module(), {"x": 0}, step)
                for _ in range(syncs):
                    warnings.warn("called a synchronizing CUDA operation")  # this line, every time
                warnings.warn("something else", RuntimeWarning)
    assert [c[1] for c in calls] == [0, 1, 2, 3]  # the module's own hook still runs, once per step
    assert probe.syncs == {1: 3, 2: 1}  # steps 0 and 3 are outside the window
    (where, count), = probe.where.items()
    assert where.startswith("test_gpu_check.py:") and count == 4
    assert probe.trainable_bytes == 12
    # outside the window sync warnings pass on to the usual display; other warnings keep the caller's filters
    assert shown.count("called a synchronizing CUDA operation") == 6 and "something else" not in shown


def test_largest_batch_extrapolates_the_per_image_memory_of_one_run():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import real_path

    gib = 2**30
    # 10 GiB at a step's start + 3 GiB of gradients; peak 21 GiB at batch 4: 2 GiB per image;
    # 0.92 x 80 GiB = 73.6 GiB leaves room for 30 images (73.6 - 13 = 60.6)
    plan = real_path.largest_batch(4, 21 * gib, 10 * gib, 3 * gib, 80 * gib)
    assert plan["batch"] == 30 and plan["per_image_gib"] == pytest.approx(2.0) and plan["base_gib"] == pytest.approx(13.0)
    assert plan["predicted_peak_gib"] == pytest.approx(73.0)
    assert real_path.largest_batch(4, 21 * gib, 10 * gib, 3 * gib, 24 * gib)["batch"] == 4  # (22.08 - 13) / 2
    with pytest.raises(ValueError, match="not above the batch-independent part"):
        real_path.largest_batch(4, 12 * gib, 10 * gib, 3 * gib, 80 * gib)
