"""`ccp-null-text PRIOR OUT_DIR [--definition calibrated|value_mean] [--null-text zeros|empty_prompt]`:
convert a prior's UNet (SD v1.x, SD 2.x or SDXL) into a null-text concept UNet (§4.3) — the
initialisation of our concept model, loadable by ccp-sample."""

from __future__ import annotations

import argparse

from ccp.config import exit_on_config_error
from ccp.models.null_text_unet import (
    DEFAULT_NULL_TEXT_DEFINITION,
    NULL_TEXT_DEFINITIONS,
    NULL_TEXT_SOURCES,
    null_text_from_pipeline,
)
from ccp.priors.loading import load_prior


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ccp-null-text", description=__doc__)
    parser.add_argument("prior", help="SD v1.x, SD 2.x or SDXL folder or hub id (or a ccp-tiny-prior folder)")
    parser.add_argument("out_dir", help="where to write the null-text UNet (diffusers model folder)")
    parser.add_argument("--definition", choices=NULL_TEXT_DEFINITIONS, default=DEFAULT_NULL_TEXT_DEFINITION)
    parser.add_argument(
        "--null-text", choices=NULL_TEXT_SOURCES,
        help="SDXL only; default: zeros when the pipeline sets force_zeros_for_empty_prompt (SDXL base does)",
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    with exit_on_config_error("ccp-null-text"):  # a missing prior folder: its message, not a traceback
        prior = load_prior(args.prior, device=args.device)
    kwargs = {"null_text": args.null_text} if args.null_text else {}
    unet = null_text_from_pipeline(prior, definition=args.definition, **kwargs)
    unet.save_pretrained(args.out_dir)
    source = unet.config.null_text_source
    print(f"wrote null-text concept UNet ({args.definition}, null text: {source}) to {args.out_dir}")


if __name__ == "__main__":
    main()
