"""Numbers over seeds: mean and 95% interval of each metric, records aggregated over seeds, and
claims checked against them.

* `t_interval`: the Student t interval of a mean over n independent runs (n - 1 degrees of
  freedom), the interval every multi-seed table shows;
* `aggregate_records`: per-seed result records (`ccp.evaluation.tables`) -> one record per
  (method, dataset) holding the mean of every number, with ``intervals`` (metric path -> interval)
  and ``per_seed`` (metric path -> the seeds' values);
* `check_claims`: statements such as "ours has the lowest best-weight FID in every seed" or "the
  interval of A lies below the interval of B", each with its verdict and the numbers behind it
  (`claims_markdown` for the README).

Metric paths name a number of a record: ``fid``, ``kid``, ``text_alignment``, ``drift.fid``,
``drift.style_share``, ``fid_search.best_fid``, ...
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

from ccp.config import ConfigError

CONFIDENCE = 0.95
INTERVAL_NOTE = ("Each number is the mean over {n} seeds {seeds} with its 95% interval [low, high]: Student t "
                 "over seeds (n - 1 = {dof} degrees of freedom; mean ± t·s/√n), the spread of training and sampling "
                 "seeds together.")
# The numbers of a record that are averaged over seeds (dotted paths); `params` is the same in every seed.
SCALAR_METRICS: tuple[str, ...] = ("fid", "kid", "kid_std", "text_alignment", "text_alignment_colour",
                                   "text_alignment_class", "spatial_alignment", "spatial_alignment_prior")
DRIFT_METRICS: tuple[str, ...] = ("fid", "style_share", "prior_style_share")


class ClaimConfigError(ConfigError, ValueError):
    """A claim that cannot be checked (unknown kind, row, metric or dataset); the message says which."""


@dataclass(frozen=True)
class Interval:
    """Mean of `n` values and its two-sided `confidence` interval (None for fewer than 2 values)."""

    mean: float
    low: float | None
    high: float | None
    n: int
    std: float | None  # sample standard deviation (ddof=1)
    confidence: float = CONFIDENCE

    @property
    def half_width(self) -> float | None:
        return None if self.high is None else (self.high - self.low) / 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def t_interval(values: Iterable[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean ± t_{(1+c)/2, n-1} · s / √n of `values` (s: the ddof=1 standard deviation)."""
    from scipy import stats

    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("an interval needs at least one value")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence}: must be in (0, 1)")
    n = len(xs)
    mean = math.fsum(xs) / n
    if n < 2:
        return Interval(mean, None, None, n, None, confidence)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(stats.t.ppf((1.0 + confidence) / 2.0, n - 1)) * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, std, confidence)


def metric_value(record: Mapping[str, Any], path: str) -> float | None:
    """The number at a dotted path of a record (``drift.fid``), or None when absent."""
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _paths(record: Mapping[str, Any]) -> list[str]:
    paths = [m for m in SCALAR_METRICS if metric_value(record, m) is not None]
    paths += [f"drift.{m}" for m in DRIFT_METRICS if metric_value(record, f"drift.{m}") is not None]
    search = record.get("fid_search") or {}
    paths += [f"fid_search.fid.{v}" for v in search.get("fid", {})]
    if search:
        paths.append("fid_search.best_fid")
    return paths


def aggregate_records(per_seed: Mapping[int, Sequence[Mapping[str, Any]]],
                      confidence: float = CONFIDENCE) -> list[dict[str, Any]]:
    """One record per (method, dataset) present in every seed, with each number the mean over the
    seeds (so `ccp.evaluation.tables` draws the means), ``intervals`` (path -> `Interval` as a dict)
    and ``per_seed`` (path -> {seed: value}). A searched weight's best FID is the mean of each seed's
    own best; ``fid_search.best_weight`` is the weight most seeds chose, ``best_weights`` each seed's."""
    if not per_seed:
        raise ValueError("no seeds to aggregate")
    seeds = sorted(per_seed)
    index = {s: {(r["method"], r["dataset"]): r for r in per_seed[s]} for s in seeds}
    keys = [k for k in index[seeds[0]] if all(k in index[s] for s in seeds)]
    missing = sorted({k for s in seeds for k in index[s]} - set(keys))
    if missing:
        raise ValueError(f"cells {missing} are not measured in every seed {seeds}; rerun the missing seeds")
    out = []
    for key in keys:
        first = index[seeds[0]][key]
        record: dict[str, Any] = {k: v for k, v in first.items()
                                  if k in ("method", "dataset", "method_class", "label", "params", "stand_in_weights")}
        for nested in ("drift", "fid_search"):  # settings such as num_samples kept; every number replaced below
            if first.get(nested):
                record[nested] = copy.deepcopy(first[nested])
        record["seeds"] = seeds
        record["exports"] = {str(s): index[s][key].get("export") for s in seeds}
        intervals, values = {}, {}
        for path in _paths(first):
            got = {s: metric_value(index[s][key], path) for s in seeds}
            if any(v is None for v in got.values()):
                continue
            interval = t_interval(got.values(), confidence)
            intervals[path] = interval.to_dict()
            values[path] = {str(s): v for s, v in got.items()}
            _set(record, path, interval.mean)
        if first.get("fid_search"):
            search = record["fid_search"]
            search["weight"] = first["fid_search"]["weight"]
            chosen = [float(index[s][key]["fid_search"]["best_weight"]) for s in seeds]
            search["best_weights"] = chosen
            search["best_weight"] = Counter(chosen).most_common(1)[0][0]
        record["intervals"] = intervals
        record["per_seed"] = values
        out.append(record)
    return out


def _set(record: dict[str, Any], path: str, value: float) -> None:
    *parents, last = path.split(".")
    node = record
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def interval_note(seeds: Sequence[int]) -> str:
    return INTERVAL_NOTE.format(n=len(seeds), seeds=list(seeds), dof=len(seeds) - 1)


# --- claims ---------------------------------------------------------------------------------------
CLAIM_KINDS = {
    "lowest_in_every_seed": "`row` has the lowest `metric` of the rows (`among`, default all) in every seed",
    "highest_in_every_seed": "`row` has the highest `metric` of the rows (`among`, default all) in every seed",
    "below": "the interval of `a` lies entirely below the interval of `b` (`b_metric`: another metric of b)",
    "above": "the interval of `a` lies entirely above the interval of `b` (`b_metric`: another metric of b)",
    "overlaps": "the intervals of `a` and `b` overlap: neither lies entirely beyond the other (`b_metric` as above)",
    "at_most_in_every_seed": "`metric` of every row of `rows` is <= `value` in every seed",
    "at_least_in_every_seed": "`metric` of every row of `rows` is >= `value` in every seed",
}


@dataclass
class ClaimResult:
    id: str
    text: str
    kind: str
    verdict: str  # "holds", "does not hold" or "undecided" (an interval needs two seeds)
    evidence: str
    values: dict[str, Any]


def claim_rows(claim: Mapping[str, Any]) -> list[str]:
    """Every table row a claim names."""
    rows = [claim[k] for k in ("row", "a", "b") if claim.get(k) is not None]
    return rows + list(claim.get("rows") or []) + list(claim.get("among") or [])


def check_claim_specs(claims: Sequence[Mapping[str, Any]], rows: Sequence[str], datasets: Sequence[str]) -> list[str]:
    """Problems with the claim specs (no records needed), so a run can refuse them before training."""
    problems = []
    for i, c in enumerate(claims):
        name = f"claims[{i}] ({c.get('id', '?')})"
        kind = c.get("kind")
        if kind not in CLAIM_KINDS:
            problems.append(f"{name}: kind={kind!r}; choose one of {sorted(CLAIM_KINDS)}")
            continue
        for key in ("id", "text", "metric", "dataset"):
            if not c.get(key):
                problems.append(f"{name}: set `{key}`")
        if c.get("dataset") and c["dataset"] not in datasets:
            problems.append(f"{name}: dataset {c['dataset']!r} is not in datasets {list(datasets)}")
        needed = {"lowest_in_every_seed": ("row",), "highest_in_every_seed": ("row",), "below": ("a", "b"),
                  "above": ("a", "b"), "overlaps": ("a", "b"), "at_most_in_every_seed": ("rows", "value"),
                  "at_least_in_every_seed": ("rows", "value")}[kind]
        for key in needed:
            if c.get(key) is None:
                problems.append(f"{name}: kind {kind} needs `{key}` ({CLAIM_KINDS[kind]})")
        unknown = [r for r in claim_rows(c) if r not in rows]
        if unknown:
            problems.append(f"{name}: rows {unknown} are not table rows (methods: {list(rows)})")
    return problems


def _verdict(ok: bool) -> str:
    return "holds" if ok else "does not hold"


def _fmt_interval(iv: Interval) -> str:
    if iv.low is None:
        return f"{iv.mean:.4g} (one seed)"
    return f"{iv.mean:.4g} [{iv.low:.4g}, {iv.high:.4g}]"


def check_claims(claims: Sequence[Mapping[str, Any]], per_seed: Mapping[int, Sequence[Mapping[str, Any]]],
                 confidence: float = CONFIDENCE) -> list[ClaimResult]:
    """Each claim's verdict on the per-seed records (see `CLAIM_KINDS`); intervals as `t_interval`."""
    seeds = sorted(per_seed)
    index = {s: {(r["method"], r["dataset"]): r for r in per_seed[s]} for s in seeds}
    rows = sorted({r["method"] for s in seeds for r in per_seed[s]})
    datasets = sorted({r["dataset"] for s in seeds for r in per_seed[s]})
    problems = check_claim_specs(claims, rows, datasets)
    if problems:
        raise ClaimConfigError("cannot check the claims:\n  - " + "\n  - ".join(problems))

    def values(row: str, metric: str, dataset: str) -> dict[int, float]:
        got = {s: metric_value(index[s].get((row, dataset), {}), metric) for s in seeds}
        absent = [s for s, v in got.items() if v is None]
        if absent:
            raise ClaimConfigError(f"no {metric} of {row} on {dataset} in seeds {absent}: measure it or drop the claim")
        return got

    results = []
    for c in claims:
        kind, metric, dataset = c["kind"], c["metric"], c["dataset"]
        if kind in ("lowest_in_every_seed", "highest_in_every_seed"):
            among = list(c.get("among") or [r for r in rows if all((r, dataset) in index[s] for s in seeds)])
            if c["row"] not in among:
                among.append(c["row"])
            table = {r: values(r, metric, dataset) for r in among}
            lower = kind == "lowest_in_every_seed"
            wins = []
            for s in seeds:
                others = [table[r][s] for r in among if r != c["row"]]
                mine = table[c["row"]][s]
                wins.append(all(mine < o for o in others) if lower else all(mine > o for o in others))
            best = {str(s): (min if lower else max)(among, key=lambda r: table[r][s]) for s in seeds}
            verdict = _verdict(all(wins))
            evidence = f"{sum(wins)} of {len(seeds)} seeds; best per seed: " + ", ".join(
                f"{s}: {r}" for s, r in best.items())
            data = {"per_seed": {r: {str(s): v for s, v in t.items()} for r, t in table.items()}, "best": best}
        elif kind in ("below", "above", "overlaps"):
            a = t_interval(values(c["a"], metric, dataset).values(), confidence)
            b_metric = c.get("b_metric") or metric
            b = t_interval(values(c["b"], b_metric, dataset).values(), confidence)
            if a.low is None or b.low is None:
                verdict = "undecided"
                evidence = "one seed: no interval"
            elif kind == "overlaps":
                ok = a.low <= b.high and b.low <= a.high
                verdict = _verdict(ok)
                evidence = (f"{c['a']} {metric} {_fmt_interval(a)}, {c['b']} {b_metric} {_fmt_interval(b)}"
                            + ("" if ok else ": the intervals are disjoint"))
            else:
                ok = a.high < b.low if kind == "below" else a.low > b.high
                verdict = _verdict(ok)
                evidence = (f"{c['a']} {metric} {_fmt_interval(a)} {'<' if kind == 'below' else '>'} "
                            f"{c['b']} {b_metric} {_fmt_interval(b)}" + ("" if ok else ": the intervals overlap or are reversed"))
            data = {"a": a.to_dict(), "b": b.to_dict(), "b_metric": b_metric}
        else:
            bound = float(c["value"])
            table = {r: values(r, metric, dataset) for r in c["rows"]}
            at_most = kind == "at_most_in_every_seed"
            failing = {r: {str(s): v for s, v in t.items() if (v > bound if at_most else v < bound)}
                       for r, t in table.items()}
            failing = {r: f for r, f in failing.items() if f}
            verdict = _verdict(not failing)
            extreme = (max if at_most else min)(v for t in table.values() for v in t.values())
            evidence = (f"{'max' if at_most else 'min'} over {len(c['rows'])} row(s) x {len(seeds)} seeds: {extreme:.4g}"
                        f" ({'<=' if at_most else '>='} {bound:g} required)"
                        + ("".join(f"; {r} fails in seeds {sorted(f)}" for r, f in failing.items())))
            data = {"per_seed": {r: {str(s): v for s, v in t.items()} for r, t in table.items()},
                    "failing": failing, "value": bound}
        results.append(ClaimResult(str(c["id"]), str(c["text"]), kind, verdict, evidence,
                                   {"metric": metric, "dataset": dataset, "seeds": seeds, **data}))
    return results


def claims_markdown(results: Sequence[ClaimResult], seeds: Sequence[int]) -> str:
    lines = [f"### Claims over {len(seeds)} seeds {list(seeds)}", "",
             "| Claim | Verdict | Evidence |", "| --- | --- | --- |"]
    lines += [f"| {r.text} | **{r.verdict}** | {r.evidence} |" for r in results]
    lines += ["", "Intervals: 95%, Student t over seeds. \"In every seed\": the comparison holds in each seed's own "
              "run. `claims.json` holds each claim's per-seed values."]
    return "\n".join(lines) + "\n"
