"""The reproduction's config (``conf/reproduce.yaml`` with a ``scale``) and its checks.

`check_inputs` lists every problem that needs no model at once, before anything is trained or
sampled. Rows: ``methods`` lists table rows; a row is a registered method or a key of ``rows``
(``rows.<row>: {method, label, step_factor, train_settings}``: the same method trained with other
settings, with its own export, record and table row).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ccp.config import ConfigError, compose
from ccp.methods.export import is_export


class ReproduceConfigError(ConfigError, ValueError):
    """Inputs of a reproduction that are missing or inconsistent; the message lists them all."""


def compose_reproduce(overrides: Sequence[str] = ()) -> DictConfig:
    """``conf/reproduce.yaml`` with Hydra overrides, e.g. ``["scale=toy", "datasets=[bold]"]``."""
    return compose("reproduce", overrides)


def row_spec(cfg: DictConfig, row: str) -> DictConfig | None:
    """``rows.<row>`` (a variant of a method), or None for a plain method row."""
    return OmegaConf.select(cfg, f"rows.{row}") if cfg.get("rows") else None


def method_of(cfg: DictConfig, row: str) -> str:
    """The registered method a table row trains and samples with."""
    spec = row_spec(cfg, row)
    return str(spec.method) if spec is not None else row


def export_dir(cfg: DictConfig, dataset: str, method: str) -> Path:
    given = OmegaConf.select(cfg, f"exports.{dataset}.{method}")
    return Path(str(given)) if given else Path(str(cfg.train_dir)) / f"{dataset}_{method}" / "export"


def fid_real_path(cfg: DictConfig, dataset: str) -> str:
    """The real side of FID: ``data.<d>.fid_path`` (toy scale: the held-out folder), else the training folder."""
    return str(cfg.data[dataset].get("fid_path") or cfg.data[dataset].path)


def _missing(path: Any) -> bool:
    return path is None or str(path) in ("", "???") or not Path(str(path)).expanduser().exists()


def check_preference(cfg: DictConfig) -> list[str]:
    """``preference``: dataset -> a preference study of that dataset (its analysis.json or database)."""
    problems = []
    for d, path in (cfg.get("preference") or {}).items():
        if d not in cfg.datasets:
            problems.append(f"preference.{d}: {d!r} is not in datasets {list(cfg.datasets)}; key each study by its dataset")
        elif path is None or not Path(str(path)).is_file():
            problems.append(f"preference.{d}={path}: not a file; give the study's analysis.json (ccp-study analyze) "
                            "or its .sqlite database")
    return problems


def check_inputs(cfg: DictConfig) -> None:
    """Every problem that needs no model, all at once, before anything is trained or sampled."""
    from ccp.methods import METHODS

    problems = []
    rows = cfg.get("rows") or {}
    unknown = [m for m in cfg.methods if m not in METHODS and m not in rows]
    if unknown:
        problems.append(f"methods: unknown {unknown}; choose from {sorted(METHODS)} or a variant row of "
                        f"rows ({sorted(rows)})")
    for row, spec in rows.items():
        if spec.get("method") not in METHODS:
            problems.append(f"rows.{row}.method={spec.get('method')}: set it to the method the row trains, one of "
                            f"{sorted(METHODS)}")
        factor = spec.get("step_factor", 1)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
            problems.append(f"rows.{row}.step_factor={factor}: must be a positive number (trainer.max_steps multiplier)")
    for d in cfg.datasets:
        if OmegaConf.select(cfg, f"data.{d}") is None:
            problems.append(f"datasets lists {d!r} but data.{d} is not configured")
    problems += check_digit_inputs(cfg)
    problems += check_weight_search(cfg)
    problems += check_preference(cfg)
    tiny = bool(cfg.toy_data)
    if not tiny:
        if _missing(cfg.prior.path) and not cfg.prior.get("write_tiny", False) and not cfg.prior.get("train_toy", False):
            problems.append(f"prior.path={cfg.prior.path}: not a folder; download SD v1.5 "
                            "(huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir sd-v1-5)")
        for d in cfg.datasets:
            if OmegaConf.select(cfg, f"data.{d}") is not None and not cfg.data[d].get("digits") and _missing(cfg.data[d].path):
                problems.append(f"data.{d}.path={cfg.data[d].path}: not a folder of real images (FID statistics"
                                f"{' and training' if cfg.train_missing else ''})")
        if cfg.fid.feature_extractor == "inception":
            from ccp.evaluation.fid import InceptionWeightsError, resolve_inception_weights

            try:
                resolve_inception_weights(cfg.fid.inception_weights)
            except InceptionWeightsError as err:
                problems.append(str(err))
        if cfg.text_alignment.enabled and cfg.text_alignment.predictor == "clip" and _missing(cfg.text_alignment.clip_weights):
            from ccp.evaluation.attributes import CLIP_VIT_L14_URL

            problems.append(f"text_alignment.clip_weights={cfg.text_alignment.clip_weights}: missing; download "
                            f"{CLIP_VIT_L14_URL} and point text_alignment.clip_weights at it")
        # the toy scale builds both: the toy ControlNet beside its prior, conditions from held-out digits
        toy_builds = bool(cfg.prior.get("train_toy", False) and (cfg.get("toy_controlnet") or {}).get("train_toy", False))
        if cfg.spatial_alignment.enabled and not toy_builds:
            if _missing(cfg.spatial_alignment.condition_dir):
                problems.append(f"spatial_alignment.condition_dir={cfg.spatial_alignment.condition_dir}: not a folder "
                                "(200 CelebA-HQ images, Appendix D.3)")
            if _missing(cfg.controlnet):
                hint = ("toy_controlnet.train_toy=true to train the toy one" if cfg.prior.get("train_toy", False) else
                        "huggingface-cli download lllyasviel/sd-controlnet-canny --local-dir sd-controlnet-canny")
                problems.append(f"controlnet={cfg.controlnet}: not a diffusers ControlNet folder ({hint}), or set "
                                "spatial_alignment.enabled=false")
    if cfg.fid.feature_extractor not in ("inception", "toy", "digit"):
        problems.append(f"fid.feature_extractor={cfg.fid.feature_extractor}: choose inception, toy or digit")
    if cfg.text_alignment.predictor not in ("clip", "mean_colour", "toy"):
        problems.append(f"text_alignment.predictor={cfg.text_alignment.predictor}: choose clip, mean_colour or toy")
    absent = [f"{d}/{m} ({export_dir(cfg, d, m)})" for d in cfg.datasets for m in cfg.methods
              if not is_export(export_dir(cfg, d, m))]
    if absent and not cfg.train_missing:
        problems.append("no ccp-train export for " + ", ".join(absent) + "; train them (ccp-train experiment=...) "
                        "or set train_missing=true, or pass +exports.<dataset>.<method>=/path/to/export for existing ones")
    if problems:
        raise ReproduceConfigError("cannot reproduce the tables:\n  - " + "\n  - ".join(problems))


def uses_digit_classifier(cfg: DictConfig) -> bool:
    drift = cfg.get("drift")
    return (cfg.fid.feature_extractor == "digit" or cfg.text_alignment.predictor == "toy"
            or bool(drift is not None and drift.enabled))


def check_digit_inputs(cfg: DictConfig) -> list[str]:
    """Toy-scale settings: the toy prior's trainer, the digit folders, classifier, prompts, drift."""
    problems = []
    from ccp.toy.digits import CONCEPT_STYLES

    for d in cfg.datasets:
        spec = OmegaConf.select(cfg, f"data.{d}.digits")
        if spec is not None and spec.get("style") not in CONCEPT_STYLES:
            problems.append(f"data.{d}.digits.style={spec.get('style')}: choose a concept style {list(CONCEPT_STYLES)}")
    if uses_digit_classifier(cfg) and not OmegaConf.select(cfg, "classifier.path"):
        problems.append("the digit FID features / toy predictor / drift need the toy digit classifier: set "
                        "classifier.path (a file; trained there once when absent) and classifier.settings")
    t = cfg.text_alignment
    if t.enabled and t.predictor == "toy":
        from ccp.toy.instruments import DigitClassifier, ToyAttributePredictor

        attributes = dict(t.get("attributes") or {})
        unmapped = [p for p in t.prompts if p not in attributes]
        if unmapped:
            problems.append(f"text_alignment.prompts {unmapped} have no entry in text_alignment.attributes; add "
                            "'<prompt>': '<attribute to find>' (e.g. 'a red digit 3': 'red digit 3')")
        known = set(ToyAttributePredictor(DigitClassifier()).attributes)
        bad = {p: a for p, a in attributes.items() if a not in known}
        if bad:
            problems.append(f"text_alignment.attributes {bad}: ToyAttributePredictor decides a colour ('red'), a class "
                            "('digit 3') or both ('red digit 3')")
    drift = cfg.get("drift")
    if drift is not None and drift.enabled:
        nostyle = [d for d in cfg.datasets if not OmegaConf.select(cfg, f"data.{d}.digits.style")]
        if nostyle:
            problems.append(f"drift.enabled=true needs each dataset's concept style (data.<d>.digits.style); missing "
                            f"for {nostyle}; set drift.enabled=false or configure data.<d>.digits")
    return problems


SEARCHABLE = ("concept_weight", "control_weight")


def search_enabled(cfg: DictConfig, dataset: str) -> bool:
    ws = cfg.get("weight_search")
    return bool(ws is not None and ws.enabled and cfg.fid.enabled
                and (ws.get("datasets") is None or dataset in ws.datasets))


def search_grid(cfg: DictConfig, row: str) -> tuple[str, list[float]]:
    """(weight name, values) searched for one row: its own grid entry, its method's, or ``default``."""
    grid = cfg.weight_search.grid
    entry = grid.get(row) or grid.get(method_of(cfg, row)) or grid.get("default")
    if entry is None or len(entry) != 1:
        raise ReproduceConfigError(f"weight_search.grid: no single weight for {row!r} (give it, its method or "
                                   f"'default' one entry, e.g. {{control_weight: [1.0, 2.0, 5.0]}})")
    (name, values), = entry.items()
    return str(name), [float(v) for v in values]


def check_weight_search(cfg: DictConfig) -> list[str]:
    ws = cfg.get("weight_search")
    if ws is None or not ws.enabled:
        return []
    problems = []
    for key, entry in (ws.get("grid") or {}).items():
        entry = OmegaConf.to_container(entry, resolve=True) if isinstance(entry, DictConfig) else entry
        ok = isinstance(entry, dict) and len(entry) == 1 and next(iter(entry)) in SEARCHABLE
        values = next(iter(entry.values())) if ok else None
        if not ok or not isinstance(values, list) or not values or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            problems.append(f"weight_search.grid.{key}={entry}: give one of {list(SEARCHABLE)} with a non-empty "
                            "list of numbers, e.g. {control_weight: [1.0, 2.0, 5.0]}")
    for row in cfg.methods:
        try:
            search_grid(cfg, row)
        except ReproduceConfigError as err:
            problems.append(str(err))
    unknown = [d for d in (ws.get("datasets") or []) if d not in cfg.datasets]
    if unknown:
        problems.append(f"weight_search.datasets: {unknown} not in datasets {list(cfg.datasets)}")
    return problems
