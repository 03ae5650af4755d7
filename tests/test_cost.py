"""benchmarks/cost.py: device-hours from benchmark JSON and the configs' recipe."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("cost", ROOT / "benchmarks" / "cost.py")
cost = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cost)


def bench(kind, size="sd15"):
    common = {"benchmark": kind, "machine": {"device": "cuda:0", "gpu": "Test GPU"}, "model": {"size": size}}
    if kind == "training":
        return {**common, "results": {"ours": {"images_per_s": 10.0}, "dreambooth": {"images_per_s": 5.0}}}
    rows = [{"batch": 1, "per_image_s": {"a_batched_gcfg": 99.0, "c_diffusers_cfg": 99.0}},
            {"batch": 8, "per_image_s": {"a_batched_gcfg": 2.0, "c_diffusers_cfg": 1.0}}]
    return {**common, "steps": 20, "results": rows}


def test_recipe_comes_from_the_configs():
    r = cost.recipe()
    assert r["train_steps"] == 100_000 and r["global_batch"] == 32
    assert r["fid_samples"] == 50_000 and r["sampling_steps"] == 100
    assert r["text_images"] == 10 * 100 and r["spatial_images"] == 200 * 5
    assert len(r["methods"]) == 5 and r["datasets"] == ["face", "animal"]


def test_hours_follow_the_measured_speeds():
    r = cost.recipe()
    result = cost.estimate(bench("training"), bench("sampling"), r)
    # by hand: the largest batch (8) prices sampling; per step = per-image seconds / 20 benchmark steps
    ours_image_s, base_image_s = 2.0 / 20 * 100, 1.0 / 20 * 100
    assert result["hours"]["train ours"] == pytest.approx(2 * 100_000 * 32 / 10.0 / 3600)
    assert result["hours"]["train oft"] == pytest.approx(2 * 100_000 * 32 / 5.0 / 3600)
    assert result["hours"]["FID ours"] == pytest.approx(2 * 50_000 * ours_image_s / 3600)
    assert result["hours"]["FID dreambooth"] == pytest.approx(2 * 50_000 * base_image_s / 3600)
    assert result["hours"]["alignment ours"] == pytest.approx(2000 * ours_image_s / 3600)
    assert result["totals"]["all"] == pytest.approx(sum(result["hours"].values()))
    assert result["devices"]["sampling"] == "Test GPU" and result["batch"] == 8
    assert "Test GPU" in cost.markdown(result, r)


def test_other_model_sizes_are_refused_with_the_fix(tmp_path, capsys):
    t, s = tmp_path / "t.json", tmp_path / "s.json"
    t.write_text(json.dumps(bench("training", size="tiny")))
    s.write_text(json.dumps(bench("sampling")))
    with pytest.raises(SystemExit, match="--size sd15 --device cuda"):
        cost.main(["--training", str(t), "--sampling", str(s)])
    with pytest.raises(SystemExit, match="expected a sampling benchmark"):
        cost.main(["--training", str(t), "--sampling", str(t), "--allow-other-size"])
    cost.main(["--training", str(t), "--sampling", str(s), "--allow-other-size", "--json", str(tmp_path / "c.json")])
    assert json.loads((tmp_path / "c.json").read_text())["recipe"]["fid_samples"] == 50_000
