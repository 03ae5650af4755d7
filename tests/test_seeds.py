"""Several seeds of `ccp-reproduce` (`ccp.reproduce.seeds`): what a seed changes, the checks before
anything runs, a two-seed tiny run end to end (per-seed folders, tables over seeds against a hand
computation, Fig. 9 error bars, sampling spread, claims, environment.json) and its rerun."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

from ccp.reproduce import ReproduceConfigError, compose_reproduce, reproduce
from ccp.reproduce.environment import environment_record, processor_model
from ccp.reproduce.exports import train_config
from ccp.reproduce.seeds import DEFAULT_SEED_STRIDE, run_seeds, seed_config

TINY = ["scale=tiny", "methods=[textual_inversion,ours]", "datasets=[face]", "spatial_alignment.enabled=false",
        "logger=none"]
CLAIMS = ("+claims=[{id: ours_fid_lowest, kind: lowest_in_every_seed, metric: fid, dataset: face, row: ours, "
          "text: ours lowest}, {id: ti_below, kind: below, metric: kid, dataset: face, a: textual_inversion, b: ours, "
          "text: TI KID below ours}]")


def hand_interval(values):
    x = np.asarray(values, dtype=np.float64)
    half = scipy.stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return x.mean() - half, x.mean() + half


def test_seed_config_shifts_training_and_sampling_seeds_and_folders(tmp_path):
    cfg = compose_reproduce(["scale=toy", f"out_dir={tmp_path}", "results_dir=" + str(tmp_path / "results")])
    assert list(cfg.seeds) == [0] and run_seeds(cfg) == [0]
    assert seed_config(cfg, 0, multi=False) is cfg  # one seed: today's run, untouched
    two = seed_config(cfg, 2, multi=True, first=False)
    stride = DEFAULT_SEED_STRIDE
    assert (two.fid.seed, two.text_alignment.seed, two.drift.seed) == (
        cfg.fid.seed + 2 * stride, cfg.text_alignment.seed + 2 * stride, cfg.drift.seed + 2 * stride)
    assert two.train_dir == str(tmp_path / "seeds" / "2" / "train") and two.eval_dir == str(tmp_path / "seeds" / "2" / "eval")
    assert two.results_dir == str(tmp_path / "results" / "seeds" / "2")
    # the instruments and the data stay: same classifier, data folders and prior
    assert two.classifier.path == cfg.classifier.path and two.data.bold.fid_path == cfg.data.bold.fid_path
    assert two.prior.path == cfg.prior.path and two.fid.stats_cache_dir == cfg.fid.stats_cache_dir
    assert train_config(two, "bold", "ours").seed == train_config(cfg, "bold", "ours").seed + 2
    # seed 0 of several: the single run's trainings and records, its own tables
    zero = seed_config(cfg, 0, multi=True)
    assert (zero.train_dir, zero.eval_dir, zero.fid.seed) == (cfg.train_dir, cfg.eval_dir, cfg.fid.seed)
    assert zero.results_dir == str(tmp_path / "results" / "seeds" / "0")
    assert zero.sample_spread.enabled is True and two.sample_spread.enabled is False  # the first seed's models only
    with_prior = compose_reproduce(["scale=toy", f"out_dir={tmp_path}", "prior_seeds=true"])
    own = seed_config(with_prior, 3, multi=True)
    assert own.prior.path == f"{with_prior.prior.path}-seed3" and own.prior.seed == with_prior.seed + 3


@pytest.mark.parametrize("overrides, needle", [
    (["seeds=[0,0]"], "listed twice"),
    (["seeds=[0,-1]"], "integers >= 0"),
    (["seeds=[]"], "non-empty list"),
    (["seeds=3"], "give a list of run seeds"),
    (["seeds=[0,1]", "seed_stride=0"], "seed_stride=0"),
    (["seeds=[0,1]", "sample_spread.sampling_seeds=[0,0]"], "sample_spread.sampling_seeds"),
    (["seeds=[0,1]", "+exports.face.ours=/somewhere/export"], "drop the +exports"),
    (["seeds=[0,1]", "+claims=[{id: c, kind: smallest, metric: fid, dataset: face, text: t}]"], "kind='smallest'"),
    (["seeds=[0,1]", "+claims=[{id: c, kind: below, metric: fid, dataset: face, a: ours, b: dreambooh, text: t}]"],
     "rows ['dreambooh'] are not table rows"),
    (["seeds=[0,1]", "kid.enabled=false", "+claims=[{id: c, kind: below, metric: kid, dataset: face, a: ours, "
      "b: textual_inversion, text: t}]"], "metric kid is not measured"),
])
def test_bad_seed_settings_are_refused_before_anything_runs(tmp_path, overrides, needle):
    cfg = compose_reproduce([*TINY, f"out_dir={tmp_path / 'run'}", *overrides])
    with pytest.raises(ReproduceConfigError, match=None) as err:
        reproduce(cfg, progress=False)
    assert needle in str(err.value)
    assert not (tmp_path / "run").exists()  # nothing was written


def test_prior_seeds_need_a_prior_ccp_trains(tmp_path):
    cfg = compose_reproduce(["scale=full", f"out_dir={tmp_path}", "seeds=[0,1]", "prior_seeds=true"])
    with pytest.raises(ReproduceConfigError, match="prior_seeds=true trains the prior per seed"):
        reproduce(cfg, progress=False)


def test_environment_record_names_processor_threads_and_versions():
    import diffusers

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        record = environment_record("cpu")
    finally:
        torch.set_num_threads(before)
    assert record["torch_threads"] == 1 and record["cpu_count"] >= 1 and record["device"] == "cpu"
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
             if line.lower().startswith("model name")]
    assert record["processor"] == processor_model() == (names[0] if names else (platform.processor() or platform.machine()))
    assert record["processor"]
    libraries = record["libraries"]
    assert libraries["torch"] == torch.__version__ and libraries["numpy"] == np.__version__
    assert libraries["diffusers"] == diffusers.__version__ and "torchmetrics" in libraries
    assert record["python"] == platform.python_version()


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    out = tmp_path_factory.mktemp("seeds")
    cfg = compose_reproduce([*TINY, f"out_dir={out}", "seeds=[0,1]", CLAIMS])
    return out, cfg, reproduce(cfg, progress=False)


def test_two_seeds_write_per_seed_runs_and_tables_over_seeds(two_seeds):
    out, cfg, summary = two_seeds
    results = out / "results"
    assert summary["seeds"] == [0, 1]
    assert sorted(summary["trained"]) == sorted(f"seed {s}: face/{m}" for s in (0, 1) for m in ("textual_inversion", "ours"))
    # seed 0 trains where the single-seed run does, seed 1 in its own folder, with training seed 1
    assert (out / "train" / "face_ours" / "export").is_dir()
    assert (out / "seeds" / "1" / "train" / "face_ours" / "export").is_dir()
    assert "\nseed: 1\n" in (out / "seeds" / "1" / "train" / "face_ours" / "config.yaml").read_text()
    assert (out / "seeds" / "1" / "eval" / "face_ours" / "record.json").is_file()
    per_seed = {s: json.loads((results / "seeds" / str(s) / "table1.json").read_text()) for s in (0, 1)}
    fids = {s: {r["method"]: r["fid_face"] for r in per_seed[s]["rows"]} for s in (0, 1)}
    assert fids[0]["ours"] != fids[1]["ours"]  # other weights, other samples
    # each number over seeds: the mean and the Student t interval of the per-seed tables' numbers
    rows = {r["method"]: r for r in json.loads((results / "table1.json").read_text())["rows"]}
    md = (results / "table1.md").read_text()
    for m in ("textual_inversion", "ours"):
        values = [fids[0][m], fids[1][m]]
        low, high = hand_interval(values)
        assert rows[m]["fid_face"] == pytest.approx(np.mean(values))
        assert (rows[m]["fid_face_low"], rows[m]["fid_face_high"]) == (pytest.approx(low), pytest.approx(high))
        assert f"{np.mean(values):.2f} [{low:.2f}, {high:.2f}]" in md
        assert rows[m]["kid_face"] is not None
    assert "Student t over seeds" in md and "2 seeds [0, 1]" in md
    text = {s: {r["method"]: r["text_alignment"] for r in json.loads(
        (results / "seeds" / str(s) / "table2.json").read_text())["rows"]} for s in (0, 1)}
    rows2 = {r["method"]: r for r in json.loads((results / "table2.json").read_text())["rows"]}
    assert rows2["ours"]["text_alignment"] == pytest.approx((text[0]["ours"] + text[1]["ours"]) / 2)

    # Fig. 9 over seeds carries error bars; each seed's folder has its own figures
    assert summary["figures"]["fig9"] == str(results / "fig9_fidelity_controllability.png")
    for s in (0, 1):
        assert (results / "seeds" / str(s) / "fig9_fidelity_controllability.png").is_file()
        assert (results / "seeds" / str(s) / "fig8a_weight_grid.png").is_file()

    # the first seed's models sampled at a second sampling seed: its first FID is the table's
    spread = {r["method"]: r for r in json.loads((results / "table_spread.json").read_text())["rows"]}
    record0 = {r["method"]: r for r in per_seed[0]["records"]}
    for m in ("textual_inversion", "ours"):
        sampled = record0[m]["fid_sampling"]
        assert sampled["sampling_seeds"] == [0, 1] and sampled["fid"][0] == fids[0][m]
        assert spread[m]["sampling_mean"] == pytest.approx(np.mean(sampled["fid"]))
        assert spread[m]["seeds_mean"] == pytest.approx(np.mean([fids[0][m], fids[1][m]]))
    assert "fid_sampling" not in json.loads((results / "seeds" / "1" / "table1.json").read_text())["records"][0]

    # claims, checked on the per-seed numbers
    claims = {c["id"]: c for c in json.loads((results / "claims.json").read_text())["claims"]}
    lowest = fids[0]["ours"] < fids[0]["textual_inversion"] and fids[1]["ours"] < fids[1]["textual_inversion"]
    assert claims["ours_fid_lowest"]["verdict"] == ("holds" if lowest else "does not hold")
    assert claims["ti_below"]["verdict"] in ("holds", "does not hold")
    assert "| ours lowest |" in (results / "claims.md").read_text()

    # environment.json in the aggregate folder and every seed's
    for folder in (results, results / "seeds" / "0", results / "seeds" / "1"):
        env = json.loads((folder / "environment.json").read_text())
        assert env["processor"] == processor_model() and env["torch_threads"] == cfg.threads
        assert env["libraries"]["torch"] == torch.__version__


def test_two_seeds_rerun_reuses_every_seed_and_one_seed_is_seed_zero(two_seeds, monkeypatch):
    out, cfg, first = two_seeds
    import ccp.pipelines.gcfg
    import ccp.reproduce.exports

    def forbidden(*args, **kwargs):
        raise AssertionError("the rerun trained or sampled")

    monkeypatch.setattr(ccp.reproduce.exports, "run_training", forbidden)
    monkeypatch.setattr(ccp.pipelines.gcfg.GCFGPipeline, "__call__", forbidden)
    table = (out / "results" / "table1.json").read_text()
    second = reproduce(compose_reproduce([*TINY, f"out_dir={out}", "seeds=[0,1]", CLAIMS]), progress=False)
    assert second["trained"] == [] and second["computed"] == {}
    assert json.loads((out / "results" / "table1.json").read_text())["rows"] == json.loads(table)["rows"]
    # the single-seed run is seed 0: nothing to train or measure, and its tables are seed 0's
    single = reproduce(compose_reproduce([*TINY, f"out_dir={out}", f"results_dir={out / 'single'}",
                                          "figures.enabled=false"]), progress=False)
    assert single["trained"] == [] and single["computed"] == {}
    assert (json.loads((out / "single" / "table1.json").read_text())["rows"]
            == json.loads((out / "results" / "seeds" / "0" / "table1.json").read_text())["rows"])
    assert not (out / "single" / "seeds").exists() and (out / "single" / "environment.json").is_file()
