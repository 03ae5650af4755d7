"""`ccp-tiny-prior OUT_DIR [--family sd1|sd2|sdxl] [--seed N] [--with-controlnet]`: write a random SD-shaped prior folder."""

from __future__ import annotations

import argparse

from ccp.priors.families import FAMILIES
from ccp.priors.tiny import save_tiny_prior


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ccp-tiny-prior", description=__doc__)
    parser.add_argument("out_dir", help="folder to write (diffusers StableDiffusionPipeline/XLPipeline layout)")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sd1",
                        help="sd1: SD v1.5's shape (default); sd2: SD 2.x (v-prediction); sdxl: SDXL")
    parser.add_argument("--seed", type=int, default=0, help="weights are a function of the seed")
    parser.add_argument("--with-controlnet", action="store_true", help="also write OUT_DIR/controlnet")
    args = parser.parse_args(argv)
    out = save_tiny_prior(args.out_dir, seed=args.seed, with_controlnet=args.with_controlnet, family=args.family)
    print(f"wrote tiny {FAMILIES[args.family].title} prior to {out}")


if __name__ == "__main__":
    main()
