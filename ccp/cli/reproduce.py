"""`python -m ccp.cli.reproduce scale=tiny|toy|full [key=value ...]`: Tables 1-2 and Figs. 8-10.

For every method x dataset of ``conf/reproduce/<scale>.yaml``: use the ccp-train export if it
exists (``exports.<dataset>.<method>``, default ``<train_dir>/<dataset>_<method>/export``), else
(``train_missing: true``) train it in-process with `run_training` and the listed experiment; then
count trainable parameters, measure FID (every dataset), text- and spatial-guided alignment
(``table2_dataset``, faces) and write ``table1.{md,csv,json}``, ``table2.{md,csv,json}`` and the
figures into ``results_dir``.

Every path the run needs is checked first (`check_inputs`), before any training or sampling.
A rerun reuses finished exports and every metric whose settings (and export) are unchanged
(``<eval_dir>/<dataset>_<method>/record.json``); FID shards are resumable on their own.

The tiny scale is an offline CPU smoke run of the whole pipeline: the tiny random prior, random
toy images per dataset, 2 training steps per method, FID with `ToyFeatureExtractor` (a fixed random
conv net), text alignment with `MeanColourPredictor` on colour prompts, 2 canny conditions. Its
numbers say nothing about the methods; it shows that the recipe runs and what it writes.

The toy scale reproduces the tables on real data offline on a CPU: a 32 px prior trained from
scratch on plain coloured scikit-learn digits (`ccp.toy.prior.ensure_toy_prior`, ``prior.train_toy``),
two concept styles as the datasets (``bold``, ``outlined``; `ccp.toy.digits`), FID with the toy
digit classifier's features, text alignment with `ToyAttributePredictor` on caption prompts
(``text_alignment.attributes``: prompt -> attribute to find), unconditional drift
(`ccp.evaluation.drift`, ``table_drift.*``), and a second DreamBooth row trained longer.

Rows: ``methods`` lists table rows; a row is a registered method or a key of ``rows``
(``rows.<row>: {method, label, step_factor, train_settings}``: the same method trained with other
settings, with its own export, record and table row).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ccp.cli.eval import RandomConvFeatures
from ccp.evaluation.attributes import AttributePredictor, AttributeQuestion, ZeroShotAttributePredictor
from ccp.evaluation.tables import write_tables
from ccp.training.latent_cache import folder_stamp, write_dir_atomic, write_json_atomic

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
RECORD = "record.json"


class ReproduceConfigError(ValueError):
    """Inputs of a reproduction that are missing or inconsistent; the message lists them all."""


# --- offline stand-ins for the tiny scale ------------------------------------------------------
# FID features: ccp-eval's `RandomConvFeatures` (a fixed random 8-d conv net), as `ToyFeatureExtractor`.
ToyFeatureExtractor = RandomConvFeatures

# Text features: directions in (chroma r, g, b, luminance - 0.5, constant) space.
_COLOUR_WORDS = {
    "red": (2.0, -1.0, -1.0, 0.0, 0.0), "green": (-1.0, 2.0, -1.0, 0.0, 0.0), "blue": (-1.0, -1.0, 2.0, 0.0, 0.0),
    "grey": (0.0, 0.0, 0.0, 0.0, 1.0), "bright": (0.0, 0.0, 0.0, 1.0, 0.0), "dark": (0.0, 0.0, 0.0, -1.0, 0.0),
}
_HUES = {"red": ("a red tint",), "green": ("a green tint",), "blue": ("a blue tint",), "grey": ("a grey tint",)}
_LIGHT = {"bright": ("bright light",), "dark": ("dark light",)}
COLOUR_QUESTIONS: dict[str, AttributeQuestion] = {
    "red tint": AttributeQuestion("red tint", _HUES, ("red",)),
    "green tint": AttributeQuestion("green tint", _HUES, ("green",)),
    "blue tint": AttributeQuestion("blue tint", _HUES, ("blue",)),
    "bright light": AttributeQuestion("bright light", _LIGHT, ("bright",)),
}


class MeanColourPredictor(ZeroShotAttributePredictor):
    """Zero-shot attribute predictor without weights (tiny scale), decided like CLIP's nearest class.

    Image feature: the mean RGB in [0, 1] as (chroma r, g, b = channel minus the mean of the
    channels, luminance - 0.5, 0.1); a text's feature: the mean of its colour words' directions
    (red/green/blue/grey/bright/dark). A hue question competes red, green, blue and grey (a
    colourless image is grey: its chroma is 0, so only the constant component matches); the light
    question bright vs dark. Prompts: ``COLOUR_QUESTIONS`` ("red tint", "green tint", "blue tint",
    "bright light")."""

    def __init__(self, questions=COLOUR_QUESTIONS):
        super().__init__(questions)

    def encode_images(self, images):
        features = []
        for im in images:
            rgb = np.asarray(im.convert("RGB"), np.float64).reshape(-1, 3).mean(0) / 255.0
            luminance = rgb.mean()
            features.append(np.concatenate([rgb - luminance, [luminance - 0.5, 0.1]]))
        return torch.tensor(np.stack(features))

    def encode_texts(self, texts):
        out = []
        for text in texts:
            words = [_COLOUR_WORDS[w] for w in text.lower().split() if w in _COLOUR_WORDS]
            if not words:
                raise ValueError(f"{text!r} names none of {sorted(_COLOUR_WORDS)}")
            out.append(np.mean(words, axis=0))
        return torch.tensor(np.array(out))


def write_toy_images(folder: Path, count: int, resolution: int, seed: int, tint: Sequence[float] = (0.5, 0.5, 0.5),
                     shapes: int = 3) -> Path:
    """`count` random PNGs: smooth coloured noise around `tint` with a few filled shapes (so canny
    finds edges). Written to a temporary folder, then renamed: a half-written folder never counts."""
    rng = np.random.default_rng(seed)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        low = rng.random((resolution // 8, resolution // 8, 3)) * 0.5 + np.asarray(tint) - 0.25
        base = np.kron(low, np.ones((8, 8, 1)))
        image = PIL.Image.fromarray((base.clip(0, 1) * 255).astype(np.uint8))
        draw = PIL.ImageDraw.Draw(image)
        for _ in range(shapes):
            x0, y0 = rng.integers(0, resolution * 3 // 4, 2)
            size = rng.integers(resolution // 6, resolution // 3)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + size, y0 + size], fill=colour)
        image.save(tmp / f"{i:03d}.png")
    os.replace(tmp, folder)
    return folder


# --- config ----------------------------------------------------------------------------------------
def _plain(node: Any) -> dict:
    """A config mapping (possibly empty or absent) as a plain dict: an empty DictConfig is falsy,
    so ``node or {}`` would hand OmegaConf a plain dict."""
    return {} if node is None else OmegaConf.to_container(node, resolve=True)


def load_config(argv: Sequence[str] = ()) -> DictConfig:
    """``conf/reproduce/<scale>.yaml`` merged with ``key=value`` overrides (OmegaConf dotlist)."""
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise ReproduceConfigError(f"arguments must be key=value (e.g. scale=tiny out_dir=...), got {bad}")
    overrides = OmegaConf.from_dotlist(list(argv))
    scale = str(overrides.get("scale", "tiny"))
    path = CONF_DIR / "reproduce" / f"{scale}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONF_DIR / "reproduce").glob("*.yaml"))
        raise ReproduceConfigError(f"scale={scale}: no {path}; choose one of {known}")
    cfg = OmegaConf.merge(OmegaConf.load(path), overrides)
    cfg.scale = scale
    return cfg


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


def export_done(path: Path) -> bool:
    from ccp.cli.train import EXPORT_INFO

    return (path / EXPORT_INFO).is_file()


def _missing(path: Any) -> bool:
    return path is None or str(path) in ("", "???") or not Path(str(path)).expanduser().exists()


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
        if cfg.spatial_alignment.enabled:
            if _missing(cfg.spatial_alignment.condition_dir):
                problems.append(f"spatial_alignment.condition_dir={cfg.spatial_alignment.condition_dir}: not a folder "
                                "(200 CelebA-HQ images, Appendix D.3)")
            if _missing(cfg.controlnet):
                problems.append(f"controlnet={cfg.controlnet}: not a diffusers ControlNet folder "
                                "(huggingface-cli download lllyasviel/sd-controlnet-canny --local-dir sd-controlnet-canny)")
    if cfg.fid.feature_extractor not in ("inception", "toy", "digit"):
        problems.append(f"fid.feature_extractor={cfg.fid.feature_extractor}: choose inception, toy or digit")
    if cfg.text_alignment.predictor not in ("clip", "mean_colour", "toy"):
        problems.append(f"text_alignment.predictor={cfg.text_alignment.predictor}: choose clip, mean_colour or toy")
    absent = [f"{d}/{m} ({export_dir(cfg, d, m)})" for d in cfg.datasets for m in cfg.methods
              if not export_done(export_dir(cfg, d, m))]
    if absent and not cfg.train_missing:
        problems.append("no ccp-train export for " + ", ".join(absent) + "; train them (ccp-train experiment=...) "
                        "or set train_missing=true, or point exports.<dataset>.<method> at existing exports")
    if problems:
        raise ReproduceConfigError("cannot reproduce the tables:\n  - " + "\n  - ".join(problems))


def uses_digit_classifier(cfg: DictConfig) -> bool:
    drift = cfg.get("drift")
    return (cfg.fid.feature_extractor == "digit" or cfg.text_alignment.predictor == "toy"
            or bool(drift is not None and drift.enabled))


def check_digit_inputs(cfg: DictConfig) -> list[str]:
    """Toy-scale settings: the toy prior's trainer, the digit folders, classifier, prompts, drift."""
    problems = []
    if cfg.prior.get("train_toy", False):
        try:
            from ccp.toy.prior import ensure_toy_prior  # noqa: F401
        except ImportError as err:
            problems.append(f"prior.train_toy=true but ccp.toy.prior.ensure_toy_prior cannot be imported ({err}); "
                            "set prior.train_toy=false and prior.path=<a trained prior folder>, or prior.write_tiny=true "
                            "for the random tiny prior")
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


def prepare_toy_inputs(cfg: DictConfig, progress: bool = False) -> None:
    """The prior (tiny random, or the trained toy prior) and the data folders, when absent: tiny
    scale's toy images and condition images, toy scale's digit concept folders (train and held out)."""
    if cfg.prior.get("write_tiny", False) and not Path(str(cfg.prior.path)).is_dir():
        from ccp.priors.tiny import save_tiny_prior

        write_dir_atomic(Path(str(cfg.prior.path)),
                                 lambda tmp: save_tiny_prior(tmp, seed=int(cfg.seed), with_controlnet=True))
    elif cfg.prior.get("train_toy", False):
        from ccp.toy.prior import ensure_toy_prior

        settings = _plain(cfg.prior.get("toy_settings"))
        cfg.prior.path = str(ensure_toy_prior(str(cfg.prior.path), seed=int(cfg.seed), progress=progress, **settings))
    for d in cfg.datasets:
        spec = cfg.data[d].get("digits")
        if not spec:
            continue
        from ccp.toy.digits import write_concept_dataset

        for split, folder in (("train", cfg.data[d].path), ("held_out", fid_real_path(cfg, d))):
            if not Path(str(folder)).is_dir():
                write_dir_atomic(Path(str(folder)), lambda tmp: write_concept_dataset(
                    tmp, style=str(spec.style), split=split, seed=int(spec.seed), resolution=int(spec.resolution)))
    if not cfg.toy_data:
        return
    for i, d in enumerate(cfg.datasets):
        folder = Path(str(cfg.data[d].path))
        if not folder.is_dir():
            spec = cfg.data[d].toy
            write_toy_images(folder, int(spec.count), int(spec.resolution), int(spec.seed), tuple(spec.tint))
    spatial = cfg.spatial_alignment
    folder = Path(str(spatial.condition_dir))
    if spatial.enabled and not folder.is_dir():
        write_toy_images(folder, int(spatial.num_conditions), int(cfg.sampling.height), int(cfg.seed) + 100,
                         shapes=2)


# --- training -----------------------------------------------------------------------------------
def train_config(cfg: DictConfig, dataset: str, method: str) -> DictConfig:
    """The ccp-train config of one table cell: its experiment, the prior, data and extra settings."""
    from hydra import compose, initialize_config_dir

    from ccp.cli.train import CONF_DIR as TRAIN_CONF

    row, method = method, method_of(cfg, method)
    spec = row_spec(cfg, row)
    experiment = str(cfg.data[dataset].experiment).format(method=method, dataset=dataset, row=row)
    with initialize_config_dir(config_dir=TRAIN_CONF, version_base="1.3"):
        train_cfg = compose("train", overrides=[f"experiment={experiment}"])
    OmegaConf.update(train_cfg, "prior.path", str(cfg.prior.path))
    OmegaConf.update(train_cfg, "data.path", str(cfg.data[dataset].path))
    layers = [cfg.train_settings, cfg.data[dataset].get("train_settings")]
    if spec is not None:  # a variant row: its own settings, then its step multiplier
        layers.append(spec.get("train_settings"))
    for layer in layers:
        if layer is not None:  # (an empty DictConfig is falsy but still a config)
            for key, value in (OmegaConf.to_container(layer, resolve=True) or {}).items():
                OmegaConf.update(train_cfg, key, value, force_add=True)
    if spec is not None:
        factor = spec.get("step_factor", 1)
        if factor != 1:
            train_cfg.trainer.max_steps = max(1, int(round(int(train_cfg.trainer.max_steps) * float(factor))))
    return train_cfg


def ensure_export(cfg: DictConfig, dataset: str, method: str) -> tuple[Path, bool]:
    """(export folder, whether it was trained now). An export of ``exports.<dataset>.<method>`` is
    used as given; one in ``train_dir`` only while its config and the prior's files are those it
    was trained with (a retrained toy prior at the same path retrains every method)."""
    from ccp.cli.train import run_training, set_aside, trained_with

    path = export_dir(cfg, dataset, method)
    given = OmegaConf.select(cfg, f"exports.{dataset}.{method}")
    train_cfg = train_config(cfg, dataset, method)
    current = trained_with(path.parent, train_cfg)
    if export_done(path) and (given or current or not cfg.train_missing):
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
    from ccp.cli.train import EXPORT_INFO

    info = path / EXPORT_INFO
    return hashlib.sha256(f"{info.resolve()}:{info.stat().st_mtime_ns}:{info.read_text()}".encode()).hexdigest()[:16]


# --- evaluation ----------------------------------------------------------------------------------
def _weights(cfg: DictConfig, method: str) -> dict[str, float]:
    g = cfg.guidance
    own = (OmegaConf.select(cfg, f"guidance.per_method.{method}")
           or OmegaConf.select(cfg, f"guidance.per_method.{method_of(cfg, method)}") or {})
    return {"concept_weight": float(own.get("concept_weight", g.concept_weight)),
            "control_weight": float(own.get("control_weight", g.control_weight))}


def _settings(cfg: DictConfig, metric: str, method: str, stamp: str,
              weights: dict[str, float] | None = None) -> dict[str, Any]:
    parts = {"metric": metric, "export": stamp, "sampling": OmegaConf.to_container(cfg.sampling, resolve=True),
             "weights": weights or _weights(cfg, method)}
    section = "fid" if metric.startswith("fid_search/") else {"text_alignment_parts": "text_alignment"}.get(metric, metric)
    if section in ("fid", "text_alignment", "spatial_alignment", "drift"):
        parts[section] = OmegaConf.to_container(cfg[section], resolve=True)
    if section != "params" and cfg.get("classifier") is not None and uses_digit_classifier(cfg):
        parts["classifier"] = OmegaConf.to_container(cfg.classifier, resolve=True)
    return parts


class Cell:
    """One (dataset, method): its record file and the model, loaded only when a metric is missing."""

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

    @property
    def loaded(self):
        if self._loaded is None:
            from ccp.cli.train import load_trained

            self._loaded = load_trained(self.export, self._prior_loader())
        return self._loaded

    @property
    def template(self):
        from ccp.methods.base import PromptTemplate

        info = json.loads((self.export / "ccp_export.json").read_text())
        return PromptTemplate(**info["template"])

    def metric(self, name: str, compute, weights: dict[str, float] | None = None) -> Any:
        settings = _settings(self.cfg, name, self.method, self.stamp, weights)
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


def count_params(cfg: DictConfig, cell: Cell, prior) -> int:
    """Trainable parameters of the method as ccp-train builds it (its method kwargs, the prior)."""
    from ccp.methods import method_class

    train_cfg = train_config(cfg, cell.dataset, cell.method)
    kwargs = train_cfg.method.get("kwargs")
    kwargs = OmegaConf.to_container(kwargs, resolve=True) if kwargs is not None else {}
    method = method_class(method_of(cfg, cell.method))(prior, cell.template, **kwargs)
    count = int(method.num_trainable_parameters())
    del method
    gc.collect()
    return count


def ensure_digit_classifier(cfg: DictConfig):
    """The toy `DigitClassifier` at ``classifier.path``, trained there once with ``classifier.settings``
    (`train_digit_classifier` keywords); retrained only when those settings change."""
    from ccp.toy import instruments

    path = Path(str(cfg.classifier.path))
    sidecar = path.with_name(path.name + ".json")
    settings = _plain(cfg.classifier.get("settings"))
    if path.is_file() and sidecar.is_file() and json.loads(sidecar.read_text()).get("settings") == settings:
        return instruments.load_classifier(path)
    log.info("training the toy digit classifier (%s)", path)
    model, info = instruments.train_digit_classifier(**settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    instruments.save_classifier(model, tmp)
    os.replace(tmp, path)
    write_json_atomic(sidecar, {"settings": settings, "train": info})
    return model


class PromptAttributePredictor(AttributePredictor):
    """Judges each prompt by the attribute it asks for (``attributes``: prompt -> attribute of a
    `ToyAttributePredictor`, e.g. "a red digit 3" -> "red digit 3": both must hold), and keeps the
    colour-only and class-only verdicts of combined attributes in ``parts``."""

    def __init__(self, toy, attributes: dict[str, str]):
        self.toy = toy
        self.mapping = dict(attributes)
        self.parts: dict[str, dict[str, list[torch.Tensor]]] = {}

    @property
    def attributes(self) -> tuple[str, ...]:
        return tuple(self.mapping)

    def _split(self, attribute: str) -> dict[str, str]:
        if attribute in self.toy.colour.attributes:
            return {"colour": attribute}
        if attribute in self.toy.digit.attributes:
            return {"class": attribute}
        colour, digit = attribute.split(" ", 1)
        return {"colour": colour, "class": digit}

    def predict(self, images, prompt):
        self.check([prompt])
        self.toy.check([self.mapping[prompt]])
        flags = {kind: torch.as_tensor(self.toy.predict(images, attr), dtype=torch.bool)
                 for kind, attr in self._split(self.mapping[prompt]).items()}
        for kind, f in flags.items():
            self.parts.setdefault(kind, {}).setdefault(prompt, []).append(f)
        both = torch.ones(len(images), dtype=torch.bool)
        for f in flags.values():
            both &= f
        return both

    def part_alignment(self) -> dict[str, float]:
        """Mean over prompts of the colour-only / class-only alignment (kinds every prompt has)."""
        from ccp.evaluation.alignment import alignment_table

        return {kind: alignment_table({p: torch.cat(v) for p, v in found.items()})["mean"]
                for kind, found in self.parts.items() if set(found) == set(self.mapping)}


def measure_fid(cfg: DictConfig, cell: Cell, progress: bool, classifier=None, weights: dict[str, float] | None = None,
                shard_dir: Path | None = None) -> float:
    from ccp.evaluation.fid import FIDConfig, run_fid
    from ccp.evaluation.generation import PipelineSampler

    f, s = cfg.fid, cfg.sampling
    fid_cfg = FIDConfig(
        real_path=fid_real_path(cfg, cell.dataset), shard_dir=str(shard_dir or cell.dir / "fid_shards"),
        resolution=int(f.resolution),
        num_samples=int(f.num_samples), shard_size=int(f.shard_size), batch_size=int(s.batch_size), seed=int(f.seed),
        inception_weights=f.inception_weights, max_real_images=f.max_real_images,
        stats_cache_dir=str(f.stats_cache_dir) if f.stats_cache_dir else None, num_workers=int(f.num_workers),
    )
    extractor = (ToyFeatureExtractor(int(f.toy_seed)) if f.feature_extractor == "toy"
                 else classifier().feature_extractor() if f.feature_extractor == "digit" else None)
    fid_cfg.check(need_weights=extractor is None)
    pipe, denoiser, cls = cell.loaded
    spec = cls.default_guidance(denoiser, cell.template, None, **(weights or _weights(cfg, cell.method)))
    sampler = PipelineSampler(pipe, spec, num_inference_steps=int(s.steps), height=int(s.height), width=int(s.width),
                              batch_size=int(s.batch_size))
    return float(run_fid(fid_cfg, sampler, feature_extractor=extractor, device=cfg.device, rank=0, world_size=1,
                         progress=progress))


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


def search_fid(cfg: DictConfig, cell: Cell, fid_at_configured: float | None, progress: bool, classifier) -> dict:
    """FID at each value of the row's searched guidance weight (the others as configured), and the
    best: the paper compares each method at its own best weights. The configured value reuses the
    table's FID; every other value samples into its own shard folder and record entry."""
    name, values = search_grid(cfg, cell.method)
    base = _weights(cfg, cell.method)
    fids = {}
    for value in values:
        weights = {**base, name: value}
        if weights == base and fid_at_configured is not None:
            fids[f"{value:g}"] = fid_at_configured
            continue
        tag = f"{name}={value:g}"
        fids[f"{value:g}"] = cell.metric(f"fid_search/{tag}", lambda: measure_fid(
            cfg, cell, progress, classifier, weights, shard_dir=cell.dir / f"fid_shards_{tag}"), weights=weights)
    best = min(fids, key=fids.get)
    return {"weight": name, "fid": fids, "best_weight": float(best), "best_fid": fids[best]}


def measure_text(cfg: DictConfig, cell: Cell, progress: bool, classifier=None) -> float:
    """Mean text-guided alignment; with the toy predictor the colour-only and class-only means go
    into ``text_alignment.json`` as ``parts`` too."""
    from ccp.evaluation.alignment import TextAlignmentConfig, text_alignment
    from ccp.evaluation.attributes import CLIPAttributePredictor

    t, s = cfg.text_alignment, cfg.sampling
    if t.predictor == "toy":
        from ccp.toy.instruments import ToyAttributePredictor

        predictor = PromptAttributePredictor(ToyAttributePredictor(classifier()),
                                             OmegaConf.to_container(t.attributes, resolve=True))
    elif t.predictor == "mean_colour":
        predictor = MeanColourPredictor()
    else:
        predictor = CLIPAttributePredictor(str(t.clip_weights), device=cfg.device)
    config = TextAlignmentConfig(
        steps=int(s.steps), height=int(s.height), width=int(s.width), batch_size=int(s.batch_size), seed=int(t.seed),
        prompts=tuple(t.prompts), images_per_prompt=int(t.images_per_prompt),
        clip_weights=str(t.clip_weights or ""), **_weights(cfg, cell.method),
    )
    pipe, denoiser, cls = cell.loaded
    out = cell.dir / "text_alignment.json"
    result = text_alignment(pipe, denoiser, cls, cell.template, predictor=predictor, config=config, out=out,
                            progress=progress)
    if isinstance(predictor, PromptAttributePredictor):
        result["parts"] = predictor.part_alignment()
        write_json_atomic(out, result)
    return float(result["mean"])


def text_parts(cell: Cell) -> dict[str, float]:
    """The colour-only / class-only means `measure_text` stored beside the main number."""
    return json.loads((cell.dir / "text_alignment.json").read_text()).get("parts", {})


def drift_config(cfg: DictConfig):
    from ccp.evaluation.drift import DriftConfig

    d, s = cfg.drift, cfg.sampling
    return DriftConfig(num_samples=int(d.num_samples), steps=int(s.steps), height=int(s.height), width=int(s.width),
                       batch_size=int(s.batch_size), seed=int(d.seed))


def prior_unconditional_samples(cfg: DictConfig, prior, classifier, progress: bool):
    """The prior's own unconditional samples, judged; drawn once per (prior, drift settings,
    classifier) and kept in ``<eval_dir>/prior_unconditional.safetensors``."""
    from safetensors.torch import load_file, save_file

    from ccp.evaluation.drift import UnconditionalSamples, digit_judge, prior_unconditional, sample_unconditional
    from ccp.pipelines.gcfg import GCFGPipeline

    config = drift_config(cfg)
    judge = digit_judge(classifier())  # first: the key below reads the classifier's file
    key = hashlib.sha256(json.dumps({
        "prior": folder_stamp(Path(str(cfg.prior.path))), "drift": OmegaConf.to_container(cfg.drift, resolve=True),
        "sampling": OmegaConf.to_container(cfg.sampling, resolve=True),
        "classifier": hashlib.sha256(Path(str(cfg.classifier.path)).read_bytes()).hexdigest()[:16],
    }, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(str(cfg.eval_dir)) / "prior_unconditional.safetensors"
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            same = (f.metadata() or {}).get("key") == key
        if same:
            tensors = load_file(str(path))
            return UnconditionalSamples(tensors["features"], tensors["styles"])
    pipe = GCFGPipeline.from_prior(prior())
    pipe.set_progress_bar_config(disable=True)
    samples = sample_unconditional(pipe, prior_unconditional(), judge, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(samples.to_dict(), str(tmp), metadata={"key": key})
    os.replace(tmp, path)
    return samples


def measure_drift(cfg: DictConfig, cell: Cell, reference, classifier) -> dict[str, float]:
    """Drift of the cell's unconditional source from the prior's (`ccp.evaluation.drift`)."""
    from ccp.evaluation.drift import digit_judge, drift, method_unconditional, sample_unconditional, style_index

    pipe, denoiser, cls = cell.loaded
    own = sample_unconditional(pipe, method_unconditional(cls, denoiser, cell.template), digit_judge(classifier()),
                               drift_config(cfg))
    return drift(own, reference(), style_index(str(cfg.data[cell.dataset].digits.style)))


def measure_spatial(cfg: DictConfig, cell: Cell, controlnet, progress: bool) -> float:
    from ccp.evaluation.alignment import SpatialAlignmentConfig, spatial_alignment

    a, s = cfg.spatial_alignment, cfg.sampling
    config = SpatialAlignmentConfig(
        steps=int(s.steps), height=int(s.height), width=int(s.width), batch_size=int(s.batch_size), seed=int(a.seed),
        num_conditions=int(a.num_conditions), samples_per_condition=int(a.samples_per_condition),
        **_weights(cfg, cell.method),
    )
    pipe, denoiser, cls = cell.loaded
    result = spatial_alignment(pipe, denoiser, cls, cell.template, str(a.condition_dir), controlnet(), config,
                               out=cell.dir / "spatial_alignment.json", progress=progress)
    return float(result["mean_f1"])


# --- figures ---------------------------------------------------------------------------------------
def draw_figures(cfg: DictConfig, records: list[dict], cells: dict[tuple[str, str], Cell], results_dir: Path) -> dict[str, Path]:
    from ccp.evaluation.figures import (
        fidelity_control_scatter,
        rectification_figure,
        sample_rectification,
        sample_weight_grid,
        weight_grid_figure,
    )

    fig, s = cfg.figures, cfg.sampling
    out: dict[str, Path] = {}
    dataset = str(cfg.table2_dataset)
    if any(r["dataset"] == dataset and r.get("fid") and r.get("text_alignment") is not None for r in records):
        out["fig9"] = fidelity_control_scatter(records, results_dir / "fig9_fidelity_controllability.png", dataset).path

    def stamp_ok(name: str, settings: dict) -> bool:
        path = results_dir / f"{name}.json"
        settings = json.loads(json.dumps(settings))
        if path.is_file() and (results_dir / f"{name}.png").is_file() and json.loads(path.read_text()) == settings:
            return True
        return False

    grid = fig.weight_grid
    if grid.enabled and (grid.dataset, "ours") in cells:
        cell = cells[(grid.dataset, "ours")]
        settings = {"export": cell.stamp, "sampling": OmegaConf.to_container(s), "grid": OmegaConf.to_container(grid)}
        if not stamp_ok("fig8a_weight_grid", settings):
            pipe, denoiser, cls = cell.loaded
            images = sample_weight_grid(pipe, denoiser, cls, cell.template, str(grid.control_prompt),
                                        list(grid.concept_weights), list(grid.control_weights), int(grid.seed),
                                        int(s.steps), int(s.height), int(s.width))
            weight_grid_figure(images, list(grid.concept_weights), list(grid.control_weights),
                               results_dir / "fig8a_weight_grid.png", str(grid.control_prompt))
            write_json_atomic(results_dir / "fig8a_weight_grid.json", settings)
        out["fig8a"] = results_dir / "fig8a_weight_grid.png"

    rect = fig.rectification
    chosen = [m for m in rect.methods if (rect.dataset, m) in cells]
    if rect.enabled and chosen:
        settings = {"exports": {m: cells[(rect.dataset, m)].stamp for m in chosen},
                    "sampling": OmegaConf.to_container(s), "rect": OmegaConf.to_container(rect)}
        if not stamp_ok("fig8b_rectification", settings):
            samples = {}
            for m in chosen:
                cell = cells[(rect.dataset, m)]
                pipe, denoiser, cls = cell.loaded
                samples[m] = sample_rectification(pipe, denoiser, cls, cell.template, list(rect.seeds),
                                                  rect.control_prompt, _weights(cfg, m)["control_weight"],
                                                  int(s.steps), int(s.height), int(s.width))
            labels = {m: str(row_spec(cfg, m).get("label") or m) for m in chosen if row_spec(cfg, m) is not None}
            rectification_figure(samples, results_dir / "fig8b_rectification.png", seeds=list(rect.seeds), labels=labels)
            write_json_atomic(results_dir / "fig8b_rectification.json", settings)
        out["fig8b"] = results_dir / "fig8b_rectification.png"
    return out


# --- the run -----------------------------------------------------------------------------------------
def reproduce(cfg: DictConfig, progress: bool = True) -> dict[str, Any]:
    """Train what is missing, evaluate, write tables and figures. Returns ``{records, tables,
    figures, trained, computed, reused, seconds}``."""
    start = time.perf_counter()
    check_inputs(cfg)
    prepare_toy_inputs(cfg, progress)
    check_inputs(cfg)  # the toy folders now exist

    trained = []
    jobs = [(d, m) for d in cfg.datasets for m in cfg.methods]
    exports = {}
    for d, m in tqdm(jobs, desc="exports (train if missing)", disable=not progress):
        exports[(d, m)], now = ensure_export(cfg, d, m)
        if now:
            trained.append(f"{d}/{m}")

    from ccp.priors.loading import load_controlnet, load_prior

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
            cache["classifier"] = ensure_digit_classifier(cfg)
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


def main(argv: Sequence[str] | None = None) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    ccp_log = logging.getLogger("ccp")
    ccp_log.addHandler(handler)
    ccp_log.setLevel(logging.INFO)
    ccp_log.propagate = False
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
        if cfg.get("threads"):
            torch.set_num_threads(int(cfg.threads))
        summary = reproduce(cfg)
    except ReproduceConfigError as err:
        raise SystemExit(f"ccp.cli.reproduce: error: {err}") from None
    results = Path(summary["tables"]["table1.md"]).parent
    print((results / "table1.md").read_text())
    print((results / "table2.md").read_text())
    if "table_drift.md" in summary["tables"]:
        print((results / "table_drift.md").read_text())
    print(f"trained: {summary['trained'] or 'nothing (all exports existed)'}; "
          f"{len(summary['computed'])} cell(s) evaluated, {len(summary['reused'])} reused; "
          f"{summary['seconds']:.1f} s; tables and figures in {results}")


if __name__ == "__main__":
    main()
