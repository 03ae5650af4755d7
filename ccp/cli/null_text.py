"""`ccp-null-text PRIOR OUT_DIR [--definition calibrated|value_mean]`: convert a prior's UNet into a
null-text concept UNet (§4.3) — the initialisation of our concept model, loadable by ccp-sample."""

from __future__ import annotations

import argparse

from ccp.models.null_text_unet import DEFAULT_NULL_TEXT_DEFINITION, NULL_TEXT_DEFINITIONS, NullTextUNet2DConditionModel
from ccp.priors.loading import load_prior


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ccp-null-text", description=__doc__)
    parser.add_argument("prior", help="SD v1.x folder or hub id (or a ccp-tiny-prior folder)")
    parser.add_argument("out_dir", help="where to write the null-text UNet (diffusers model folder)")
    parser.add_argument("--definition", choices=NULL_TEXT_DEFINITIONS, default=DEFAULT_NULL_TEXT_DEFINITION)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    prior = load_prior(args.prior, device=args.device)
    unet = NullTextUNet2DConditionModel.from_prior(prior.unet, prior.text_encoder, prior.tokenizer, definition=args.definition)
    unet.save_pretrained(args.out_dir)
    print(f"wrote null-text concept UNet ({args.definition}) to {args.out_dir}")


if __name__ == "__main__":
    main()
