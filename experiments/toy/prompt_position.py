"""Does a toy prior follow a caption wherever it sits in the prompt? (docs/toy.md, "Text encoder")

    python experiments/toy/prompt_position.py outputs/toy/prior outputs/reproduce/toy/digit_classifier.safetensors
    python experiments/toy/prompt_position.py --features      # text features only, no prior needed

Alignment: 10 caption prompts ("a red digit 0" ... "a white digit 9") x 16 seeds, CFG 5, 25
DPM-Solver++ steps; the share of images whose colour and class (ToyAttributePredictor) both match,
for the caption alone and behind a prefix. --features: cosine similarity of a random CLIP text
encoder's features for "a red digit 3" vs the same caption behind "a digit, " (matched tokens) and
vs "a blue digit 3" (the colour token), for SD's initialisation, zero position embeddings, and the
toy prior's token-identity encoder.
"""

from __future__ import annotations

import argparse
import json

import torch

PROMPTS = [("red", 0), ("green", 1), ("blue", 2), ("yellow", 3), ("white", 4),
           ("red", 5), ("green", 6), ("blue", 7), ("yellow", 8), ("white", 9)]
FORMS = ["{c}", "a digit, {c}", "a photo of {c}"]


def alignment(prior_dir: str, classifier: str) -> dict:
    from ccp.guidance import GuidanceSpec
    from ccp.pipelines.gcfg import GCFGPipeline
    from ccp.pipelines.sampling import sample_images
    from ccp.priors.loading import load_prior
    from ccp.toy.instruments import ToyAttributePredictor, load_classifier

    pipe = GCFGPipeline.from_prior(load_prior(prior_dir))
    pipe.set_progress_bar_config(disable=True)
    predictor = ToyAttributePredictor(load_classifier(classifier))
    out = {}
    for form in FORMS:
        hits = total = 0
        for colour, digit in PROMPTS:
            prompt = form.format(c=f"a {colour} digit {digit}")
            images = sample_images(pipe, GuidanceSpec.cfg(prompt, 5.0), range(16), seed=0, batch_size=16,
                                   num_inference_steps=25, height=32, width=32)
            hits += int(torch.as_tensor(predictor.predict(images, f"{colour} digit {digit}")).sum())
            total += len(images)
        out[form] = hits / total
    return out


def features() -> dict:
    from transformers import CLIPTextConfig, CLIPTextModel

    from ccp.priors.tiny import _seeded
    from ccp.priors.tokenizer import build_clip_tokenizer
    from ccp.toy.prior import TOY_TEXT_ENCODER_CONFIG, token_identity_text_encoder

    tokenizer = build_clip_tokenizer()

    def encode(encoder, text):
        ids = tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            return encoder(ids)[0][0]

    def sd_init(zero_positions: bool):
        encoder = _seeded(1, lambda: CLIPTextModel(CLIPTextConfig(**TOY_TEXT_ENCODER_CONFIG))).eval()
        if zero_positions:
            encoder.get_submodule("embeddings.position_embedding").weight.data.zero_()
        return encoder

    cos = torch.nn.functional.cosine_similarity
    out = {}
    for name, encoder in (("sd_init", sd_init(False)), ("zero_positions", sd_init(True)),
                          ("token_identity", token_identity_text_encoder(1, 50.0))):
        a, b, c = (encode(encoder, t) for t in ("a red digit 3", "a digit, a red digit 3", "a blue digit 3"))
        out[name] = {"shifted_caption": round(float(cos(a[1:5], b[4:8], dim=-1).mean()), 3),
                     "other_colour": round(float(cos(a[2], c[2], dim=0)), 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prior", nargs="?")
    parser.add_argument("classifier", nargs="?")
    parser.add_argument("--features", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.features:
        print(json.dumps(features(), indent=1))
    else:
        if not (args.prior and args.classifier):
            parser.error("give PRIOR and CLASSIFIER, or --features")
        print(json.dumps(alignment(args.prior, args.classifier)))


if __name__ == "__main__":
    main()
