"""benchmarks/gpu_check.py: its --smoke run (the GPU check's code path, tiny, on the CPU), its budget,
its tokenizer fallback for a bare torch machine, and the Makefile's wheel pins."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SECTIONS = {"sampling", "null_text_forward", "training", "training_steady", "cost", "validation_memory", "sampling_sdxl",
            "training_compile"}
TARGETS = {"ours_training_images_per_s", "gcfg_three_term_unet_rows_per_s", "gcfg_a_over_d",
           "null_text_forward_time_ratio_minus_flop_ratio"}


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
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_check_smoke_cpu.json"], files  # no temporary file left behind
    return proc.stdout, strict_json(out / "gpu_check_smoke_cpu.json")


def test_every_section_runs_and_is_written_as_it_ends(smoke):
    log, result = smoke
    sections = result["sections"]
    assert set(sections) == SECTIONS
    for name, section in sections.items():
        assert section["status"] == "done", (name, section.get("reason"), section.get("error"))
        assert not section.get("skipped_variants"), name
        assert section["wall_s"] >= 0
    assert result["complete"] is True and result["mode"] == "smoke"
    assert result["machine"]["device"] == "cpu" and result["preflight"]["missing"] == {}
    # one atomic write after each section, each logged with its progress line
    assert sum("] wrote " in line for line in log.splitlines()) >= len(SECTIONS)
    order = ["sampling", "null_text_forward", "training", "training_steady", "cost", "validation_memory", "sampling_sdxl",
             "training_compile"]
    starts = [sections[name]["started_s"] for name in order]
    assert starts == sorted(starts)  # in this order, the one whose time cannot be predicted (compile) last
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
    assert cost["hours"]["train ours"] > 0 and cost["hours"]["FID ours"] > 0
    assert cost["totals"]["all"] == pytest.approx(sum(cost["hours"].values()))
    assert set(cost["totals"]) == {"training", "FID", "alignment", "all"}
    assert cost["recipe"]["train_steps"] > 0 and "| **all** |" in cost["markdown"]

    targets = result["targets"]
    assert set(targets) == TARGETS
    for name, target in targets.items():
        assert isinstance(target["pass"], bool), name
        assert isinstance(target["value"], float) and target["target"].split()[0] in (">=", "<=")
        bound = float(target["target"].split()[1])
        assert target["pass"] == (target["value"] >= bound if target["target"].startswith(">=") else target["value"] <= bound)


def test_a_budget_too_small_skips_every_section_with_its_reason(tmp_path):
    gpu_check = load_gpu_check()
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
    for name in [m for m in sys.modules if m == "clip" or m.startswith("clip.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pkg_resources", None)  # import pkg_resources -> ImportError
    monkeypatch.setitem(sys.modules, "torchvision", None)
    how = gpu_check.ensure_clip_tokenizer()
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
