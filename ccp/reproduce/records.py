"""Per-cell records: one (dataset, row) of the tables, its ``record.json`` of metric values keyed
by everything they depend on (the export's stamp, sampling, the metric's settings, weights), and
its model, loaded only when a metric has to be computed."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ccp.io import folder_stamp, write_json_atomic
from ccp.methods.export import TrainedModel, export_template, load_trained
from ccp.reproduce.config import method_of, uses_digit_classifier
from ccp.reproduce.exports import export_stamp

RECORD = "record.json"


def weights_for(cfg: DictConfig, method: str) -> dict[str, float]:
    g = cfg.guidance
    own = (OmegaConf.select(cfg, f"guidance.per_method.{method}")
           or OmegaConf.select(cfg, f"guidance.per_method.{method_of(cfg, method)}") or {})
    return {"concept_weight": float(own.get("concept_weight", g.concept_weight)),
            "control_weight": float(own.get("control_weight", g.control_weight))}


def _settings(cfg: DictConfig, metric: str, method: str, stamp: str,
              weights: dict[str, float] | None = None) -> dict[str, Any]:
    parts = {"metric": metric, "export": stamp, "sampling": OmegaConf.to_container(cfg.sampling, resolve=True),
             "weights": weights or weights_for(cfg, method)}
    section = "fid" if metric.startswith("fid_search/") else {"text_alignment_parts": "text_alignment"}.get(metric, metric)
    if section in ("fid", "text_alignment", "spatial_alignment", "drift"):
        parts[section] = OmegaConf.to_container(cfg[section], resolve=True)
    if section == "spatial_alignment" and cfg.get("controlnet"):  # a retrained ControlNet is measured again
        parts["controlnet"] = folder_stamp(str(cfg.controlnet))
    if metric == "kid" or metric.startswith("fid_sampling/"):  # computed on FID's samples
        parts["fid"] = OmegaConf.to_container(cfg.fid, resolve=True)
        if metric == "kid":
            parts["kid"] = OmegaConf.to_container(cfg.kid, resolve=True)
    if section != "params" and cfg.get("classifier") is not None and uses_digit_classifier(cfg):
        parts["classifier"] = OmegaConf.to_container(cfg.classifier, resolve=True)
    if stand_in_instrument(cfg, metric):  # also: a stand-in later replaced by the real file is measured again
        parts["stand_in_weights"] = True
    return parts


def stand_in_instrument(cfg: DictConfig, metric: str) -> bool:
    """Whether `metric` is measured with a stand-in weights file (`ccp.evaluation.stand_in`): the
    Inception of FID, KID and their searches/spreads, or the CLIP of text alignment."""
    from ccp.evaluation.stand_in import stand_in_marker

    if metric in ("fid", "kid") or metric.startswith(("fid_search/", "fid_sampling/")):
        if cfg.fid.feature_extractor != "inception":
            return False
        from ccp.evaluation.fid import InceptionWeightsError, resolve_inception_weights

        try:
            path = resolve_inception_weights(cfg.fid.inception_weights)
        except InceptionWeightsError:
            return False  # measuring it fails with the message
    elif metric in ("text_alignment", "text_alignment_parts"):
        if cfg.text_alignment.predictor != "clip" or not cfg.text_alignment.clip_weights:
            return False
        path = Path(str(cfg.text_alignment.clip_weights)).expanduser()
    else:
        return False
    return stand_in_marker(path) is not None


class Cell:
    """One (dataset, row): its record file and the model, loaded only when a metric is missing."""

    def __init__(self, cfg: DictConfig, dataset: str, method: str, export: Path, prior_loader):
        self.cfg, self.dataset, self.method, self.export = cfg, dataset, method, export
        self.dir = Path(str(cfg.eval_dir)) / f"{dataset}_{method}"
        self.record_path = self.dir / RECORD
        self.stamp = export_stamp(export)
        self._prior_loader = prior_loader
        self._loaded = None
        self.record = json.loads(self.record_path.read_text()) if self.record_path.is_file() else {}
        self.computed: list[str] = []
        self.reused: list[str] = []
        self.stand_in: list[str] = []  # metrics measured with stand-in weight files: their numbers mean nothing

    @property
    def model(self) -> TrainedModel:
        if self._loaded is None:
            self._loaded = load_trained(self.export, self._prior_loader())
        return self._loaded

    @property
    def template(self):
        return export_template(self.export)

    def metric(self, name: str, compute, weights: dict[str, float] | None = None) -> Any:
        settings = _settings(self.cfg, name, self.method, self.stamp, weights)
        if settings.get("stand_in_weights") and name not in self.stand_in:
            self.stand_in.append(name)
        entry = self.record.get(name)
        if entry is not None and entry.get("settings") == json.loads(json.dumps(settings)):
            self.reused.append(name)
            return entry["value"]
        value = compute()
        self.record[name] = {"value": value, "settings": settings}
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.record_path, self.record)
        self.computed.append(name)
        return value

    def release(self) -> None:
        self._loaded = None
        gc.collect()

