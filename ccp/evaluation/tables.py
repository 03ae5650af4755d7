"""Table 1 (#param, FID per dataset) and Table 2 (text- and spatial-guided alignment) in the
paper's layout, from result records, with the paper's own numbers as labelled reference columns.

A result record is a dict with ``method`` (registry name: ours, dreambooth, ...), ``dataset``
(face, animal), ``params`` (trainable parameters), ``fid``, ``text_alignment`` and
``spatial_alignment`` (any of the metrics may be missing or None: it shows as "-").

    rows1 = table1_rows(records)          # one row per method, FID per dataset
    rows2 = table2_rows(records)          # one row per method (Table 2 is on faces)
    write_tables(records, "results")      # table1.md/.csv/.json, table2.md/.csv/.json

Human-preference columns (the paper's user study) are not reproduced. Every file is written
atomically (temporary file, then rename).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ccp.io import write_text_atomic

# The paper's row order and labels.
METHOD_ORDER: tuple[str, ...] = ("textual_inversion", "dreambooth", "custom_diffusion", "oft", "ours")
METHOD_LABELS: dict[str, str] = {
    "textual_inversion": "Textual Inversion",
    "dreambooth": "DreamBooth",
    "custom_diffusion": "Custom Diffusion",
    "oft": "OFT",
    "ours": "Ours",
}
DATASETS: tuple[str, ...] = ("face", "animal")
DATASET_LABELS: dict[str, str] = {"face": "Face", "animal": "Animal", "bold": "Bold", "outlined": "Outlined"}


@dataclass(frozen=True)
class PaperRow:
    """One method's numbers as printed in the paper (Tables 1 and 2)."""

    params: str
    fid: Mapping[str, float]
    text_alignment: float
    spatial_alignment: float


# Cao et al., Table 1 (#param., FID face / animal) and Table 2 (Align. text / spatial).
PAPER: dict[str, PaperRow] = {
    "textual_inversion": PaperRow("<1K", {"face": 70.62, "animal": 44.75}, 0.97, 0.22),
    "dreambooth": PaperRow("859M", {"face": 12.37, "animal": 23.92}, 0.24, 0.22),
    "custom_diffusion": PaperRow("44M", {"face": 40.98, "animal": 49.98}, 0.74, 0.20),
    "oft": PaperRow("23M", {"face": 27.50, "animal": 38.74}, 0.77, 0.21),
    "ours": PaperRow("859M", {"face": 6.57, "animal": 18.82}, 0.89, 0.20),
}


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def format_params(n: int | float | None) -> str:
    """Parameter counts, three significant digits: 768 -> "768", 43,963,328 -> "44M", 11,602,368 -> "11.6M"."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    n = int(n)
    for size, suffix in ((10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n >= size:
            return f"{n / size:.3g}{suffix}"
    return str(n)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def ordered_methods(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """Rows of the records (their ``method``), in the paper's order; a variant row (a record with
    ``method_class``, e.g. ``dreambooth_long`` of ``dreambooth``) right after its method's row,
    unknown ones last, in first-seen order."""
    seen: dict[str, str] = {}
    for r in records:
        seen.setdefault(r["method"], r.get("method_class") or r["method"])
    order = list(seen)

    def key(row: str) -> tuple[int, int, int]:
        base = seen[row]
        rank = METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER)
        return rank, int(row != base), order.index(row)

    return sorted(order, key=key)


def row_labels(records: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Row -> label: the record's own ``label`` (variant rows), else the paper's name."""
    labels: dict[str, str] = {}
    for r in records:
        labels.setdefault(r["method"], r.get("label") or method_label(r["method"]))
    return labels


def _index(records: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], Mapping[str, Any]]:
    out: dict[tuple[str, str], Mapping[str, Any]] = {}
    for r in records:
        key = (r["method"], r["dataset"])
        if key in out:
            raise ValueError(f"two result records for method {key[0]!r} on dataset {key[1]!r}")
        out[key] = r
    return out


def table1_rows(records: Sequence[Mapping[str, Any]], datasets: Sequence[str] = DATASETS) -> list[dict[str, Any]]:
    """One row per method: ``method``, ``label``, ``params`` (ours, from the first dataset that
    has it), ``fid_<dataset>`` per dataset, and the paper's ``paper_params``, ``paper_fid_<dataset>``."""
    index = _index(records)
    labels = row_labels(records)
    rows = []
    for method in ordered_methods(records):
        params = next((index[(method, d)].get("params") for d in datasets
                       if (method, d) in index and index[(method, d)].get("params") is not None), None)
        row: dict[str, Any] = {"method": method, "label": labels[method], "params": params}
        for d in datasets:
            row[f"fid_{d}"] = _number(index.get((method, d), {}).get("fid"))
        paper = PAPER.get(method)
        row["paper_params"] = paper.params if paper else None
        for d in datasets:
            row[f"paper_fid_{d}"] = paper.fid.get(d) if paper else None
        rows.append(row)
    return rows


def table2_rows(records: Sequence[Mapping[str, Any]], dataset: str = "face",
                extra: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One row per method evaluated on `dataset` (the paper's Table 2 is on faces):
    ``text_alignment``, ``spatial_alignment``, the record keys named in `extra` (e.g. the toy
    scale's ``text_alignment_colour``) and the paper's ``paper_text_alignment``,
    ``paper_spatial_alignment``."""
    index = _index(records)
    labels = row_labels(records)
    rows = []
    for method in ordered_methods(r for r in records if r["dataset"] == dataset):
        record = index[(method, dataset)]
        paper = PAPER.get(method)
        rows.append({
            "method": method,
            "label": labels[method],
            "text_alignment": _number(record.get("text_alignment")),
            **{key: _number(record.get(key)) for key in extra},
            "spatial_alignment": _number(record.get("spatial_alignment")),
            "paper_text_alignment": paper.text_alignment if paper else None,
            "paper_spatial_alignment": paper.spatial_alignment if paper else None,
        })
    return rows


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _md(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def table1_markdown(rows: Sequence[Mapping[str, Any]], datasets: Sequence[str] = DATASETS, title: str | None = None,
                    paper: bool = True) -> str:
    """Markdown Table 1: Method | #param | FID per dataset, then (``paper=True``) the paper's
    #param and FIDs in columns labelled "paper"."""
    header = ["Method", "#param"] + [f"{DATASET_LABELS.get(d, d)} FID ↓" for d in datasets]
    in_paper = [d for d in datasets if any(d in p.fid for p in PAPER.values())]  # none at toy scale
    if paper:
        header += ["#param (paper)"] + [f"{DATASET_LABELS.get(d, d)} FID (paper)" for d in in_paper]
    body = []
    for r in rows:
        cells = [r["label"], format_params(r["params"])] + [_fmt(r[f"fid_{d}"], 2) for d in datasets]
        if paper:
            cells += [r["paper_params"] or "-"] + [_fmt(r[f"paper_fid_{d}"], 2) for d in in_paper]
        body.append(cells)
    text = _md(header, body)
    note = ("\n(paper) columns: Cao et al., Table 1, reproduced results at 512x512 with 50k samples; "
            "human-preference columns are not reproduced.\n") if paper else ""
    return (f"### {title}\n\n" if title else "") + text + note


def table2_markdown(rows: Sequence[Mapping[str, Any]], title: str | None = None, paper: bool = True,
                    extra: Mapping[str, str] | None = None, not_applicable: Mapping[str, str] | None = None) -> str:
    """Markdown Table 2: Method | Text-guided Align. | (`extra`: key -> header) | Spatial-guided
    Align., then the paper's. A metric in `not_applicable` (key -> why) shows "n/a", with the
    reason under the table, instead of a number."""
    extra, not_applicable = dict(extra or {}), dict(not_applicable or {})
    header = ["Method", "Text-guided Align. ↑", *extra.values(), "Spatial-guided Align. ↑"]
    if paper:
        header += ["Text-guided Align. (paper)", "Spatial-guided Align. (paper)"]

    def cell(r: Mapping[str, Any], key: str) -> str:
        return "n/a" if key in not_applicable else _fmt(r[key], 2)

    body = []
    for r in rows:
        cells = [r["label"], cell(r, "text_alignment"), *(cell(r, k) for k in extra), cell(r, "spatial_alignment")]
        if paper:
            cells += [_fmt(r["paper_text_alignment"], 2), _fmt(r["paper_spatial_alignment"], 2)]
        body.append(cells)
    note = ("\n(paper) columns: Cao et al., Table 2. Our spatial Align. is edge F1 (docs/alignment.md), a "
            "different quantity from the paper's unspecified discrepancy; compare methods only within a column.\n"
            ) if paper else ""
    note += "".join(f"\nn/a ({key}): {why}\n" for key, why in not_applicable.items())
    return (f"### {title}\n\n" if title else "") + _md(header, body) + note


def rows_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """CSV with the rows' keys as header (numbers unrounded, missing values empty)."""
    if not rows:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buffer.getvalue()


def drift_rows(records: Sequence[Mapping[str, Any]], datasets: Sequence[str] = DATASETS) -> list[dict[str, Any]]:
    """One row per method with a ``drift`` record (`ccp.evaluation.drift`): per dataset
    ``drift_fid_<d>`` (method's unconditional vs the prior's), ``style_share_<d>`` and
    ``prior_style_share_<d>`` (share of samples in the dataset's concept style)."""
    index = _index(records)
    labels = row_labels(records)
    rows = []
    for method in ordered_methods(r for r in records if r.get("drift")):
        row: dict[str, Any] = {"method": method, "label": labels[method]}
        for d in datasets:
            drift = index.get((method, d), {}).get("drift") or {}
            row[f"drift_fid_{d}"] = _number(drift.get("fid"))
            row[f"style_share_{d}"] = _number(drift.get("style_share"))
            row[f"prior_style_share_{d}"] = _number(drift.get("prior_style_share"))
        rows.append(row)
    return rows


def drift_markdown(rows: Sequence[Mapping[str, Any]], datasets: Sequence[str] = DATASETS, title: str | None = None,
                   num_samples: int | None = None) -> str:
    header = ["Method"]
    for d in datasets:
        name = DATASET_LABELS.get(d, d)
        header += [f"{name} drift FID ↓", f"{name} style share", f"{name} style share (prior)"]
    body = [[r["label"]] + [cell for d in datasets for cell in (
        _fmt(r[f"drift_fid_{d}"], 2), _fmt(r[f"style_share_{d}"], 3), _fmt(r[f"prior_style_share_{d}"], 3))]
        for r in rows]
    note = ("\nUnconditional drift (§3.2, Appendix B): the method's unconditional source alone (its "
            "`default_guidance` without terms) vs the prior's unconditional, same seeds"
            f"{f', {num_samples} samples each' if num_samples else ''}. Drift FID: between the two sample sets; "
            "style share: samples the classifier's style head calls the dataset's concept style.\n")
    return (f"### {title}\n\n" if title else "") + _md(header, body) + note


WEIGHT_LABELS = {"control_weight": "control (CFG)", "concept_weight": "concept"}


def weight_search_rows(records: Sequence[Mapping[str, Any]], datasets: Sequence[str] = DATASETS) -> list[dict[str, Any]]:
    """One row per (method, dataset, weight value) with a ``fid_search`` record: the long form
    (CSV); `weight_search_markdown` folds it per method."""
    labels = row_labels(records)
    rows = []
    index = _index(records)
    for method in ordered_methods(r for r in records if r.get("fid_search")):
        for d in datasets:
            search = index.get((method, d), {}).get("fid_search")
            if not search:
                continue
            for value, fid in search["fid"].items():
                rows.append({"method": method, "label": labels[method], "dataset": d, "weight": search["weight"],
                             "value": float(value), "fid": _number(fid), "best": float(value) == search["best_weight"]})
    return rows


def weight_search_markdown(records: Sequence[Mapping[str, Any]], datasets: Sequence[str] = DATASETS,
                           title: str | None = None) -> str:
    """Method | weight searched | per dataset: FID at each value, best FID (at which value)."""
    index = _index(records)
    labels = row_labels(records)
    header = ["Method", "Weight searched"]
    for d in datasets:
        name = DATASET_LABELS.get(d, d)
        header += [f"{name} FID at each value", f"{name} best FID ↓", "at"]
    body = []
    for method in ordered_methods(r for r in records if r.get("fid_search")):
        searches = [index.get((method, d), {}).get("fid_search") for d in datasets]
        weight = next(s["weight"] for s in searches if s)
        cells = [labels[method], WEIGHT_LABELS.get(weight, weight)]
        for search in searches:
            if not search:
                cells += ["-", "-", "-"]
                continue
            per_value = " · ".join(f"{v}: {_fmt(_number(f), 1)}" for v, f in search["fid"].items())
            cells += [per_value, _fmt(_number(search["best_fid"]), 2), f"{search['best_weight']:g}"]
        body.append(cells)
    note = ("\nTable 1 at each row's best guidance weight (the paper searched weights per method): FID with "
            "the weight in column 2 varied, the other weights as configured, the same seeds at every value.\n")
    return (f"### {title}\n\n" if title else "") + _md(header, body) + note


def write_tables(records: Sequence[Mapping[str, Any]], out_dir: str | Path, datasets: Sequence[str] = DATASETS,
                 table2_dataset: str = "face", title_suffix: str = "", table2_extra: Mapping[str, str] | None = None,
                 not_applicable: Mapping[str, str] | None = None) -> dict[str, Path]:
    """Write ``table1.{md,csv,json}`` and ``table2.{md,csv,json}`` under `out_dir` (atomically),
    ``table_drift.{md,csv,json}`` when some record has a ``drift`` entry and
    ``table1_weight_search.{md,csv,json}`` when some record has a ``fid_search`` entry.

    The JSON files hold ``{"rows": [...], "records": [...], "paper": {...}}``: the table rows with
    unrounded numbers, the input records and the paper's values. `table2_extra` (record key ->
    column header) adds Table 2 columns; `not_applicable` (metric -> why) shows "n/a" for a metric
    that is not measured at this scale. Returns the paths by name.
    """
    out_dir = Path(out_dir)
    extra = dict(table2_extra or {})
    rows1 = table1_rows(records, datasets)
    rows2 = table2_rows(records, table2_dataset, extra=list(extra))
    paper = {m: {"params": p.params, "fid": dict(p.fid), "text_alignment": p.text_alignment,
                 "spatial_alignment": p.spatial_alignment} for m, p in PAPER.items()}
    used = [dict(r) for r in records]
    json2 = {"rows": rows2, "records": [r for r in used if r["dataset"] == table2_dataset], "paper": paper}
    if not_applicable:
        json2["not_applicable"] = dict(not_applicable)
    paths = {
        "table1.md": write_text_atomic(out_dir / "table1.md", table1_markdown(
            rows1, datasets, title=f"Table 1: unconditional generation, FID{title_suffix}")),
        "table1.csv": write_text_atomic(out_dir / "table1.csv", rows_csv(rows1)),
        "table1.json": write_text_atomic(out_dir / "table1.json", json.dumps(
            {"rows": rows1, "records": used, "paper": paper}, indent=1) + "\n"),
        "table2.md": write_text_atomic(out_dir / "table2.md", table2_markdown(
            rows2, title=f"Table 2: controllability, alignment ({table2_dataset}){title_suffix}", extra=extra,
            not_applicable=not_applicable)),
        "table2.csv": write_text_atomic(out_dir / "table2.csv", rows_csv(rows2)),
        "table2.json": write_text_atomic(out_dir / "table2.json", json.dumps(json2, indent=1) + "\n"),
    }
    rows_d = drift_rows(records, datasets)
    if rows_d:
        counts = {r["drift"].get("num_samples") for r in records if r.get("drift")}
        paths["table_drift.md"] = write_text_atomic(out_dir / "table_drift.md", drift_markdown(
            rows_d, datasets, title=f"Unconditional drift{title_suffix}",
            num_samples=counts.pop() if len(counts) == 1 else None))
        paths["table_drift.csv"] = write_text_atomic(out_dir / "table_drift.csv", rows_csv(rows_d))
        paths["table_drift.json"] = write_text_atomic(out_dir / "table_drift.json", json.dumps(
            {"rows": rows_d, "records": [r for r in used if r.get("drift")]}, indent=1) + "\n")
    rows_w = weight_search_rows(records, datasets)
    if rows_w:
        paths["table1_weight_search.md"] = write_text_atomic(out_dir / "table1_weight_search.md", weight_search_markdown(
            records, datasets, title=f"Table 1 with guidance weights searched{title_suffix}"))
        paths["table1_weight_search.csv"] = write_text_atomic(out_dir / "table1_weight_search.csv", rows_csv(rows_w))
        paths["table1_weight_search.json"] = write_text_atomic(out_dir / "table1_weight_search.json", json.dumps(
            {"rows": rows_w, "records": [r for r in used if r.get("fid_search")]}, indent=1) + "\n")
    return paths
