"""`make reproduce-tables SCALE=toy` shrunk to a CPU smoke run: digit concept folders, the digit
classifier, a variant row (DreamBooth (long)), FID, toy text alignment, drift, tables, figures;
then a rerun that trains and samples nothing. The toy prior's trainer (`ccp.toy.prior`) is stood
in for by a fake `ensure_toy_prior` that writes the random tiny prior (64 px)."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ccp.reproduce import ReproduceConfigError, compose_reproduce, reproduce
from ccp.reproduce.config import check_inputs, export_dir
from ccp.reproduce.exports import train_config
from ccp.toy.digits import split_indices

ROWS = ["textual_inversion", "dreambooth", "dreambooth_long", "ours"]
LABELS = ["Textual Inversion", "DreamBooth", "DreamBooth (long)", "Ours"]
ATTRIBUTES = {"a red digit 3": "red digit 3", "a blue digit 7": "blue digit 7"}
PROMPTS = list(ATTRIBUTES)


def toy_config(out: Path, *extra: str):
    """scale=toy with every count shrunk; the tiny prior's 64 px and the tiny experiments."""
    cfg = compose_reproduce([
        "scale=toy", f"out_dir={out}", f"results_dir={out}/results", f"prior.path={out}/toy-prior", "resolution=64",
        "data.bold.train_overrides=['experiment=tiny']", "data.outlined.train_overrides=['experiment=tiny']",
        "train_settings.trainer.max_steps=2", "+train_settings.checkpoint.every_n_steps=2",
        "classifier.settings.epochs=1", "fid.num_samples=8", "fid.shard_size=8", "sampling.steps=2",
        "sampling.batch_size=8", "text_alignment.images_per_prompt=2", "drift.num_samples=4",
        "figures.weight_grid.concept_weights=[0.5,1.5]", "figures.weight_grid.control_weights=[1.0,5.0]",
        "figures.rectification.methods=[dreambooth,dreambooth_long]", "figures.rectification.seeds=[0,1]",
        "++prior.toy_settings={steps: 3}", "long_factor=4", "datasets=[bold,outlined]", "weight_search.datasets=[bold]",
        "weight_search.grid.default={control_weight: [1.0, 5.0]}", "weight_search.grid.ours={concept_weight: [1.0, 2.0]}",
        # FakeToyPrior writes no toy prior marker, so no toy ControlNet and no spatial column here
        # (tests/test_toy_controlnet.py builds one; tests/test_toy_pipeline.py measures the column)
        "toy_controlnet.train_toy=false", "spatial_alignment.enabled=false",
        *extra,
    ])
    cfg.methods = ROWS
    cfg.text_alignment.prompts = PROMPTS
    cfg.text_alignment.attributes = ATTRIBUTES
    return cfg


class FakeToyPrior:
    """Stands in for ccp.toy.prior: writes the tiny prior once, records every call."""

    def __init__(self):
        self.calls: list[dict] = []
        self.writes = 0

    def __call__(self, out_dir, seed=0, progress=True, **settings):
        from ccp.priors.tiny import save_tiny_prior

        self.calls.append({"out_dir": str(out_dir), "seed": seed, **settings})
        folder = Path(out_dir) / "pipeline"
        if not folder.is_dir():
            save_tiny_prior(folder, seed=seed)
            self.writes += 1
        return folder


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce-toy")
    fake = FakeToyPrior()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "ccp.toy.prior", types.SimpleNamespace(ensure_toy_prior=fake))
        cfg = toy_config(out)
        summary = reproduce(cfg, progress=False)
    return out, cfg, summary, fake


def _md_rows(path: Path) -> list[list[str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def test_toy_run_tables_rows_and_variant(toy_run):
    out, cfg, summary, fake = toy_run
    results = out / "results"
    # the toy prior went through the switch, with the configured settings
    assert fake.calls == [{"out_dir": str(out / "toy-prior"), "seed": 0, "steps": 3}] and fake.writes == 1
    assert cfg.prior.path == str(out / "toy-prior" / "pipeline")
    # concept folders: train and held-out splits of each style
    for style in ("bold", "outlined"):
        labels = [json.loads(l) for l in (out / "data" / style / "labels.jsonl").read_text().splitlines()]
        held = [json.loads(l) for l in (out / "data" / f"{style}_held_out" / "labels.jsonl").read_text().splitlines()]
        assert len(labels) == len(split_indices("train")) and len(held) == len(split_indices("held_out"))
        assert {r["style"] for r in labels + held} == {style}
    assert (out / "digit_classifier.safetensors").is_file()
    assert sorted(summary["trained"]) == sorted(f"{d}/{m}" for d in ("bold", "outlined") for m in ROWS)

    # the long row is DreamBooth trained long_factor x as many steps, in its own export and record
    for d in ("bold", "outlined"):
        short = json.loads((export_dir(cfg, d, "dreambooth") / "ccp_export.json").read_text())
        long = json.loads((export_dir(cfg, d, "dreambooth_long") / "ccp_export.json").read_text())
        assert short["method"] == long["method"] == "dreambooth"
        assert long["step"] == cfg.long_factor * short["step"] == 4 * 2
        assert (Path(cfg.eval_dir) / f"{d}_dreambooth_long" / "record.json").is_file()
    assert export_dir(cfg, "bold", "dreambooth_long") != export_dir(cfg, "bold", "dreambooth")

    data1 = json.loads((results / "table1.json").read_text())
    assert [r["method"] for r in data1["rows"]] == ROWS
    md1 = _md_rows(results / "table1.md")
    assert [r[0] for r in md1] == LABELS
    by_key = {(r["method"], r["dataset"]): r for r in data1["records"]}
    for row, md in zip(data1["rows"], md1):
        for d, col in (("bold", 2), ("outlined", 3)):
            assert math.isfinite(row[f"fid_{d}"]) and row[f"fid_{d}"] > 0
            assert row[f"fid_{d}"] == by_key[(row["method"], d)]["fid"]
            assert md[col] == f"{row[f'fid_{d}']:.2f}"
    params = {r["method"]: r["params"] for r in data1["rows"]}
    assert params["dreambooth_long"] == params["dreambooth"] > params["textual_inversion"]
    assert by_key[("dreambooth_long", "bold")]["label"] == "DreamBooth (long)"
    assert by_key[("dreambooth_long", "bold")]["method_class"] == "dreambooth"

    # Table 2 on bold: the both-attributes number, colour only, class only; spatial says n/a
    rows2 = json.loads((results / "table2.json").read_text())["rows"]
    md2 = _md_rows(results / "table2.md")
    assert [r["method"] for r in rows2] == ROWS and [r[0] for r in md2] == LABELS
    for row, md in zip(rows2, md2):
        text = json.loads((Path(cfg.eval_dir) / f"bold_{row['method']}" / "text_alignment.json").read_text())
        assert text["num_images"] == 2 * len(PROMPTS) and row["text_alignment"] == text["mean"]
        assert row["text_alignment_colour"] == text["parts"]["colour"]
        assert row["text_alignment_class"] == text["parts"]["class"]
        # both must hold: never above either part alone
        assert row["text_alignment"] <= min(row["text_alignment_colour"], row["text_alignment_class"])
        assert md[1:4] == [f"{row[k]:.2f}" for k in ("text_alignment", "text_alignment_colour", "text_alignment_class")]
        assert md[4] == "n/a" and row["spatial_alignment"] is None
    assert "n/a (spatial_alignment): not measured at this scale" in (results / "table2.md").read_text()

    # drift: one row per table row, per dataset the FID and both style shares
    drift = json.loads((results / "table_drift.json").read_text())
    assert [r["method"] for r in drift["rows"]] == ROWS
    assert [r[0] for r in _md_rows(results / "table_drift.md")] == LABELS
    prior_share = {d: {r[f"prior_style_share_{d}"] for r in drift["rows"]} for d in ("bold", "outlined")}
    assert all(len(v) == 1 for v in prior_share.values())  # the same prior samples for every row
    for row in drift["rows"]:
        for d in ("bold", "outlined"):
            assert row[f"drift_fid_{d}"] == by_key[(row["method"], d)]["drift"]["fid"]
            assert 0.0 <= row[f"style_share_{d}"] <= 1.0
    # the prior's UNet is untouched by ours: its unconditional samples are the prior's
    ours = next(r for r in drift["rows"] if r["method"] == "ours")
    db = next(r for r in drift["rows"] if r["method"] == "dreambooth_long")
    assert 0.0 <= ours["drift_fid_bold"] < 1e-6 and db["drift_fid_bold"] > ours["drift_fid_bold"]


def test_toy_run_figures(toy_run):
    out, cfg, summary, _ = toy_run
    results = out / "results"
    for name in ("fig9_fidelity_controllability.png", "fig8a_weight_grid.png", "fig8b_rectification.png"):
        assert (results / name).is_file(), name
    assert set(summary["figures"]) == {"fig9", "fig8a", "fig8b"}
    import PIL.Image

    from ccp.evaluation.figures import GAP, fidelity_control_scatter

    tile = cfg.resolution
    rect = PIL.Image.open(results / "fig8b_rectification_grid.png")
    assert rect.size == (4 * tile + 3 * GAP, 2 * tile + GAP)  # dreambooth, dreambooth (long) x 2 seeds x 2
    records = json.loads((results / "table1.json").read_text())["records"]
    scatter = fidelity_control_scatter(records, out / "fig9_check.png", dataset="bold")
    assert list(scatter.points) == ROWS  # the long DreamBooth is a point of its own
    assert scatter.paper_points == {}  # the paper has no digit datasets
    assert "FID (paper)" not in (results / "table1.md").read_text()


def test_toy_run_weight_search(toy_run):
    out, cfg, summary, _ = toy_run
    records = {(r["method"], r["dataset"]): r for r in summary["records"]}
    for row in ROWS:
        record, search = records[(row, "bold")], records[(row, "bold")]["fid_search"]
        weight, configured, other = (("concept_weight", "1", "2") if row == "ours" else ("control_weight", "5", "1"))
        assert search["weight"] == weight and list(search["fid"]) == sorted(search["fid"], key=float)
        assert search["fid"][configured] == record["fid"]  # the table's own FID, not sampled twice
        assert math.isfinite(search["fid"][other]) and search["fid"][other] != record["fid"]  # other guidance
        assert search["best_fid"] == min(search["fid"].values())
        assert search["fid"][f"{search['best_weight']:g}"] == search["best_fid"]
        assert "fid_search" not in records[(row, "outlined")]  # weight_search.datasets=[bold]
    md = _md_rows(out / "results" / "table1_weight_search.md")
    assert [r[0] for r in md] == LABELS
    assert [r[1] for r in md] == ["control (CFG)"] * 3 + ["concept"]
    for r, row in zip(md, ROWS):
        search = records[(row, "bold")]["fid_search"]
        assert r[3] == f"{search['best_fid']:.2f}" and r[4] == f"{search['best_weight']:g}"
        assert r[5:] == ["-", "-", "-"]  # outlined: not searched
    rows = json.loads((out / "results" / "table1_weight_search.json").read_text())["rows"]
    assert len(rows) == 2 * len(ROWS) and sum(r["best"] for r in rows) == len(ROWS)


def test_toy_rerun_trains_and_samples_nothing(toy_run, monkeypatch):
    out, cfg, first, fake = toy_run
    import ccp.pipelines.gcfg
    import ccp.reproduce.exports
    import ccp.toy.digits
    import ccp.toy.instruments

    def forbidden(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"the rerun {what}")
        return fail

    monkeypatch.setattr(ccp.reproduce.exports, "run_training", forbidden("trained a method"))
    monkeypatch.setattr(ccp.pipelines.gcfg.GCFGPipeline, "__call__", forbidden("sampled"))
    monkeypatch.setattr(ccp.toy.instruments, "train_digit_classifier", forbidden("trained the classifier"))
    monkeypatch.setattr(ccp.toy.digits, "write_concept_dataset", forbidden("rewrote a concept folder"))
    monkeypatch.setitem(sys.modules, "ccp.toy.prior", types.SimpleNamespace(ensure_toy_prior=fake))
    rows = {n: json.loads((out / "results" / n).read_text())["rows"] for n in ("table1.json", "table2.json",
                                                                             "table_drift.json")}
    second = reproduce(toy_config(out), progress=False)
    assert second["trained"] == [] and second["computed"] == {}
    assert fake.writes == 1 and len(fake.calls) == 2  # asked again, reused
    assert second["records"] == first["records"]
    for name, before in rows.items():
        assert json.loads((out / "results" / name).read_text())["rows"] == before


def test_retrained_prior_or_changed_settings_retrain_the_methods(tmp_path, monkeypatch):
    """An export in train_dir is reused only with the config and prior files it was trained on."""
    fake = FakeToyPrior()
    monkeypatch.setitem(sys.modules, "ccp.toy.prior", types.SimpleNamespace(ensure_toy_prior=fake))
    small = ["datasets=[bold]", "drift.enabled=false", "figures.enabled=false", "text_alignment.enabled=false"]

    def run(*extra):
        cfg = toy_config(tmp_path, *small, *extra)
        cfg.methods = ["ours"]
        return reproduce(cfg, progress=False)

    first_run = run()
    assert first_run["trained"] == ["bold/ours"]
    export = tmp_path / "train" / "bold_ours" / "export"
    first = (export / "concept_unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert run()["trained"] == []
    # the toy prior retrained at the same path (other weights): ours trains again, the old run is kept aside
    from ccp.priors.tiny import save_tiny_prior

    prior = Path(fake(tmp_path / "toy-prior"))
    save_tiny_prior(prior, seed=7)
    again = run()
    assert again["trained"] == ["bold/ours"] and again["computed"]  # and its FID is measured anew,
    assert again["records"][0]["fid"] != first_run["records"][0]["fid"]  # from new samples, not the old shards
    assert (tmp_path / "train" / "bold_ours.old" / "export" / "concept_unet" / "diffusion_pytorch_model.safetensors"
            ).read_bytes() == first
    assert run()["trained"] == []
    # other training settings: trains again
    assert run("train_settings.trainer.max_steps=3")["trained"] == ["bold/ours"]
    assert json.loads((export / "ccp_export.json").read_text())["step"] == 3
    # an export given explicitly is used as it is
    assert run(f"+exports.bold.ours={tmp_path / 'train' / 'bold_ours.old' / 'export'}")["trained"] == []


def test_variant_row_trains_more_steps_in_its_own_folder(tmp_path):
    cfg = toy_config(tmp_path, "long_factor=3", "train_settings.trainer.max_steps=5")
    short = train_config(cfg, "bold", "dreambooth")
    long = train_config(cfg, "bold", "dreambooth_long")
    assert short.method.name == long.method.name == "dreambooth"
    assert (short.trainer.max_steps, long.trainer.max_steps) == (5, 15)
    assert OmegaConf.to_container(short.template) == OmegaConf.to_container(long.template)
    assert export_dir(cfg, "bold", "dreambooth_long") == tmp_path / "train" / "bold_dreambooth_long" / "export"
    # tiny keeps its five plain rows
    tiny = compose_reproduce(["scale=tiny", f"out_dir={tmp_path}"])
    assert list(tiny.methods) == ["textual_inversion", "dreambooth", "custom_diffusion", "oft", "ours"]
    assert tiny.get("rows") is None


def test_toy_config_problems_are_listed_before_anything_runs(tmp_path):
    cfg = toy_config(tmp_path / "run", "rows.dreambooth_long.method=dreambooh", "rows.dreambooth_long.step_factor=0",
                     "+weight_search.grid.oft={guidance_scale: [1.5]}", "weight_search.datasets=[bold,striped]")
    cfg.text_alignment.prompts = ["a red digit 3", "a purple digit 3"]
    cfg.text_alignment.attributes["a red digit 3"] = "red digit 33"
    with pytest.raises(ReproduceConfigError) as err:
        reproduce(cfg, progress=False)
    message = str(err.value)
    for needle in ("rows.dreambooth_long.method=dreambooh", "step_factor=0", "['a purple digit 3'] have no entry",
                   "'red digit 33'", "weight_search.grid.oft={'guidance_scale': [1.5]}: give one of",
                   "weight_search.datasets: ['striped'] not in datasets"):
        assert needle in message, needle
    assert not (tmp_path / "run").exists()  # nothing was written
    check_inputs(compose_reproduce(["scale=toy", f"out_dir={tmp_path}"]))  # the toy settings are valid as shipped
    # the spatial column without a toy ControlNet to train or one given: named before anything runs
    with pytest.raises(ReproduceConfigError, match=r"controlnet=None: not a diffusers ControlNet folder "
                                                   r"\(toy_controlnet.train_toy=true to train the toy one\)"):
        check_inputs(compose_reproduce(["scale=toy", f"out_dir={tmp_path}", "toy_controlnet.train_toy=false"]))
