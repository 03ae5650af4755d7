"""`python -m ccp.cli.reproduce scale=tiny|full [key=value ...]`: Tables 1-2 and Figs. 8-10.

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
from ccp.evaluation.attributes import AttributeQuestion, ZeroShotAttributePredictor
from ccp.evaluation.tables import write_tables
from ccp.training.latent_cache import write_json_atomic

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


def export_dir(cfg: DictConfig, dataset: str, method: str) -> Path:
    given = OmegaConf.select(cfg, f"exports.{dataset}.{method}")
    return Path(str(given)) if given else Path(str(cfg.train_dir)) / f"{dataset}_{method}" / "export"


def export_done(path: Path) -> bool:
    from ccp.cli.train import EXPORT_INFO

    return (path / EXPORT_INFO).is_file()


def _missing(path: Any) -> bool:
    return path is None or str(path) in ("", "???") or not Path(str(path)).expanduser().exists()


def check_inputs(cfg: DictConfig) -> None:
    """Every problem that needs no model, all at once, before anything is trained or sampled."""
    from ccp.methods import METHODS

    problems = []
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        problems.append(f"methods: unknown {unknown}; choose from {sorted(METHODS)}")
    for d in cfg.datasets:
        if OmegaConf.select(cfg, f"data.{d}") is None:
            problems.append(f"datasets lists {d!r} but data.{d} is not configured")
    tiny = bool(cfg.toy_data)
    if not tiny:
        if _missing(cfg.prior.path) and not cfg.prior.get("write_tiny", False):
            problems.append(f"prior.path={cfg.prior.path}: not a folder; download SD v1.5 "
                            "(huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir sd-v1-5)")
        for d in cfg.datasets:
            if OmegaConf.select(cfg, f"data.{d}") is not None and _missing(cfg.data[d].path):
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
    if cfg.fid.feature_extractor not in ("inception", "toy"):
        problems.append(f"fid.feature_extractor={cfg.fid.feature_extractor}: choose inception or toy")
    if cfg.text_alignment.predictor not in ("clip", "mean_colour"):
        problems.append(f"text_alignment.predictor={cfg.text_alignment.predictor}: choose clip or mean_colour")
    absent = [f"{d}/{m} ({export_dir(cfg, d, m)})" for d in cfg.datasets for m in cfg.methods
              if not export_done(export_dir(cfg, d, m))]
    if absent and not cfg.train_missing:
        problems.append("no ccp-train export for " + ", ".join(absent) + "; train them (ccp-train experiment=...) "
                        "or set train_missing=true, or point exports.<dataset>.<method> at existing exports")
    if problems:
        raise ReproduceConfigError("cannot reproduce the tables:\n  - " + "\n  - ".join(problems))


def prepare_toy_inputs(cfg: DictConfig) -> None:
    """Tiny scale: the tiny prior (with ControlNet), toy image folders and condition images, when absent."""
    if cfg.prior.get("write_tiny", False) and not Path(str(cfg.prior.path)).is_dir():
        from ccp.priors.tiny import save_tiny_prior

        tmp = Path(str(cfg.prior.path) + f".tmp{os.getpid()}")
        save_tiny_prior(tmp, seed=int(cfg.seed), with_controlnet=True)
        os.replace(tmp, str(cfg.prior.path))
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

    experiment = str(cfg.data[dataset].experiment).format(method=method, dataset=dataset)
    with initialize_config_dir(config_dir=TRAIN_CONF, version_base="1.3"):
        train_cfg = compose("train", overrides=[f"experiment={experiment}"])
    OmegaConf.update(train_cfg, "prior.path", str(cfg.prior.path))
    OmegaConf.update(train_cfg, "data.path", str(cfg.data[dataset].path))
    for key, value in (OmegaConf.to_container(cfg.train_settings, resolve=True) or {}).items():
        OmegaConf.update(train_cfg, key, value, force_add=True)
    for key, value in (OmegaConf.to_container(cfg.data[dataset].get("train_settings") or {}, resolve=True)).items():
        OmegaConf.update(train_cfg, key, value, force_add=True)
    return train_cfg


def ensure_export(cfg: DictConfig, dataset: str, method: str) -> tuple[Path, bool]:
    """(export folder, whether it was trained now)."""
    from ccp.cli.train import run_training

    path = export_dir(cfg, dataset, method)
    if export_done(path):
        return path, False
    if not cfg.train_missing:
        raise ReproduceConfigError(f"no export at {path} and train_missing=false")
    log.info("training %s on %s (no export at %s)", method, dataset, path)
    trained = run_training(train_config(cfg, dataset, method), path.parent)
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
    own = OmegaConf.select(cfg, f"guidance.per_method.{method}") or {}
    return {"concept_weight": float(own.get("concept_weight", g.concept_weight)),
            "control_weight": float(own.get("control_weight", g.control_weight))}


def _settings(cfg: DictConfig, metric: str, method: str, stamp: str) -> dict[str, Any]:
    parts = {"metric": metric, "export": stamp, "sampling": OmegaConf.to_container(cfg.sampling, resolve=True),
             "weights": _weights(cfg, method)}
    if metric in ("fid", "text_alignment", "spatial_alignment"):
        parts[metric] = OmegaConf.to_container(cfg[metric], resolve=True)
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

    def metric(self, name: str, compute) -> Any:
        settings = _settings(self.cfg, name, self.method, self.stamp)
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
    method = method_class(cell.method)(prior, cell.template, **kwargs)
    count = int(method.num_trainable_parameters())
    del method
    gc.collect()
    return count


def measure_fid(cfg: DictConfig, cell: Cell, progress: bool) -> float:
    from ccp.evaluation.fid import FIDConfig, run_fid
    from ccp.evaluation.generation import PipelineSampler

    f, s = cfg.fid, cfg.sampling
    fid_cfg = FIDConfig(
        real_path=str(cfg.data[cell.dataset].path), shard_dir=str(cell.dir / "fid_shards"), resolution=int(f.resolution),
        num_samples=int(f.num_samples), shard_size=int(f.shard_size), batch_size=int(s.batch_size), seed=int(f.seed),
        inception_weights=f.inception_weights, max_real_images=f.max_real_images,
        stats_cache_dir=str(f.stats_cache_dir) if f.stats_cache_dir else None, num_workers=int(f.num_workers),
    )
    extractor = ToyFeatureExtractor(int(f.toy_seed)) if f.feature_extractor == "toy" else None
    fid_cfg.check(need_weights=extractor is None)
    pipe, denoiser, cls = cell.loaded
    spec = cls.default_guidance(denoiser, cell.template, None, **_weights(cfg, cell.method))
    sampler = PipelineSampler(pipe, spec, num_inference_steps=int(s.steps), height=int(s.height), width=int(s.width),
                              batch_size=int(s.batch_size))
    return float(run_fid(fid_cfg, sampler, feature_extractor=extractor, device=cfg.device, rank=0, world_size=1,
                         progress=progress))


def measure_text(cfg: DictConfig, cell: Cell, progress: bool) -> float:
    from ccp.evaluation.alignment import TextAlignmentConfig, text_alignment
    from ccp.evaluation.attributes import CLIPAttributePredictor

    t, s = cfg.text_alignment, cfg.sampling
    predictor = (MeanColourPredictor() if t.predictor == "mean_colour"
                 else CLIPAttributePredictor(str(t.clip_weights), device=cfg.device))
    config = TextAlignmentConfig(
        steps=int(s.steps), height=int(s.height), width=int(s.width), batch_size=int(s.batch_size), seed=int(t.seed),
        prompts=tuple(t.prompts), images_per_prompt=int(t.images_per_prompt),
        clip_weights=str(t.clip_weights or ""), **_weights(cfg, cell.method),
    )
    pipe, denoiser, cls = cell.loaded
    result = text_alignment(pipe, denoiser, cls, cell.template, predictor=predictor, config=config,
                            out=cell.dir / "text_alignment.json", progress=progress)
    return float(result["mean"])


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
            rectification_figure(samples, results_dir / "fig8b_rectification.png", seeds=list(rect.seeds))
            write_json_atomic(results_dir / "fig8b_rectification.json", settings)
        out["fig8b"] = results_dir / "fig8b_rectification.png"
    return out


# --- the run -----------------------------------------------------------------------------------------
def reproduce(cfg: DictConfig, progress: bool = True) -> dict[str, Any]:
    """Train what is missing, evaluate, write tables and figures. Returns ``{records, tables,
    figures, trained, computed, reused, seconds}``."""
    start = time.perf_counter()
    check_inputs(cfg)
    prepare_toy_inputs(cfg)
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

    records, cells = [], {}
    inner = progress and bool(cfg.get("inner_progress", True))
    for d, m in tqdm(jobs, desc="evaluate", disable=not progress):
        cell = Cell(cfg, d, m, exports[(d, m)], prior)
        cells[(d, m)] = cell
        record: dict[str, Any] = {"method": m, "dataset": d, "export": str(cell.export)}
        record["params"] = cell.metric("params", lambda: count_params(cfg, cell, prior()))
        record["fid"] = cell.metric("fid", lambda: measure_fid(cfg, cell, inner)) if cfg.fid.enabled else None
        on_table2 = d == cfg.table2_dataset
        record["text_alignment"] = (cell.metric("text_alignment", lambda: measure_text(cfg, cell, inner))
                                    if on_table2 and cfg.text_alignment.enabled else None)
        record["spatial_alignment"] = (cell.metric("spatial_alignment", lambda: measure_spatial(cfg, cell, controlnet, inner))
                                       if on_table2 and cfg.spatial_alignment.enabled else None)
        records.append(record)
        cell.release()

    results_dir = Path(str(cfg.results_dir))
    suffix = f" — {cfg.scale} scale" if cfg.scale != "full" else ""
    tables = write_tables(records, results_dir, datasets=list(cfg.datasets), table2_dataset=str(cfg.table2_dataset),
                          title_suffix=suffix)
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
    print(f"trained: {summary['trained'] or 'nothing (all exports existed)'}; "
          f"{len(summary['computed'])} cell(s) evaluated, {len(summary['reused'])} reused; "
          f"{summary['seconds']:.1f} s; tables and figures in {results}")


if __name__ == "__main__":
    main()
