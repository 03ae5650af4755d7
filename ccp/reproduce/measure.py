"""Each table column of one cell, measured through the shared metric adapters
(`ccp.evaluation.metrics`) with the scale's instruments: Inception or stand-in FID features,
CLIP or stand-in attribute predictors, the toy digit classifier for drift."""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ccp.evaluation.alignment import SamplingConfig, SpatialAlignmentConfig, TextAlignmentConfig
from ccp.evaluation.fid import FIDConfig, RandomConvFeatures, kernel_inception_distance
from ccp.evaluation.generation import ShardDirMismatchError
from ccp.evaluation.metrics import fid_metric, spatial_metric, text_metric
from ccp.io import folder_stamp, write_json_atomic
from ccp.reproduce.config import fid_real_path, search_grid
from ccp.reproduce.exports import train_config
from ccp.reproduce.records import Cell, weights_for
from ccp.reproduce.tiny import MeanColourPredictor


def count_params(cfg: DictConfig, cell: Cell, prior) -> int:
    """Trainable parameters of the method as ccp-train builds it (its ``method.module``, the prior)."""
    train_cfg = train_config(cfg, cell.dataset, cell.method)
    method = instantiate(train_cfg.method.module, _convert_="all")(prior, cell.template)
    count = int(method.num_trainable_parameters())
    del method
    gc.collect()
    return count


def sampling_config(cfg: DictConfig, weights: dict[str, float], seed: int = 0) -> SamplingConfig:
    s = cfg.sampling
    return SamplingConfig(steps=int(s.steps), height=int(s.height), width=int(s.width), batch_size=int(s.batch_size),
                          seed=int(seed), **weights)


def fid_extractor(cfg: DictConfig, classifier):
    f = cfg.fid
    return (RandomConvFeatures(int(f.toy_seed)) if f.feature_extractor == "toy"
            else classifier().feature_extractor() if f.feature_extractor == "digit" else None)


def measure_fid(cfg: DictConfig, cell: Cell, progress: bool, classifier=None, weights: dict[str, float] | None = None,
                shard_dir: Path | None = None, seed: int | None = None) -> float:
    f = cfg.fid
    fid_cfg = FIDConfig(
        real_path=fid_real_path(cfg, cell.dataset), shard_dir=str(shard_dir or cell.dir / "fid_shards"),
        resolution=int(f.resolution), num_samples=int(f.num_samples), shard_size=int(f.shard_size),
        batch_size=int(cfg.sampling.batch_size), seed=int(f.seed if seed is None else seed),
        inception_weights=f.inception_weights,
        max_real_images=f.max_real_images, stats_cache_dir=str(f.stats_cache_dir) if f.stats_cache_dir else None,
        num_workers=int(f.num_workers),
    )
    extractor = fid_extractor(cfg, classifier)
    fid_cfg.check(need_weights=extractor is None)
    sampling = sampling_config(cfg, weights or weights_for(cfg, cell.method))

    def measure() -> float:
        return fid_metric(cell.model, sampling, fid_cfg, feature_extractor=extractor, device=cfg.device,
                          progress=progress)[0]

    try:
        return measure()
    except ShardDirMismatchError:
        # The cell's shards are samples of other weights or settings (its record changed, so this
        # metric is being recomputed): they are this run's own cache, so start that folder over.
        shutil.rmtree(fid_cfg.shard_dir)
        return measure()


def search_fid(cfg: DictConfig, cell: Cell, fid_at_configured: float | None, progress: bool, classifier) -> dict:
    """FID at each value of the row's searched guidance weight (the others as configured), and the
    best: the paper compares each method at its own best weights. The configured value reuses the
    table's FID; every other value samples into its own shard folder and record entry."""
    name, values = search_grid(cfg, cell.method)
    base = weights_for(cfg, cell.method)
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


def kid_subset_size(cfg: DictConfig) -> int:
    """``kid.subset_size``, at most the sample count (torchmetrics' default 1,000 exceeds the toy's 359;
    the real side bounds it too, in `measure_kid`)."""
    return min(int(cfg.kid.subset_size), int(cfg.fid.num_samples))


def measure_kid(cfg: DictConfig, cell: Cell, progress: bool, classifier) -> dict[str, float]:
    """KID (mean and std over subsets, `ccp.evaluation.fid.kernel_inception_distance`) of the cell's
    FID samples against the real folder's features: the same samples and features as its FID. The
    FID shards are reused (measured again only when they are gone)."""
    from ccp.evaluation.fid import fake_features, inception_feature_extractor, real_features
    from ccp.evaluation.generation import MissingShardsError

    f, k = cfg.fid, cfg.kid
    extractor = fid_extractor(cfg, classifier)
    if extractor is None:
        extractor = inception_feature_extractor(f.inception_weights, cfg.device)
    shard_dir = cell.dir / "fid_shards"
    try:
        fake = fake_features(shard_dir, int(f.num_samples))
    except (FileNotFoundError, MissingShardsError):
        measure_fid(cfg, cell, progress, classifier)
        fake = fake_features(shard_dir, int(f.num_samples))
    real = real_features(fid_real_path(cfg, cell.dataset), extractor, resolution=int(f.resolution),
                         max_images=f.max_real_images, cache_dir=str(f.stats_cache_dir) if f.stats_cache_dir else None,
                         num_workers=int(f.num_workers), progress=progress)
    size = min(kid_subset_size(cfg), int(real.shape[0]))
    mean, std = kernel_inception_distance(real, fake, subsets=int(k.subsets), subset_size=size,
                                          degree=int(k.get("degree", 3)), seed=int(k.get("seed", 0)))
    return {"kid": mean, "kid_std": std, "subset_size": size, "subsets": int(k.subsets),
            "num_real": int(real.shape[0]), "num_fake": int(fake.shape[0])}


def sampling_spread(cfg: DictConfig, cell: Cell, fid_at_base: float, progress: bool, classifier) -> dict:
    """FID of one trained model (this cell's) at several sampling seeds: sample seed j draws
    images ``fid.seed + j * seed_stride + i`` into its own shard folder; j = 0 is the table's FID.
    The spread of these FIDs is the evaluation's own, next to the spread over training seeds."""
    stride = int(cfg.get("seed_stride", 1_000_000))
    fids = []
    for j in cfg.sample_spread.sampling_seeds:
        seed = int(cfg.fid.seed) + int(j) * stride
        if seed == int(cfg.fid.seed):
            fids.append(fid_at_base)
            continue
        fids.append(cell.metric(f"fid_sampling/seed={seed}", lambda: measure_fid(
            cfg, cell, progress, classifier, shard_dir=cell.dir / f"fid_shards_seed{seed}", seed=seed)))
    return {"sampling_seeds": [int(j) for j in cfg.sample_spread.sampling_seeds], "fid": fids,
            "num_samples": int(cfg.fid.num_samples)}


def measure_text(cfg: DictConfig, cell: Cell, progress: bool, classifier=None) -> float:
    """Mean text-guided alignment; with the toy predictor the colour-only and class-only means go
    into ``text_alignment.json`` as ``parts`` too."""
    from ccp.evaluation.attributes import CLIPAttributePredictor

    t = cfg.text_alignment
    if t.predictor == "toy":
        from ccp.toy.instruments import PromptAttributePredictor, ToyAttributePredictor

        predictor = PromptAttributePredictor(ToyAttributePredictor(classifier()),
                                             OmegaConf.to_container(t.attributes, resolve=True))
    elif t.predictor == "mean_colour":
        predictor = MeanColourPredictor()
    else:
        predictor = CLIPAttributePredictor(str(t.clip_weights), device=cfg.device)
    sampling = sampling_config(cfg, weights_for(cfg, cell.method), seed=int(t.seed))
    config = TextAlignmentConfig(**sampling.__dict__, prompts=tuple(t.prompts), images_per_prompt=int(t.images_per_prompt),
                                 clip_weights=str(t.clip_weights or ""))
    out = cell.dir / "text_alignment.json"
    value, result = text_metric(cell.model, config, predictor, out=out, progress=progress)
    if hasattr(predictor, "part_alignment"):
        result["parts"] = predictor.part_alignment()
    if getattr(predictor, "stand_in_weights", False):  # CLIP from a stand-in file: the number means nothing
        result["stand_in_weights"] = True
    if "parts" in result or "stand_in_weights" in result:
        write_json_atomic(out, result)
    return value


def text_parts(cell: Cell) -> dict[str, float]:
    """The colour-only / class-only means `measure_text` stored beside the main number."""
    return json.loads((cell.dir / "text_alignment.json").read_text()).get("parts", {})


def measure_spatial(cfg: DictConfig, cell: Cell, controlnet, progress: bool,
                    weights: dict[str, float] | None = None, name: str = "spatial_alignment") -> float:
    """Mean edge F1 of the cell's model through the scale's canny ControlNet; `weights` default to
    the row's own (ours' prior reference: concept weight 0, `prior_spatial_weights`)."""
    a = cfg.spatial_alignment
    sampling = sampling_config(cfg, weights or weights_for(cfg, cell.method), seed=int(a.seed))
    config = SpatialAlignmentConfig(**sampling.__dict__, num_conditions=int(a.num_conditions),
                                    samples_per_condition=int(a.samples_per_condition))
    return spatial_metric(cell.model, config, str(a.condition_dir), controlnet(),
                          out=cell.dir / f"{name}.json", progress=progress)[0]


def prior_spatial_weights(cfg: DictConfig, cell: Cell) -> dict[str, float]:
    """Ours' spatial guidance without its concept term: the prior and its ControlNet term alone, the
    reference ours' spatial alignment is compared with (a weight-0 term is not evaluated)."""
    return {**weights_for(cfg, cell.method), "concept_weight": 0.0}


def drift_config(cfg: DictConfig):
    from ccp.evaluation.drift import DriftConfig

    d, s = cfg.drift, cfg.sampling
    return DriftConfig(num_samples=int(d.num_samples), steps=int(s.steps), height=int(s.height), width=int(s.width),
                       batch_size=int(s.batch_size), seed=int(d.seed))


def prior_unconditional_samples(cfg: DictConfig, prior, classifier, progress: bool):
    """The prior's own unconditional samples, judged; drawn once per (prior, drift settings,
    classifier) and kept in ``<eval_dir>/prior_unconditional.safetensors``."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ccp.evaluation.drift import UnconditionalSamples, prior_unconditional, sample_unconditional
    from ccp.io import write_atomic
    from ccp.pipelines.gcfg import GCFGPipeline
    from ccp.toy.instruments import digit_judge

    config = drift_config(cfg)
    judge = digit_judge(classifier())  # first: the key below reads the classifier's file
    key = hashlib.sha256(json.dumps({
        "prior": folder_stamp(Path(str(cfg.prior.path))), "drift": OmegaConf.to_container(cfg.drift, resolve=True),
        "sampling": OmegaConf.to_container(cfg.sampling, resolve=True),
        "classifier": hashlib.sha256(Path(str(cfg.classifier.path)).read_bytes()).hexdigest()[:16],
    }, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(str(cfg.eval_dir)) / "prior_unconditional.safetensors"
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            same = (f.metadata() or {}).get("key") == key
        if same:
            tensors = load_file(str(path))
            return UnconditionalSamples(tensors["features"], tensors["styles"])
    pipe = GCFGPipeline.from_prior(prior())
    pipe.set_progress_bar_config(disable=True)
    samples = sample_unconditional(pipe, prior_unconditional(), judge, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: save_file(samples.to_dict(), tmp, metadata={"key": key}))
    return samples


def measure_drift(cfg: DictConfig, cell: Cell, reference, classifier) -> dict[str, float]:
    """Drift of the cell's unconditional source from the prior's (`ccp.evaluation.drift`)."""
    from ccp.evaluation.drift import drift, sample_unconditional
    from ccp.toy.instruments import digit_judge, style_index

    model = cell.model
    own = sample_unconditional(model.pipe, model.unconditional(), digit_judge(classifier()), drift_config(cfg))
    return drift(own, reference(), style_index(str(cfg.data[cell.dataset].digits.style)))


def write_vae_round_trip(cfg: DictConfig, prior, classifier, results_dir: Path) -> dict[str, Path]:
    """``vae_round_trip.{json,md}``: the prior's VAE round trip against the held-out floor, per style
    (`ccp.toy.instruments.vae_round_trip`), with the digit classifier's features as FID's."""
    from ccp.io import write_text_atomic
    from ccp.toy.instruments import vae_round_trip, vae_round_trip_markdown

    result = vae_round_trip(prior.vae, classifier, int(cfg.vae_round_trip.seed), int(cfg.resolution))
    write_json_atomic(results_dir / "vae_round_trip.json", {"prior": str(cfg.prior.path), "styles": result})
    return {"vae_round_trip.json": results_dir / "vae_round_trip.json",
            "vae_round_trip.md": write_text_atomic(results_dir / "vae_round_trip.md", vae_round_trip_markdown(result))}


def write_controlnet_check(cfg: DictConfig, results_dir: Path) -> dict[str, Path]:
    """``toy_controlnet_check.{json,md}``: the toy ControlNet's own quality check (stored with it by
    `ccp.toy.controlnet`), beside the tables its spatial column fills."""
    from ccp.io import write_text_atomic
    from ccp.toy.controlnet import read_info

    info = read_info(str(cfg.controlnet))
    q = info["quality"]
    write_json_atomic(results_dir / "toy_controlnet_check.json", {
        "controlnet": str(cfg.controlnet), "key": info["key"], "settings": info["settings"], "prior": info["prior"],
        "seconds": info["seconds"], "quality": q})
    rows = [f"| {name} | {q[side]['f1']:.3f} | {q['f1_tolerance_1'][side]:.3f} | {q[side]['precision']:.3f} | "
            f"{q[side]['recall']:.3f} |" for name, side in (("prior alone", "prior"), ("prior + ControlNet", "controlnet"))]
    text = "\n".join([
        "### The toy ControlNet's own check", "",
        f"| Sampled by | edge F1 within {q['tolerance']} px ↑ | within 1 px ↑ | precision | recall |",
        "| --- | --- | --- | --- | --- |", *rows, "",
        f"{len(q['sources'])} held-out plain digits x {q['samples_per_map']} seeds, {q['sampler']} {q['steps']} steps, "
        f"CFG {q['cfg_weight']:g} on each digit's caption; with the ControlNet both CFG halves see the digit's "
        f"edge map. Trained {info['settings']['steps']} steps in {info['seconds']['train_s']:.0f} s "
        f"(ccp-train experiment=toy_controlnet); the ControlNet: {cfg.controlnet}.", ""])
    return {"toy_controlnet_check.json": results_dir / "toy_controlnet_check.json",
            "toy_controlnet_check.md": write_text_atomic(results_dir / "toy_controlnet_check.md", text)}
