"""Guidance-weight sweeps: the grid, collecting a multirun folder, and the selection rule."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ccp.evaluation.sweeps import (
    CollectSweep,
    collect_results,
    grid_override,
    main,
    select_best,
    summarize_sweep,
    weight_grid,
)


def test_weight_grid_is_inclusive_and_exact():
    assert weight_grid(1.0, 2.0) == [1.0, 1.25, 1.5, 1.75, 2.0]
    assert len(weight_grid(1.0, 7.5)) == 27 and weight_grid(1.0, 7.5)[-1] == 7.5
    assert weight_grid(0.1, 0.5, 0.1) == [0.1, 0.2, 0.3, 0.4, 0.5]  # no 0.30000000000000004
    assert weight_grid(1.0, 2.1) == [1.0, 1.25, 1.5, 1.75, 2.0]  # stop off the grid: the last point below it
    assert weight_grid(3, 3) == [3.0]
    assert all(str(v) == repr(v) and len(str(v)) <= 4 for v in weight_grid(0.0, 10.0))
    assert grid_override(1.0, 1.5) == "1.0,1.25,1.5"
    with pytest.raises(ValueError, match="step must be positive"):
        weight_grid(1.0, 2.0, 0.0)
    with pytest.raises(ValueError, match="below start"):
        weight_grid(2.0, 1.0)


def _result(folder, metric, value, concept=1.0, control=5.0, method="ours", run="face_ours"):
    folder.mkdir(parents=True)
    better = "lower" if metric == "fid" else "higher"
    (folder / "result.json").write_text(json.dumps({
        "run": run, "method": method, "metric": metric, "condition": "unconditional" if metric == "fid" else metric,
        "value": value, "better": better, "concept_weight": concept, "control_weight": control,
        "default_weights": {"concept_weight": 1.0, "control_weight": 5.0}, "num_images": 4, "details": {},
    }))


@pytest.fixture
def sweep_dir(tmp_path):
    root = tmp_path / "multirun"
    # ours, FID over concept_weight: 1.5 and 2.0 tie at 6.0 -> 1.5 is closer to the default 1.0
    for k, (w, v) in enumerate([(1.0, 9.0), (1.5, 6.0), (2.0, 6.0), (2.5, 7.0)]):
        _result(root / f"{k}_guidance.concept_weight={w}", "fid", v, concept=w)
    # dreambooth, text over control_weight: 4.0 and 6.0 tie at 0.5, equally far from 5.0 -> the smaller
    for k, (w, v) in enumerate([(3.0, 0.25), (4.0, 0.5), (6.0, 0.5), (7.0, float("nan"))]):
        _result(root / f"{10 + k}_ctl={w}", "text", v, control=w, method="dreambooth", run="face_dreambooth")
    return root


def test_collect_reads_every_point(sweep_dir):
    rows = collect_results(sweep_dir)
    assert len(rows) == 8
    fid = [r for r in rows if r["metric"] == "fid"]
    assert [r["concept_weight"] for r in fid] == [1.0, 1.5, 2.0, 2.5]
    assert fid[1]["path"] == "1_guidance.concept_weight=1.5" and fid[1]["value"] == 6.0
    assert math.isnan([r for r in rows if r["control_weight"] == 7.0][0]["value"])
    with pytest.raises(FileNotFoundError):
        collect_results(sweep_dir / "missing")


def test_selection_best_point_and_ties(sweep_dir):
    by_method = {e["method"]: e for e in select_best(collect_results(sweep_dir))}
    ours = by_method["ours"]
    assert (ours["value"], ours["concept_weight"], ours["control_weight"]) == (6.0, 1.5, 5.0)
    assert [t["concept_weight"] for t in ours["tied"]] == [1.5, 2.0]
    assert [p["value"] for p in ours["curve"]] == [9.0, 6.0, 6.0, 7.0]
    assert ours["distance_to_default"] == 0.5 and ours["num_points"] == 4
    db = by_method["dreambooth"]
    assert (db["value"], db["control_weight"]) == (0.5, 4.0)  # highest; tie at equal distance -> smaller weight
    assert db["curve"][-1]["value"] is None  # the NaN point stays in the curve, never selected
    # within a tolerance the default-closest point wins even if slightly worse
    ours_tol = {e["method"]: e for e in select_best(collect_results(sweep_dir), tie_tolerance=3.0)}["ours"]
    assert ours_tol["concept_weight"] == 1.0


def test_summaries_and_the_hydra_callback(sweep_dir, tmp_path):
    selection = summarize_sweep(sweep_dir, tmp_path / "out")
    with open(tmp_path / "out" / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 8 and table[0]["metric"] in ("fid", "text")
    assert json.loads((tmp_path / "out" / "selection.json").read_text()) == json.loads(json.dumps(selection))
    assert len(json.loads((tmp_path / "out" / "sweep.json").read_text())) == 8

    CollectSweep().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}}))
    assert (sweep_dir / "selection.json").is_file()
    # a folder without results is logged, not raised
    CollectSweep().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "none")}}}))


def test_module_cli(sweep_dir, capsys):
    main(["grid", "1", "2"])
    assert capsys.readouterr().out.strip() == "1.0,1.25,1.5,1.75,2.0"
    main(["collect", str(sweep_dir)])
    out = capsys.readouterr().out
    assert "face_ours\tours\tfid\tbest=6.0\tconcept_weight=1.5" in out


def test_a_sweep_point_with_many_overrides_gets_a_folder_name_the_file_system_takes(tmp_path):
    # 13 overrides made a 300-character folder name: "OSError: [Errno 36] File name too long"
    from ccp.config import MAX_DIRNAME, short_dirname

    long = ",".join(f"sampling.option_{i}=value_{i}" for i in range(13))
    short = short_dirname(long)
    assert len(short) == MAX_DIRNAME and short.startswith(long[:100])
    assert short != short_dirname(long + "x")  # the hash keeps points apart
    assert short_dirname("guidance.control_weight=1.5") == "guidance.control_weight=1.5"
    (tmp_path / f"12_{short}").mkdir()  # and the file system takes it
    for name in ("eval.yaml", "sample.yaml"):
        text = (Path(__file__).resolve().parents[1] / "ccp" / "conf" / name).read_text()
        assert "subdir: ${hydra.job.num}_${ccp.dirname:${hydra.job.override_dirname}}" in text
