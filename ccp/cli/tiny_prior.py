"""`ccp-tiny-prior OUT_DIR [--seed N] [--with-controlnet]`: write a random SD-shaped prior folder."""

from __future__ import annotations

import argparse

from ccp.priors.tiny import save_tiny_prior


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ccp-tiny-prior", description=__doc__)
    parser.add_argument("out_dir", help="folder to write (diffusers StableDiffusionPipeline layout)")
    parser.add_argument("--seed", type=int, default=0, help="weights are a function of the seed")
    parser.add_argument("--with-controlnet", action="store_true", help="also write OUT_DIR/controlnet")
    args = parser.parse_args(argv)
    out = save_tiny_prior(args.out_dir, seed=args.seed, with_controlnet=args.with_controlnet)
    print(f"wrote tiny prior to {out}")


if __name__ == "__main__":
    main()
