"""Device-hours of the full reproduction recipe, derived from committed benchmark JSON.

    python benchmarks/cost.py --training benchmarks/results/training_sd15_cuda_bfloat16_512px.json \
        --sampling benchmarks/results/sampling_sd15_cuda_float16_512px.json

The recipe's sizes come from the configs, not from this file: ten trainings (methods x datasets of
ccp/conf/scale/full.yaml) of `trainer.max_steps` x `trainer.global_batch_size` images
(ccp/conf/experiment/table1.yaml), FID over `fid.num_samples` per cell, text alignment
(prompts x images_per_prompt) and spatial alignment (conditions x samples) for every method on
the Table 2 dataset, all at `sampling.steps` denoising steps.

Approximations, stated in the output: training speed of TI / Custom Diffusion / OFT taken as
DreamBooth's (each backpropagates through the whole UNet; their optimiser steps are smaller);
ours' sampling at the benchmark's three-term GCFG speed (FID needs two terms: an overestimate),
baselines at diffusers' CFG speed; ControlNet steps as plain ones (an underestimate); evaluation
models (Inception, CLIP, canny) and real-statistics passes are left out (small next to sampling).
Benchmarks of another model size are refused unless --allow-other-size (the tests use it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from ccp.config import CONF_DIR
from ccp.hardware import machine



class BenchmarkMismatch(ValueError):
    """A benchmark JSON that cannot price the SD v1.5 recipe."""


def recipe(conf_dir: Path = Path(CONF_DIR)) -> dict:
    full = OmegaConf.load(conf_dir / "scale" / "full.yaml")
    train = OmegaConf.load(conf_dir / "experiment" / "table1.yaml")
    return {
        "methods": list(full.methods),
        "datasets": list(full.datasets),
        "train_steps": int(train.trainer.max_steps),
        "global_batch": int(train.trainer.global_batch_size),
        "sampling_steps": int(full.sampling.steps),
        "fid_samples": int(full.fid.num_samples),
        "text_images": len(full.text_alignment.prompts) * int(full.text_alignment.images_per_prompt),
        "spatial_images": int(full.spatial_alignment.num_conditions) * int(full.spatial_alignment.samples_per_condition),
    }


def _device(bench: dict) -> str:
    m = bench.get("machine", {})
    return m.get("gpu") or m.get("device", "unknown device")


def check(bench: dict, kind: str, allow_other_size: bool) -> None:
    if bench.get("benchmark") != kind:
        raise BenchmarkMismatch(f"expected a {kind} benchmark, got {bench.get('benchmark')!r}")
    size = bench.get("model", {}).get("size")
    if size != "sd15" and not allow_other_size:
        raise BenchmarkMismatch(
            f"the {kind} benchmark is of the {size!r} model, not SD v1.5 size: run `make bench-{kind} "
            "ARGS=\"--size sd15 --device cuda\"` on the GPU you will use and commit its JSON "
            "(or pass --allow-other-size to price that model instead)")


def estimate(training: dict, sampling: dict, r: dict) -> dict:
    """Hours per component and in total (device-hours: divide by the GPU count for wall time)."""
    images_per_s = {"ours": training["results"]["ours"]["images_per_s"],
                    "baseline": training["results"]["dreambooth"]["images_per_s"]}
    biggest = max(sampling["results"], key=lambda row: row["batch"])
    per_step = {"ours": biggest["per_image_s"]["a_batched_gcfg"] / sampling["steps"],
                "baseline": biggest["per_image_s"]["c_diffusers_cfg"] / sampling["steps"]}
    hours = {}
    for method in r["methods"]:
        kind = "ours" if method == "ours" else "baseline"
        images = r["train_steps"] * r["global_batch"]
        per_image = per_step[kind] * r["sampling_steps"]
        hours[f"train {method}"] = len(r["datasets"]) * images / images_per_s[kind] / 3600
        hours[f"FID {method}"] = len(r["datasets"]) * r["fid_samples"] * per_image / 3600
        hours[f"alignment {method}"] = (r["text_images"] + r["spatial_images"]) * per_image / 3600
    totals = {
        "training": sum(v for k, v in hours.items() if k.startswith("train ")),
        "FID": sum(v for k, v in hours.items() if k.startswith("FID ")),
        "alignment": sum(v for k, v in hours.items() if k.startswith("alignment ")),
    }
    totals["all"] = sum(totals.values())
    return {"hours": hours, "totals": totals, "batch": biggest["batch"],
            "devices": {"training": _device(training), "sampling": _device(sampling)}}


def markdown(result: dict, r: dict) -> str:
    lines = [f"Device-hours on {result['devices']['training']} (training) / {result['devices']['sampling']} "
             f"(sampling, batch {result['batch']}); {r['train_steps']:,} steps x {r['global_batch']} images per "
             f"training, {r['fid_samples']:,} FID samples per cell, {r['sampling_steps']} sampling steps.", "",
             "| component | hours |", "|---|---|"]
    lines += [f"| {k} | {v:,.1f} |" for k, v in result["hours"].items()]
    lines += [f"| **{k}** | **{v:,.1f}** |" for k, v in result["totals"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--training", required=True, type=Path)
    parser.add_argument("--sampling", required=True, type=Path)
    parser.add_argument("--allow-other-size", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the estimate here")
    args = parser.parse_args(argv)
    training, sampling = (json.loads(p.read_text()) for p in (args.training, args.sampling))
    try:
        check(training, "training", args.allow_other_size)
        check(sampling, "sampling", args.allow_other_size)
    except BenchmarkMismatch as err:
        sys.exit(f"cost.py: error: {err}")
    r = recipe()
    result = estimate(training, sampling, r)
    print(markdown(result, r))
    if args.json:
        # measured_on: the machines of the priced benchmarks; machine: where this arithmetic ran
        measured_on = {"training": training.get("machine"), "sampling": sampling.get("machine")}
        args.json.write_text(json.dumps({"recipe": r, **result, "measured_on": measured_on, "machine": machine()},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
