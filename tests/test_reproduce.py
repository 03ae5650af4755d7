"""`make reproduce-tables` at tiny scale end to end (train 5 methods x 2 datasets, FID, alignment,
tables, figures), its rerun without retraining, and the table/figure helpers on their own."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from ccp.reproduce import ReproduceConfigError, compose_reproduce, reproduce
from ccp.reproduce.config import check_inputs, export_dir
from ccp.reproduce.tiny import MeanColourPredictor
from ccp.evaluation.figures import (
    GAP,
    fidelity,
    fidelity_control_scatter,
    rectified_guidance,
    tile_grid,
)
from ccp.evaluation.tables import PAPER, format_params, table1_markdown, table1_rows, table2_rows, write_tables
from ccp.guidance import Condition, GuidanceSpec, GuidanceTerm, Source

METHODS = ["textual_inversion", "dreambooth", "custom_diffusion", "oft", "ours"]
LABELS = ["Textual Inversion", "DreamBooth", "Custom Diffusion", "OFT", "Ours"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    cfg = compose_reproduce(["scale=tiny", f"out_dir={out}"])
    summary = reproduce(cfg, progress=False)
    return cfg, summary


def _md_rows(path: Path) -> list[list[str]]:
    lines = [l for l in path.read_text().splitlines() if l.startswith("| ")]
    return [[c.strip() for c in l.strip("|").split("|")] for l in lines[2:]]  # skip header and rule


def test_tiny_run_writes_one_row_per_method_matching_the_json(tiny_run):
    cfg, summary = tiny_run
    results = Path(cfg.results_dir)
    assert sorted(summary["trained"]) == sorted(f"{d}/{m}" for d in ("face", "animal") for m in METHODS)
    data1 = json.loads((results / "table1.json").read_text())
    rows1 = data1["rows"]
    assert [r["method"] for r in rows1] == METHODS
    md1 = _md_rows(results / "table1.md")
    assert [r[0] for r in md1] == LABELS
    for row, md in zip(rows1, md1):
        assert row["params"] > 0 and isinstance(row["params"], int)
        for d in ("face", "animal"):
            assert math.isfinite(row[f"fid_{d}"]) and row[f"fid_{d}"] >= 0
        assert md[1] == format_params(row["params"])
        assert md[2] == f"{row['fid_face']:.2f}" and md[3] == f"{row['fid_animal']:.2f}"
        assert md[5] == f"{PAPER[row['method']].fid['face']:.2f}"  # the paper's column
    # records in the JSON are what the rows came from
    by_key = {(r["method"], r["dataset"]): r for r in data1["records"]}
    for row in rows1:
        assert row["fid_face"] == by_key[(row["method"], "face")]["fid"]
        assert row["fid_animal"] == by_key[(row["method"], "animal")]["fid"]
    # textual inversion trains one token row; dreambooth the whole UNet
    params = {r["method"]: r["params"] for r in rows1}
    assert params["textual_inversion"] < params["oft"] < params["dreambooth"]
    csv_rows = list(csv.DictReader(io.StringIO((results / "table1.csv").read_text())))
    assert [float(r["fid_face"]) for r in csv_rows] == [r["fid_face"] for r in rows1]

    rows2 = json.loads((results / "table2.json").read_text())["rows"]
    assert [r["method"] for r in rows2] == METHODS
    md2 = _md_rows(results / "table2.md")
    assert [r[0] for r in md2] == LABELS
    for row, md in zip(rows2, md2):
        assert 0.0 <= row["text_alignment"] <= 1.0 and 0.0 <= row["spatial_alignment"] <= 1.0
        assert md[1] == f"{row['text_alignment']:.2f}" and md[2] == f"{row['spatial_alignment']:.2f}"
        assert md[-2] == f"{PAPER[row['method']].text_alignment:.2f}"
    # the per-cell evaluation files behind the numbers
    text = json.loads((Path(cfg.eval_dir) / "face_ours" / "text_alignment.json").read_text())
    assert text["mean"] == rows2[-1]["text_alignment"] and text["num_images"] == 3 * 2
    spatial = json.loads((Path(cfg.eval_dir) / "face_ours" / "spatial_alignment.json").read_text())
    assert spatial["mean_f1"] == rows2[-1]["spatial_alignment"] and spatial["count"] == 2
    # ours' reference: the same spatial guidance without the concept term (the prior's ControlNet term alone)
    reference = json.loads((Path(cfg.eval_dir) / "face_ours" / "spatial_alignment_prior.json").read_text())
    assert rows2[-1]["spatial_alignment_prior"] == reference["mean_f1"] and reference["count"] == 2
    assert reference["config"]["concept_weight"] == 0.0 and spatial["config"]["concept_weight"] == 1.0
    assert all(r["spatial_alignment_prior"] is None for r in rows2[:-1])
    assert md2[-1][3] == f"{reference['mean_f1']:.2f}" and md2[0][3] == "-"  # its column, after the spatial one


def test_tiny_run_figures(tiny_run):
    cfg, summary = tiny_run
    results = Path(cfg.results_dir)
    for name in ("fig9_fidelity_controllability.png", "fig8a_weight_grid.png", "fig8b_rectification.png"):
        assert (results / name).is_file(), name
    tile = 64
    # Fig. 8a: 3 concept weights (rows) x 3 control weights (cols) of 64 px tiles
    grid = PIL.Image.open(results / "fig8a_weight_grid_grid.png")
    assert grid.size == (3 * tile + 2 * GAP, 3 * tile + 2 * GAP)
    # Fig. 8a with the ControlNet: 2 concept weights (rows) x (the edge map | 2 ControlNet-term weights)
    spatial = PIL.Image.open(results / "fig8a_weight_grid_controlnet_grid.png")
    assert spatial.size == (3 * tile + 2 * GAP, 2 * tile + GAP)
    tiles = np.asarray(spatial.convert("RGB")).astype(int)
    first, second = tiles[:tile, :tile], tiles[tile + GAP:, :tile]
    assert np.array_equal(first, second) and set(np.unique(first)) <= {0, 255}  # every row starts with the edge map
    # concept 0, ControlNet 0 is the prior's unconditional sample; a ControlNet weight changes it
    assert not np.array_equal(tiles[:tile, tile + GAP:2 * tile + GAP], tiles[:tile, 2 * (tile + GAP):])
    # Fig. 8b: 3 baselines (rows) x (2 seeds own | 2 seeds prior) columns
    rect = PIL.Image.open(results / "fig8b_rectification_grid.png")
    assert rect.size == (4 * tile + 3 * GAP, 3 * tile + 2 * GAP)
    assert PIL.Image.open(results / "fig8b_rectification.png").size[0] > rect.size[0]  # labelled version
    # the scatter puts each method at (-ln(FID/100), text alignment)
    records = json.loads((results / "table1.json").read_text())["records"]
    scatter = fidelity_control_scatter(records, results / "fig9_check.png")
    assert PIL.Image.open(scatter.path).size == scatter.size == (640, 480)
    face = {r["method"]: r for r in records if r["dataset"] == "face"}
    assert list(scatter.points) == METHODS
    for m, (x, y) in scatter.points.items():
        assert x == pytest.approx(-math.log(face[m]["fid"] / 100), abs=1e-12)
        assert y == pytest.approx(face[m]["text_alignment"], abs=1e-12)
    areas = scatter.areas
    assert areas["dreambooth"] / areas["oft"] == pytest.approx(face["dreambooth"]["params"] / face["oft"]["params"])


def test_rerun_reuses_exports_and_results(tiny_run):
    cfg, first = tiny_run
    exports = {(d, m): export_dir(cfg, d, m) / "ccp_export.json" for d in cfg.datasets for m in cfg.methods}
    mtimes = {k: p.stat().st_mtime_ns for k, p in exports.items()}
    table = (Path(cfg.results_dir) / "table1.json").read_text()
    second = reproduce(cfg, progress=False)
    assert second["trained"] == []
    assert second["computed"] == {}  # every metric reused
    assert {k: p.stat().st_mtime_ns for k, p in exports.items()} == mtimes
    assert json.loads((Path(cfg.results_dir) / "table1.json").read_text())["rows"] == json.loads(table)["rows"]
    assert second["records"] == first["records"]


def test_full_scale_lists_every_missing_input_before_anything_runs(tmp_path):
    cfg = compose_reproduce(["scale=full", f"out_dir={tmp_path}", f"prior.path={tmp_path / 'no-sd'}",
                       f"data.face.path={tmp_path / 'no-ffhq'}", f"fid.inception_weights={tmp_path / 'no.pth'}",
                       f"text_alignment.clip_weights={tmp_path / 'no-clip.pt'}",
                       f"spatial_alignment.condition_dir={tmp_path / 'no-celeba'}", f"controlnet={tmp_path / 'no-cn'}",
                       f"train_dir={tmp_path / 'train'}"])
    assert cfg.fid.num_samples == 50_000 and cfg.text_alignment.images_per_prompt == 100
    assert cfg.spatial_alignment.num_conditions == 200 and cfg.spatial_alignment.samples_per_condition == 5
    with pytest.raises(ReproduceConfigError) as err:
        reproduce(cfg, progress=False)
    message = str(err.value)
    for needle in ("prior.path", "data.face.path", "weights-inception", "clip_weights", "condition_dir",
                   "controlnet=", "no ccp-train export for face/textual_inversion", "animal/ours"):
        assert needle in message, needle
    assert list(tmp_path.iterdir()) == []  # nothing was written
    with pytest.raises(MissingConfigException, match="scale.*huge"):  # Hydra lists the scales there are
        compose_reproduce(["scale=huge"])


def test_tables_from_records_and_paper_reference():
    records = [
        {"method": "ours", "dataset": "face", "params": 815_533_444, "fid": 6.0, "text_alignment": 0.9,
         "spatial_alignment": 0.5},
        {"method": "ours", "dataset": "animal", "params": 815_533_444, "fid": 19.0},
        {"method": "textual_inversion", "dataset": "face", "params": 768, "fid": 70.0, "text_alignment": 1.0,
         "spatial_alignment": None},
    ]
    rows = table1_rows(records)
    assert [r["method"] for r in rows] == ["textual_inversion", "ours"]  # the paper's order
    assert rows[0]["fid_animal"] is None and rows[1]["paper_fid_animal"] == 18.82
    md = table1_markdown(rows)
    assert "| Textual Inversion | 768 | 70.00 | - | <1K | 70.62 | 44.75 |" in md
    assert "| Ours | 816M | 6.00 | 19.00 | 859M | 6.57 | 18.82 |" in md
    assert [r["spatial_alignment"] for r in table2_rows(records)] == [None, 0.5]
    assert format_params(43_963_328) == "44M" and format_params(11_602_368) == "11.6M"
    with pytest.raises(ValueError, match="two result records"):
        table1_rows(records + [records[0]])


def test_write_tables_is_complete(tmp_path):
    records = [{"method": m, "dataset": d, "params": i + 1, "fid": 10.0 + i, "text_alignment": 0.1 * i,
                "spatial_alignment": 0.2} for i, m in enumerate(METHODS) for d in ("face", "animal")]
    paths = write_tables(records, tmp_path)
    assert sorted(paths) == sorted(f"table{k}.{e}" for k in (1, 2) for e in ("md", "csv", "json"))
    assert not list(tmp_path.glob(".*.tmp"))
    data = json.loads(paths["table2.json"].read_text())
    assert data["paper"]["ours"]["text_alignment"] == 0.89 and len(data["rows"]) == 5


def test_rectified_guidance_changes_only_the_unconditional():
    spec = GuidanceSpec(terms=(GuidanceTerm("prompt", Source("dreambooth", Condition(prompt="a photo of face")), 5.0),),
                        unconditional=Source("dreambooth", Condition(prompt="")))
    rect = rectified_guidance(spec)
    assert rect.terms == spec.terms
    assert rect.unconditional == Source("prior", Condition(prompt=""))


def test_tile_grid_layout():
    colours = [[(255, 0, 0), (0, 255, 0)], [(0, 0, 255), (9, 9, 9)]]
    images = [[PIL.Image.new("RGB", (5, 3), c) for c in row] for row in colours]
    grid = np.asarray(tile_grid(images, gap=2))
    assert grid.shape == (3 * 2 + 2, 5 * 2 + 2, 3)
    for r in range(2):
        for c in range(2):
            assert tuple(grid[r * 5, c * 7]) == colours[r][c]
    assert tuple(grid[3, 0]) == (255, 255, 255)  # the gap


def test_mean_colour_predictor_and_fidelity_axis():
    predictor = MeanColourPredictor()
    images = [PIL.Image.new("RGB", (4, 4), c) for c in [(220, 40, 40), (40, 40, 220), (240, 240, 240), (20, 20, 20)]]
    assert predictor.predict(images, "red tint").tolist() == [True, False, False, False]
    assert predictor.predict(images, "blue tint").tolist() == [False, True, False, False]
    assert predictor.predict(images, "bright light").tolist() == [False, False, True, False]
    assert fidelity(100.0) == 0.0 and fidelity(10.0) == pytest.approx(math.log(10))
    with pytest.raises(ValueError):
        fidelity(0.0)


def test_check_inputs_without_training_needs_exports(tmp_path):
    cfg = compose_reproduce(["scale=tiny", f"out_dir={tmp_path}", "train_missing=false"])
    with pytest.raises(ReproduceConfigError, match="no ccp-train export for face/textual_inversion"):
        check_inputs(cfg)
    assert OmegaConf.select(cfg, "exports.face.ours") is None


def test_ccp_reproduce_console_script_runs_a_cell_and_prints_the_tables(tmp_path, monkeypatch, capsys):
    """The Hydra entry point composes a ccp-train config per cell inside its own Hydra app."""
    import sys

    from ccp.cli import reproduce as cli

    monkeypatch.setattr(sys, "argv", ["ccp-reproduce", "scale=tiny", f"out_dir={tmp_path}", "methods=[ours]",
                                      "datasets=[face]", "figures.enabled=false", "spatial_alignment.enabled=false"])
    cli.main()
    printed = capsys.readouterr().out
    assert "| Ours |" in printed and "trained: ['face/ours']" in printed
    rows = json.loads((tmp_path / "results" / "table1.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["ours"] and math.isfinite(rows[0]["fid_face"])
    assert list((tmp_path / "logs").glob("*/.hydra/config.yaml"))  # the run's resolved config is kept


def test_tiny_reproduction_on_the_tiny_sdxl_prior(tmp_path):
    """prior.family=sdxl writes the tiny SDXL prior; the methods train and evaluate on it unchanged."""
    cfg = compose_reproduce(["scale=tiny", f"out_dir={tmp_path}", "prior.family=sdxl",
                             "methods=[textual_inversion,ours]", "datasets=[face]", "figures.enabled=false",
                             "spatial_alignment.enabled=false"])
    reproduce(cfg, progress=False)
    index = json.loads((Path(str(cfg.prior.path)) / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    rows = {r["method"]: r for r in json.loads((tmp_path / "results" / "table1.json").read_text())["rows"]}
    assert rows.keys() == {"textual_inversion", "ours"} and math.isfinite(rows["ours"]["fid_face"])
    assert rows["textual_inversion"]["params"] == 32 + 32  # one token row per SDXL text encoder
