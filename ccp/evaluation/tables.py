"""Table 1 (#param, FID per dataset) and Table 2 (text- and spatial-guided alignment) in the
paper's layout, from result records, with the paper's own numbers as labelled reference columns.

A result record is a dict with ``method`` (registry name: ours, dreambooth, ...), ``dataset``
(face, animal), ``params`` (trainable parameters), ``fid``, ``text_alignment`` and
``spatial_alignment`` (any of the metrics may be missing or None: it shows as "-").

    rows1 = table1_rows(records)          # one row per method, FID per dataset
    rows2 = table2_rows(records)          # one row per method (Table 2 is on faces)
    write_tables(records, "results")      # table1.md/.csv/.json, table2.md/.csv/.json

Table 1's human-preference column ("Pref.") comes from a preference study (`ccp.study`) when a
record has ``pref`` (the share of votes preferring ours over the record's method, in percent) and
``pref_ci``; without a study it is left out. Every file is written atomically (temporary file, then
rename).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ccp.evaluation.stand_in import STAND_IN_LABEL
from ccp.io import write_text_atomic

# The paper's row order and labels.
METHOD_ORDER: tuple[str, ...] = ("textual_inversion", "dreambooth", "custom_diffusion", "oft", "lora", "ours")
METHOD_LABELS: dict[str, str] = {
    "textual_inversion": "Textual Inversion",
    "dreambooth": "DreamBooth",
    "custom_diffusion": "Custom Diffusion",
    "oft": "OFT",
    "lora": "LoRA",
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


def _span(row: dict[str, Any], key: str, record: Mapping[str, Any], path: str) -> None:
    """Add ``<key>_low`` / ``<key>_high`` to a row when the record (aggregated over seeds,
    `ccp.evaluation.intervals`) has an interval for the metric at `path`."""
    interval = (record.get("intervals") or {}).get(path)
    if interval and interval.get("low") is not None:
        row[f"{key}_low"], row[f"{key}_high"] = interval["low"], interval["high"]


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
            record = index.get((method, d), {})
            row[f"fid_{d}"] = _number(record.get("fid"))
            _span(row, f"fid_{d}", record, "fid")
        if any(index.get((method, d), {}).get("kid") is not None for d in datasets):
            for d in datasets:
                record = index.get((method, d), {})
                row[f"kid_{d}"] = _number(record.get("kid"))
                row[f"kid_std_{d}"] = _number(record.get("kid_std"))
                _span(row, f"kid_{d}", record, "kid")
        if any(index.get((method, d), {}).get("pref") is not None for d in datasets):
            for d in datasets:
                record = index.get((method, d), {})
                row[f"pref_{d}"] = _number(record.get("pref"))
                if record.get("pref_ci"):
                    row[f"pref_{d}_low"], row[f"pref_{d}_high"] = record["pref_ci"]
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
        row = {
            "method": method,
            "label": labels[method],
            "text_alignment": _number(record.get("text_alignment")),
            **{key: _number(record.get(key)) for key in extra},
            "spatial_alignment": _number(record.get("spatial_alignment")),
            "paper_text_alignment": paper.text_alignment if paper else None,
            "paper_spatial_alignment": paper.spatial_alignment if paper else None,
        }
        for key in ("text_alignment", *extra, "spatial_alignment"):
            _span(row, key, record, key)
        rows.append(row)
    return rows


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _cell(row: Mapping[str, Any], key: str, digits: int) -> str:
    """A number, with its interval over seeds as "mean [low, high]" when the row has one."""
    text = _fmt(row.get(key), digits)
    if row.get(f"{key}_low") is not None:
        text += f" [{row[f'{key}_low']:.{digits}f}, {row[f'{key}_high']:.{digits}f}]"
    return text


def _sig(value: float | None) -> str:
    """Three significant digits: KID's scale follows the features' (Inception's ~1e-2, the toy
    classifier's far larger), so no fixed number of decimals fits both."""
    return "-" if value is None else f"{value:.3g}"


def _kid_cell(row: Mapping[str, Any], d: str) -> str:
    """KID: over seeds "mean [low, high]", for one run "mean ± std over subsets"."""
    mean, low, std = row.get(f"kid_{d}"), row.get(f"kid_{d}_low"), row.get(f"kid_std_{d}")
    if low is not None:
        return f"{_sig(mean)} [{_sig(low)}, {_sig(row.get(f'kid_{d}_high'))}]"
    return _sig(mean) if std is None else f"{_sig(mean)} ± {_sig(std)}"


def _md(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def table1_markdown(rows: Sequence[Mapping[str, Any]], datasets: Sequence[str] = DATASETS, title: str | None = None,
                    paper: bool = True, note: str | None = None) -> str:
    """Markdown Table 1: Method | #param | FID per dataset, then (``paper=True``) the paper's
    #param and FIDs in columns labelled "paper", then KID per dataset (3 significant digits) when the rows have it
    (mean ± std over subsets for one run). `note`: a footnote (e.g. how intervals are computed)."""
    kid = any(f"kid_{d}" in r for r in rows for d in datasets)
    pref = [d for d in datasets if any(r.get(f"pref_{d}") is not None for r in rows)]
    header = ["Method", "#param"] + [f"{DATASET_LABELS.get(d, d)} FID ↓" for d in datasets]
    header += [f"{DATASET_LABELS.get(d, d)} Pref.: ours preferred (%)" for d in pref]
    in_paper = [d for d in datasets if any(d in p.fid for p in PAPER.values())]  # none at toy scale
    if paper:
        header += ["#param (paper)"] + [f"{DATASET_LABELS.get(d, d)} FID (paper)" for d in in_paper]
    body = []
    for r in rows:
        cells = [r["label"], format_params(r["params"])] + [_cell(r, f"fid_{d}", 2) for d in datasets]
        cells += [_cell(r, f"pref_{d}", 1) for d in pref]
        if paper:
            cells += [r["paper_params"] or "-"] + [_fmt(r[f"paper_fid_{d}"], 2) for d in in_paper]
        if kid:
            cells += [_kid_cell(r, d) if f"kid_{d}" in r else "-" for d in datasets]
        body.append(cells)
    if kid:
        header += [f"{DATASET_LABELS.get(d, d)} KID ↓" for d in datasets]
    text = _md(header, body)
    footer = ("\n(paper) columns: Cao et al., Table 1, reproduced results at 512x512 with 50k samples"
              + ("" if pref else "; human-preference columns come only from a study (ccp-study, docs/study.md)")
              + ".\n") if paper else ""
    if pref:
        footer += ("\nPref.: in the preference study (docs/study.md), the share of counted votes on (ours, row) "
                   "pairs that preferred ours, with its 95% interval: the span of the bootstrap over raters and the "
                   "Wilson interval on the pooled votes (never a point with few votes); ours' own row has none.\n")
    if kid:
        footer += ("\nKID: torchmetrics' polynomial-kernel MMD on the same features as FID, unbiased at any sample "
                   "count (FID is not: compare FIDs only at equal counts).\n")
    footer += f"\n{note}\n" if note else ""
    return (f"### {title}\n\n" if title else "") + text + footer


def table2_markdown(rows: Sequence[Mapping[str, Any]], title: str | None = None, paper: bool = True,
                    extra: Mapping[str, str] | None = None, not_applicable: Mapping[str, str] | None = None,
                    note: str | None = None) -> str:
    """Markdown Table 2: Method | Text-guided Align. | (`extra`: key -> header) | Spatial-guided
    Align. | (`extra` keys ``spatial_alignment_*``), then the paper's. A metric in `not_applicable` (key -> why) shows "n/a", with the
    reason under the table, instead of a number."""
    extra, not_applicable = dict(extra or {}), dict(not_applicable or {})
    # extras of the spatial column (``spatial_alignment_*``) follow it, the text column's precede it
    after = {k: v for k, v in extra.items() if k.startswith("spatial_alignment_")}
    before = {k: v for k, v in extra.items() if k not in after}
    header = ["Method", "Text-guided Align. ↑", *before.values(), "Spatial-guided Align. ↑", *after.values()]
    if paper:
        header += ["Text-guided Align. (paper)", "Spatial-guided Align. (paper)"]

    def cell(r: Mapping[str, Any], key: str) -> str:
        return "n/a" if key in not_applicable else _cell(r, key, 2)

    body = []
    for r in rows:
        cells = [r["label"], cell(r, "text_alignment"), *(cell(r, k) for k in before), cell(r, "spatial_alignment"),
                 *(cell(r, k) for k in after)]
        if paper:
            cells += [_fmt(r["paper_text_alignment"], 2), _fmt(r["paper_spatial_alignment"], 2)]
        body.append(cells)
    footer = note
    note = ("\n(paper) columns: Cao et al., Table 2. Our spatial Align. is edge F1 (docs/alignment.md), a "
            "different quantity from the paper's unspecified discrepancy; compare methods only within a column.\n"
            ) if paper else ""
    note += "".join(f"\nn/a ({key}): {why}\n" for key, why in not_applicable.items())
    note += f"\n{footer}\n" if footer else ""
    return (f"### {title}\n\n" if title else "") + _md(header, body) + note


def rows_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """CSV with the rows' keys as header (numbers unrounded, missing values empty)."""
    if not rows:
        return ""
    buffer = io.StringIO()
    fields = list(dict.fromkeys(k for row in rows for k in row))  # rows may differ (intervals, KID)
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
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
            record = index.get((method, d), {})
            drift = record.get("drift") or {}
            for key, name in (("drift_fid", "fid"), ("style_share", "style_share"),
                              ("prior_style_share", "prior_style_share")):
                row[f"{key}_{d}"] = _number(drift.get(name))
                _span(row, f"{key}_{d}", record, f"drift.{name}")
        rows.append(row)
    return rows


def drift_markdown(rows: Sequence[Mapping[str, Any]], datasets: Sequence[str] = DATASETS, title: str | None = None,
                   num_samples: int | None = None, note: str | None = None) -> str:
    header = ["Method"]
    for d in datasets:
        name = DATASET_LABELS.get(d, d)
        header += [f"{name} drift FID ↓", f"{name} style share", f"{name} style share (prior)"]
    body = [[r["label"]] + [cell for d in datasets for cell in (
        _cell(r, f"drift_fid_{d}", 2), _cell(r, f"style_share_{d}", 3), _cell(r, f"prior_style_share_{d}", 3))]
        for r in rows]
    text = ("\nUnconditional drift (§3.2, Appendix B): the method's unconditional source alone (its "
            "`default_guidance` without terms) vs the prior's unconditional, same seeds"
            f"{f', {num_samples} samples each' if num_samples else ''}. Drift FID: between the two sample sets; "
            "style share: samples the classifier's style head calls the dataset's concept style.\n")
    note = text + (f"\n{note}\n" if note else "")
    return (f"### {title}\n\n" if title else "") + _md(header, body) + note


def spread_rows(first_seed: Sequence[Mapping[str, Any]], over_seeds: Sequence[Mapping[str, Any]],
                dataset: str) -> list[dict[str, Any]]:
    """One row per method whose first-seed record has ``fid_sampling`` (FID of one trained model
    at several sampling seeds) on `dataset`: that spread (mean, std, 95% t interval) next to the
    spread of the same FID over run seeds (records aggregated by `ccp.evaluation.intervals`), their
    ratio, and the first seed's KID with its std over subsets."""
    from ccp.evaluation.intervals import t_interval

    index = _index(first_seed)
    aggregated = _index(over_seeds)
    labels = row_labels(first_seed)
    rows = []
    for method in ordered_methods(r for r in first_seed if r["dataset"] == dataset and r.get("fid_sampling")):
        record = index[(method, dataset)]
        sampling = t_interval(record["fid_sampling"]["fid"])
        seeds = (aggregated.get((method, dataset), {}).get("intervals") or {}).get("fid") or {}
        ratio = (sampling.std / seeds["std"] if sampling.std is not None and seeds.get("std") else None)
        rows.append({
            "method": method, "label": labels[method], "dataset": dataset,
            "num_samples": record["fid_sampling"].get("num_samples"),
            "sampling_n": sampling.n, "sampling_mean": sampling.mean, "sampling_std": sampling.std,
            "sampling_low": sampling.low, "sampling_high": sampling.high,
            "seeds_n": seeds.get("n"), "seeds_mean": seeds.get("mean"), "seeds_std": seeds.get("std"),
            "seeds_low": seeds.get("low"), "seeds_high": seeds.get("high"),
            "std_ratio": ratio, "kid": _number(record.get("kid")), "kid_std": _number(record.get("kid_std")),
        })
    return rows


def spread_markdown(rows: Sequence[Mapping[str, Any]], dataset: str, seeds: Sequence[int],
                    title: str | None = None) -> str:
    """Method | FID over sampling seeds (one model) | FID over run seeds | std ratio | KID (first seed)."""
    name = DATASET_LABELS.get(dataset, dataset)
    header = ["Method", f"{name} FID, one model, sampling seeds: mean [95%] (std)",
              f"{name} FID over run seeds: mean [95%] (std)", "std ratio (sampling / run seeds)",
              "KID, first seed (± std over subsets)"]

    def span(r: Mapping[str, Any], side: str) -> str:
        if r.get(f"{side}_low") is None:
            return _fmt(r.get(f"{side}_mean"), 1)
        return (f"{r[f'{side}_mean']:.1f} [{r[f'{side}_low']:.1f}, {r[f'{side}_high']:.1f}] "
                f"({r[f'{side}_std']:.1f}, n={r[f'{side}_n']})")

    body = [[r["label"], span(r, "sampling"), span(r, "seeds"), _fmt(r.get("std_ratio"), 2),
             "-" if r.get("kid") is None else f"{_sig(r['kid'])} ± {_sig(r.get('kid_std') or 0.0)}"]
            for r in rows]
    counts = {r.get("num_samples") for r in rows}
    note = (f"\nTwo sources of spread. Sampling seeds: the first run seed's ({seeds[0]}) trained model, FID of "
            f"{counts.pop() if len(counts) == 1 else 'the configured'} samples drawn from each sampling seed "
            "(disjoint noise), against the same real images: the evaluation's own spread. Run seeds: a model trained "
            f"and sampled per seed {list(seeds)}: training and sampling spread together. A ratio well below 1 says "
            "the spread over seeds is mostly training; intervals: Student t.\n")
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
                           title: str | None = None, note: str | None = None) -> str:
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
            record = index[(method, datasets[searches.index(search)])]
            best: dict[str, Any] = {"best": _number(search["best_fid"])}
            _span(best, "best", record, "fid_search.best_fid")
            at = f"{search['best_weight']:g}"
            if len(set(search.get("best_weights") or [])) > 1:  # seeds chose different weights
                at += " (per seed: " + ", ".join(f"{w:g}" for w in search["best_weights"]) + ")"
            cells += [per_value, _cell(best, "best", 2), at]
        body.append(cells)
    text = ("\nTable 1 at each row's best guidance weight (the paper searched weights per method): FID with "
            "the weight in column 2 varied, the other weights as configured, the same seeds at every value.\n")
    note = text + (f"\n{note}\n" if note else "")
    return (f"### {title}\n\n" if title else "") + _md(header, body) + note


def stand_in_metrics(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """The metrics some record measured with stand-in weight files (its ``stand_in_weights``:
    `ccp.evaluation.stand_in`); empty for real weights."""
    found: dict[str, None] = {}
    for r in records:
        marked = r.get("stand_in_weights")  # reproduce: the metric names; elsewhere possibly just true
        for metric in marked if isinstance(marked, (list, tuple)) else ["some metric"] if marked else []:
            found[str(metric)] = None
    return list(found)


def stand_in_banner(records: Iterable[Mapping[str, Any]]) -> str:
    """The line above every table whose records used stand-in weights; "" otherwise."""
    metrics = stand_in_metrics(records)
    return (f"**{STAND_IN_LABEL}** (measured with stand-in weight files: {', '.join(metrics)})\n\n"
            if metrics else "")


def _labelled(rows: list[dict[str, Any]], records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every row flagged ``stand_in_weights`` (a CSV column too) when some record used stand-in weights."""
    if stand_in_metrics(records):
        for row in rows:
            row["stand_in_weights"] = True
    return rows


def write_tables(records: Sequence[Mapping[str, Any]], out_dir: str | Path, datasets: Sequence[str] = DATASETS,
                 table2_dataset: str = "face", title_suffix: str = "", table2_extra: Mapping[str, str] | None = None,
                 not_applicable: Mapping[str, str] | None = None, note: str | None = None) -> dict[str, Path]:
    """Write ``table1.{md,csv,json}`` and ``table2.{md,csv,json}`` under `out_dir` (atomically),
    ``table_drift.{md,csv,json}`` when some record has a ``drift`` entry and
    ``table1_weight_search.{md,csv,json}`` when some record has a ``fid_search`` entry.

    The JSON files hold ``{"rows": [...], "records": [...], "paper": {...}}``: the table rows with
    unrounded numbers, the input records and the paper's values. `table2_extra` (record key ->
    column header) adds Table 2 columns; `not_applicable` (metric -> why) shows "n/a" for a metric
    that is not measured at this scale. `note`: a footnote under every table (records aggregated
    over seeds, `ccp.evaluation.intervals`: how the intervals are computed). When some record was
    measured with stand-in weight files (its ``stand_in_weights``), every table starts with
    `STAND_IN_LABEL` and every row has ``stand_in_weights: true``. Returns the paths by name.
    """
    out_dir = Path(out_dir)
    extra = dict(table2_extra or {})
    rows1 = _labelled(table1_rows(records, datasets), records)
    rows2 = _labelled(table2_rows(records, table2_dataset, extra=list(extra)), records)
    banner = stand_in_banner(records)
    paper = {m: {"params": p.params, "fid": dict(p.fid), "text_alignment": p.text_alignment,
                 "spatial_alignment": p.spatial_alignment} for m, p in PAPER.items()}
    used = [dict(r) for r in records]
    json2 = {"rows": rows2, "records": [r for r in used if r["dataset"] == table2_dataset], "paper": paper}
    if not_applicable:
        json2["not_applicable"] = dict(not_applicable)
    paths = {
        "table1.md": write_text_atomic(out_dir / "table1.md", banner + table1_markdown(
            rows1, datasets, title=f"Table 1: unconditional generation, FID{title_suffix}", note=note)),
        "table1.csv": write_text_atomic(out_dir / "table1.csv", rows_csv(rows1)),
        "table1.json": write_text_atomic(out_dir / "table1.json", json.dumps(
            {"rows": rows1, "records": used, "paper": paper}, indent=1) + "\n"),
        "table2.md": write_text_atomic(out_dir / "table2.md", banner + table2_markdown(
            rows2, title=f"Table 2: controllability, alignment ({table2_dataset}){title_suffix}", extra=extra,
            not_applicable=not_applicable, note=note)),
        "table2.csv": write_text_atomic(out_dir / "table2.csv", rows_csv(rows2)),
        "table2.json": write_text_atomic(out_dir / "table2.json", json.dumps(json2, indent=1) + "\n"),
    }
    rows_d = _labelled(drift_rows(records, datasets), records)
    if rows_d:
        counts = {r["drift"].get("num_samples") for r in records if r.get("drift")}
        paths["table_drift.md"] = write_text_atomic(out_dir / "table_drift.md", banner + drift_markdown(
            rows_d, datasets, title=f"Unconditional drift{title_suffix}",
            num_samples=counts.pop() if len(counts) == 1 else None, note=note))
        paths["table_drift.csv"] = write_text_atomic(out_dir / "table_drift.csv", rows_csv(rows_d))
        paths["table_drift.json"] = write_text_atomic(out_dir / "table_drift.json", json.dumps(
            {"rows": rows_d, "records": [r for r in used if r.get("drift")]}, indent=1) + "\n")
    rows_w = _labelled(weight_search_rows(records, datasets), records)
    if rows_w:
        search_md = weight_search_markdown(
            records, datasets, title=f"Table 1 with guidance weights searched{title_suffix}",
            note=None if note is None else note + " Per-value FIDs: means over seeds; best FID: each seed's own best.")
        paths["table1_weight_search.md"] = write_text_atomic(out_dir / "table1_weight_search.md", banner + search_md)
        paths["table1_weight_search.csv"] = write_text_atomic(out_dir / "table1_weight_search.csv", rows_csv(rows_w))
        paths["table1_weight_search.json"] = write_text_atomic(out_dir / "table1_weight_search.json", json.dumps(
            {"rows": rows_w, "records": [r for r in used if r.get("fid_search")]}, indent=1) + "\n")
    return paths
