"""Translation and stylization on the toy prior (docs/translation.md): plain digits drawn by the
prior, translated into the bold concept at several strengths (image to image, concept term only),
and stylized with a LoRA fine-tuned from the toy prior as a third term (concept + style + prompt).

    python -m ccp.toy.gallery --prior outputs/toy/prior \\
        --concept outputs/reproduce/toy/train/bold_ours/export \\
        --style-lora outputs/reproduce/toy/train/bold_lora/export --out docs/images/toy_translation.png
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

from ccp.guidance import Condition, GuidanceSpec, GuidanceTerm, Source

log = logging.getLogger(__name__)
PROMPTS = ("a red digit 0", "a green digit 2", "a blue digit 3", "a yellow digit 5", "a white digit 7", "a red digit 9")


def stylize_spec(prompt: str, concept: float, style: float, control: float) -> GuidanceSpec:
    """Concept (null-text model) + style (the LoRA denoiser under the prompt) + the prompt on the prior."""
    return GuidanceSpec(terms=(
        GuidanceTerm("concept", Source("concept", Condition()), concept),
        GuidanceTerm("style", Source("style", Condition(prompt=prompt)), style),
        GuidanceTerm("control", Source("prior", Condition(prompt=prompt)), control),
    ))


def toy_gallery(prior_dir: str | Path, concept_export: str | Path, style_lora: str | Path, out_path: str | Path,
                prompts: Sequence[str] = PROMPTS, strengths: Sequence[float] = (0.3, 0.6, 1.0),
                translate_weight: float = 2.0, stylize_weights: tuple[float, float, float] = (1.0, 1.5, 3.0),
                cfg_weight: float = 5.0, steps: int = 25, seed: int = 0, resolution: int = 32):
    """Rows: the prior's plain digits (CFG), each translated into the concept at every strength,
    then concept + style LoRA + prompt from noise. Column k: image k of `seed` in every row."""
    from ccp.evaluation.figures import grid_figure
    from ccp.methods.export import load_trained
    from ccp.pipelines.sampling import sample_images
    from ccp.priors.loading import load_prior

    model = load_trained(concept_export, load_prior(str(prior_dir)))
    pipe = model.pipe
    pipe.set_progress_bar_config(disable=True)
    columns = list(range(len(prompts)))
    settings = dict(seed=seed, num_inference_steps=steps, height=resolution, width=resolution)

    plain = [sample_images(pipe, GuidanceSpec.cfg(p, cfg_weight), [k], **settings)[0] for k, p in zip(columns, prompts)]
    rows = {f"prior alone\n(CFG {cfg_weight:g})": plain}
    concept_only = model.guidance(None, translate_weight, 0.0)
    for strength in strengths:
        rows[f"translated\n(strength {strength:g})"] = sample_images(pipe, concept_only, columns, image=plain,
                                                                    strength=strength, **settings)
    pipe.add_lora_denoiser("style", str(style_lora))
    concept, style, control = stylize_weights
    rows[f"concept {concept:g}, LoRA\n{style:g}, prompt {control:g}"] = [
        sample_images(pipe, stylize_spec(p, concept, style, control), [k], **settings)[0] for k, p in zip(columns, prompts)]
    images = [[im.resize((96, 96), 0) for im in row] for row in rows.values()]  # nearest: 32 px tiles stay crisp
    return grid_figure(images, out_path, list(rows), [p.replace("a ", "", 1) for p in prompts], ylabel="",
                       xlabel="prompt (same seed per column)", cell_inches=1.1,
                       title="toy translation: plain digits into the bold concept; a LoRA from the toy prior as style")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prior", default="outputs/toy/prior")
    parser.add_argument("--concept", default="outputs/reproduce/toy/train/bold_ours/export")
    parser.add_argument("--style-lora", default="outputs/reproduce/toy/train/bold_lora/export")
    parser.add_argument("--out", default="outputs/gallery/toy_translation.png")
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    result = toy_gallery(args.prior, args.concept, args.style_lora, args.out, steps=args.steps)
    print(result.path)


if __name__ == "__main__":
    main()
