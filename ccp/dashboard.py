"""The project's saved wandb report (`ccp-dashboard`): Table 1, Table 2, Figs. 8-9, the evaluation
points and the training curves, laid out with ``wandb-workspaces`` over the runs `ccp.tracking`
logs.

Each section is a panel grid over one run set: Tables 1-2 and Figs. 8-9 read the ``reproduce``
runs (their `TABLE_KEYS` Tables and `FIGURE_KEYS` Images), the evaluation table the ``eval`` runs
(`EVAL_TABLE_KEY`), the curves the ``train`` runs (`TRAIN_CURVES` against `TRAIN_STEP`). A
``group`` narrows every run set to one experiment. A dry run writes the report's spec (the JSON
the wandb server stores) to a file without touching the network; otherwise the report is saved to
the server and its URL returned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ccp.config import ConfigError
from ccp.io import write_text_atomic
from ccp.tracking import (
    EVAL_TABLE_KEY,
    FIGURE_KEYS,
    TABLE_KEYS,
    TRAIN_CURVES,
    TRAIN_STEP,
    VALIDATION_IMAGE_KEY,
    wandb_config,
)


class DashboardConfigError(ConfigError, ValueError):
    """A ccp-dashboard setting that cannot work; the message says which value to set."""


@dataclass
class DashboardPlan:
    project: str
    entity: str | None
    group: str | None
    title: str
    dry_run: bool
    output: Path


def check_dashboard_config(cfg: DictConfig) -> DashboardPlan:
    section = wandb_config(cfg)
    if section is None:
        raise DashboardConfigError("logger.wandb is off (enabled=false or mode=disabled): the report reads the "
                                   "runs logged to logger.wandb.project; set logger=default")
    dry = cfg.dry_run
    if dry == "auto":
        dry = section.mode != "online"
    if not isinstance(dry, bool):
        raise DashboardConfigError(f"dry_run={cfg.dry_run!r}; set dry_run=auto (a file unless logger.wandb.mode=online), "
                                   "true (write the report spec to output) or false (save it on the wandb server)")
    group = cfg.group
    if group is not None and (not isinstance(group, str) or not group.strip() or "'" in group):
        raise DashboardConfigError(f"group={group!r}; give an experiment group (e.g. group=reproduce-toy) or null for all runs")
    if not str(cfg.title).strip():
        raise DashboardConfigError("title is empty; set title='ccp results'")
    return DashboardPlan(str(section.project), section.entity, group, str(cfg.title), bool(dry), Path(str(cfg.output)))


def _runset(name: str, job_type: str, group: str | None):
    import wandb_workspaces.reports.v2 as wr

    filters = f"JobType = '{job_type}'" + (f" and Group = '{group}'" if group else "")
    return wr.Runset(name=name, filters=filters)  # no entity/project: the report's own project


def build_report(project: str, entity: str | None, group: str | None = None, title: str = "ccp results"):
    """The report object (``wandb_workspaces.reports.v2.Report``); nothing is sent anywhere."""
    import wandb_workspaces.reports.v2 as wr

    reproduce, evals, train = (_runset("reproductions", "reproduce", group), _runset("evaluations", "eval", group),
                               _runset("trainings", "train", group))
    scope = f" (group {group})" if group else ""
    blocks = [
        wr.P(f"Runs of project {project}{scope}, logged by ccp-train, ccp-eval and ccp-reproduce."),
        wr.H2("Table 1: unconditional generation, FID"),
        wr.PanelGrid(runsets=[reproduce], panels=[
            wr.WeavePanelSummaryTable(table_name=TABLE_KEYS["table1"]),
            wr.WeavePanelSummaryTable(table_name=TABLE_KEYS["table1_weight_search"])]),
        wr.H2("Table 2: controllability, text and spatial alignment"),
        wr.PanelGrid(runsets=[reproduce], panels=[
            wr.WeavePanelSummaryTable(table_name=TABLE_KEYS["table2"]),
            wr.WeavePanelSummaryTable(table_name=TABLE_KEYS["table_drift"])]),
        wr.H2("Fig. 8: guidance weights and rectification"),
        wr.PanelGrid(runsets=[reproduce], panels=[
            wr.MediaBrowser(title="Fig. 8a: concept x control weight", media_keys=[FIGURE_KEYS["fig8a"]]),
            wr.MediaBrowser(title="Fig. 8b: rectification", media_keys=[FIGURE_KEYS["fig8b"]])]),
        wr.H2("Fig. 9: fidelity vs controllability"),
        wr.PanelGrid(runsets=[reproduce], panels=[
            wr.MediaBrowser(title="Fig. 9", media_keys=[FIGURE_KEYS["fig9"]])]),
        wr.H2("Evaluation points (ccp-eval)"),
        wr.PanelGrid(runsets=[evals], panels=[wr.WeavePanelSummaryTable(table_name=EVAL_TABLE_KEY)]),
        wr.H2("Training curves"),
        wr.PanelGrid(runsets=[train], panels=[
            *(wr.LinePlot(title=key, x=TRAIN_STEP, y=[key]) for key in TRAIN_CURVES),
            wr.MediaBrowser(title="validation samples", media_keys=[VALIDATION_IMAGE_KEY])]),
    ]
    # entity None: the logged-in user's default entity, looked up by the report (saving only)
    owner: dict[str, Any] = {} if entity is None else {"entity": entity}
    return wr.Report(project=project, title=title, description="Tables 1-2, Figs. 8-9 and training curves", blocks=blocks,
                     **owner)


def report_spec(report) -> dict:
    """The report as the wandb server stores it (its view spec), as plain JSON data."""
    return report._to_model().model_dump(by_alias=True, exclude_none=True, mode="json")


def write_dashboard(cfg: DictConfig) -> dict[str, Any]:
    """Build the report of ``conf/dashboard.yaml``; dry run: write its spec to ``output``; else save
    it on the wandb server. Returns ``{"spec": path}`` or ``{"url": url}``."""
    plan = check_dashboard_config(cfg)
    # a dry run never asks the server for the default entity
    entity = plan.entity if plan.entity or not plan.dry_run else ""
    report = build_report(plan.project, entity, plan.group, plan.title)
    if plan.dry_run:
        write_text_atomic(plan.output, json.dumps(report_spec(report), indent=1) + "\n")
        return {"spec": plan.output}
    report.save()
    return {"url": report.url}
