"""Every job on wandb: one project (the ``logger`` config group), one run per job.

A run's ``job_type`` says what the job was: ``train`` (ccp-train, and the trainings ccp-reproduce
starts), ``eval`` (one ccp-eval point: FID, text or spatial alignment; each point of a sweep) or
``reproduce`` (ccp-reproduce). Its ``group`` is the experiment it belongs to, the first of:

1. ``logger.wandb.group``, when set (``+logger.wandb.group=NAME`` on any command line);
2. the group of an enclosing `experiment_group` block (ccp-reproduce puts the trainings it starts
   in its own group, so a reproduction's trainings and tables sit together);
3. the job's own experiment: a training's ``run_name`` (the run of ``experiment=table1/face_ours``
   is ``face_ours``), an evaluation's ``run`` (the evaluated export's run folder, so evaluations
   join the training they measure), a reproduction's ``reproduce-<scale>``.

Offline by default (``logger.wandb.mode=offline``: the run is written under the job's folder, in
``wandb/offline-run-*``, for ``wandb sync`` later); ``logger.wandb.enabled=false`` logs nothing.
Result rows go to wandb Tables, figures to wandb Images; the keys are `TABLE_KEYS`,
`FIGURE_KEYS`, `EVAL_TABLE_KEY` and `TRAIN_CURVES`, which the report of `ccp.dashboard` reads.
wandb is imported only when a run starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ccp.config import ConfigError, with_output_dir

JOB_TYPES = ("train", "eval", "reproduce")
MODES = ("offline", "online", "disabled")
TABLE_KEYS = {"table1": "tables/table1", "table2": "tables/table2", "table_drift": "tables/table_drift",
              "table1_weight_search": "tables/table1_weight_search"}
FIGURE_KEYS = {"fig8a": "figures/fig8a", "fig8b": "figures/fig8b", "fig9": "figures/fig9"}
EVAL_TABLE_KEY = "eval/result"
EVAL_COLUMNS = ("run", "method", "metric", "condition", "value", "better", "concept_weight", "control_weight",
                "num_images", "override_dirname")
TRAIN_STEP = "trainer/global_step"  # Lightning's WandbLogger x-axis
TRAIN_CURVES = ("train/loss", "train/lr", "train/images_per_s", "train/step_time_s")
VALIDATION_IMAGE_KEY = "validation/grid"

_scopes: list[str] = []


class TrackingConfigError(ConfigError, ValueError):
    """A ``logger.wandb`` setting that cannot work; the message says which value to set."""


def wandb_config(cfg: DictConfig) -> DictConfig | None:
    """The checked ``logger.wandb`` section, or None when nothing is to be logged (no logger group,
    ``enabled: false`` or ``mode: disabled``)."""
    section = OmegaConf.select(cfg, "logger.wandb")
    if section is None or not section.get("enabled", False):
        return None
    mode = section.get("mode", "offline")
    if mode not in MODES:
        raise TrackingConfigError(f"logger.wandb.mode={mode!r} is unknown; set logger.wandb.mode=offline "
                                  "(written locally, `wandb sync` later), online or disabled")
    project = section.get("project")
    if not isinstance(project, str) or not project.strip():
        raise TrackingConfigError(f"logger.wandb.project={project!r}: every job logs to one project; "
                                  "set logger.wandb.project=ccp (or your project's name)")
    group = section.get("group")
    if group is not None and (not isinstance(group, str) or not group.strip()):
        raise TrackingConfigError(f"logger.wandb.group={group!r}: give a name (e.g. +logger.wandb.group=face_ours) "
                                  "or leave it unset for the job's own experiment")
    return None if mode == "disabled" else section


@contextlib.contextmanager
def experiment_group(name: str) -> Iterator[None]:
    """Jobs started inside this block (e.g. trainings run in-process) join group `name`, unless
    their config sets ``logger.wandb.group``."""
    _scopes.append(str(name))
    try:
        yield
    finally:
        _scopes.pop()


def group_for(cfg: DictConfig, default: str) -> str:
    """The wandb group of a job: ``logger.wandb.group``, else the enclosing `experiment_group`,
    else `default` (the job's own experiment; see the module docstring)."""
    explicit = OmegaConf.select(cfg, "logger.wandb.group")
    if explicit:
        return str(explicit)
    return _scopes[-1] if _scopes else str(default)


def run_id(kind: str, name: str, folder: str | Path) -> str:
    """A wandb run id fixed by the job's folder: rerunning a job (resuming a training, a skipped
    eval point) updates the same run instead of adding one."""
    digest = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:10]
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in str(name))[:60]
    return f"{kind}-{safe}-{digest}"


def table_cell(value: Any) -> Any:
    """A value a wandb Table column holds: numbers, strings, booleans and None as they are; other
    values (dicts, lists) as JSON text; NaN/inf as None (JSON has no spelling for them)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return json.dumps(value, sort_keys=True, default=str)


def rows_table(rows: Sequence[Mapping[str, Any]]):
    """A wandb.Table of dict rows; columns in first-seen order, missing cells None."""
    import wandb

    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    data = [[table_cell(row.get(c)) for c in columns] for row in rows]
    return wandb.Table(columns=columns, data=data, allow_mixed_types=True)


def _resolvable(cfg: DictConfig, save_dir: Path) -> DictConfig:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() or OmegaConf.select(cfg, "paths") is None:
        return cfg
    return with_output_dir(cfg, save_dir)  # outside a Hydra app, ${hydra:runtime.output_dir} has no value


def log_job(cfg: DictConfig, job_type: str, default_group: str, save_dir: str | Path, *, name: str,
            run_key: str | None = None, tables: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
            images: Mapping[str, str | Path] | None = None, summary: Mapping[str, Any] | None = None,
            config: Mapping[str, Any] | None = None) -> Path | None:
    """Start a wandb run for one finished job, log its `tables` (key -> rows), `images` (key -> PNG
    path) and `summary` values, and finish it. Returns the run's local folder, or None when
    ``logger.wandb`` is off. `run_key` names the run id (default: `name`), fixed by `save_dir`."""
    if job_type not in JOB_TYPES:
        raise ValueError(f"job_type={job_type!r}; one of {JOB_TYPES}")
    section = wandb_config(cfg)
    if section is None:
        return None
    import wandb

    missing = [str(p) for p in (images or {}).values() if not Path(str(p)).is_file()]
    if missing:
        raise FileNotFoundError(f"figures to log are missing: {missing}")
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    if config is None:
        config = OmegaConf.to_container(_resolvable(cfg, save_dir), resolve=True)
    run = wandb.init(
        project=str(section.project), entity=section.get("entity"), group=group_for(cfg, default_group),
        job_type=job_type, name=name, id=run_id(job_type, run_key or name, save_dir), resume="allow",
        dir=str(save_dir), mode=str(section.mode), config=dict(config), reinit="create_new",
    )
    folder = Path(run.dir).parent  # (a finished run refuses most calls)
    try:
        logged: dict[str, Any] = {key: rows_table(rows) for key, rows in (tables or {}).items()}
        logged.update({key: wandb.Image(str(path), caption=Path(str(path)).name) for key, path in (images or {}).items()})
        if logged:
            run.log(logged)
        for key, value in (summary or {}).items():
            run.summary[key] = table_cell(value)
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
    return folder


def log_eval_result(cfg: DictConfig, result: Mapping[str, Any], out_dir: str | Path) -> Path | None:
    """One ccp-eval point: its result row as a Table (`EVAL_TABLE_KEY`, the columns `EVAL_COLUMNS`
    of ``result.json``) and ``eval/<metric>`` and the weights in the run summary."""
    row = {key: result.get(key) for key in EVAL_COLUMNS}
    name = f"{result['run']}-{result['metric']}" + (f"-{result['override_dirname']}" if result.get("override_dirname") else "")
    summary = {f"eval/{result['metric']}": result["value"], "eval/concept_weight": result["concept_weight"],
               "eval/control_weight": result["control_weight"]}
    return log_job(cfg, "eval", str(result["run"]), out_dir, name=name, tables={EVAL_TABLE_KEY: [row]},
                   summary=summary, config=result.get("config"))


def log_reproduction(cfg: DictConfig, summary: Mapping[str, Any], group: str) -> Path | None:
    """A ccp-reproduce run: every table it wrote (the ``rows`` of ``table*.json``) under
    `TABLE_KEYS`, its figures under `FIGURE_KEYS`, and what it trained, computed and reused."""
    tables = {}
    for name, key in TABLE_KEYS.items():
        path = summary["tables"].get(f"{name}.json")
        if path is not None:
            tables[key] = json.loads(Path(path).read_text())["rows"]
    images = {FIGURE_KEYS[name]: path for name, path in summary["figures"].items() if name in FIGURE_KEYS}
    values = {"reproduce/seconds": summary["seconds"], "reproduce/trained": len(summary["trained"]),
              "reproduce/cells_computed": len(summary["computed"]), "reproduce/cells_reused": len(summary["reused"])}
    seed = cfg.get("run_seed")  # each seed of a multi-seed reproduction is its own run; the aggregate has none
    key = f"{cfg.scale}" if seed is None else f"{cfg.scale}-seed{seed}"
    return log_job(cfg, "reproduce", group, Path(str(cfg.out_dir)), name=group if seed is None else f"{group}-seed{seed}",
                   run_key=key,
                   tables=tables, images=images, summary=values)


def reproduce_group(cfg: DictConfig) -> str:
    """The default experiment group of a reproduction (and the trainings it starts)."""
    return group_for(cfg, f"reproduce-{cfg.scale}")
