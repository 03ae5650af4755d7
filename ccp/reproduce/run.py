"""Tables 1-2, the drift table and Figs. 8-10 for every method x dataset of a scale.

For every cell: use the ccp-train export if it exists (``exports.<dataset>.<row>``, default
``<train_dir>/<dataset>_<row>/export``), else (``train_missing: true``) train it in-process with
the listed experiment; then count trainable parameters, measure FID (every dataset; and at each
value of a searched weight), text- and spatial-guided alignment (``table2_dataset``) and drift, and
write ``table1.{md,csv,json}``, ``table2.*``, ``table_drift.*``, ``table1_weight_search.*`` and the
figures into ``results_dir``. Every path is checked first (`check_inputs`); a rerun reuses finished
exports and every metric whose settings and export are unchanged; FID shards resume on their own.

Scales (``conf/scale/``): ``tiny`` is an offline CPU smoke run of the whole recipe (random tiny
prior and images, stand-in instruments; its numbers say nothing about the methods); ``toy`` the
digits reproduction (`ccp.toy`); ``full`` the paper's evaluation on trained SD v1.5 exports.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from ccp.evaluation.tables import write_tables
from ccp.io import write_json_atomic
from ccp.priors.loading import load_controlnet, load_prior
from ccp.reproduce.config import check_inputs, row_spec, search_enabled
from ccp.reproduce.exports import ensure_export
from ccp.reproduce.figures import draw_figures
from ccp.reproduce.inputs import digit_classifier, prepare_inputs
from ccp.reproduce.measure import (
    count_params,
    measure_drift,
    measure_fid,
    measure_spatial,
    measure_text,
    prior_unconditional_samples,
    search_fid,
    text_parts,
)
from ccp.reproduce.records import Cell


def reproduce(cfg: DictConfig, progress: bool = True) -> dict[str, Any]:
    """Train what is missing, evaluate, write tables and figures. Returns ``{records, tables,
    figures, trained, computed, reused, seconds}``. ``threads``: torch CPU threads for the run
    (CPU results depend on it; restored afterwards)."""
    threads = torch.get_num_threads()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    try:
        return _reproduce(cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _reproduce(cfg: DictConfig, progress: bool) -> dict[str, Any]:
    start = time.perf_counter()
    check_inputs(cfg)
    prepare_inputs(cfg, progress)
    check_inputs(cfg)  # the toy folders now exist

    trained = []
    jobs = [(d, m) for d in cfg.datasets for m in cfg.methods]
    exports = {}
    for d, m in tqdm(jobs, desc="exports (train if missing)", disable=not progress):
        exports[(d, m)], now = ensure_export(cfg, d, m)
        if now:
            trained.append(f"{d}/{m}")

    cache: dict[str, Any] = {}

    def prior():
        if "prior" not in cache:
            cache["prior"] = load_prior(str(cfg.prior.path), dtype=cfg.prior.dtype, device=cfg.device)
        return cache["prior"]

    def controlnet():
        if "controlnet" not in cache:
            cache["controlnet"] = load_controlnet(str(cfg.controlnet), dtype=cfg.prior.dtype)
        return cache["controlnet"]

    def classifier():
        if "classifier" not in cache:
            cache["classifier"] = digit_classifier(cfg)
        return cache["classifier"]

    def reference():
        if "reference" not in cache:
            cache["reference"] = prior_unconditional_samples(cfg, prior, classifier, inner)
        return cache["reference"]

    records, cells = [], {}
    inner = progress and bool(cfg.get("inner_progress", True))
    for d, m in tqdm(jobs, desc="evaluate", disable=not progress):
        cell = Cell(cfg, d, m, exports[(d, m)], prior)
        cells[(d, m)] = cell
        record: dict[str, Any] = {"method": m, "dataset": d, "export": str(cell.export)}
        spec = row_spec(cfg, m)
        if spec is not None:
            record.update(method_class=str(spec.method), label=str(spec.get("label") or m))
        record["params"] = cell.metric("params", lambda: count_params(cfg, cell, prior()))
        record["fid"] = (cell.metric("fid", lambda: measure_fid(cfg, cell, inner, classifier))
                         if cfg.fid.enabled else None)
        if search_enabled(cfg, d):
            record["fid_search"] = search_fid(cfg, cell, record["fid"], inner, classifier)
        on_table2 = d == cfg.table2_dataset
        record["text_alignment"] = (cell.metric("text_alignment", lambda: measure_text(cfg, cell, inner, classifier))
                                    if on_table2 and cfg.text_alignment.enabled else None)
        if on_table2 and cfg.text_alignment.enabled and cfg.text_alignment.predictor == "toy":
            for kind, value in cell.metric("text_alignment_parts", lambda: text_parts(cell)).items():
                record[f"text_alignment_{kind}"] = value
        if cfg.get("drift") is not None and cfg.drift.enabled:
            record["drift"] = cell.metric("drift", lambda: measure_drift(cfg, cell, reference, classifier))
        record["spatial_alignment"] = (cell.metric("spatial_alignment", lambda: measure_spatial(cfg, cell, controlnet, inner))
                                       if on_table2 and cfg.spatial_alignment.enabled else None)
        records.append(record)
        cell.release()

    results_dir = Path(str(cfg.results_dir))
    suffix = f" — {cfg.scale} scale" if cfg.scale != "full" else ""
    extra = ({"text_alignment_colour": "Colour only ↑", "text_alignment_class": "Class only ↑"}
             if cfg.text_alignment.predictor == "toy" else None)
    not_applicable = (None if cfg.spatial_alignment.enabled else {"spatial_alignment": str(
        cfg.spatial_alignment.get("reason") or "not measured at this scale (spatial_alignment.enabled=false)")})
    tables = write_tables(records, results_dir, datasets=list(cfg.datasets), table2_dataset=str(cfg.table2_dataset),
                          title_suffix=suffix, table2_extra=extra, not_applicable=not_applicable)
    figures = draw_figures(cfg, records, cells, results_dir) if cfg.figures.enabled else {}
    for cell in cells.values():
        cell.release()
    summary = {
        "records": records,
        "tables": {k: str(v) for k, v in tables.items()},
        "figures": {k: str(v) for k, v in figures.items()},
        "trained": trained,
        "computed": {f"{c.dataset}/{c.method}": c.computed for c in cells.values() if c.computed},
        "reused": {f"{c.dataset}/{c.method}": c.reused for c in cells.values() if c.reused},
        "seconds": time.perf_counter() - start,
        "scale": cfg.scale,
    }
    write_json_atomic(results_dir / "reproduce_summary.json", summary)
    return summary


def summary_text(summary: dict[str, Any]) -> str:
    """The tables and one line on what was trained, computed and reused."""
    results = Path(summary["tables"]["table1.md"]).parent
    names = ["table1.md", "table2.md"] + (["table_drift.md"] if "table_drift.md" in summary["tables"] else [])
    tables = [(results / name).read_text() for name in names]
    line = (f"trained: {summary['trained'] or 'nothing (all exports existed)'}; "
            f"{len(summary['computed'])} cell(s) evaluated, {len(summary['reused'])} reused; "
            f"{summary['seconds']:.1f} s; tables and figures in {results}")
    return "\n".join(tables + [line])
