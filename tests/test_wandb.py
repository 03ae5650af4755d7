"""Every job on wandb, offline: what a training, an evaluation and a reproduction logged is read
back from the offline run files (the transaction log `wandb sync` uploads and the run's media),
and the dashboard's report spec is parsed back into panels."""

from __future__ import annotations

import csv
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from ccp.config import compose
from ccp.tracking import (
    EVAL_COLUMNS,
    EVAL_TABLE_KEY,
    FIGURE_KEYS,
    TABLE_KEYS,
    TRAIN_CURVES,
    TRAIN_STEP,
    TrackingConfigError,
    experiment_group,
    group_for,
    log_reproduction,
    run_id,
)


@pytest.fixture(autouse=True)
def offline_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-default"))  # a run given no folder would land here


# --- reading an offline run ------------------------------------------------------------------------
# wandb >= 0.20 has no Python reader of its run log; the format is LevelDB's log (32 KiB blocks of
# crc32, length, type records) after a 7-byte ":W&B" header, each record a wandb_internal Record.
def _records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # block padding
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, or last piece
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(run_dir: Path) -> dict:
    """{id, group, job_type, name, config, history (list of dicts), summary (flat dict), dir}."""
    import wandb

    # The log is written by the wandb-core service process, not by us: run.finish() returns once the exit
    # record is handled, but the stream that buffers and closes the file is shut down asynchronously
    # (inform_finish is fire-and-forget). On a loaded 2-core machine 1 finish in 12 left the file at its 7-byte
    # header. teardown() joins the service process, so its writer has closed the file; the next wandb.init
    # starts a new service.
    wandb.teardown()
    (log,) = run_dir.glob("*.wandb")
    out = {"history": [], "summary": {}, "dir": run_dir}
    for record in _records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(id=run.run_id, group=run.run_group, job_type=run.job_type, name=run.display_name,
                       config={u.key: json.loads(u.value_json) for u in run.config.update})
        elif kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            for u in record.summary.update:
                out["summary"][_key(u)] = json.loads(u.value_json)
    assert "id" in out, f"{log} holds no run record ({log.stat().st_size} bytes)"
    return out


def only_run(folder: Path) -> dict:
    runs = sorted((folder / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return read_offline_run(runs[0])


def logged_table(run: dict, key: str) -> tuple[list[str], list[list]]:
    (row,) = [h for h in run["history"] if f"{key}/path" in h]  # logged once
    table = json.loads((run["dir"] / "files" / row[f"{key}/path"]).read_text())
    return table["columns"], table["data"]


def logged_image(run: dict, key: str) -> np.ndarray:
    (row,) = [h for h in run["history"] if f"{key}/path" in h]
    assert row[f"{key}/_type"] == "image-file"
    return np.asarray(PIL.Image.open(run["dir"] / "files" / row[f"{key}/path"]).convert("RGB"))


# --- a tiny trained export, with wandb on ---------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tiny_prior_dir, tmp_path_factory):
    from ccp.training.run import run_training

    root = tmp_path_factory.mktemp("wandb-train")
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir()
    for i in range(4):
        PIL.Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(images / f"{i}.png")
    cfg = compose("train", overrides=["experiment=tiny/ours", f"prior.path={tiny_prior_dir}", f"data.path={images}",
                                      f"data.cache_dir={root / 'cache'}", "logger=default", "trainer.max_steps=3",
                                      "validation.every_n_steps=0", "callbacks.progress_bar=null"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        export = run_training(cfg, root / "tiny_ours")
    return {"root": root, "run_dir": root / "tiny_ours", "export": export, "images": images, "cfg": cfg}


def test_training_logs_its_group_job_type_config_and_the_losses_the_csv_has(trained):
    run = only_run(trained["run_dir"])
    assert run["job_type"] == "train"
    assert run["group"] == "tiny_ours" == trained["cfg"].run_name  # default: the experiment's run name
    assert run["id"] == run_id("train", "tiny_ours", trained["run_dir"])
    assert run["config"]["method"]["name"] == "ours" and run["config"]["trainer"]["max_steps"] == 3

    with open(trained["run_dir"] / "csv" / "version_0" / "metrics.csv") as f:
        csv_loss = {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}
    wandb_loss = {int(h[TRAIN_STEP]): h["train/loss"] for h in run["history"] if "train/loss" in h}
    assert len(csv_loss) == 3 and set(wandb_loss) == set(csv_loss)
    for step, value in csv_loss.items():
        assert wandb_loss[step] == pytest.approx(value, rel=1e-6)
    logged = set().union(*run["history"])
    assert {"train/loss", "train/lr", "train/images_per_s"} <= logged and set(TRAIN_CURVES) <= logged


def test_evaluation_logs_its_result_row_as_a_table_in_the_training_group(trained, tmp_path, monkeypatch):
    from ccp.evaluation import run as eval_run

    cfg = compose("eval", overrides=[f"export.path={trained['export']}", "metric=fid", f"fid.real_path={trained['images']}",
                                     "fid.num_samples=2", "fid.shard_size=2", "fid.feature_extractor=random_conv",
                                     "fid.num_workers=0", f"fid.stats_cache_dir={tmp_path / 'stats'}", "sampling.steps=2",
                                     "sampling.height=64", "sampling.width=64", "guidance.concept_weight=1.5"])
    assert cfg.logger.wandb.enabled and cfg.logger.wandb.mode == "offline"  # eval.yaml's default
    out = tmp_path / "point"
    result = eval_run.run_eval(cfg, out)
    on_disk = json.loads((out / "result.json").read_text())
    run = only_run(out)
    assert (run["job_type"], run["group"]) == ("eval", "tiny_ours")  # joins the training it measures
    columns, data = logged_table(run, EVAL_TABLE_KEY)
    assert columns == list(EVAL_COLUMNS) and data == [[on_disk[c] for c in EVAL_COLUMNS]]
    assert run["summary"]["eval/fid"] == pytest.approx(result["value"]) and run["summary"]["eval/concept_weight"] == 1.5
    assert run["config"]["metric"] == "fid"

    # a finished point rerun (a resumed sweep) logs again under the same run id, loading nothing
    monkeypatch.setattr(eval_run, "load_prior", lambda *a, **k: pytest.fail("loaded a model for a finished point"))
    eval_run.run_eval(cfg, out)
    ids = {read_offline_run(d)["id"] for d in (out / "wandb").glob("offline-run-*")}
    assert ids == {run["id"]}


def test_logger_off_logs_nothing_and_a_bad_mode_fails_before_any_model(trained, tmp_path, monkeypatch):
    from ccp.evaluation import run as eval_run

    base = [f"export.path={trained['export']}", "metric=fid", f"fid.real_path={trained['images']}",
            "fid.feature_extractor=random_conv"]
    monkeypatch.setattr(eval_run, "load_prior", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(TrackingConfigError, match="logger.wandb.mode=offline"):
        eval_run.run_eval(compose("eval", overrides=[*base, "logger.wandb.mode=sometimes"]), tmp_path / "a")
    with pytest.raises(TrackingConfigError, match="logger.wandb.project"):
        eval_run.run_eval(compose("eval", overrides=[*base, "logger.wandb.project=''"]), tmp_path / "b")

    from ccp.tracking import log_job

    cfg = compose("eval", overrides=[*base, "logger.wandb.enabled=false"])
    assert log_job(cfg, "eval", "g", tmp_path / "c", name="x", summary={"v": 1}) is None
    assert not (tmp_path / "c").exists() and not (tmp_path / "wandb-default").exists()


def test_group_is_the_setting_then_the_enclosing_experiment_then_the_jobs_own(tmp_path, monkeypatch):
    cfg = compose("eval")
    assert group_for(cfg, "face_ours") == "face_ours"
    with experiment_group("reproduce-toy"):
        assert group_for(cfg, "face_ours") == "reproduce-toy"
        explicit = compose("eval", overrides=["+logger.wandb.group=ablation"])
        assert group_for(explicit, "face_ours") == "ablation"
    assert group_for(cfg, "face_ours") == "face_ours"
    monkeypatch.chdir(tmp_path)  # the id follows the folder itself, however it is written
    assert run_id("train", "face/ours", "a") == run_id("train", "face/ours", tmp_path / "a")
    assert run_id("train", "face_ours", tmp_path / "a") != run_id("train", "face_ours", tmp_path / "b")
    assert set(run_id("train", "face/ours x", tmp_path)) <= set("abcdefghijklmnopqrstuvwxyz0123456789-_")


def test_wandb_is_imported_only_when_a_run_starts():
    code = ("import sys, ccp.tracking, ccp.dashboard, ccp.cli.dashboard; "
            "print(sorted(m for m in ('wandb', 'wandb_workspaces') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_reproduction_logs_tables_1_2_and_figures_8_9(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    rows1 = [{"method": "ours", "label": "Ours", "params": 993000, "fid_bold": 149.7, "paper_params": "<1K",
              "paper_fid_bold": None},
             {"method": "dreambooth", "label": "DreamBooth", "params": 1077572, "fid_bold": 425.0, "paper_params": "859M",
              "paper_fid_bold": 12.5}]
    rows2 = [{"method": "ours", "label": "Ours", "text_alignment": 0.98, "spatial_alignment": None}]
    tables = {}
    for name, rows in (("table1", rows1), ("table2", rows2)):
        (results / f"{name}.json").write_text(json.dumps({"rows": rows, "records": [], "paper": {}}))
        tables[f"{name}.json"] = str(results / f"{name}.json")
    rng = np.random.default_rng(0)
    figures = {}
    for i, name in enumerate(("fig8a", "fig8b", "fig9")):
        pixels = (rng.random((16 + i, 24, 3)) * 255).astype(np.uint8)
        PIL.Image.fromarray(pixels).save(results / f"{name}.png")
        figures[name] = str(results / f"{name}.png")
    summary = {"tables": tables, "figures": figures, "trained": ["face/ours"], "computed": {"face/ours": ["fid"]},
               "reused": {}, "seconds": 12.5, "scale": "tiny"}
    cfg = compose("reproduce", overrides=["scale=tiny", f"out_dir={tmp_path}"])
    folder = log_reproduction(cfg, summary, "reproduce-tiny")

    run = only_run(tmp_path)
    assert folder == run["dir"]
    assert (run["job_type"], run["group"], run["name"]) == ("reproduce", "reproduce-tiny", "reproduce-tiny")
    columns, data = logged_table(run, TABLE_KEYS["table1"])
    assert columns == list(rows1[0]) and data == [[r[c] for c in columns] for r in rows1]
    columns, data = logged_table(run, TABLE_KEYS["table2"])
    assert columns == list(rows2[0]) and data == [[0.98 if c == "text_alignment" else r[c] for c in columns] for r in rows2]
    for name, path in figures.items():
        np.testing.assert_array_equal(logged_image(run, FIGURE_KEYS[name]), np.asarray(PIL.Image.open(path).convert("RGB")))
    assert run["summary"]["reproduce/trained"] == 1 and run["summary"]["reproduce/seconds"] == 12.5
    assert run["config"]["scale"] == "tiny"


def test_dashboard_spec_lays_out_tables_figures_and_curves(tmp_path, monkeypatch):
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces.reports.v2 import internal

    from ccp.cli import dashboard as cli

    out = tmp_path / "report.json"
    monkeypatch.setattr(sys, "argv", ["ccp-dashboard", f"output={out}", "group=reproduce-toy",
                                      f"hydra.run.dir={tmp_path / 'logs'}"])
    cli.main()  # offline: dry_run=auto writes the spec, nothing is sent
    spec = json.loads(out.read_text())
    assert spec["project"]["name"] == "ccp"
    report = wr.Report._from_model(internal.ReportViewspec.model_validate(spec))
    grids = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    tables, media, lines = {}, {}, {}
    for grid in grids:
        (runset,) = grid.runsets
        assert "reproduce-toy" in runset.filters  # every section narrowed to the group
        for panel in grid.panels:
            if isinstance(panel, wr.WeavePanelSummaryTable):
                tables[panel.table_name] = runset.filters
            elif isinstance(panel, wr.MediaBrowser):
                media.update({key: runset.filters for key in panel.media_keys})
            elif isinstance(panel, wr.LinePlot):
                assert panel.x.name == TRAIN_STEP
                lines.update({y.name: runset.filters for y in panel.y})
    for key in (TABLE_KEYS["table1"], TABLE_KEYS["table2"]):
        assert "'reproduce'" in tables[key]
    for key in FIGURE_KEYS.values():
        assert "'reproduce'" in media[key]
    assert "'eval'" in tables[EVAL_TABLE_KEY]
    assert set(lines) == set(TRAIN_CURVES) and all("'train'" in f for f in lines.values())
    headings = [b.text for b in report.blocks if isinstance(b, wr.H2)]
    assert any(h.startswith("Table 1") for h in headings) and any(h.startswith("Fig. 9") for h in headings)


def test_dashboard_bad_settings_are_named(tmp_path):
    from ccp.dashboard import DashboardConfigError, write_dashboard

    base = [f"output={tmp_path / 'r.json'}"]
    with pytest.raises(DashboardConfigError, match="dry_run=auto"):
        write_dashboard(compose("dashboard", overrides=[*base, "dry_run=maybe"]))
    with pytest.raises(DashboardConfigError, match="logger=default"):
        write_dashboard(compose("dashboard", overrides=[*base, "logger=none"]))
    with pytest.raises(DashboardConfigError, match="group="):
        write_dashboard(compose("dashboard", overrides=[*base, "group=\"it's\""]))
    assert not (tmp_path / "r.json").exists()


def test_a_training_after_another_wandb_run_in_the_same_process_stays_offline(tiny_prior_dir, tmp_path):
    """ccp-reproduce logs a seed's results, then trains the next seed in the same process: the
    training must not fall back to online mode (and ask for an API key) because wandb was set up
    by the earlier run without WANDB_MODE. A fresh process, as a user's command would be."""
    import os
    import subprocess
    import sys

    import numpy as np
    import PIL.Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        PIL.Image.fromarray(np.full((64, 64, 3), 40 * i, dtype=np.uint8)).save(images / f"{i}.png")
    code = f"""
from ccp.config import compose
from ccp.tracking import log_job
from ccp.training.run import run_training
cfg = compose("train", overrides=["experiment=tiny/ours", "prior.path={tiny_prior_dir}", "data.path={images}",
                                  "data.cache_dir={tmp_path / 'cache'}", "logger=default", "trainer.max_steps=1",
                                  "validation.every_n_steps=0"])
log_job(cfg, "eval", "first", "{tmp_path / 'first'}", name="first", summary={{"x": 1.0}})
run_training(cfg, "{tmp_path / 'run'}")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_SILENT="true")  # no API key anywhere
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "the training wrote no offline run"
