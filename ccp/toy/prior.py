"""The toy open-world prior: an SD-shaped latent text-to-image pipeline trained from scratch on
plain coloured digits with captions ("a red digit 3"), by ccp's own training loop.

    python -m ccp.toy.prior outputs/toy/prior          # train, or reuse if already finished

Stages, each kept when finished so an interrupted run continues where it stopped:
1. data: `write_prior_dataset` (plain style, train split, `copies` colourings per digit) with
   ``captions.jsonl``;
2. VAE: `ccp.toy.vae.train_toy_vae` (32 px -> 8x8x4 latents) on the train split of every style
   (`vae_styles`: plain and the concept styles, as SD's VAE saw far more than any one concept);
3. an initial pipeline folder: that VAE, a random small token-identity CLIP text encoder with the real CLIP
   tokenizer (frozen, like SD's), a random cross-attention UNet, SD v1.5's scheduler;
4. ccp-train with ``experiment=toy_prior`` (method ``text_to_image``: per-image captions, caption
   dropout 10%, EMA), resumable from its last checkpoint;
5. the export copied to `out_dir` with ``ccp_toy_prior.json`` (settings and timings).

A finished `out_dir` whose settings match is returned at once; other settings train a new one
in their own work folder (`<out_dir>.work/<settings hash>`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ccp.priors.tiny import SD15_SCHEDULER_CONFIG, TINY_TEXT_ENCODER_CONFIG, TINY_UNET_CONFIG, _seeded
from ccp.priors.tokenizer import build_clip_tokenizer
from ccp.toy.digits import STYLES, render_set, write_prior_dataset
from ccp.toy.vae import train_toy_vae
from ccp.config import compose
from ccp.io import dir_complete, write_dir_atomic
from ccp.training.run import run_training
from ccp.training.runs import config_text

log = logging.getLogger(__name__)
DONE = "ccp_toy_prior.json"

# The tiny prior's shape with both UNet levels cross-attending, wider text features, and two
# heads: on a CPU, SDPA with many tiny heads cost 1.7x the step time of two wider ones (batch 64).
TOY_UNET_CONFIG = {
    **TINY_UNET_CONFIG,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "attention_head_dim": 2,
    "cross_attention_dim": 64,
}
TOY_TEXT_ENCODER_CONFIG = {**TINY_TEXT_ENCODER_CONFIG, "hidden_size": 64, "intermediate_size": 128, "projection_dim": 64}


def refuse_unknown(settings_class, kwargs: dict, what: str) -> None:
    """ValueError naming the keywords that are not fields of the dataclass `settings_class`, and the known ones."""
    known = {f.name for f in fields(settings_class)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"unknown {what} setting(s) {unknown}; known: {sorted(known)}")


@dataclass(frozen=True)
class ToyPriorSettings:
    resolution: int = 32
    copies: int = 3             # colourings of each training digit (1,438 digits -> 4,314 images)
    vae_steps: int = 1500         # on every style's images (experiments/toy/vae_styles.py): 600 steps left plain held-out L1 at 0.12
    vae_batch_size: int = 16      # ~35% faster than 32; reconstruction L1 0.047 (2 threads) vs 0.037 at 32 (1 thread)
    vae_lr: float = 3e-3
    # The VAE's training images: plain plus every concept style's train split (never a held-out split):
    # trained on plain alone it could not draw thin outlines (round-trip FID 421 on held-out outlined
    # digits against a floor of 23). The UNet still sees plain digits only.
    vae_styles: tuple[str, ...] = STYLES
    steps: int = 1000           # UNet optimizer steps
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50
    caption_dropout: float = 0.1
    # Templates around each caption, drawn per item ("{caption}" alone: none). A run with eight generic
    # templates (v2, docs/toy.md) did not make the random encoder's features position-free and
    # spread the same budget over 8x the prompts; the token-identity encoder below is what worked.
    caption_templates: tuple[str, ...] = ("{caption}",)
    token_embedding_scale: float = 50.0
    data_seed: int = 0

    @classmethod
    def from_kwargs(cls, **kwargs) -> "ToyPriorSettings":
        refuse_unknown(cls, kwargs, "toy prior")
        for key in ("caption_templates", "vae_styles"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        unknown = sorted(set(kwargs.get("vae_styles", ())) - set(STYLES))
        if unknown:
            raise ValueError(f"vae_styles: unknown style(s) {unknown}; known: {list(STYLES)}")
        return cls(**kwargs)

    def key(self, seed: int, recipe: str = "") -> str:
        """Names a trained prior: these settings, the seed and `recipe` (the stage-4 training
        config, so an edited ccp/conf/experiment/toy_prior.yaml or override is a different prior)."""
        text = json.dumps({**asdict(self), "seed": seed, "recipe": recipe}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def token_identity_text_encoder(seed: int, token_embedding_scale: float) -> CLIPTextModel:
    """A random CLIP text encoder whose features are (almost) each token's own: no position
    embeddings, token embeddings `token_embedding_scale` x their init (std 0.02 -> 1.0 at 50), so
    the residual stream outweighs the random attention's context mixing ~40x.

    Why: with SD's random init, moving "a red digit 3" behind "a digit, " changed its token
    features more than changing red to blue (cosine 0.87 vs 0.92 for the colour token), and the
    first toy prior followed a caption only at the prompt's start (alignment 0.83 alone, 0.006 after
    "a digit, "). With token-identity features the shifted caption keeps cosine 0.98 while another
    colour word drops to 0.22; cross-attention then reads the prompt as a bag of words wherever the
    caption sits, the property a pretrained CLIP gives SD (experiments/toy/prompt_position.py)."""
    encoder = _seeded(seed, lambda: CLIPTextModel(CLIPTextConfig(**TOY_TEXT_ENCODER_CONFIG)))
    with torch.no_grad():
        encoder.get_submodule("embeddings.position_embedding").weight.zero_()
        encoder.get_input_embeddings().weight.mul_(token_embedding_scale)
    return encoder.eval()


def write_initial_pipeline(out_dir: Path, vae: AutoencoderKL, seed: int, token_embedding_scale: float = 50.0) -> Path:
    unet = _seeded(seed, lambda: UNet2DConditionModel(**TOY_UNET_CONFIG))
    text_encoder = token_identity_text_encoder(seed + 1, token_embedding_scale)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(), unet=unet,
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    write_dir_atomic(out_dir, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
    return out_dir


def train_config(settings: ToyPriorSettings, work: Path, seed: int, overrides: list[str] = ()):
    """The ccp-train config of stage 4 (``experiment=toy_prior``)."""
    return compose("train", overrides=[
        "experiment=toy_prior",
        f"prior.path={work / 'init'}",
        f"data.path={work / 'data'}",
        f"data.resolution={settings.resolution}",
        f"data.batch_size={settings.batch_size}",
        f"data.cache_dir={work / 'cache'}",
        f"trainer.global_batch_size={settings.batch_size}",
        f"trainer.max_steps={settings.steps}",
        f"optim.lr={settings.lr}",
        f"optim.warmup_steps={settings.warmup_steps}",
        f"method.module.caption_dropout={settings.caption_dropout}",
        "method.module.caption_templates=[" + ",".join(json.dumps(t) for t in settings.caption_templates) + "]",
        f"seed={seed}",
        *overrides,
    ])


def recipe(settings: ToyPriorSettings, seed: int, overrides: list[str] = ()) -> str:
    """The stage-4 training config as text, with the work folder left out (it is named by the key)."""
    return config_text(train_config(settings, Path("WORK"), seed, list(overrides)), Path("WORK") / "train")


def finished(out_dir: str | Path, key: str | None = None) -> bool:
    """Whether `out_dir` holds a published toy prior (of `key`, when given)."""
    marker = Path(out_dir) / DONE
    if not dir_complete(out_dir):
        return False
    return key is None or json.loads(marker.read_text()).get("key") == key


def ensure_toy_prior(out_dir: str | Path, seed: int = 0, progress: bool = True, train_overrides: list[str] = (),
                     **settings) -> Path:
    """The toy prior folder at `out_dir` (loadable with `ccp.priors.loading.load_prior`): reused
    when finished with the same settings, else trained (resuming any finished stage)."""
    out_dir = Path(out_dir)
    s = ToyPriorSettings.from_kwargs(**settings)
    key = s.key(seed, recipe(s, seed, train_overrides))
    if finished(out_dir, key):
        return out_dir
    work = out_dir.with_name(out_dir.name + ".work") / key
    work.mkdir(parents=True, exist_ok=True)
    times = {}

    start = time.perf_counter()
    if not dir_complete(work / "data"):
        write_dir_atomic(work / "data", lambda tmp: write_prior_dataset(tmp, "train", s.data_seed, s.resolution, s.copies))
    times["data_s"] = time.perf_counter() - start

    start = time.perf_counter()
    if not dir_complete(work / "vae"):
        images = torch.cat([render_set("train", style, s.data_seed, s.resolution, s.copies).tensor()
                            for style in s.vae_styles])
        vae = train_toy_vae(images, work / "vae", s.vae_steps, s.vae_batch_size, s.vae_lr, seed=seed, progress=progress)
    vae = AutoencoderKL.from_pretrained(work / "vae")
    times["vae_s"] = time.perf_counter() - start

    if not dir_complete(work / "init"):
        write_initial_pipeline(work / "init", vae, seed, s.token_embedding_scale)

    start = time.perf_counter()
    export = run_training(train_config(s, work, seed, list(train_overrides)), run_dir=work / "train")
    times["unet_s"] = time.perf_counter() - start

    def publish(tmp: Path) -> None:
        shutil.copytree(export, tmp)
        info = {"key": key, "seed": seed, "settings": asdict(s), "seconds": {k: round(v, 1) for k, v in times.items()},
                "work_dir": str(work)}
        (tmp / DONE).write_text(json.dumps(info, indent=2) + "\n")

    write_dir_atomic(out_dir, publish)
    log.info("toy prior ready at %s (%s)", out_dir, times)
    return out_dir


def set_threads(threads: int) -> None:
    """Torch CPU threads. Default 1: these models are small, and on a 2-core machine with anything
    else running, 2 threads made a toy VAE step 4.7x slower than 1 (1.4 s vs 0.3 s, measured)."""
    if threads < 1:
        raise ValueError(f"--threads {threads}: must be >= 1")
    torch.set_num_threads(threads)


def parse_settings(parser: argparse.ArgumentParser, items: list[str], settings_class) -> dict:
    """``--set KEY=VALUE`` items as keywords of the dataclass `settings_class` (ints or floats, by field);
    an unknown key stops the command with the known ones."""
    types = {f.name: f.type for f in fields(settings_class)}
    settings = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in types:
            parser.error(f"--set {item}: unknown setting {key!r}; known: {sorted(types)}")
        kind = str(types[key])
        settings[key] = (float(value) if kind == "float" else tuple(value.split(",")) if kind.startswith("tuple")
                         else int(value))
    return settings


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: see set_threads)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help=f"settings of {ToyPriorSettings.__name__}, e.g. steps=3000")
    args = parser.parse_args(argv)
    settings = parse_settings(parser, args.set, ToyPriorSettings)
    logging.basicConfig(level=logging.INFO)
    set_threads(args.threads)
    print(ensure_toy_prior(args.out_dir, seed=args.seed, **settings))


if __name__ == "__main__":
    main()
