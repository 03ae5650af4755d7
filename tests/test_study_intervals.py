"""The study's win-rate intervals stay honest with few votes: a Wilson interval on the pooled votes
next to the bootstrap over raters, the reported interval spanning both, counts beside them."""

from __future__ import annotations

import json
import math

import pytest
from omegaconf import OmegaConf

from test_study import DESIGN, _vote, db_rows, next_form, prepared

Z95 = 1.959963984540054  # textbook two-sided 95% normal quantile


def wilson_closed_form(wins: int, n: int, z: float = Z95) -> tuple[float, float]:
    p = wins / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def test_wilson_interval_matches_the_closed_form_and_the_textbook_value():
    from ccp.study.analysis import wilson_interval

    assert wilson_interval(0, 3, 0.95) == pytest.approx((0.0, 0.5615), abs=1e-4)  # textbook value
    for wins, n in [(0, 3), (3, 3), (1, 2), (48, 60), (120, 190)]:
        assert wilson_interval(wins, n, 0.95) == pytest.approx(wilson_closed_form(wins, n), abs=1e-9)
    assert wilson_interval(5, 10, 0.90) == pytest.approx(wilson_closed_form(5, 10, z=1.6448536269514722), abs=1e-9)


def test_three_unanimous_votes_by_two_raters_get_an_interval_not_a_point(tmp_path, capsys):
    """The issue's case, through ccp-study analyze on a study database voted through the app."""
    from fastapi.testclient import TestClient

    from ccp.cli.study import main
    from ccp.reproduce.run import add_preference
    from ccp.study.app import create_app

    design = ["~study.methods.oft", "study.comparisons=ours_vs_each",
              "study.pairs_per_rater=2", "study.attention_checks=0"]
    state = prepared(tmp_path, *design)
    db = state["db"]
    client = TestClient(create_app(db, state["design"].question), follow_redirects=False)
    for rater, votes in (("alice", 2), ("bob", 1)):
        token = state["tokens"][rater]
        for _ in range(votes):  # every vote prefers the baseline: ours at 0 of 3
            form = next_form(client.get(f"/r/{token}").text)
            left = db_rows(db, "SELECT method_left FROM pairs WHERE id = ?", (form["pair_id"],))[0][0]
            client.post(f"/r/{token}/vote", data={**form, "choice": "left" if left == "dreambooth" else "right"})
    out = tmp_path / "out"
    main(["analyze", "study=smoke", f"samples={state['samples']}", f"db={db}", *design,
          f"analysis.output_dir={out}"])

    result = json.loads((out / "analysis.json").read_text())
    entry = result["win_rate"]["dreambooth"]
    assert (entry["wins"], entry["n"], entry["raters"]) == (0, 3, 2)
    assert entry["ci_high"] - entry["ci_low"] > 0.5  # not the point [0, 0] the issue reports
    assert entry["bootstrap_low"] == entry["bootstrap_high"] == 0  # which the bootstrap alone still gives
    low, high = wilson_closed_form(0, 3)
    assert (entry["ci_low"], entry["ci_high"]) == pytest.approx((low, high), abs=1e-9)
    pref = result["pref"]["dreambooth"]
    assert pref["ci_pct"] == pytest.approx([100 * low, 100 * high], abs=1e-7) and pref["ci_pct"][1] > 50
    assert (pref["n"], pref["raters"]) == (3, 2)
    assert "span" in result["intervals"]["rule"] and "Wilson" in result["intervals"]["rule"]

    markdown = (out / "analysis.md").read_text()
    row = next(line for line in markdown.splitlines() if line.startswith("| dreambooth |"))
    assert row == "| dreambooth | 0.0% | [0.0%, 56.1%] | [0.0%, 0.0%] | [0.0%, 56.1%] | 3 | 2 |"
    assert "CI (reported) | bootstrap over raters | Wilson, pooled votes | votes | raters |" in markdown
    assert "reported interval = the span" in markdown and row in capsys.readouterr().out

    # ccp-reproduce's Table 1 gets the reported interval, not the bootstrap's point
    records = [{"method": "dreambooth", "dataset": "face", "params": 1, "fid": 1.0}]
    add_preference(OmegaConf.create({"preference": {"face": str(out / "analysis.json")}}), records)
    assert records[0]["pref"] == 0 and records[0]["pref_ci"] == pytest.approx([100 * low, 100 * high], abs=1e-7)


def test_reported_interval_spans_the_bootstrap_when_raters_disagree():
    from ccp.study.analysis import AnalysisOptions, analyze_votes

    votes = []
    for r in range(6):  # half the raters always prefer ours, half never: the votes cluster by rater
        votes += [_vote(f"r{r}", "ours", "dreambooth", "left" if r < 3 else "right") for _ in range(10)]
    raters = [{"name": f"r{r}", "revoked": 0, "pairs": 10} for r in range(6)]
    entry = analyze_votes(votes, raters, DESIGN, AnalysisOptions(resamples=2000))["win_rate"]["dreambooth"]
    wilson = wilson_closed_form(30, 60)
    assert (entry["wilson_low"], entry["wilson_high"]) == pytest.approx(wilson, abs=1e-9)
    assert entry["bootstrap_low"] < wilson[0] - 0.1 and entry["bootstrap_high"] > wilson[1] + 0.1
    assert (entry["ci_low"], entry["ci_high"]) == (entry["bootstrap_low"], entry["bootstrap_high"])


def test_pref_column_of_an_analysis_written_before_the_pooled_interval_is_not_a_point(tmp_path):
    from ccp.study.analysis import pref_column

    path = tmp_path / "analysis.json"  # what analyze wrote before: ci_pct is the bare bootstrap
    path.write_text(json.dumps({
        "bootstrap": {"confidence": 0.95},
        "win_rate": {"dreambooth": {"wins": 0, "n": 3, "raters": 2}},
        "pref": {"dreambooth": {"ours_preferred_pct": 0.0, "ci_pct": [0.0, 0.0], "n": 3},
                 "oft": {"ours_preferred_pct": None, "ci_pct": None, "n": 0}}}))
    column = pref_column(path)
    low, high = wilson_closed_form(0, 3)
    assert column["dreambooth"]["ci_pct"] == pytest.approx([100 * low, 100 * high], abs=1e-7)
    assert column["dreambooth"]["bootstrap_ci_pct"] == [0.0, 0.0] and column["dreambooth"]["raters"] == 2
    assert column["oft"]["ci_pct"] is None
