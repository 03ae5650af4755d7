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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ccp.training.latent_cache import write_atomic

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
DATASET_LABELS: dict[str, str] = {"face": "Face", "animal": "Animal"}


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
    """Methods of the records, in the paper's order, unknown ones after them in first-seen order."""
    seen: list[str] = []
    for r in records:
        if r["method"] not in seen:
            seen.append(r["method"])
    return [m for m in METHOD_ORDER if m in seen] + [m for m in seen if m not in METHOD_ORDER]


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
    rows = []
    for method in ordered_methods(records):
        params = next((index[(method, d)].get("params") for d in datasets
                       if (method, d) in index and index[(method, d)].get("params") is not None), None)
        row: dict[str, Any] = {"method": method, "label": method_label(method), "params": params}
        for d in datasets:
            row[f"fid_{d}"] = _number(index.get((method, d), {}).get("fid"))
        paper = PAPER.get(method)
        row["paper_params"] = paper.params if paper else None
        for d in datasets:
            row[f"paper_fid_{d}"] = paper.fid.get(d) if paper else None
        rows.append(row)
    return rows


def table2_rows(records: Sequence[Mapping[str, Any]], dataset: str = "face") -> list[dict[str, Any]]:
    """One row per method evaluated on `dataset` (the paper's Table 2 is on faces):
    ``text_alignment``, ``spatial_alignment`` and the paper's ``paper_text_alignment``,
    ``paper_spatial_alignment``."""
    index = _index(records)
    rows = []
    for method in ordered_methods(r for r in records if r["dataset"] == dataset):
        record = index[(method, dataset)]
        paper = PAPER.get(method)
        rows.append({
            "method": method,
            "label": method_label(method),
            "text_alignment": _number(record.get("text_alignment")),
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
    if paper:
        header += ["#param (paper)"] + [f"{DATASET_LABELS.get(d, d)} FID (paper)" for d in datasets]
    body = []
    for r in rows:
        cells = [r["label"], format_params(r["params"])] + [_fmt(r[f"fid_{d}"], 2) for d in datasets]
        if paper:
            cells += [r["paper_params"] or "-"] + [_fmt(r[f"paper_fid_{d}"], 2) for d in datasets]
        body.append(cells)
    text = _md(header, body)
    note = ("\n(paper) columns: Cao et al., Table 1, reproduced results at 512x512 with 50k samples; "
            "human-preference columns are not reproduced.\n") if paper else ""
    return (f"### {title}\n\n" if title else "") + text + note


def table2_markdown(rows: Sequence[Mapping[str, Any]], title: str | None = None, paper: bool = True) -> str:
    """Markdown Table 2: Method | Text-guided Align. | Spatial-guided Align., then the paper's."""
    header = ["Method", "Text-guided Align. ↑", "Spatial-guided Align. ↑"]
    if paper:
        header += ["Text-guided Align. (paper)", "Spatial-guided Align. (paper)"]
    body = []
    for r in rows:
        cells = [r["label"], _fmt(r["text_alignment"], 2), _fmt(r["spatial_alignment"], 2)]
        if paper:
            cells += [_fmt(r["paper_text_alignment"], 2), _fmt(r["paper_spatial_alignment"], 2)]
        body.append(cells)
    note = ("\n(paper) columns: Cao et al., Table 2. Our spatial Align. is edge F1 (docs/alignment.md), a "
            "different quantity from the paper's unspecified discrepancy; compare methods only within a column.\n"
            ) if paper else ""
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


def write_text_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: (Path(tmp).write_text(text), os.chmod(tmp, 0o644)))
    return path


def write_tables(records: Sequence[Mapping[str, Any]], out_dir: str | Path, datasets: Sequence[str] = DATASETS,
                 table2_dataset: str = "face", title_suffix: str = "") -> dict[str, Path]:
    """Write ``table1.{md,csv,json}`` and ``table2.{md,csv,json}`` under `out_dir` (atomically).

    The JSON files hold ``{"rows": [...], "records": [...], "paper": {...}}``: the table rows with
    unrounded numbers, the input records and the paper's values. Returns the paths by name.
    """
    out_dir = Path(out_dir)
    rows1 = table1_rows(records, datasets)
    rows2 = table2_rows(records, table2_dataset)
    paper = {m: {"params": p.params, "fid": dict(p.fid), "text_alignment": p.text_alignment,
                 "spatial_alignment": p.spatial_alignment} for m, p in PAPER.items()}
    used = [dict(r) for r in records]
    paths = {
        "table1.md": write_text_atomic(out_dir / "table1.md", table1_markdown(
            rows1, datasets, title=f"Table 1: unconditional generation, FID{title_suffix}")),
        "table1.csv": write_text_atomic(out_dir / "table1.csv", rows_csv(rows1)),
        "table1.json": write_text_atomic(out_dir / "table1.json", json.dumps(
            {"rows": rows1, "records": used, "paper": paper}, indent=1) + "\n"),
        "table2.md": write_text_atomic(out_dir / "table2.md", table2_markdown(
            rows2, title=f"Table 2: controllability, alignment ({table2_dataset}){title_suffix}")),
        "table2.csv": write_text_atomic(out_dir / "table2.csv", rows_csv(rows2)),
        "table2.json": write_text_atomic(out_dir / "table2.json", json.dumps(
            {"rows": rows2, "records": [r for r in used if r["dataset"] == table2_dataset], "paper": paper},
            indent=1) + "\n"),
    }
    return paths
