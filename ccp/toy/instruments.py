"""Measuring instruments for the toy digits (`ccp.toy.digits`).

* `DigitClassifier`: a small CNN for the digit class (with auxiliary style and colour heads),
  trained on every style (plain and concept styles) in every palette colour, so it sees the whole
  toy world. Its penultimate layer is the FID feature extractor (`DigitFeatures`): uint8
  [n, 3, H, W] of any size -> `num_features`-d float32, what `ccp.evaluation.fid` expects of an
  extractor.
* Attribute predictors for text-guided alignment (`ccp.evaluation.attributes.AttributePredictor`):
  `ColourPredictor` (the stroke pixels' mean chromaticity, nearest palette colour),
  `DigitClassPredictor` (the CNN) and `ToyAttributePredictor`, which also decides combined
  attributes such as "red digit 3" (both must hold); `PromptAttributePredictor` judges caption
  prompts by the attribute each asks for.
* `digit_judge`, `style_index`: the classifier as the judge of unconditional drift
  (`ccp.evaluation.drift`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ccp.evaluation.alignment import alignment_table
from ccp.evaluation.attributes import AttributePredictor
from ccp.io import write_atomic, write_json_atomic
from ccp.toy.digits import COLOURS, DEFAULT_RESOLUTION, PALETTE, STYLES, render_set

log = logging.getLogger(__name__)
NUM_CLASSES = 10
DEFAULT_NUM_FEATURES = 64
# The network's input size: renderings (32 px by default) and generated images of any size are
# resized to this; 16 px keeps everything the 8x8 sources hold and trains 4x faster than 32 px.
CLASSIFIER_RESOLUTION = 16


# --- the classifier and its feature extractor ------------------------------------------------------
class DigitClassifier(nn.Module):
    """uint8 [n, 3, H, W] -> digit logits [n, 10]. Inputs are resized (bilinear, antialiased) to
    `resolution` and scaled to [0, 1]; `features` is the penultimate (ReLU) layer.

    Two auxiliary heads (stroke style, stroke colour) are trained with the digit head, so the
    penultimate layer describes all three axes of the toy world, as Inception's features describe
    far more than ImageNet's classes; without them a class-only network learns to ignore style
    and FID could not tell plain from bold."""

    def __init__(self, resolution: int = CLASSIFIER_RESOLUTION, num_features: int = DEFAULT_NUM_FEATURES):
        super().__init__()
        self.resolution = int(resolution)
        self.num_features = int(num_features)
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4, self.num_features), nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, NUM_CLASSES)
        self.style_head = nn.Linear(self.num_features, len(STYLES))
        self.colour_head = nn.Linear(self.num_features, len(COLOURS))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [n, 3, H, W], got shape {tuple(images.shape)}")
        x = images.float() / 255.0
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear",
                              align_corners=False, antialias=True)
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.prepare(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Digit class int64 [n] of uint8 [n, 3, H, W]."""
        was_training = self.training
        self.eval()
        out = [self(images[i : i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)]
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    def feature_extractor(self) -> "DigitFeatures":
        return DigitFeatures(self)


class DigitFeatures(nn.Module):
    """FID feature extractor: the classifier's penultimate layer. uint8 [n, 3, H, W] (any size)
    -> float32 [n, num_features]. Frozen and in eval mode."""

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features
        self.fid_fingerprint = f"toy-digit-cnn-{classifier.resolution}px-{classifier.num_features}d"
        self.requires_grad_(False).eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def classifier_training_data(seed: int = 0, resolution: int = DEFAULT_RESOLUTION, copies: int = 1,
                             styles: Sequence[str] = STYLES, split: str = "train") -> dict[str, torch.Tensor]:
    """`split` rendered in every style of `styles` with random palette colours: {"images": uint8
    [N, 3, H, W], "digits", "styles", "colours": int64 [N] (indices into STYLES and COLOURS)}."""
    sets = [render_set(split, style, seed, resolution, copies) for style in styles]
    return {
        "images": _nchw(np.concatenate([s.images for s in sets])),
        "digits": torch.from_numpy(np.concatenate([s.digits for s in sets])),
        "styles": torch.tensor([STYLES.index(s.style) for s in sets for _ in range(len(s))]),
        "colours": torch.tensor([COLOURS.index(c) for s in sets for c in s.colours]),
    }


def train_digit_classifier(
    seed: int = 0,
    resolution: int = DEFAULT_RESOLUTION,
    input_resolution: int = CLASSIFIER_RESOLUTION,
    num_features: int = DEFAULT_NUM_FEATURES,
    epochs: int = 8,
    batch_size: int = 64,
    lr: float = 3e-3,
    copies: int = 1,
    styles: Sequence[str] = STYLES,
    aux_weight: float = 0.2,
) -> tuple[DigitClassifier, dict]:
    """Train on the train split (every style in `styles`, `copies` renderings per digit at
    `resolution` px in random palette colours; the network sees them at `input_resolution`) with
    Adam and a one-cycle schedule. The loss is the digit cross-entropy plus `aux_weight` times the
    style and colour cross-entropies (see `DigitClassifier`). Deterministic for a seed on one
    machine. Returns the model (eval mode, frozen) and {"train_images", "epochs", "seconds",
    "final_loss"}."""
    start = time.perf_counter()
    data = classifier_training_data(seed, resolution, copies, styles)
    images, digits = data["images"], data["digits"]
    torch.manual_seed(seed)
    model = DigitClassifier(input_resolution, num_features)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(digits) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    inputs = model.prepare(images)  # resized and scaled once; model.features does this per call
    model.train()
    loss = torch.zeros(())
    for _ in range(epochs):
        order = torch.randperm(len(digits), generator=generator)
        for i in range(0, len(order), batch_size):
            batch = order[i : i + batch_size]
            features = model.body(inputs[batch])
            loss = F.cross_entropy(model.head(features), digits[batch]) + aux_weight * (
                F.cross_entropy(model.style_head(features), data["styles"][batch])
                + F.cross_entropy(model.colour_head(features), data["colours"][batch]))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
    model.eval().requires_grad_(False)
    info = {"train_images": len(digits), "epochs": epochs, "seconds": time.perf_counter() - start,
            "final_loss": float(loss.detach())}
    return model, info


def classifier_accuracy(model: DigitClassifier, images: torch.Tensor, digits: torch.Tensor) -> float:
    return float((model.predict(images) == digits).float().mean())


def save_classifier(model: DigitClassifier, path: str | Path) -> Path:
    """Weights as safetensors; resolution and feature size in its metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "ccp-toy-digit-classifier", "resolution": str(model.resolution),
            "num_features": str(model.num_features)}
    save_file(state, str(path), metadata=meta)
    return path


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> DigitClassifier:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "ccp-toy-digit-classifier":
        raise ValueError(f"{path} is not a toy digit classifier written by save_classifier")
    model = DigitClassifier(int(meta["resolution"]), int(meta["num_features"]))
    model.load_state_dict(load_file(str(path), device="cpu"))
    return model.to(device).eval().requires_grad_(False)


# --- attribute predictors ---------------------------------------------------------------------------
def _to_uint8_batch(images: Sequence[PIL.Image.Image]) -> torch.Tensor:
    arrays = [np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images]
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        first = arrays[0].shape
        arrays = [a if a.shape == first else np.asarray(PIL.Image.fromarray(a).resize(first[1::-1], PIL.Image.BICUBIC))
                  for a in arrays]
    return _nchw(np.stack(arrays))


class ColourPredictor(AttributePredictor):
    """Stroke colour: the pixels brighter than `threshold` (max channel, 0..255) are the stroke;
    their mean colour, divided by its brightest channel, is matched to the nearest palette colour
    (equally normalised). An image with no stroke pixel matches no colour."""

    def __init__(self, threshold: int = 64):
        self.threshold = int(threshold)
        palette = torch.tensor([PALETTE[c] for c in COLOURS], dtype=torch.float32)
        self._palette = palette / palette.amax(dim=1, keepdim=True)

    @property
    def attributes(self) -> tuple[str, ...]:
        return COLOURS

    def classify_arrays(self, images: torch.Tensor) -> list[str | None]:
        """Palette name (or None: no stroke) per uint8 [n, 3, H, W] image."""
        x = images.float()
        stroke = (x.amax(dim=1, keepdim=True) > self.threshold).float()
        count = stroke.sum(dim=(1, 2, 3))
        mean = (x * stroke).sum(dim=(2, 3)) / count.clamp_min(1)[:, None]
        chroma = mean / mean.amax(dim=1, keepdim=True).clamp_min(1e-6)
        nearest = torch.cdist(chroma, self._palette).argmin(dim=1)
        return [COLOURS[k] if n > 0 else None for k, n in zip(nearest.tolist(), count.tolist())]

    def classify(self, images: Sequence[PIL.Image.Image]) -> list[str | None]:
        return self.classify_arrays(_to_uint8_batch(images)) if len(images) else []

    def predict(self, images, attribute):
        self.check([attribute])
        return torch.tensor([c == attribute for c in self.classify(images)], dtype=torch.bool)


def digit_attribute(digit: int) -> str:
    return f"digit {int(digit)}"


class DigitClassPredictor(AttributePredictor):
    """Digit class by the toy CNN; attributes "digit 0" ... "digit 9"."""

    def __init__(self, classifier: DigitClassifier):
        self.classifier = classifier.eval()

    @property
    def attributes(self) -> tuple[str, ...]:
        return tuple(digit_attribute(d) for d in range(NUM_CLASSES))

    def classify(self, images: Sequence[PIL.Image.Image]) -> list[int]:
        if not len(images):
            return []
        return self.classifier.predict(_to_uint8_batch(images)).tolist()

    def predict(self, images, attribute):
        self.check([attribute])
        wanted = int(attribute.split()[-1])
        return torch.tensor([d == wanted for d in self.classify(images)], dtype=torch.bool)


class ToyAttributePredictor(AttributePredictor):
    """Colour ("red"), class ("digit 3") and both ("red digit 3": both must hold)."""

    def __init__(self, classifier: DigitClassifier, colour: ColourPredictor | None = None):
        self.colour = colour or ColourPredictor()
        self.digit = DigitClassPredictor(classifier)

    @property
    def attributes(self) -> tuple[str, ...]:
        both = tuple(f"{c} {d}" for c in self.colour.attributes for d in self.digit.attributes)
        return self.colour.attributes + self.digit.attributes + both

    def predict(self, images, attribute):
        self.check([attribute])
        if attribute in self.colour.attributes:
            return self.colour.predict(images, attribute)
        if attribute in self.digit.attributes:
            return self.digit.predict(images, attribute)
        colour, digit = attribute.split(" ", 1)
        return self.colour.predict(images, colour) & self.digit.predict(images, digit)


def ensure_digit_classifier(path: str | Path, settings: dict | None = None) -> DigitClassifier:
    """The `DigitClassifier` at `path`, trained there once with `settings` (`train_digit_classifier`
    keywords, kept in ``<path>.json``); retrained only when those settings change."""
    path = Path(path)
    sidecar = path.with_name(path.name + ".json")
    settings = dict(settings or {})
    if path.is_file() and sidecar.is_file() and json.loads(sidecar.read_text()).get("settings") == settings:
        return load_classifier(path)
    log.info("training the toy digit classifier (%s)", path)
    model, info = train_digit_classifier(**settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: save_classifier(model, tmp))
    write_json_atomic(sidecar, {"settings": settings, "train": info})
    return model


class PromptAttributePredictor(AttributePredictor):
    """Judges each prompt by the attribute it asks for (``attributes``: prompt -> attribute of a
    `ToyAttributePredictor`, e.g. "a red digit 3" -> "red digit 3": both must hold), and keeps the
    colour-only and class-only verdicts of combined attributes in ``parts``."""

    def __init__(self, toy, attributes: dict[str, str]):
        self.toy = toy
        self.mapping = dict(attributes)
        self.parts: dict[str, dict[str, list[torch.Tensor]]] = {}

    @property
    def attributes(self) -> tuple[str, ...]:
        return tuple(self.mapping)

    def _split(self, attribute: str) -> dict[str, str]:
        if attribute in self.toy.colour.attributes:
            return {"colour": attribute}
        if attribute in self.toy.digit.attributes:
            return {"class": attribute}
        colour, digit = attribute.split(" ", 1)
        return {"colour": colour, "class": digit}

    def predict(self, images, prompt):
        self.check([prompt])
        self.toy.check([self.mapping[prompt]])
        flags = {kind: torch.as_tensor(self.toy.predict(images, attr), dtype=torch.bool)
                 for kind, attr in self._split(self.mapping[prompt]).items()}
        for kind, f in flags.items():
            self.parts.setdefault(kind, {}).setdefault(prompt, []).append(f)
        both = torch.ones(len(images), dtype=torch.bool)
        for f in flags.values():
            both &= f
        return both

    def part_alignment(self) -> dict[str, float]:
        """Mean over prompts of the colour-only / class-only alignment (kinds every prompt has)."""
        return {kind: alignment_table({p: torch.cat(v) for p, v in found.items()})["mean"]
                for kind, found in self.parts.items() if set(found) == set(self.mapping)}


def held_out_halves(style: str, seed: int = 0, resolution: int = DEFAULT_RESOLUTION):
    """The held-out digits rendered twice (two random colours) in `style`, and a mask of half A:
    the first half of the held-out digits, so halves A and B share no digit."""
    from ccp.toy.digits import split_indices

    held = split_indices("held_out", seed)
    first = set(held[: len(held) // 2].tolist())
    toy = render_set("held_out", style, seed, resolution, copies=2)
    return toy, torch.tensor([int(s) in first for s in toy.sources])


@torch.no_grad()
def vae_round_trip(vae, classifier: "DigitClassifier", seed: int = 0, resolution: int = DEFAULT_RESOLUTION) -> dict:
    """What the toy prior's VAE alone costs in FID, per style: the held-out digits (two colours
    each) in halves A and B of disjoint digits (`held_out_halves`); FID(A, B) is the floor of the
    finite sample, FID(A, decode(encode(B))) adds what the 8x8x4 latent space loses. No method that
    samples through this VAE can get much below the second number."""
    from ccp.evaluation.fid import FeatureStats, extract_features, frechet_distance
    from ccp.toy.vae import reconstruction_l1, to_model_range

    vae = vae.eval()
    extractor = classifier.feature_extractor()
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
        out[style] = {"fid_floor_A_vs_B": frechet_distance(a, b), "fid_A_vs_vae_B": frechet_distance(a, b_vae),
                      "reconstruction_l1": reconstruction_l1(vae, x), "images_per_half": int(in_a.sum())}
    return out


def vae_round_trip_markdown(result: dict, title: str = "The toy VAE's round trip, per style") -> str:
    lines = [f"### {title}", "", "| Style | FID floor (A vs B) | FID (A vs VAE round trip of B) | Reconstruction L1 |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {style} | {r['fid_floor_A_vs_B']:.1f} | {r['fid_A_vs_vae_B']:.1f} | {r['reconstruction_l1']:.3f} |"
              for style, r in result.items()]
    lines += ["", "Held-out digits (two colours each) in halves A and B of disjoint digits, "
              f"{next(iter(result.values()))['images_per_half']} images per half; FID on the toy digit classifier's "
              "64-d features. The floor is what the finite sample alone gives; no method sampling through this VAE "
              "gets much below the round trip."]
    return "\n".join(lines) + "\n"


def measure_instruments(seed: int = 0, resolution: int = DEFAULT_RESOLUTION) -> dict:
    """Train the classifier and measure every instrument on the held-out split (the numbers
    docs/toy.md reports; tests/test_toy_data.py asserts the same protocol). Held-out digits are
    rendered twice (two random colours) per style and cut into two halves of disjoint digits A
    and B; FID compares equal-size sets: A vs B of one style, plain A vs style B."""
    from ccp.evaluation.fid import FeatureStats, extract_features, frechet_distance

    model, info = train_digit_classifier(seed, resolution)
    extractor = model.feature_extractor()
    colour = ColourPredictor()
    result: dict = {"train": info, "digit_accuracy": {}, "colour_accuracy": {}, "fid_within_style": {},
                    "fid_plain_vs": {}}
    halves = {}
    for style in STYLES:
        toy, in_a = held_out_halves(style, seed, resolution)
        x = toy.tensor()
        result["digit_accuracy"][style] = classifier_accuracy(model, x, torch.from_numpy(toy.digits))
        predicted = colour.classify_arrays(x)
        result["colour_accuracy"][style] = float(np.mean([p == c for p, c in zip(predicted, toy.colours)]))
        features = extract_features(extractor, x)
        halves[style] = (FeatureStats.from_features(features[in_a]), FeatureStats.from_features(features[~in_a]))
        result["fid_within_style"][style] = frechet_distance(*halves[style])
    for style in STYLES[1:]:
        result["fid_plain_vs"][style] = frechet_distance(halves[STYLES[0]][0], halves[style][1])
    return result


# --- drift judges -------------------------------------------------------------------------------
def digit_judge(classifier, batch_size: int = 512):
    """A `ccp.evaluation.drift` judge from the toy `DigitClassifier`: its FID features (penultimate
    layer) and its style head's argmax (an index into `ccp.toy.digits.STYLES`)."""

    @torch.no_grad()
    def judge(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        classifier.eval()
        features = torch.cat([classifier.features(images[i : i + batch_size])
                              for i in range(0, len(images), batch_size)])
        return features, classifier.style_head(features).argmax(dim=1)

    return judge


def style_index(style: str, styles: Sequence[str] | None = None) -> int:
    styles = STYLES if styles is None else styles
    if style not in styles:
        raise ValueError(f"style {style!r} is not one the classifier's style head knows ({list(styles)})")
    return list(styles).index(style)


if __name__ == "__main__":
    print(json.dumps(measure_instruments(), indent=2))
