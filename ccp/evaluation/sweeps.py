"""Guidance-weight sweeps (Appendix D.2: "grid searches on all models and conditions, with an
interval of 0.25") and the rule that picks the reported point.

* `weight_grid(start, stop, step=0.25)`: the grid, both ends included, in exact decimal
  arithmetic (``0.1 * 3`` is ``0.3``, never ``0.30000000000000004``), as a list or as the comma
  list a Hydra multirun takes (`grid_override`).
* `collect_results(sweep_dir)`: every ``result.json`` that ``ccp-eval`` wrote under a multirun
  folder, one row per point; `write_table` saves the rows as CSV and JSON.
* `select_best(rows)`: per (run, method, metric), the best point (lowest FID, highest alignment);
  ties go to the point closest to the method's default weights (L1 distance over
  ``concept_weight`` and ``control_weight``), then to the smaller weights; the whole curve comes
  with it. Non-finite values are kept in the curve but never selected.
* `CollectSweep`: a Hydra callback (on in conf/eval.yaml) that writes ``sweep.csv``,
  ``sweep.json`` and ``selection.json`` into the multirun folder when the sweep ends.

From a shell::

    python -m ccp.evaluation.sweeps grid 1.0 7.5            # 1.0,1.25,...,7.5
    python -m ccp.evaluation.sweeps collect multirun/eval/DATE/TIME   # table + selection
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from collections.abc import Iterable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from ccp.io import write_atomic, write_json_atomic

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
WEIGHT_KEYS = ("concept_weight", "control_weight")
GROUP_KEYS = ("run", "method", "metric")
# Columns of the sweep table, in this order (extra keys of a result are not tabulated).
TABLE_COLUMNS = (
    "run", "method", "metric", "condition", "value", "better", "concept_weight", "control_weight",
    "default_concept_weight", "default_control_weight", "num_images", "path",
)


# --- the grid ------------------------------------------------------------------------------------
def weight_grid(start: float, stop: float, step: float = 0.25) -> list[float]:
    """``start, start + step, ..., stop`` with both ends included (the last point is the largest
    one not beyond `stop`), computed in decimal so no point drifts (``1.25``, not ``1.2500000001``)."""
    lo, hi, dx = (Decimal(str(v)) for v in (start, stop, step))
    if dx <= 0:
        raise ValueError(f"step must be positive, got {step}")
    if hi < lo:
        raise ValueError(f"stop ({stop}) is below start ({start})")
    count = int((hi - lo) // dx) + 1
    return [float(lo + k * dx) for k in range(count)]


def grid_override(start: float, stop: float, step: float = 0.25) -> str:
    """The grid as a Hydra sweep value: ``1.0,1.25,1.5``."""
    return ",".join(repr(v) for v in weight_grid(start, stop, step))


# --- collecting a sweep --------------------------------------------------------------------------
def result_row(result: dict[str, Any], path: str = "") -> dict[str, Any]:
    """One table row from a ``result.json`` that ccp-eval wrote."""
    defaults = result.get("default_weights") or {}
    row = {
        "run": result.get("run"),
        "method": result.get("method"),
        "metric": result.get("metric"),
        "condition": result.get("condition"),
        "value": float(result["value"]) if result.get("value") is not None else math.nan,
        "better": result.get("better"),
        "concept_weight": float(result["concept_weight"]),
        "control_weight": float(result["control_weight"]),
        "default_concept_weight": float(defaults.get("concept_weight", 1.0)),
        "default_control_weight": float(defaults.get("control_weight", 5.0)),
        "num_images": result.get("num_images"),
        "path": path,
    }
    if row["better"] not in ("lower", "higher"):
        raise ValueError(f"{path or 'result'}: 'better' must be 'lower' or 'higher', got {row['better']!r}")
    return row


def collect_results(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``result.json`` under `sweep_dir` (recursively), as table rows sorted by run,
    method, metric and weights. ``path`` is the point's folder relative to `sweep_dir`."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder (pass the multirun folder of a ccp-eval sweep)")
    rows = []
    for file in sorted(root.rglob(RESULT_FILE)):
        try:
            result = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{file} is not valid JSON ({err})") from err
        rows.append(result_row(result, file.parent.relative_to(root).as_posix()))
    return sorted(rows, key=lambda r: (*(str(r[k]) for k in GROUP_KEYS), r["concept_weight"], r["control_weight"]))


def write_table(rows: Sequence[dict[str, Any]], csv_path: str | Path | None = None,
                json_path: str | Path | None = None) -> None:
    """The rows as CSV (`TABLE_COLUMNS`) and/or JSON (a list of objects), each written atomically."""
    if csv_path is not None:
        def write_csv(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)

        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(csv_path), write_csv)
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(json_path), [_finite_or_none(row) for row in rows])


def _finite_or_none(row: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN; a failed point (NaN FID) is written as null.
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


# --- selection -----------------------------------------------------------------------------------
def distance_to_default(row: dict[str, Any]) -> float:
    """L1 distance of the point's weights to the method's defaults."""
    return sum(abs(row[k] - row[f"default_{k}"]) for k in WEIGHT_KEYS)


def select_best(rows: Iterable[dict[str, Any]], tie_tolerance: float = 0.0) -> list[dict[str, Any]]:
    """The reported point per (run, method, metric).

    Best = lowest value for ``better == "lower"`` (FID), highest for ``"higher"`` (alignment).
    Points within `tie_tolerance` (absolute) of the best value tie; among them the one closest to
    the method's default weights wins (`distance_to_default`), then the one with the smaller
    (concept_weight, control_weight). Each entry: the chosen point's weights and value, the
    tied points, and ``curve`` (every point of the group, sorted by weights).
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in GROUP_KEYS), []).append(row)
    selection = []
    for key, points in sorted(groups.items(), key=lambda item: tuple(str(k) for k in item[0])):
        better = {p["better"] for p in points}
        if len(better) != 1:
            raise ValueError(f"{dict(zip(GROUP_KEYS, key))}: points disagree on whether lower or higher is better")
        sign = 1.0 if better.pop() == "lower" else -1.0
        curve = sorted(points, key=lambda p: (p["concept_weight"], p["control_weight"]))
        finite = [p for p in curve if math.isfinite(p["value"])]
        entry: dict[str, Any] = {**dict(zip(GROUP_KEYS, key)), "better": points[0]["better"], "num_points": len(curve)}
        if finite:
            best = min(sign * p["value"] for p in finite)
            tied = [p for p in finite if sign * p["value"] <= best + tie_tolerance]
            chosen = min(tied, key=lambda p: (distance_to_default(p), p["concept_weight"], p["control_weight"]))
            entry.update(
                value=chosen["value"],
                concept_weight=chosen["concept_weight"],
                control_weight=chosen["control_weight"],
                distance_to_default=distance_to_default(chosen),
                path=chosen["path"],
                tied=[{k: p[k] for k in (*WEIGHT_KEYS, "value")} for p in tied],
            )
        else:
            entry.update(value=None, concept_weight=None, control_weight=None, distance_to_default=None,
                         path=None, tied=[])
        entry["curve"] = [_finite_or_none({k: p[k] for k in (*WEIGHT_KEYS, "value", "path")}) for p in curve]
        selection.append(entry)
    return selection


def summarize_sweep(sweep_dir: str | Path, out_dir: str | Path | None = None,
                    tie_tolerance: float = 0.0) -> list[dict[str, Any]]:
    """Collect `sweep_dir` and write ``sweep.csv``, ``sweep.json`` and ``selection.json`` into
    `out_dir` (default: `sweep_dir`); returns the selection."""
    rows = collect_results(sweep_dir)
    out = Path(out_dir) if out_dir is not None else Path(sweep_dir)
    write_table(rows, out / "sweep.csv", out / "sweep.json")
    selection = select_best(rows, tie_tolerance)
    write_json_atomic(out / "selection.json", selection)
    return selection


try:  # the Hydra callback; hydra-core is a dependency, but keep this module importable without it
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object


class CollectSweep(_HydraCallback):
    """Hydra callback: at the end of a multirun, `summarize_sweep` on its folder. A failure is
    logged, never raised, so it cannot turn a finished sweep into an error."""

    def __init__(self, tie_tolerance: float = 0.0):
        self.tie_tolerance = float(tie_tolerance)

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            selection = summarize_sweep(sweep_dir, tie_tolerance=self.tie_tolerance)
        except Exception as err:  # noqa: BLE001 - a summary must not fail the sweep
            log.warning("could not summarise the sweep in %s: %s: %s", sweep_dir, type(err).__name__, err)
            return
        for entry in selection:
            log.info("%s %s %s: best %s at concept_weight=%s control_weight=%s (%d points)", entry["run"],
                     entry["method"], entry["metric"], entry["value"], entry["concept_weight"],
                     entry["control_weight"], entry["num_points"])
        log.info("sweep table and selection written to %s", sweep_dir)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ccp.evaluation.sweeps", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    grid = sub.add_parser("grid", help="print the weight grid as a Hydra sweep value")
    grid.add_argument("start", type=float)
    grid.add_argument("stop", type=float)
    grid.add_argument("step", type=float, nargs="?", default=0.25)
    collect = sub.add_parser("collect", help="tabulate a ccp-eval multirun folder and select the best points")
    collect.add_argument("sweep_dir")
    collect.add_argument("--out", default=None, help="folder for sweep.csv/json and selection.json (default: sweep_dir)")
    collect.add_argument("--tie-tolerance", type=float, default=0.0)
    args = parser.parse_args(argv)
    if args.command == "grid":
        print(grid_override(args.start, args.stop, args.step))
        return
    for entry in summarize_sweep(args.sweep_dir, args.out, args.tie_tolerance):
        print(f"{entry['run']}\t{entry['method']}\t{entry['metric']}\tbest={entry['value']}\t"
              f"concept_weight={entry['concept_weight']}\tcontrol_weight={entry['control_weight']}\t"
              f"points={entry['num_points']}")


if __name__ == "__main__":
    main()
