"""Run folders: what a training run was started with, and whether a later run may reuse it.

``ccp-train`` writes ``config.yaml`` (the resolved config) and `PRIOR_STAMP` (which prior files it
started from) beside its checkpoints. `trained_with` compares them with a config about to run, so
callers that train on demand (reproduce, the toy prior, the demo) reuse a run only when it is the
same training; `set_aside` keeps a run that is not, instead of deleting it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ccp.config import with_output_dir
from ccp.io import folder_stamp

log = logging.getLogger(__name__)
PRIOR_STAMP = "prior_stamp.txt"  # beside config.yaml: which prior files the run started from


def run_config(cfg: DictConfig, run_dir: str | Path) -> DictConfig:
    """`cfg` as the run in `run_dir` sees it (its ``paths.output_dir`` is the run folder)."""
    return with_output_dir(cfg, Path(run_dir))


def config_text(cfg: DictConfig, run_dir: str | Path) -> str:
    """The ``config.yaml`` a run of `cfg` in `run_dir` writes."""
    return OmegaConf.to_yaml(run_config(cfg, run_dir), resolve=True)


def prior_fingerprint(path: str | Path) -> str:
    """Changes when the prior folder's files are rewritten (e.g. a toy prior retrained at the same
    path); a hub id stands for itself."""
    path = Path(str(path))
    return f"folder:{folder_stamp(path)}" if path.is_dir() else f"id:{path}"


def write_run_stamps(cfg: DictConfig, run_dir: str | Path) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_text(cfg, run_dir))
    (run_dir / PRIOR_STAMP).write_text(prior_fingerprint(cfg.prior.path))


def trained_with(run_dir: str | Path, cfg: DictConfig) -> bool:
    """Whether `run_dir` holds a training (finished or interrupted) of exactly `cfg`, started from
    the prior as its files are now. A run without these stamps (older ccp) counts as different."""
    run_dir = Path(run_dir)
    saved, stamp = run_dir / "config.yaml", run_dir / PRIOR_STAMP
    return (saved.is_file() and saved.read_text() == config_text(cfg, run_dir)
            and stamp.is_file() and stamp.read_text() == prior_fingerprint(cfg.prior.path))


def set_aside(run_dir: str | Path) -> Path | None:
    """Move a run that no longer matches its config to ``<run_dir>.old`` (replacing an older one)
    rather than delete it: what it trained stays inspectable until the next change."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return None
    old = run_dir.with_name(run_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    run_dir.rename(old)
    log.warning("%s was trained with another config or prior; moved to %s, training afresh", run_dir, old)
    return old
