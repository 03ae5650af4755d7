"""`make demo`: the whole method at toy scale, offline on a CPU.

    python -m ccp.toy.demo [--out outputs/demo] [--prior outputs/toy/prior] [--style bold]

1. the toy open-world prior (`ensure_toy_prior`: trained from scratch on captioned plain digits,
   or reused when finished), then its canny ControlNet beside it (`ensure_toy_controlnet`, with its
   edge-F1 check; trained or reused the same way);
2. a null-text concept UNet (``ccp-train experiment=toy method=ours``) on unlabeled digits of a style the
   prior never saw (default ``bold``); rerunning resumes or reuses it;
3. one labelled grid, ``<out>/grid.png``, every column one seed and one prompt:
   the prior alone with the prompt (CFG), GCFG with the concept term plus the prompt as a control
   term on the prior, and the concept term alone (unconditional from the prior).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from ccp.config import compose
from ccp.guidance import GuidanceSpec
from ccp.io import dir_complete, write_dir_atomic
from ccp.methods.export import is_export, read_export_info
from ccp.toy.controlnet import ensure_toy_controlnet, read_info
from ccp.toy.digits import write_concept_dataset
from ccp.toy.prior import ensure_toy_prior, set_threads
from ccp.training.run import run_training
from ccp.training.runs import set_aside, trained_with

log = logging.getLogger(__name__)
DEMO_PROMPTS = ("a red digit 0", "a green digit 2", "a blue digit 3", "a yellow digit 5", "a white digit 7", "a red digit 9")


def ensure_concept_data(root: Path, style: str, split: str = "train", seed: int = 0, resolution: int = 32) -> Path:
    """``<root>/<style>/<split>``: unlabeled concept images, written once (atomically)."""
    folder = root / style / split
    if not dir_complete(folder):
        write_dir_atomic(folder, lambda tmp: write_concept_dataset(tmp, style, split, seed, resolution))
    return folder


def train_concept(prior_dir: Path, data_dir: Path, run_dir: Path, style: str, overrides: list[str] = ()) -> Path:
    """ccp-train experiment=toy method=ours on `data_dir`; an export of the same step count is reused."""
    cfg = compose("train", overrides=["experiment=toy", "method=ours", f"prior.path={prior_dir}", f"data.path={data_dir}",
                                      f"data.cache_dir={run_dir / 'cache'}", f"dataset_name={style}",
                                      f"template.placeholder='<{style}>'", *overrides])
    export = run_dir / "export"
    if trained_with(run_dir, cfg):
        if is_export(export) and read_export_info(export).get("step") == cfg.trainer.max_steps:
            return export
    else:
        set_aside(run_dir)  # another config, or the prior was retrained at the same path
    return run_training(cfg, run_dir=run_dir)  # resumes an interrupted run of the same config


def demo_grid(prior_dir: Path, export_dir: Path, out_path: Path, prompts=DEMO_PROMPTS, steps: int = 25,
              weights: tuple[tuple[float, float], ...] = ((1.0, 5.0), (3.0, 3.0)), cfg_weight: float = 5.0,
              seed: int = 0, resolution: int = 32):
    """Rows: prior alone (CFG), GCFG at each (concept, control) weight pair, the concept alone."""
    from ccp.evaluation.figures import grid_figure
    from ccp.methods.export import load_trained
    from ccp.pipelines.sampling import sample_images
    from ccp.priors.loading import load_prior

    model = load_trained(export_dir, load_prior(str(prior_dir)))
    model.pipe.set_progress_bar_config(disable=True)
    rows = {f"prior alone\n(CFG {cfg_weight:g})": [GuidanceSpec.cfg(p, cfg_weight) for p in prompts]}
    for concept, control in weights:
        rows[f"GCFG: concept {concept:g}\n+ prompt {control:g}"] = [model.guidance(p, concept, control) for p in prompts]
    rows["concept alone"] = [model.guidance(None, 1.0, 0.0)] * len(prompts)
    images = []
    for specs in rows.values():
        row = []
        for column, spec in enumerate(specs):  # column k: image k of `seed`, whatever the row
            row += sample_images(model.pipe, spec, [column], seed=seed, num_inference_steps=steps,
                                 height=resolution, width=resolution)
        images.append([im.resize((96, 96), 0) for im in row])  # nearest: 32 px tiles stay crisp
    return grid_figure(images, out_path, list(rows), [p.replace("a ", "", 1) for p in prompts], ylabel="", xlabel="prompt (same seed per column)",
                       title="toy GCFG: prior trained on plain digits, concept = unlabeled bold digits", cell_inches=1.1)


def run_demo(out: str | Path = "outputs/demo", prior: str | Path = "outputs/toy/prior", style: str = "bold",
             steps: int = 25, train_overrides: list[str] = (), prior_settings: dict | None = None,
             controlnet_settings: dict | None = None) -> Path:
    out, prior = Path(out), Path(prior)
    start = time.perf_counter()
    prior_dir = ensure_toy_prior(prior, **(prior_settings or {}))
    stage = time.perf_counter()
    controlnet = ensure_toy_controlnet(prior_dir, **(controlnet_settings or {}))
    quality = read_info(controlnet)["quality"]
    log.info("toy ControlNet %s (%.0f s): held-out edge F1 prior alone %.3f, with the ControlNet %.3f", controlnet,
             time.perf_counter() - stage, quality["prior"]["f1"], quality["controlnet"]["f1"])
    data = ensure_concept_data(prior.parent / "data", style)
    export = train_concept(prior_dir, data, out / f"ours_{style}", style, list(train_overrides))
    result = demo_grid(prior_dir, export, out / "grid.png", steps=steps)
    log.info("demo grid %s (%.0f s)", result.path, time.perf_counter() - start)
    return result.path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/demo")
    parser.add_argument("--prior", default="outputs/toy/prior")
    parser.add_argument("--style", default="bold", choices=("bold", "outlined"))
    parser.add_argument("--steps", type=int, default=25, help="sampling steps (DPM-Solver++)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    set_threads(args.threads)
    print(run_demo(args.out, args.prior, args.style, args.steps))


if __name__ == "__main__":
    main()
