"""Tables 1-2, the drift table and Figs. 8-10 for every method x dataset of a scale.

For every cell: use the ccp-train export if it exists (``exports.<dataset>.<row>``, default
``<train_dir>/<dataset>_<row>/export``), else (``train_missing: true``) train it in-process with
the listed experiment; then count trainable parameters, measure FID (every dataset; and at each
value of a searched weight), text- and spatial-guided alignment (``table2_dataset``) and drift, and
write ``table1.{md,csv,json}``, ``table2.*``, ``table_drift.*``, ``table1_weight_search.*`` and the
figures into ``results_dir``. Every path is checked first (`check_inputs`); a rerun reuses finished
exports and every metric whose settings and export are unchanged; FID shards resume on their own.

Seeds (``seeds: [0, 1, 2]``, `ccp.reproduce.seeds`): one seed is the run above; several run it
once per seed (training and sampling seeds shifted, each seed's trainings, records and tables in
its own folders, reused on rerun), then write the same tables in ``results_dir`` with each number
as the mean over seeds and its 95% Student t interval (`ccp.evaluation.intervals`), Fig. 9 with
error bars, ``table_spread.*`` (FID spread over sampling seeds of one trained model next to the
spread over run seeds), ``claims.{md,json}`` (each configured claim's verdict) and
``environment.json`` (processor, threads, library versions; also in every per-seed folder).

Scales (``conf/scale/``): ``tiny`` is an offline CPU smoke run of the whole recipe (random tiny
prior and images, stand-in instruments; its numbers say nothing about the methods); ``toy`` the
digits reproduction (`ccp.toy`); ``full`` the paper's evaluation on trained SD v1.5 exports.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ccp.evaluation.intervals import (
    aggregate_records,
    check_claim_specs,
    check_claims,
    claim_rows,
    claims_markdown,
    interval_note,
)
from ccp.evaluation.tables import spread_markdown, spread_rows, write_tables
from ccp.io import write_json_atomic, write_text_atomic
from ccp.pipelines.run import sampling_precision
from ccp.priors.loading import load_controlnet, load_prior
from ccp.reproduce.config import ReproduceConfigError, check_inputs, method_of, row_spec, search_enabled
from ccp.reproduce.environment import write_environment
from ccp.reproduce.exports import ensure_export
from ccp.reproduce.figures import draw_figures
from ccp.reproduce.inputs import digit_classifier, prepare_inputs
from ccp.reproduce.measure import (
    count_params,
    measure_drift,
    measure_fid,
    measure_kid,
    measure_spatial,
    measure_text,
    prior_spatial_weights,
    prior_unconditional_samples,
    sampling_spread,
    search_fid,
    text_parts,
    write_controlnet_check,
    write_vae_round_trip,
)
from ccp.reproduce.records import Cell
from ccp.reproduce.seeds import check_seed_settings, run_seeds, seed_config
from ccp.tracking import experiment_group, log_reproduction, reproduce_group, wandb_config


def reproduce(cfg: DictConfig, progress: bool = True) -> dict[str, Any]:
    """Train what is missing, evaluate, write tables and figures. Returns ``{records, tables,
    figures, trained, computed, reused, seconds}`` (several seeds: also ``seeds``, ``per_seed``
    and ``claims``). ``threads``: torch CPU threads for the run (CPU results depend on it; restored
    afterwards)."""
    threads = torch.get_num_threads()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    try:
        seeds = run_seeds(cfg)
        if len(seeds) == 1:
            problems = check_seed_settings(cfg, seeds)
            if problems:
                raise ReproduceConfigError("cannot reproduce the tables:\n  - " + "\n  - ".join(problems))
            return _reproduce(seed_config(cfg, seeds[0], multi=False), progress)
        return _reproduce_seeds(cfg, seeds, progress)
    finally:
        torch.set_num_threads(threads)


def _reproduce_seeds(cfg: DictConfig, seeds: list[int], progress: bool) -> dict[str, Any]:
    """Every seed's run (each reused where finished), then the tables over seeds."""
    start = time.perf_counter()
    from ccp.methods import METHODS

    claims = [OmegaConf.to_container(c, resolve=True) for c in (cfg.get("claims") or [])]
    known_rows = sorted(set(METHODS) | set(cfg.get("rows") or {}))
    problems = check_seed_settings(cfg, seeds) + check_claim_specs(claims, known_rows, sorted(cfg.data))
    # a claim about a row or dataset this run leaves out (methods=[...]) is reported as not checked
    skipped = [c for c in claims if not (set(claim_rows(c)) <= set(cfg.methods) and c.get("dataset") in cfg.datasets)]
    claims = [c for c in claims if c not in skipped]
    problems += _claim_metric_problems(cfg, claims)
    if problems:
        raise ReproduceConfigError("cannot reproduce the tables:\n  - " + "\n  - ".join(problems))
    configs = {s: seed_config(cfg, s, multi=True, first=(s == seeds[0])) for s in seeds}
    for seed_cfg in configs.values():  # every seed's inputs checked before the first one trains
        check_inputs(seed_cfg)
    summaries = {}
    for s in tqdm(seeds, desc=f"seeds {seeds}", disable=not progress):
        summaries[s] = _reproduce(configs[s], progress)
    per_seed = {s: summaries[s]["records"] for s in seeds}
    records = aggregate_records(per_seed)
    results_dir = Path(str(cfg.results_dir))
    for name in ("vae_round_trip.md", "toy_controlnet_check.md"):  # reports on the prior: one for every
        found = {s: Path(summaries[s]["tables"][name]) for s in seeds if name in summaries[s]["tables"]}
        if found:  # seed, or (prior_seeds) each seed's own prior's
            shown = found if cfg.get("prior_seeds") else dict(list(found.items())[:1])
            write_text_atomic(results_dir / name, "\n".join(
                (f"Seed {s}'s prior:\n\n" if cfg.get("prior_seeds") else "") + p.read_text() for s, p in shown.items()))
    add_preference(cfg, records)

    results_dir = Path(str(cfg.results_dir))
    suffix = f" — {cfg.scale} scale, {len(seeds)} seeds" if cfg.scale != "full" else f" — {len(seeds)} seeds"
    tables = write_tables(records, results_dir, datasets=list(cfg.datasets), table2_dataset=str(cfg.table2_dataset),
                          title_suffix=suffix, table2_extra=_table2_extra(cfg), not_applicable=_not_applicable(cfg),
                          note=interval_note(seeds))
    spread_dataset = str((cfg.get("sample_spread") or {}).get("dataset") or cfg.table2_dataset)
    spread = spread_rows(per_seed[seeds[0]], records, spread_dataset)
    if spread:
        tables.update(_write_table(results_dir, "table_spread", spread, spread_markdown(
            spread, spread_dataset, seeds, title=f"FID spread: sampling seeds vs run seeds{suffix}")))
    figures = {}
    if cfg.figures.enabled and any(r["dataset"] == str(cfg.table2_dataset) and r.get("fid")
                                   and r.get("text_alignment") is not None for r in records):
        from ccp.evaluation.figures import fidelity_control_scatter

        figures["fig9"] = fidelity_control_scatter(records, results_dir / "fig9_fidelity_controllability.png",
                                                   str(cfg.table2_dataset)).path
    verdicts = check_claims(claims, per_seed) if claims else []
    if claims or skipped:
        tables["claims.md"] = write_text_atomic(results_dir / "claims.md", claims_markdown(verdicts, seeds) + "".join(
            f"\nNot checked (its rows or dataset are not in this run): {c['text']}\n" for c in skipped))
        tables["claims.json"] = write_text_atomic(results_dir / "claims.json", json.dumps(
            {"seeds": seeds, "claims": [v.__dict__ for v in verdicts], "not_checked": skipped}, indent=1) + "\n")
    write_environment(results_dir, str(cfg.device))
    summary = {
        "records": records,
        "tables": {k: str(v) for k, v in tables.items()},
        "figures": {k: str(v) for k, v in figures.items()},
        "trained": [f"seed {s}: {t}" for s in seeds for t in summaries[s]["trained"]],
        "computed": {f"seed {s}: {k}": v for s in seeds for k, v in summaries[s]["computed"].items()},
        "reused": {f"seed {s}: {k}": v for s in seeds for k, v in summaries[s]["reused"].items()},
        "seconds": time.perf_counter() - start,
        "scale": cfg.scale,
        "seeds": seeds,
        "per_seed": {str(s): {k: summaries[s][k] for k in ("trained", "seconds")} | {
            "results_dir": str(configs[s].results_dir)} for s in seeds},
        "claims": [{"id": v.id, "verdict": v.verdict} for v in verdicts],
    }
    write_json_atomic(results_dir / "reproduce_summary.json", summary)
    log_reproduction(cfg, summary, reproduce_group(cfg))  # the tables over seeds; each seed logged its own run
    return summary


def _claim_metric_problems(cfg: DictConfig, claims: list[dict]) -> list[str]:
    """A claim on a metric this run does not measure fails here, before anything is trained."""
    problems = []
    for c in claims:
        metric, dataset = str(c.get("metric")), c.get("dataset")
        top = metric.split(".")[0]
        measured = {
            "fid": bool(cfg.fid.enabled),
            "kid": bool(cfg.fid.enabled and cfg.get("kid") is not None and cfg.kid.enabled),
            "kid_std": bool(cfg.fid.enabled and cfg.get("kid") is not None and cfg.kid.enabled),
            "fid_search": search_enabled(cfg, str(dataset)),
            "drift": bool(cfg.get("drift") is not None and cfg.drift.enabled),
            "spatial_alignment": bool(cfg.spatial_alignment.enabled and dataset == cfg.table2_dataset),
            "spatial_alignment_prior": bool(cfg.spatial_alignment.enabled and dataset == cfg.table2_dataset
                                            and any(method_of(cfg, m) == "ours" for m in cfg.methods)),
        }
        for key in ("text_alignment", "text_alignment_colour", "text_alignment_class"):
            measured[key] = bool(cfg.text_alignment.enabled and dataset == cfg.table2_dataset)
        if not measured.get(top, False):
            problems.append(f"claim {c.get('id')}: metric {metric} is not measured on {dataset} in this run (check "
                            f"{top}.enabled, table2_dataset or weight_search.datasets), or drop the claim (claims=[])")
    return problems


def _write_table(out_dir: Path, name: str, rows: list[dict], markdown: str) -> dict[str, Path]:
    from ccp.evaluation.tables import rows_csv

    return {f"{name}.md": write_text_atomic(out_dir / f"{name}.md", markdown),
            f"{name}.csv": write_text_atomic(out_dir / f"{name}.csv", rows_csv(rows)),
            f"{name}.json": write_text_atomic(out_dir / f"{name}.json", json.dumps({"rows": rows}, indent=1) + "\n")}


def _table2_extra(cfg: DictConfig) -> dict[str, str] | None:
    extra = ({"text_alignment_colour": "Colour only ↑", "text_alignment_class": "Class only ↑"}
             if cfg.text_alignment.predictor == "toy" else {})
    if cfg.spatial_alignment.enabled and any(method_of(cfg, m) == "ours" for m in cfg.methods):
        extra["spatial_alignment_prior"] = "Spatial, prior + ControlNet alone ↑"  # ours' row: its guidance minus the concept term
    return extra or None


def _not_applicable(cfg: DictConfig) -> dict[str, str] | None:
    return (None if cfg.spatial_alignment.enabled else {"spatial_alignment": str(
        cfg.spatial_alignment.get("reason") or "not measured at this scale (spatial_alignment.enabled=false)")})


def _reproduce(cfg: DictConfig, progress: bool) -> dict[str, Any]:
    start = time.perf_counter()
    check_inputs(cfg)
    wandb_config(cfg)  # a bad logger.wandb setting fails before anything is trained
    group = reproduce_group(cfg)
    prepare_inputs(cfg, progress)
    check_inputs(cfg)  # the toy folders now exist

    trained = []
    jobs = [(d, m) for d in cfg.datasets for m in cfg.methods]
    exports = {}
    with experiment_group(group):  # the trainings started here are this reproduction's on wandb
        for d, m in tqdm(jobs, desc="exports (train if missing)", disable=not progress):
            exports[(d, m)], now = ensure_export(cfg, d, m)
            if now:
                trained.append(f"{d}/{m}")

    cache: dict[str, Any] = {}

    def precision():
        return sampling_precision(str(cfg.prior.dtype), torch.device(str(cfg.device)))

    def prior():
        if "prior" not in cache:
            cache["prior"] = load_prior(str(cfg.prior.path), dtype=precision(), device=cfg.device,
                                        allow_download=bool(cfg.prior.get("allow_download", False)),
                                        family=cfg.prior.get("family"))
        return cache["prior"]

    def controlnet():
        if "controlnet" not in cache:
            cache["controlnet"] = load_controlnet(str(cfg.controlnet), dtype=precision(),
                                                  allow_download=bool(cfg.prior.get("allow_download", False)))
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
        if cfg.fid.enabled and cfg.get("kid") is not None and cfg.kid.enabled:
            kid = cell.metric("kid", lambda: measure_kid(cfg, cell, inner, classifier))
            record["kid"], record["kid_std"] = kid["kid"], kid["kid_std"]
        spread = cfg.get("sample_spread")
        if (spread is not None and spread.get("enabled") and cfg.fid.enabled
                and d == str(spread.get("dataset") or cfg.table2_dataset)):
            record["fid_sampling"] = sampling_spread(cfg, cell, record["fid"], inner, classifier)
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
        spatial = on_table2 and cfg.spatial_alignment.enabled
        record["spatial_alignment"] = (cell.metric("spatial_alignment", lambda: measure_spatial(cfg, cell, controlnet, inner))
                                       if spatial else None)
        if spatial and method_of(cfg, m) == "ours":  # the prior's own ControlNet term, ours' reference
            weights = prior_spatial_weights(cfg, cell)
            record["spatial_alignment_prior"] = cell.metric("spatial_alignment_prior", lambda: measure_spatial(
                cfg, cell, controlnet, inner, weights, "spatial_alignment_prior"), weights)
        if cell.stand_in:  # measured with stand-in weight files: the tables say their numbers mean nothing
            record["stand_in_weights"] = list(cell.stand_in)
        records.append(record)
        cell.release()

    add_preference(cfg, records)
    results_dir = Path(str(cfg.results_dir))
    suffix = f" — {cfg.scale} scale" if cfg.scale != "full" else ""
    if cfg.get("run_seed") is not None:
        suffix += (", " if suffix else " — ") + f"run seed {cfg.run_seed}"
    tables = write_tables(records, results_dir, datasets=list(cfg.datasets), table2_dataset=str(cfg.table2_dataset),
                          title_suffix=suffix, table2_extra=_table2_extra(cfg), not_applicable=_not_applicable(cfg))
    round_trip = cfg.get("vae_round_trip")
    if round_trip is not None and round_trip.enabled:  # the toy VAE's ceiling per style, beside the tables
        tables.update(write_vae_round_trip(cfg, prior(), classifier(), results_dir))
    toy_controlnet = cfg.get("toy_controlnet")
    if cfg.get("controlnet") and toy_controlnet is not None and toy_controlnet.get("train_toy", False):
        tables.update(write_controlnet_check(cfg, results_dir))
    figures = draw_figures(cfg, records, cells, results_dir, controlnet) if cfg.figures.enabled else {}
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
    write_environment(results_dir, str(cfg.device))
    log_reproduction(cfg, summary, group)
    return summary


def add_preference(cfg: DictConfig, records: list[dict[str, Any]]) -> None:
    """Table 1's "Pref." from the preference study of each dataset in ``preference`` (dataset ->
    analysis.json or study database): ``pref`` (% of votes preferring ours over the record's
    method), ``pref_ci`` and ``pref_n`` on every record the study compared with ours."""
    from ccp.study.analysis import pref_column

    for dataset, path in (cfg.get("preference") or {}).items():
        column = pref_column(str(path))
        for record in records:
            entry = column.get(record["method"]) if record["dataset"] == dataset else None
            if entry and entry.get("ours_preferred_pct") is not None:
                record.update(pref=entry["ours_preferred_pct"], pref_ci=entry.get("ci_pct"), pref_n=entry.get("n"))


def summary_text(summary: dict[str, Any]) -> str:
    """The tables and one line on what was trained, computed and reused."""
    results = Path(summary["tables"]["table1.md"]).parent
    names = ["table1.md", "table2.md"] + [n for n in ("table_drift.md", "table_spread.md", "claims.md")
                                          if n in summary["tables"]]
    tables = [(results / name).read_text() for name in names]
    line = (f"trained: {summary['trained'] or 'nothing (all exports existed)'}; "
            f"{len(summary['computed'])} cell(s) evaluated, {len(summary['reused'])} reused; "
            f"{summary['seconds']:.1f} s; tables and figures in {results}")
    return "\n".join(tables + [line])
