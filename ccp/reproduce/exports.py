"""Table cells' exports: use the ccp-train export a cell names, or train it in-process with its
dataset's experiment, reusing a run only while its config and prior files are those it was trained with."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ccp.config import compose
from ccp.methods.export import EXPORT_INFO, is_export
from ccp.reproduce.config import ReproduceConfigError, export_dir, method_of, row_spec
from ccp.training.run import run_training
from ccp.training.runs import set_aside, trained_with

log = logging.getLogger(__name__)


def train_config(cfg: DictConfig, dataset: str, method: str) -> DictConfig:
    """The ccp-train config of one table cell: its dataset's experiment with the cell's method, the prior,
    data and extra settings."""
    row, method = method, method_of(cfg, method)
    spec = row_spec(cfg, row)
    train_cfg = compose("train", overrides=[*cfg.data[dataset].train_overrides, f"method={method}"])
    OmegaConf.update(train_cfg, "prior.path", str(cfg.prior.path))
    OmegaConf.update(train_cfg, "data.path", str(cfg.data[dataset].path))
    layers = [cfg.train_settings, cfg.data[dataset].get("train_settings")]
    if spec is not None:  # a variant row: its own settings, then its step multiplier
        layers.append(spec.get("train_settings"))
    for layer in layers:
        if layer is not None:  # (an empty DictConfig is falsy but still a config)
            for key, value in (OmegaConf.to_container(layer, resolve=True) or {}).items():
                OmegaConf.update(train_cfg, key, value, force_add=True)
    run_seed = int(cfg.get("run_seed") or 0)
    if run_seed:  # run seed s of several (`ccp.reproduce.seeds`): the experiment's training seed + s
        train_cfg.seed = int(train_cfg.get("seed") or 0) + run_seed
    if spec is not None:
        factor = spec.get("step_factor", 1)
        if factor != 1:
            train_cfg.trainer.max_steps = max(1, int(round(int(train_cfg.trainer.max_steps) * float(factor))))
    return train_cfg


def ensure_export(cfg: DictConfig, dataset: str, method: str) -> tuple[Path, bool]:
    """(export folder, whether it was trained now). An export of ``exports.<dataset>.<method>`` is
    used as given; one in ``train_dir`` only while its config and the prior's files are those it
    was trained with (a retrained toy prior at the same path retrains every method)."""
    path = export_dir(cfg, dataset, method)
    given = OmegaConf.select(cfg, f"exports.{dataset}.{method}")
    train_cfg = train_config(cfg, dataset, method)
    current = trained_with(path.parent, train_cfg)
    if is_export(path) and (given or current or not cfg.train_missing):
        if not (given or current):
            log.warning("%s was trained with another config or prior; using it anyway (train_missing=false)", path)
        return path, False
    if not cfg.train_missing:
        raise ReproduceConfigError(f"no export at {path} and train_missing=false")
    if not current:
        set_aside(path.parent)
    log.info("training %s on %s into %s", method, dataset, path.parent)
    trained = run_training(train_cfg, path.parent)
    if trained.resolve() != path.resolve():
        raise RuntimeError(f"training wrote {trained}, expected {path}")
    return path, True


def export_stamp(path: Path) -> str:
    info = path / EXPORT_INFO
    return hashlib.sha256(f"{info.resolve()}:{info.stat().st_mtime_ns}:{info.read_text()}".encode()).hexdigest()[:16]
