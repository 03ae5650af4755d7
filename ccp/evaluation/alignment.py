"""Text-guided and spatial-guided alignment of a personalization method (Table 2, Appendix D.3).

Both evaluations take a method as ccp-train exports it, a `TrainedModel` from
``ccp.methods.export.load_trained`` (pipeline, denoiser, method, template), and sample image ``i``
of seed ``config.seed`` (`ccp.pipelines.sampling`), so results do not depend on the batch size or
the device and every method sees the same noise.

* Text-guided: for each prompt of Table 3, `images_per_prompt` images sampled with the method's
  own `default_guidance(..., control_prompt=prompt)` (baselines: the prompt joined to the
  template, ``a photo of <ffhq> face, wearing glasses``; ours: a control term on the prior next
  to the concept term); an `AttributePredictor` says whether the attribute is present.
  Alignment = share of images where it is, per prompt; the table value is the mean over prompts.
* Spatial-guided: canny edges of `num_conditions` condition images (CelebA-HQ in the paper) are
  the control image of a ControlNet (sd-controlnet-canny); `samples_per_condition` images each;
  score = edge F1 (`ccp.evaluation.canny`) between the condition's edges and the generated
  image's edges, per image, averaged.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from ccp.evaluation.attributes import DEFAULT_CLIP_WEIGHTS, TABLE3_PROMPTS, AttributePredictor, CLIPAttributePredictor
from ccp.evaluation.canny import (
    DEFAULT_HIGH_THRESHOLD,
    DEFAULT_LOW_THRESHOLD,
    DEFAULT_TOLERANCE,
    canny_edges,
    edge_f1,
    edge_map_image,
)
from ccp.guidance import Condition, GuidanceSpec, GuidanceTerm, Source
from ccp.methods.export import TrainedModel
from ccp.pipelines.sampling import sample_images
from ccp.io import list_image_files, load_rgb8, write_json_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingConfig:
    """What every evaluation image is sampled with. Guidance weights: the paper grid-searches
    them per method and condition (step 0.25, Appendix D.2); pass the chosen ones."""

    steps: int = 100  # DPM-Solver++, Appendix D.2
    height: int = 512
    width: int = 512
    batch_size: int = 8
    seed: int = 0
    concept_weight: float = 1.0
    control_weight: float = 5.0


@dataclass(frozen=True)
class TextAlignmentConfig(SamplingConfig):
    prompts: tuple[str, ...] = TABLE3_PROMPTS
    images_per_prompt: int = 100  # Table 3
    clip_weights: str = DEFAULT_CLIP_WEIGHTS  # local CLIP ViT-L/14 file (never downloaded)


@dataclass(frozen=True)
class SpatialAlignmentConfig(SamplingConfig):
    num_conditions: int = 200  # Appendix D.3 (CelebA-HQ)
    samples_per_condition: int = 5
    selection_seed: int = 0  # which `num_conditions` images of the folder (seeded sample)
    canny_low: int = DEFAULT_LOW_THRESHOLD
    canny_high: int = DEFAULT_HIGH_THRESHOLD
    tolerance: int = DEFAULT_TOLERANCE  # pixels, edge-F1 match radius
    control_scale: float = 1.0  # ControlNet conditioning scale
    control_prompt: str = ""  # ours: prompt of the ControlNet term (baselines keep their own prompt)


# --- sampling ----------------------------------------------------------------------------------
def generate(pipe: Any, spec: GuidanceSpec, indices: Sequence[int], config: SamplingConfig) -> list[PIL.Image.Image]:
    """Images ``indices`` of seed ``config.seed`` in one pipeline call."""
    return sample_images(pipe, spec, indices, seed=config.seed, batch_size=max(1, len(indices)),
                         num_inference_steps=config.steps, height=config.height, width=config.width)


def _quiet_pipeline_bar(pipe: Any, progress: bool) -> None:
    # Our bars (prompts, images) replace the pipeline's per-step bar.
    if progress and hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "empty"


def _save(images: Sequence[PIL.Image.Image], folder: Path | None, indices: Sequence[int]) -> None:
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for image, i in zip(images, indices):
        image.save(folder / f"{int(i):05d}.png")


def _write(out: str | Path | None, result: dict) -> None:
    if out is None:
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)


def _describe(model: TrainedModel, config: SamplingConfig) -> dict:
    return {
        "method": model.method.name,
        "denoiser": model.denoiser,
        "template": model.template.prompt(with_token=model.method.trains_token),
        "config": asdict(config),
    }


# --- text-guided -------------------------------------------------------------------------------
def alignment_table(found: dict[str, torch.Tensor | Sequence[bool]]) -> dict:
    """Per prompt ``{alignment, found, total}`` and the mean of the per-prompt alignments."""
    per_prompt = {}
    for prompt, flags in found.items():
        flags = torch.as_tensor(flags, dtype=torch.bool).flatten()
        if flags.numel() == 0:
            raise ValueError(f"no images were judged for {prompt!r}")
        hits = int(flags.sum())
        per_prompt[prompt] = {"alignment": hits / flags.numel(), "found": hits, "total": int(flags.numel())}
    if not per_prompt:
        raise ValueError("no prompts to tabulate")
    mean = float(np.mean([entry["alignment"] for entry in per_prompt.values()]))
    return {"per_prompt": per_prompt, "mean": mean}


def text_alignment(
    model: TrainedModel,
    predictor: AttributePredictor | None = None,
    config: TextAlignmentConfig = TextAlignmentConfig(),
    out: str | Path | None = None,
    image_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Text-guided alignment of one method (Table 2, "Text-Guided Align.").

    `predictor`: defaults to CLIP ViT-L/14 zero-shot from ``config.clip_weights`` (a missing file
    fails here, before any sampling). Returns ``{per_prompt: {prompt: {alignment, found, total}},
    mean, num_images, method, ...}``; written to `out` as JSON (atomically) when given, and the
    images under ``image_dir/<prompt>/`` when given.
    """
    if config.images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be >= 1, got {config.images_per_prompt}")
    if predictor is None:
        predictor = CLIPAttributePredictor(config.clip_weights)
    predictor.check(config.prompts)
    # how a method is sampled for a text-guided prompt: its own default guidance
    specs = {prompt: model.guidance(prompt, config.concept_weight, config.control_weight) for prompt in config.prompts}
    pipe = model.pipe
    _quiet_pipeline_bar(pipe, progress)

    found: dict[str, torch.Tensor] = {}
    n = config.images_per_prompt
    for prompt in tqdm(config.prompts, desc=f"{model.name}: prompts", disable=not progress):
        flags = []
        folder = Path(image_dir) / _slug(prompt) if image_dir is not None else None
        with tqdm(total=n, desc=prompt, leave=False, disable=not progress) as bar:
            for start in range(0, n, config.batch_size):
                indices = range(start, min(start + config.batch_size, n))
                images = generate(pipe, specs[prompt], indices, config)
                _save(images, folder, indices)
                flags.append(torch.as_tensor(predictor.predict(images, prompt), dtype=torch.bool).cpu().flatten())
                bar.update(len(indices))
        found[prompt] = torch.cat(flags)
        log.info("%s %r: alignment %.3f", model.name, prompt, float(found[prompt].float().mean()))

    result = {
        "kind": "text",
        **_describe(model, config),
        "predictor": type(predictor).__name__,
        **alignment_table(found),
        "num_images": n * len(config.prompts),
    }
    _write(out, result)
    return result


# --- spatial-guided ----------------------------------------------------------------------------
@dataclass(frozen=True)
class EdgeCondition:
    """A condition image resized to the sampling size and its canny map."""

    name: str  # path relative to the condition folder
    image: PIL.Image.Image
    edges: np.ndarray  # [H, W] uint8, 0 or 255
    control_image: PIL.Image.Image  # the 3-channel map the ControlNet takes


def fit(image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
    """Centre-crop to the target aspect ratio, then resize (bicubic) to ``width x height``."""
    scale = min(image.width / width, image.height / height)
    crop_w, crop_h = round(width * scale), round(height * scale)
    left, top = (image.width - crop_w) // 2, (image.height - crop_h) // 2
    image = image.crop((left, top, left + crop_w, top + crop_h))
    if image.size != (width, height):
        image = image.resize((width, height), PIL.Image.Resampling.BICUBIC)
    return image


def select_conditions(folder: str | Path, count: int, seed: int = 0) -> list[Path]:
    """`count` images of `folder` (recursive): all when it holds exactly `count`, else a seeded
    random sample, returned in file order."""
    files = list_image_files(folder)
    if count < 1:
        raise ValueError(f"num_conditions must be >= 1, got {count}")
    if len(files) < count:
        raise ValueError(f"{folder} holds {len(files)} images, fewer than the {count} conditions asked for")
    if len(files) == count:
        return files
    chosen = set(random.Random(seed).sample(range(len(files)), count))
    return [f for i, f in enumerate(files) if i in chosen]


def load_conditions(folder: str | Path, config: SpatialAlignmentConfig) -> list[EdgeCondition]:
    root = Path(folder).expanduser()
    conditions = []
    for path in select_conditions(root, config.num_conditions, config.selection_seed):
        image = fit(load_rgb8(path), config.width, config.height)
        edges = canny_edges(image, config.canny_low, config.canny_high)
        conditions.append(EdgeCondition(path.relative_to(root).as_posix(), image, edges, edge_map_image(edges)))
    return conditions


def attach_controlnet(pipe: Any, denoiser: str, controlnet: torch.nn.Module) -> str:
    """Register the ControlNet for a method's sampling and return the new denoiser's name.

    A text-conditioned method denoiser (baselines) gets the ControlNet on its own UNet, as
    diffusers' ControlNet pipeline runs a fine-tuned UNet; the null-text concept model (ours)
    takes no condition, so the ControlNet goes on the prior UNet, for a separate control term.
    """
    base = pipe.denoisers[denoiser]
    if base.kind == "unet":
        unet, name = base.unet, f"{denoiser}+controlnet"
    elif base.kind == "concept":
        unet, name = pipe.unet, "prior+controlnet"
    else:
        raise ValueError(f"denoiser {denoiser!r} is of kind {base.kind!r}; expected a text UNet or a concept model")
    existing = pipe.denoisers.get(name)
    if existing is None:
        pipe.add_denoiser(name, unet, controlnet=controlnet.to(device=unet.device, dtype=unet.dtype).eval())
    elif existing.controlnet is not controlnet:
        raise ValueError(f"the pipeline already has another ControlNet as {name!r}; load the model afresh")
    return name


def spatial_guidance(model: TrainedModel, control_denoiser: str, control_image: Any, takes_prompt: bool,
                     config: SpatialAlignmentConfig) -> GuidanceSpec:
    """The method's `default_guidance` (no control prompt) with the canny ControlNet added.

    `takes_prompt` (baselines): every source on the method's denoiser moves to its ControlNet
    version with the same prompt, i.e. unconditional and CFG term both see the edges, exactly
    as diffusers' StableDiffusionControlNetPipeline. Otherwise (ours): a ``spatial`` term,
    prior + ControlNet on ``config.control_prompt``, weight ``config.control_weight``, next to
    the concept term (control guidance, Fig. 4b).
    """
    spec = model.guidance(None, config.concept_weight, config.control_weight)
    denoiser = model.denoiser

    def controlled(prompt: str | None) -> Source:
        return Source(control_denoiser, Condition(prompt=prompt or "", control_image=control_image,
                                                  control_scale=config.control_scale))

    if takes_prompt:
        def move(source: Source) -> Source:
            return controlled(source.condition.prompt) if source.denoiser == denoiser else source

        terms = tuple(replace(t, source=move(t.source)) for t in spec.terms)
        return replace(spec, terms=terms, unconditional=move(spec.unconditional))
    term = GuidanceTerm("spatial", controlled(config.control_prompt), config.control_weight)
    return replace(spec, terms=spec.terms + (term,))


def spatial_alignment(
    model: TrainedModel,
    condition_dir: str | Path,
    controlnet: torch.nn.Module | None = None,
    config: SpatialAlignmentConfig = SpatialAlignmentConfig(),
    out: str | Path | None = None,
    image_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Spatial-guided alignment of one method (Table 2, "Spatial-Guided Align."): mean edge F1.

    `controlnet`: a canny ControlNet (e.g. ``ccp.priors.load_controlnet("sd-controlnet-canny")``),
    defaults to the pipeline's own. Condition ``j``'s sample ``s`` is image ``j *
    samples_per_condition + s`` (seed ``seed + j * samples_per_condition + s``). Returns
    ``{mean_f1, mean_precision, mean_recall, count, per_condition: [{condition, f1, precision,
    recall}], method, ...}``; written to `out` as JSON (atomically) when given, images and the
    condition edge maps under ``image_dir/<condition>/`` when given.
    """
    pipe, denoiser = model.pipe, model.denoiser
    controlnet = controlnet if controlnet is not None else getattr(pipe, "controlnet", None)
    if controlnet is None:
        raise ValueError("spatial alignment needs a canny ControlNet: pass controlnet=load_controlnet(path)")
    if config.samples_per_condition < 1:
        raise ValueError(f"samples_per_condition must be >= 1, got {config.samples_per_condition}")
    conditions = load_conditions(condition_dir, config)  # all files read before any sampling
    takes_prompt = pipe.denoisers[denoiser].takes_prompt
    control_denoiser = attach_controlnet(pipe, denoiser, controlnet)
    _quiet_pipeline_bar(pipe, progress)

    per_condition, scores = [], []
    k = config.samples_per_condition
    bar = tqdm(total=len(conditions) * k, desc=f"{model.name}: spatial", unit="img", disable=not progress)
    for j, condition in enumerate(conditions):
        spec = spatial_guidance(model, control_denoiser, condition.control_image, takes_prompt, config)
        folder = Path(image_dir) / _slug(condition.name) if image_dir is not None else None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            condition.control_image.save(folder / "condition_canny.png")
        entry_scores = []
        for start in range(0, k, config.batch_size):
            indices = range(j * k + start, j * k + min(start + config.batch_size, k))
            images = generate(pipe, spec, indices, config)
            _save(images, folder, indices)
            for image in images:
                generated = canny_edges(image, config.canny_low, config.canny_high)
                entry_scores.append(edge_f1(condition.edges, generated, config.tolerance))
            bar.update(len(indices))
        scores += entry_scores
        per_condition.append({
            "condition": condition.name,
            **{key: [getattr(s, key) for s in entry_scores] for key in ("f1", "precision", "recall")},
        })
    bar.close()

    result = {
        "kind": "spatial",
        **_describe(model, config),
        "condition_dir": str(condition_dir),
        "mean_f1": float(np.mean([s.f1 for s in scores])),
        "mean_precision": float(np.mean([s.precision for s in scores])),
        "mean_recall": float(np.mean([s.recall for s in scores])),
        "count": len(scores),
        "per_condition": per_condition,
    }
    _write(out, result)
    return result
