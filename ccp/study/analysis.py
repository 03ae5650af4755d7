"""The study's analysis: who is excluded, win rates of ours with bootstrap intervals, Bradley–Terry scores.

Exclusion rule (documented in docs/study.md): a rater is excluded when they picked the broken
image in more than ``max_failed_checks`` attention checks (default 0: any failed check excludes),
or when the admin revoked them. Attention-check pairs never count as method comparisons.

Intervals (docs/study.md): a two-stage percentile bootstrap that resamples raters with replacement
and then each drawn rater's votes (a rater's votes are not independent of each other), and a Wilson
score interval on the pooled votes. The bootstrap collapses to a point when every vote agrees (0 of 3
gives [0, 0]); the Wilson interval never does but ignores raters. The reported interval is their span.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ccp.config import ConfigError
from ccp.io import write_json_atomic, write_text_atomic
from ccp.study.store import connect, read_votes

RULE = ("a rater is excluded if they picked the obviously broken image in more than {max_failed_checks} "
        "attention check(s), or was revoked by the admin; attention checks are not method comparisons")
INTERVAL_RULE = ("reported interval = the span of two intervals, from the lower of their lows to the higher of "
                 "their highs: the bootstrap over raters (allows for raters disagreeing, but is a single point "
                 "when every vote agrees) and the Wilson score interval on the pooled votes (never a single "
                 "point, but treats votes as independent)")


@dataclass(frozen=True)
class AnalysisOptions:
    max_failed_checks: int = 0
    resamples: int = 2000
    confidence: float = 0.95
    seed: int = 0
    bt_alpha: float = 0.01  # choix's regularisation: finite scores even when one method always wins


def _study_meta(db_path: str | Path) -> dict:
    with connect(db_path) as conn:
        design = json.loads(conn.execute("SELECT value FROM meta WHERE key = 'design'").fetchone()["value"])["design"]
        raters = [dict(r) for r in conn.execute(
            "SELECT r.name, r.revoked, COUNT(p.id) AS pairs FROM raters r JOIN pairs p ON p.rater_id = r.id "
            "GROUP BY r.id ORDER BY r.name")]
    return {"design": design, "raters": raters}


def rater_summary(votes: list[dict], raters: list[dict], options: AnalysisOptions) -> list[dict]:
    summary = {r["name"]: {"name": r["name"], "pairs": r["pairs"], "votes": 0, "checks_answered": 0,
                           "checks_failed": 0, "revoked": bool(r["revoked"])} for r in raters}
    for v in votes:
        s = summary[v["rater"]]
        s["votes"] += 1
        if v["broken_side"]:
            s["checks_answered"] += 1
            s["checks_failed"] += v["choice"] == v["broken_side"]
    for s in summary.values():
        s["included"] = not s["revoked"] and s["checks_failed"] <= options.max_failed_checks
        s["reason"] = ("revoked" if s["revoked"] else
                       f"failed {s['checks_failed']} of {s['checks_answered']} attention checks" if not s["included"] else "")
    return list(summary.values())


def bootstrap_win_rate(per_rater: list[tuple[int, int]], options: AnalysisOptions) -> tuple[float, float]:
    """Percentile interval of sum(wins) / sum(n) under the two-stage bootstrap; per_rater = [(wins, n)]."""
    wins = np.array([w for w, _ in per_rater], dtype=float)
    n = np.array([k for _, k in per_rater], dtype=np.int64)
    rng = np.random.default_rng(options.seed)
    draw = rng.integers(0, len(per_rater), size=(options.resamples, len(per_rater)))
    resampled = rng.binomial(n[draw], wins[draw] / n[draw])
    rates = resampled.sum(1) / n[draw].sum(1)
    tail = (1 - options.confidence) / 2 * 100
    low, high = np.percentile(rates, [tail, 100 - tail])
    return float(low), float(high)


def wilson_interval(wins: int, n: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval of wins / n over the pooled votes: for n >= 1 it has positive width."""
    from scipy.stats import binomtest

    ci = binomtest(wins, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def _intervals(wins: int, n: int, bootstrap: tuple[float, float], confidence: float) -> dict:
    """The bootstrap, Wilson and reported (span of both) intervals as fractions."""
    wilson = wilson_interval(wins, n, confidence)
    return {"ci_low": min(bootstrap[0], wilson[0]), "ci_high": max(bootstrap[1], wilson[1]),
            "bootstrap_low": bootstrap[0], "bootstrap_high": bootstrap[1],
            "wilson_low": wilson[0], "wilson_high": wilson[1]}


def _pref_entry(e: dict) -> dict:
    """Table 1's Pref. entry of a win_rate entry: percentages, counts beside the intervals."""
    has = e["rate"] is not None
    pct = (lambda low, high: [100 * e[low], 100 * e[high]] if has else None)
    return {"ours_preferred_pct": 100 * e["rate"] if has else None, "ci_pct": pct("ci_low", "ci_high"),
            "bootstrap_ci_pct": pct("bootstrap_low", "bootstrap_high"), "wilson_ci_pct": pct("wilson_low", "wilson_high"),
            "n": e["n"], "raters": e["raters"]}


def analyze_votes(votes: list[dict], raters: list[dict], design: dict, options: AnalysisOptions) -> dict:
    """The analysis of `votes` (`ccp.study.store.read_votes` rows) as a JSON-ready dict."""
    import choix

    summary = rater_summary(votes, raters, options)
    included = {s["name"] for s in summary if s["included"]}
    comparisons = [v for v in votes if not v["broken_side"] and v["rater"] in included]
    ours = design["ours"]
    methods = list(design["methods"])

    win_rate = {}
    for baseline in (m for m in methods if m != ours):
        per_rater: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for v in comparisons:
            if {v["method_left"], v["method_right"]} != {ours, baseline}:
                continue
            winner = v["method_left"] if v["choice"] == "left" else v["method_right"]
            per_rater[v["rater"]][0] += winner == ours
            per_rater[v["rater"]][1] += 1
        wins = sum(w for w, _ in per_rater.values())
        n = sum(k for _, k in per_rater.values())
        entry = {"wins": wins, "losses": n - wins, "n": n, "raters": len(per_rater),
                 "rate": wins / n if n else None, "ci_low": None, "ci_high": None,
                 "bootstrap_low": None, "bootstrap_high": None, "wilson_low": None, "wilson_high": None}
        if n:
            bootstrap = bootstrap_win_rate([tuple(x) for x in per_rater.values()], options)
            entry.update(_intervals(wins, n, bootstrap, options.confidence))
        win_rate[baseline] = entry

    index = {m: i for i, m in enumerate(methods)}
    data = []
    for v in comparisons:
        winner, loser = ((v["method_left"], v["method_right"]) if v["choice"] == "left"
                         else (v["method_right"], v["method_left"]))
        data.append((index[winner], index[loser]))
    bt = None
    if data:
        params = choix.ilsr_pairwise(len(methods), data, alpha=options.bt_alpha)
        bt = {"scores": {m: float(params[i]) for m, i in index.items()},
              "p_ours_beats": {m: float(1 / (1 + np.exp(params[i] - params[index[ours]])))
                               for m, i in index.items() if m != ours},
              "comparisons": len(data), "alpha": options.bt_alpha}
    return {
        "study": design["name"], "question": design["question"], "ours": ours, "methods": methods,
        "rule": RULE.format(max_failed_checks=options.max_failed_checks),
        "raters": summary, "excluded": [s["name"] for s in summary if not s["included"]],
        "votes": {"total": len(votes), "comparisons_counted": len(comparisons)},
        "win_rate": win_rate,
        "bradley_terry": bt,
        "bootstrap": {"resamples": options.resamples, "confidence": options.confidence, "seed": options.seed,
                      "unit": "raters with replacement, then each drawn rater's votes"},
        "intervals": {"confidence": options.confidence, "rule": INTERVAL_RULE,
                      "pooled": "Wilson score interval on the pooled votes"},
        # Table 1's Pref. column: per baseline, the percentage of votes preferring ours over it.
        "pref": {m: _pref_entry(e) for m, e in win_rate.items()},
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ci(e: dict, prefix: str) -> str:
    return "-" if e["rate"] is None else f"[{_pct(e[prefix + '_low'])}, {_pct(e[prefix + '_high'])}]"


def to_markdown(result: dict) -> str:
    confidence = 100 * result["bootstrap"]["confidence"]
    lines = [f"# Preference study {result['study']}", "", f"Question: {result['question']}", "",
             f"Exclusion rule: {result['rule']}.", "",
             f"Votes: {result['votes']['total']}, method comparisons counted: {result['votes']['comparisons_counted']}; "
             f"excluded raters: {', '.join(result['excluded']) or 'none'}.", "",
             f"## Win rate of {result['ours']} against each baseline", "",
             f"| baseline | {result['ours']} preferred | {confidence:g}% CI (reported) | bootstrap over raters "
             "| Wilson, pooled votes | votes | raters |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for m, e in result["win_rate"].items():
        lines.append(f"| {m} | {_pct(e['rate'])} | {_ci(e, 'ci')} | {_ci(e, 'bootstrap')} | {_ci(e, 'wilson')} "
                     f"| {e['n']} | {e['raters']} |")
    lines += ["", f"Intervals ({confidence:g}%): {INTERVAL_RULE}. Bootstrap: {result['bootstrap']['unit']} "
              f"({result['bootstrap']['resamples']} resamples). Few votes or few raters give wide intervals; "
              "read them with the counts beside them.", ""]
    bt = result["bradley_terry"]
    if bt:
        lines += ["## Bradley-Terry scores (log-strength, mean 0; choix)", "", "| method | score |", "| --- | --- |"]
        lines += [f"| {m} | {s:+.3f} |" for m, s in sorted(bt["scores"].items(), key=lambda kv: -kv[1])]
        lines.append("")
    lines += ["## Raters", "", "| rater | votes | of | checks failed | included |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {s['name']} | {s['votes']} | {s['pairs']} | {s['checks_failed']} / {s['checks_answered']} | "
              f"{'yes' if s['included'] else 'no: ' + s['reason']} |" for s in result["raters"]]
    return "\n".join(lines) + "\n"


def analyze(db_path: str | Path, output_dir: str | Path | None = None, options: AnalysisOptions | None = None) -> dict:
    """Analyse the study in `db_path`; with `output_dir`, also write analysis.json and analysis.md there."""
    db_path = Path(db_path)
    if not db_path.is_file():
        raise ConfigError(f"db={db_path}: no study database there; run ccp-study serve first, or pass db=PATH")
    options = options or AnalysisOptions()
    info = _study_meta(db_path)
    result = analyze_votes(read_votes(db_path), info["raters"], info["design"], options)
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(output_dir / "analysis.json", result)
        write_text_atomic(output_dir / "analysis.md", to_markdown(result))
    return result


def pref_column(path: str | Path) -> dict[str, dict]:
    """Table 1's "Pref." column from a study: per baseline ``{"ours_preferred_pct", "ci_pct",
    "bootstrap_ci_pct", "wilson_ci_pct", "n", "raters"}``; ``ci_pct`` is the reported interval
    (`INTERVAL_RULE`).

    `path` is an analysis.json written by `analyze` (its exclusion rule and bootstrap settings) or a
    study database (analysed here with the default `AnalysisOptions`)."""
    path = Path(path)
    if path.suffix == ".json":
        if not path.is_file():
            raise ConfigError(f"{path}: no analysis there; run ccp-study analyze first, or pass the study database")
        result = json.loads(path.read_text())
        return {m: _with_pooled_interval(m, e, result) for m, e in result["pref"].items()}
    return analyze(path)["pref"]


def _with_pooled_interval(baseline: str, entry: dict, result: dict) -> dict:
    """An entry of an analysis.json written before the Wilson interval, whose ``ci_pct`` is the bare
    bootstrap (a point when every vote agrees), with the reported interval put in its place."""
    if "wilson_ci_pct" in entry or entry.get("ours_preferred_pct") is None:
        return entry
    n = entry["n"]
    wins = round(entry["ours_preferred_pct"] * n / 100)  # the percentage is 100 * wins / n
    wilson = [100 * x for x in wilson_interval(wins, n, result.get("bootstrap", {}).get("confidence", 0.95))]
    bootstrap = entry["ci_pct"]
    return {**entry, "ci_pct": [min(bootstrap[0], wilson[0]), max(bootstrap[1], wilson[1])],
            "bootstrap_ci_pct": bootstrap, "wilson_ci_pct": wilson,
            "raters": result.get("win_rate", {}).get(baseline, {}).get("raters")}
