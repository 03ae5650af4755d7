"""`ccp-tiny-prior OUT_DIR [--family sd1|sd2|sdxl|sd3] [--seed N] [--with-controlnet]`: write a random SD-shaped prior folder."""

from __future__ import annotations

import argparse

from ccp.priors.families import FAMILIES
from ccp.priors.tiny import save_tiny_prior
from ccp.priors.tiny_sd3 import save_tiny_sd3

# SD3 is not a UNet family ccp personalises (so not in FAMILIES), but its tiny pipeline is written
# here for the offline tests of SD 3.x support.
SD3 = "sd3"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ccp-tiny-prior", description=__doc__)
    parser.add_argument("out_dir", help="folder to write (diffusers StableDiffusion/XL/3 pipeline layout)")
    parser.add_argument("--family", choices=sorted([*FAMILIES, SD3]), default="sd1",
                        help="sd1: SD v1.5's shape (default); sd2: SD 2.x (v-prediction); sdxl: SDXL; "
                             "sd3: SD3 (MMDiT transformer, two CLIP text encoders, no T5)")
    parser.add_argument("--seed", type=int, default=0, help="weights are a function of the seed")
    parser.add_argument("--with-controlnet", action="store_true", help="also write OUT_DIR/controlnet")
    args = parser.parse_args(argv)
    if args.family == SD3:
        if args.with_controlnet:
            parser.error("--with-controlnet is for the UNet families (sd1, sd2, sdxl); there is no tiny SD3 ControlNet")
        out = save_tiny_sd3(args.out_dir, seed=args.seed)
        print(f"wrote tiny SD3 prior (no T5) to {out}")
        return
    out = save_tiny_prior(args.out_dir, seed=args.seed, with_controlnet=args.with_controlnet, family=args.family)
    print(f"wrote tiny {FAMILIES[args.family].title} prior to {out}")


if __name__ == "__main__":
    main()
