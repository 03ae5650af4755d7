"""`ccp-study serve | analyze | reset-link`: the study's jobs from one composed config (conf/study.yaml)."""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path

from omegaconf import DictConfig

from ccp.config import ConfigError
from ccp.study.analysis import AnalysisOptions, analyze, to_markdown
from ccp.study.design import design_from_config
from ccp.study.store import open_study, reset_token

log = logging.getLogger(__name__)
ACTIONS = ("serve", "analyze", "reset-link")


def _write_private(path: Path, text: str, append: bool = False) -> None:
    """Links are secrets: files only the owner can read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC), 0o600)
    with os.fdopen(fd, "a" if append else "w") as f:
        f.write(text)


def base_url(cfg: DictConfig) -> str:
    return str(cfg.base_url).rstrip("/") if cfg.base_url else f"http://{cfg.host}:{cfg.port}"


def prepare(cfg: DictConfig) -> dict:
    """Create or reopen the database, add new raters; their links go to invites.txt (and admin.txt on creation)."""
    design = design_from_config(cfg.study)
    db = Path(str(cfg.db))
    invites, admin_token = open_study(db, design, cfg.samples)
    url = base_url(cfg)
    if invites:
        _write_private(db.parent / "invites.txt", "".join(f"{i.rater}\t{url}/r/{i.token}\n" for i in invites), append=True)
    if admin_token:
        _write_private(db.parent / "admin.txt", f"{url}/admin/{admin_token}\n")
    return {"design": design, "db": db, "invites": invites, "admin_token": admin_token, "url": url}


def serve(cfg: DictConfig) -> None:
    import uvicorn

    from ccp.study.app import create_app

    try:
        loopback = ipaddress.ip_address(str(cfg.host)).is_loopback
    except ValueError:
        loopback = str(cfg.host) == "localhost"
    if not loopback and not cfg.base_url:
        raise ConfigError(f"host={cfg.host} serves plain HTTP beyond this machine; put it behind an HTTPS proxy and "
                          "set base_url=https://... (the links raters get), or keep host=127.0.0.1")
    state = prepare(cfg)
    url = state["url"]
    print(f"study {state['design'].name}: database {state['db']}")
    for invite in state["invites"]:
        print(f"  new invite  {invite.rater}: {url}/r/{invite.token}")
    print(f"  every invite link: {state['db'].parent / 'invites.txt'}")
    print(f"  admin page: {state['db'].parent / 'admin.txt'}" + ("" if state["admin_token"] else
          " (written when the study was created; ccp-study reset-link makes a new one)"))
    app = create_app(state["db"], state["design"].question, public_url=str(cfg.base_url) if cfg.base_url else None)
    uvicorn.run(app, host=str(cfg.host), port=int(cfg.port), log_level=str(cfg.log_level))


def run_analysis(cfg: DictConfig) -> dict:
    a = cfg.analysis
    out = Path(str(a.output_dir)) if a.output_dir else Path(str(cfg.db)).parent
    options = AnalysisOptions(max_failed_checks=int(a.max_failed_checks), resamples=int(a.resamples),
                              confidence=float(a.confidence), seed=int(a.seed), bt_alpha=float(a.bt_alpha))
    if not 0 < options.confidence < 1 or options.resamples < 1:
        raise ConfigError("analysis.confidence must be in (0, 1) and analysis.resamples at least 1")
    result = analyze(cfg.db, out, options)
    print(to_markdown(result))
    print(f"written: {out / 'analysis.json'}, {out / 'analysis.md'}")
    return result


def reset_link(cfg: DictConfig) -> str:
    """A new invite link for rater=NAME (the old one stops working, a revoked rater is let back in), or a new admin link."""
    db = Path(str(cfg.db))
    if not db.is_file():
        raise ConfigError(f"db={db}: no study database there; run ccp-study serve first, or pass db=PATH")
    token = reset_token(db, cfg.rater)
    link = f"{base_url(cfg)}/{'r' if cfg.rater else 'admin'}/{token}"
    print(f"{'rater ' + cfg.rater if cfg.rater else 'admin'}: {link}")
    return link


def run_study(action: str, cfg: DictConfig):
    """The one entry point of ccp-study."""
    if action == "serve":
        return serve(cfg)
    if action == "analyze":
        return run_analysis(cfg)
    if action == "reset-link":
        return reset_link(cfg)
    raise ConfigError(f"unknown action {action!r}; use one of {', '.join(ACTIONS)}")
