"""The toy ControlNet: a canny ControlNet for the toy prior (`ccp.toy.prior`), trained by ccp's own
loop (``experiment=toy_controlnet``, method ``controlnet``) on the prior's stage-1 data.

    python -m ccp.toy.controlnet outputs/toy/prior     # -> outputs/toy/prior-controlnet (train, or reuse)

Stages, each kept when finished so an interrupted run continues where it stopped:
1. data: `write_prior_dataset` with the prior's own data seed and resolution (the train split, as the
   prior's stage 1; the held-out split is never trained on), ``captions.jsonl``;
2. ccp-train ``experiment=toy_controlnet`` (``data.condition=canny``: each item's Canny edges),
   resumable from its last checkpoint;
3. the quality check (`check_quality`): on held-out plain digits, the mean edge F1 (tolerance 2 px,
   ``ccp.evaluation.canny``) of samples of the prior alone (CFG on the digit's caption) and of the
   prior + ControlNet (the same CFG through the ControlNet with the digit's edge map), against that map;
4. the export (a diffusers ControlNet folder) published to `out_dir` with ``ccp_toy_controlnet.json``
   (settings, the prior's key, timings, the quality check) and the check's samples under ``check/``.

Default `out_dir`: ``<prior_dir>-controlnet``, beside the prior and never inside it (the prior folder
is fingerprinted by the runs trained on it); named after the prior, so the per-seed toy priors of
``prior_seeds=true`` (``<prior.path>-seed<s>``) each get their own. A finished `out_dir` is reused when its settings,
training recipe and prior (the key and the marker of the prior's ``ccp_toy_prior.json``: a prior
retrained at the same path is another prior) all match; anything else trains in its own work folder
``<out_dir>.work/<key>``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ccp.config import compose
from ccp.evaluation.canny import DEFAULT_TOLERANCE, canny_edges, edge_f1, edge_map_image
from ccp.io import dir_complete, write_dir_atomic
from ccp.methods.controlnet import ControlNetTraining
from ccp.toy.digits import render_set, write_prior_dataset
from ccp.toy.prior import DONE as PRIOR_DONE
from ccp.toy.prior import parse_settings, refuse_unknown, set_threads
from ccp.training.run import run_training
from ccp.training.runs import config_text

log = logging.getLogger(__name__)
DONE = "ccp_toy_controlnet.json"
CHECK_DIR = "check"  # in the published folder: conditions/, prior/, controlnet/ PNGs of the quality check


@dataclass(frozen=True)
class ToyControlNetSettings:
    copies: int = 1              # colourings per training digit (1,438 images)
    steps: int = 300             # ControlNet optimizer steps
    batch_size: int = 32
    lr: float = 1e-3             # toy prior, held-out F1: 300 steps at 1e-3 0.960, 200 at 1e-3 0.929, 150 at 2e-3 0.895
    # as the ControlNet paper (half the prompts empty): its CFG runs the empty prompt through the ControlNet too.
    # On an earlier toy prior (300 steps) 0.0 gave held-out edge F1 0.879 and coloured-noise artefacts, 0.5 gave 0.947.
    caption_dropout: float = 0.5
    # quality check: `check_maps` held-out edge maps x `check_samples` fixed seeds, each with and without the ControlNet
    check_maps: int = 16
    check_samples: int = 5
    check_steps: int = 25        # as the toy reproduction samples (scale=toy: sampling.steps, DPM-Solver++)
    check_weight: float = 5.0    # CFG weight of both: the reproduction's guidance.control_weight default
    check_seed: int = 0

    @classmethod
    def from_kwargs(cls, **kwargs) -> "ToyControlNetSettings":
        refuse_unknown(cls, kwargs, "toy ControlNet")
        return cls(**kwargs)


def prior_identity(prior_dir: str | Path) -> dict:
    """The toy prior's key and settings from its ``ccp_toy_prior.json``, and that file's hash (which
    changes when the prior is retrained, even with the same key: its timings differ)."""
    marker = Path(prior_dir) / PRIOR_DONE
    if not dir_complete(prior_dir) or not marker.is_file():
        raise FileNotFoundError(f"{prior_dir}: not a finished toy prior (no {PRIOR_DONE}); build it with "
                                "ccp.toy.prior.ensure_toy_prior (python -m ccp.toy.prior)")
    text = marker.read_bytes()
    info = json.loads(text)
    return {"key": info["key"], "marker_sha256": hashlib.sha256(text).hexdigest(), "settings": info["settings"]}


def train_config(prior_dir: Path, settings: ToyControlNetSettings, work: Path, seed: int, resolution: int,
                 overrides: list[str] = ()):
    """The ccp-train config of stage 2 (``experiment=toy_controlnet``)."""
    return compose("train", overrides=[
        "experiment=toy_controlnet",
        f"prior.path={prior_dir}",
        f"data.path={work / 'data'}",
        f"data.resolution={resolution}",
        f"data.batch_size={settings.batch_size}",
        f"data.cache_dir={work / 'cache'}",
        f"trainer.global_batch_size={settings.batch_size}",
        f"trainer.max_steps={settings.steps}",
        f"optim.lr={settings.lr}",
        f"method.module.caption_dropout={settings.caption_dropout}",
        f"seed={seed}",
        *overrides,
    ])


def controlnet_key(settings: ToyControlNetSettings, seed: int, prior: dict, overrides: list[str] = ()) -> str:
    """Names a trained toy ControlNet: settings, seed, the training config (work and prior folders
    left out: the prior is named by its identity) and the prior's identity."""
    recipe = config_text(train_config(Path("PRIOR"), settings, Path("WORK"), seed, prior["settings"]["resolution"],
                                      list(overrides)), Path("WORK") / "train")
    text = json.dumps({**asdict(settings), "seed": seed, "recipe": recipe, "prior_key": prior["key"],
                       "prior_marker": prior["marker_sha256"]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_dir(prior_dir: str | Path) -> Path:
    """``<prior_dir>-controlnet``: beside the prior folder, named after it."""
    prior_dir = Path(prior_dir)
    return prior_dir.with_name(prior_dir.name + "-controlnet")


def finished(out_dir: str | Path, key: str | None = None) -> bool:
    """Whether `out_dir` holds a published toy ControlNet (of `key`, when given)."""
    if not dir_complete(out_dir):
        return False
    return key is None or json.loads((Path(out_dir) / DONE).read_text()).get("key") == key


def check_conditions(data_seed: int, resolution: int, count: int) -> list[dict]:
    """`count` held-out plain digits spread evenly over the split (never trained on by the prior or
    the ControlNet): each one's image, caption, Canny edge map and source index."""
    toy = render_set("held_out", "plain", data_seed, resolution)
    if not 1 <= count <= len(toy):
        raise ValueError(f"check_maps={count}: must be in [1, {len(toy)}] (the held-out split's size)")
    captions = toy.captions()
    picks = np.linspace(0, len(toy) - 1, count).round().astype(int)
    return [{"image": toy.images[i], "caption": captions[i], "edges": canny_edges(toy.images[i]),
             "source": int(toy.sources[i])} for i in picks.tolist()]


def write_conditions(out_dir: str | Path, data_seed: int, resolution: int, count: int) -> list[str]:
    """The condition folder of the toy Table 2's spatial column: `count` held-out plain digits
    (`check_conditions`: never trained on by the prior, its VAE or the ControlNet) as PNGs, with
    ``captions.jsonl`` ({"file", "caption", "source"}). The metric takes their Canny edges."""
    import PIL.Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, c in enumerate(check_conditions(data_seed, resolution, count)):
        name = f"{i:03d}.png"
        PIL.Image.fromarray(c["image"]).save(out_dir / name)
        rows.append({"file": name, "caption": c["caption"], "source": c["source"]})
    (out_dir / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [r["file"] for r in rows]


def edge_scores(conditions: list[np.ndarray], samples: list[list], tolerance: int = DEFAULT_TOLERANCE) -> dict:
    """Mean edge precision, recall and F1 (`edge_f1`) of every sample's Canny edges against its
    condition's edge map; ``samples[i]`` are the images sampled for ``conditions[i]``."""
    scores = [edge_f1(c, canny_edges(image), tolerance) for c, images in zip(conditions, samples, strict=True)
              for image in images]
    return {"f1": float(np.mean([s.f1 for s in scores])), "precision": float(np.mean([s.precision for s in scores])),
            "recall": float(np.mean([s.recall for s in scores])), "images": len(scores)}


def check_quality(prior_dir: str | Path, export_dir: str | Path, out_dir: str | Path, settings: ToyControlNetSettings,
                  data_seed: int, resolution: int, progress: bool = True) -> dict:
    """Samples `settings.check_samples` images per held-out edge map with the prior alone (CFG on the
    caption) and with the prior + ControlNet (`ControlNetTraining.default_guidance`: the same CFG
    weight, both halves through the ControlNet with the edge map), same seeds and sampler (DPM-Solver++,
    `check_steps`); writes them under `out_dir` and returns the edge scores of each against the map."""
    from tqdm.auto import tqdm

    from ccp.guidance import GuidanceSpec
    from ccp.methods.base import PromptTemplate
    from ccp.pipelines.gcfg import GCFGPipeline
    from ccp.pipelines.sampling import sample_images
    from ccp.priors.loading import load_prior

    s, out_dir = settings, Path(out_dir)
    prior = load_prior(str(prior_dir))
    prior_pipe = GCFGPipeline.from_prior(prior)  # DPM-Solver++, as the reproduction samples
    control_pipe, denoiser = ControlNetTraining.load_export(prior, export_dir)
    for pipe in (prior_pipe, control_pipe):
        pipe.set_progress_bar_config(disable=True)
    conditions = check_conditions(data_seed, resolution, s.check_maps)
    samples = {"prior": [], "controlnet": []}
    for folder in ("conditions", *samples):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    kw = dict(seed=s.check_seed, num_inference_steps=s.check_steps, height=resolution, width=resolution,
              batch_size=s.check_samples)
    for m, c in enumerate(tqdm(conditions, desc="toy ControlNet check", disable=not progress)):
        control = edge_map_image(c["edges"])
        control.save(out_dir / "conditions" / f"{m:02d}.png")
        specs = {"prior": (prior_pipe, GuidanceSpec.cfg(c["caption"], s.check_weight)),
                 "controlnet": (control_pipe, ControlNetTraining.default_guidance(
                     denoiser, PromptTemplate(), c["caption"], control_weight=s.check_weight, control_image=control))}
        for name, (pipe, spec) in specs.items():
            images = sample_images(pipe, spec, range(s.check_samples), **kw)
            for k, image in enumerate(images):
                image.save(out_dir / name / f"{m:02d}_{k}.png")
            samples[name].append(images)
    edges = [c["edges"] for c in conditions]
    return {
        "split": "held_out", "data_seed": data_seed, "sources": [c["source"] for c in conditions],
        "captions": [c["caption"] for c in conditions], "samples_per_map": s.check_samples, "seed": s.check_seed,
        "sampler": "dpmsolver++", "steps": s.check_steps, "cfg_weight": s.check_weight, "tolerance": DEFAULT_TOLERANCE,
        **{name: edge_scores(edges, images) for name, images in samples.items()},
        # at 32 px a 2 px tolerance is loose (a caption alone already draws the digit's outline close
        # enough), so the F1 within 1 px is kept too
        "f1_tolerance_1": {name: edge_scores(edges, images, 1)["f1"] for name, images in samples.items()},
    }


def ensure_toy_controlnet(prior_dir: str | Path, out_dir: str | Path | None = None, seed: int = 0, progress: bool = True,
                          train_overrides: list[str] = (), **settings) -> Path:
    """The toy ControlNet folder for the toy prior at `prior_dir` (a diffusers ControlNet folder,
    ``ccp-sample controlnet.path=``), at `out_dir` (default `default_dir`): reused
    when finished with the same settings and prior, else trained (resuming any finished stage)."""
    prior_dir = Path(prior_dir)
    out_dir = Path(out_dir) if out_dir is not None else default_dir(prior_dir)
    if out_dir.resolve() == prior_dir.resolve() or prior_dir.resolve() in out_dir.resolve().parents:
        raise ValueError(f"out_dir={out_dir}: must not be inside the prior folder {prior_dir}")
    s = ToyControlNetSettings.from_kwargs(**settings)
    prior = prior_identity(prior_dir)
    key = controlnet_key(s, seed, prior, train_overrides)
    if finished(out_dir, key):
        return out_dir
    data_seed, resolution = int(prior["settings"]["data_seed"]), int(prior["settings"]["resolution"])
    work = out_dir.with_name(out_dir.name + ".work") / key
    work.mkdir(parents=True, exist_ok=True)
    times = {}

    start = time.perf_counter()
    if not dir_complete(work / "data"):
        write_dir_atomic(work / "data", lambda tmp: write_prior_dataset(tmp, "train", data_seed, resolution, s.copies))
    times["data_s"] = time.perf_counter() - start

    start = time.perf_counter()
    export = run_training(train_config(prior_dir, s, work, seed, resolution, list(train_overrides)), run_dir=work / "train")
    times["train_s"] = time.perf_counter() - start

    start = time.perf_counter()
    check_dir = work / CHECK_DIR
    shutil.rmtree(check_dir, ignore_errors=True)  # an interrupted check starts again
    quality = check_quality(prior_dir, export, check_dir, s, data_seed, resolution, progress)
    times["check_s"] = time.perf_counter() - start

    def publish(tmp: Path) -> None:
        shutil.copytree(export, tmp)
        shutil.copytree(check_dir, tmp / CHECK_DIR)
        info = {"key": key, "seed": seed, "settings": asdict(s), "train_overrides": list(train_overrides),
                "prior": {"path": str(prior_dir), "key": prior["key"], "marker_sha256": prior["marker_sha256"]},
                "data": {"split": "train", "style": "plain", "data_seed": data_seed, "resolution": resolution,
                         "copies": s.copies},
                "seconds": {k: round(v, 1) for k, v in times.items()}, "quality": quality, "work_dir": str(work)}
        (tmp / DONE).write_text(json.dumps(info, indent=2) + "\n")

    write_dir_atomic(out_dir, publish)
    log.info("toy ControlNet ready at %s (%s); edge F1 prior alone %.3f, with the ControlNet %.3f", out_dir,
             {k: round(v) for k, v in times.items()}, quality["prior"]["f1"], quality["controlnet"]["f1"])
    return out_dir


def read_info(out_dir: str | Path) -> dict:
    """The published ``ccp_toy_controlnet.json`` (settings, prior, timings, quality check)."""
    return json.loads((Path(out_dir) / DONE).read_text())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prior_dir", help="a finished toy prior (python -m ccp.toy.prior)")
    parser.add_argument("--out", default=None, help="default: <prior_dir>-controlnet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: see ccp.toy.prior.set_threads)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help=f"settings of {ToyControlNetSettings.__name__}, e.g. steps=600")
    args = parser.parse_args(argv)
    settings = parse_settings(parser, args.set, ToyControlNetSettings)
    logging.basicConfig(level=logging.INFO)
    set_threads(args.threads)
    out = ensure_toy_controlnet(args.prior_dir, args.out, seed=args.seed, **settings)
    quality = read_info(out)["quality"]
    print(out)
    print(f"edge F1 (tolerance {quality['tolerance']} px, {quality['prior']['images']} samples): "
          f"prior alone {quality['prior']['f1']:.3f}, prior + ControlNet {quality['controlnet']['f1']:.3f}")


if __name__ == "__main__":
    main()
