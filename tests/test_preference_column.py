"""Table 1's "Pref." column filled by ccp-reproduce from a preference study's analysis."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from ccp.evaluation.tables import table1_markdown, table1_rows
from ccp.reproduce.config import ReproduceConfigError, check_inputs, compose_reproduce
from ccp.reproduce.run import add_preference

ANALYSIS = {  # what ccp-study analyze writes (docs/study.md), with constructed numbers
    "pref": {"dreambooth": {"ours_preferred_pct": 63.2, "ci_pct": [55.0, 71.0], "n": 190},
             "oft": {"ours_preferred_pct": 48.5, "ci_pct": [40.0, 57.0], "n": 200}},
}


def _records():
    return [{"method": m, "dataset": d, "params": 10, "fid": 1.0}
            for d in ("face", "animal") for m in ("dreambooth", "oft", "textual_inversion", "ours")]


def test_the_study_fills_the_pref_column_of_its_dataset_only(tmp_path):
    path = tmp_path / "analysis.json"
    path.write_text(json.dumps(ANALYSIS))
    records = _records()
    add_preference(OmegaConf.create({"preference": {"face": str(path)}}), records)
    by = {(r["method"], r["dataset"]): r for r in records}
    assert by[("dreambooth", "face")]["pref"] == 63.2 and by[("dreambooth", "face")]["pref_ci"] == [55.0, 71.0]
    assert by[("oft", "face")]["pref_n"] == 200
    assert "pref" not in by[("dreambooth", "animal")]  # another dataset's study
    assert "pref" not in by[("ours", "face")] and "pref" not in by[("textual_inversion", "face")]

    text = table1_markdown(table1_rows(records, ["face", "animal"]), ["face", "animal"])
    header, _, *body = text.splitlines()[:6]
    assert "Face Pref.: ours preferred (%)" in header and "Animal Pref." not in header
    rows = {line.split(" | ")[0].strip("| "): line for line in body}
    assert "| 63.2 [55.0, 71.0] |" in rows["DreamBooth"]
    assert "| 48.5 [40.0, 57.0] |" in rows["OFT"]
    pref_col = header.split(" | ").index("Face Pref.: ours preferred (%)")
    assert rows["Ours"].split(" | ")[pref_col] == "-" and rows["Textual Inversion"].split(" | ")[pref_col] == "-"
    assert "span of the bootstrap over raters and the Wilson interval on the pooled votes" in text


def test_without_a_study_there_is_no_pref_column():
    text = table1_markdown(table1_rows(_records(), ["face", "animal"]), ["face", "animal"])
    assert "Pref." not in text.splitlines()[0]
    assert "human-preference columns come only from a study" in text


def test_a_study_that_is_missing_or_of_another_dataset_is_refused_before_anything_runs(tmp_path):
    cfg = compose_reproduce(["scale=tiny", f"out_dir={tmp_path}", f"+preference.face={tmp_path / 'absent.json'}"])
    with pytest.raises(ReproduceConfigError, match=r"preference\.face=.*not a file.*ccp-study analyze"):
        check_inputs(cfg)
    path = tmp_path / "analysis.json"
    path.write_text(json.dumps(ANALYSIS))
    cfg = compose_reproduce(["scale=tiny", f"out_dir={tmp_path}", f"+preference.bold={path}"])
    with pytest.raises(ReproduceConfigError, match=r"preference\.bold: 'bold' is not in datasets"):
        check_inputs(cfg)
