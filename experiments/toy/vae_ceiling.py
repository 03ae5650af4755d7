"""What the toy prior's VAE alone costs in FID, per concept style (docs/toy.md, "VAE ceiling").

    python experiments/toy/vae_ceiling.py outputs/toy/prior outputs/reproduce/toy/digit_classifier.safetensors

The held-out digits, rendered twice (two random colours) per style, are cut into halves A and B of
disjoint digits (`ccp.toy.instruments.held_out_halves`, as the instruments' FID check); FID(A, B) is the floor of the
finite sample, FID(A, decode(encode(B))) adds what the 8x8x4 latent space loses. No method that
samples through this VAE can beat the second number by much.
"""

from __future__ import annotations

import argparse
import json

import torch


@torch.no_grad()
def vae_ceiling(prior_dir: str, classifier: str, seed: int = 0, resolution: int = 32) -> dict:
    from diffusers import AutoencoderKL

    from ccp.evaluation.fid import FeatureStats, extract_features, frechet_distance
    from ccp.toy.digits import STYLES
    from ccp.toy.instruments import held_out_halves, load_classifier
    from ccp.toy.vae import reconstruction_l1, to_model_range

    vae = AutoencoderKL.from_pretrained(f"{prior_dir}/vae").eval()
    extractor = load_classifier(classifier).feature_extractor()
    out = {}
    for style in STYLES:
        toy, in_a = held_out_halves(style, seed, resolution)
        images = toy.tensor()
        x = to_model_range(images[~in_a])
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
        recon = ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        a = FeatureStats.from_features(extract_features(extractor, images[in_a]))
        b = FeatureStats.from_features(extract_features(extractor, images[~in_a]))
        b_vae = FeatureStats.from_features(extract_features(extractor, recon))
        out[style] = {"fid_A_vs_B": round(frechet_distance(a, b), 1), "fid_A_vs_vae_B": round(frechet_distance(a, b_vae), 1),
                      "reconstruction_l1": round(reconstruction_l1(vae, x), 4), "images_per_half": int(in_a.sum())}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prior")
    parser.add_argument("classifier")
    args = parser.parse_args(argv)
    print(json.dumps(vae_ceiling(args.prior, args.classifier), indent=1))


if __name__ == "__main__":
    main()
