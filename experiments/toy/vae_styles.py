"""Which training mix and budget let the toy VAE draw every style (docs/toy.md, "The toy prior").

    python experiments/toy/vae_styles.py --variant all:600:16:3e-3 --variant plain:600:16:3e-3

Each variant (styles:steps:batch:lr; styles = "plain", "all", or "concepts1": plain x3 colourings plus
one colouring of each concept style) trains a toy VAE from scratch on the train splits (seed 0, 32 px,
2 torch threads as `make demo`) and reports the reconstruction L1 (decode(posterior mean), [-1, 1]
units) on each style's held-out digits, with the seconds it took.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def run(variant: str) -> dict:
    from ccp.toy.digits import CONCEPT_STYLES, STYLES, render_set
    from ccp.toy.vae import reconstruction_l1, to_model_range, train_toy_vae

    styles, steps, batch, lr = variant.split(":")
    parts = {"plain": [("plain", 3)], "all": [(s, 3) for s in STYLES],
             "concepts1": [("plain", 3)] + [(s, 1) for s in CONCEPT_STYLES]}[styles]
    images = torch.cat([render_set("train", s, 0, 32, copies).tensor() for s, copies in parts])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        vae = train_toy_vae(images, f"{tmp}/vae", int(steps), int(batch), float(lr), seed=0, progress=False)
    seconds = time.perf_counter() - start
    held = {s: reconstruction_l1(vae, to_model_range(render_set("held_out", s, 0, 32).tensor())) for s in STYLES}
    return {"variant": variant, "images": len(images), "seconds": round(seconds, 1),
            "held_out_l1": {s: round(v, 4) for s, v in held.items()}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append", required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for variant in args.variant:
        print(json.dumps(run(variant)), flush=True)


if __name__ == "__main__":
    main()
