"""What the toy prior's VAE alone costs in FID, per concept style (docs/toy.md, "VAE ceiling").

    python experiments/toy/vae_ceiling.py outputs/toy/prior outputs/reproduce/toy/digit_classifier.safetensors

The held-out digits, rendered twice (two random colours) per style, are cut into halves A and B of
disjoint digits (`ccp.toy.instruments.held_out_halves`, as the instruments' FID check); FID(A, B) is the floor of the
finite sample, FID(A, decode(encode(B))) adds what the 8x8x4 latent space loses. No method that
samples through this VAE can beat the second number by much. The toy reproduction writes the same
numbers to its results folder (vae_round_trip.md).
"""

from __future__ import annotations

import argparse
import json



def vae_ceiling(prior_dir: str, classifier: str, seed: int = 0, resolution: int = 32) -> dict:
    from diffusers import AutoencoderKL

    from ccp.toy.instruments import load_classifier, vae_round_trip

    vae = AutoencoderKL.from_pretrained(f"{prior_dir}/vae")
    return vae_round_trip(vae, load_classifier(classifier), seed, resolution)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prior")
    parser.add_argument("classifier")
    args = parser.parse_args(argv)
    print(json.dumps(vae_ceiling(args.prior, args.classifier), indent=1))


if __name__ == "__main__":
    main()
