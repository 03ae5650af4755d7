"""Attribute predictors for text-guided alignment (Table 2, Appendix D.3, Table 3).

The paper generates 100 images for each of the ten prompts of Table 3 and asks "facial attribute
predictors" (unspecified) whether the requested attribute is present; alignment is the share of
images where it is. Here the question is data: an `AttributeQuestion` names competing classes,
each described by a few text prompts, and the classes that count as "present". The default
predictor answers by CLIP zero-shot classification (ViT-L/14 from a local weights file): the
image's nearest class (cosine similarity to the mean of the class's normalised prompt embeddings)
decides. Binary attributes compete against a description of their absence; gender, ethnicity,
eyewear and face shape compete against every other class of their group (see `QUESTIONS` and
docs/alignment.md).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Mapping, Sequence

import PIL.Image
import torch

from ccp.config import ConfigError
from ccp.evaluation.stand_in import is_torchscript, warn_if_stand_in

# Table 3, in the paper's order ("smilling" in the paper is a typo for "smiling").
TABLE3_PROMPTS: tuple[str, ...] = (
    "wearing glasses",
    "wearing sunglasses",
    "wearing hat",
    "smiling",
    "male",
    "female",
    "white people",
    "black people",
    "asian people",
    "square face",
)

DEFAULT_CLIP_WEIGHTS = "checkpoints/clip/ViT-L-14.pt"
CLIP_VIT_L14_URL = (
    "https://openaipublic.azureedge.net/clip/models/"
    "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt"
)


@dataclass(frozen=True, eq=False)
class AttributeQuestion:
    """Which of `classes` (label -> text prompts) an image shows; the attribute is present when
    the winning class is one of `accept`."""

    attribute: str
    classes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    accept: tuple[str, ...] = ()

    def __post_init__(self):
        if len(self.classes) < 2:
            raise ValueError(f"{self.attribute!r}: a question needs at least two competing classes")
        if any(not prompts for prompts in self.classes.values()):
            raise ValueError(f"{self.attribute!r}: every class needs at least one text prompt")
        unknown = [label for label in self.accept if label not in self.classes]
        if not self.accept or unknown:
            raise ValueError(f"{self.attribute!r}: accept={self.accept!r} must name classes of {list(self.classes)}")
        if set(self.accept) == set(self.classes):
            raise ValueError(f"{self.attribute!r}: every class is accepted, so the answer would always be yes")

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.classes)


# --- the competing classes, as data ------------------------------------------------------------
EYEWEAR = {
    "eyeglasses": ("a photo of a person wearing eyeglasses", "a photo of a face with clear glasses"),
    "sunglasses": ("a photo of a person wearing sunglasses", "a photo of a face with dark sunglasses"),
    "no glasses": ("a photo of a person not wearing glasses", "a photo of a face without glasses"),
}
HEADWEAR = {
    "hat": ("a photo of a person wearing a hat", "a photo of a face with a hat on the head"),
    "no hat": ("a photo of a person not wearing a hat", "a photo of a face with uncovered hair"),
}
EXPRESSION = {
    "smiling": ("a photo of a smiling person", "a photo of a face with a smile"),
    "not smiling": ("a photo of a person who is not smiling", "a photo of a face with a neutral expression"),
}
GENDER = {
    "male": ("a photo of a man", "a photo of a male face"),
    "female": ("a photo of a woman", "a photo of a female face"),
}
# FairFace's seven race groups, the usual face-attribute taxonomy (also CLIP paper §7.1).
ETHNICITY = {
    "white": ("a photo of a white person",),
    "black": ("a photo of a black person",),
    "east asian": ("a photo of an east asian person",),
    "southeast asian": ("a photo of a southeast asian person",),
    "indian": ("a photo of an indian person",),
    "latino hispanic": ("a photo of a latino hispanic person",),
    "middle eastern": ("a photo of a middle eastern person",),
}
# The five face shapes of common face-shape classifiers.
FACE_SHAPE = {
    "square": ("a photo of a person with a square face", "a photo of a face with a square jawline"),
    "round": ("a photo of a person with a round face",),
    "oval": ("a photo of a person with an oval face",),
    "oblong": ("a photo of a person with a long face",),
    "heart": ("a photo of a person with a heart-shaped face",),
}

QUESTIONS: dict[str, AttributeQuestion] = {
    q.attribute: q
    for q in (
        # CelebA's "Eyeglasses" counts sunglasses too; "wearing sunglasses" needs dark lenses.
        AttributeQuestion("wearing glasses", EYEWEAR, ("eyeglasses", "sunglasses")),
        AttributeQuestion("wearing sunglasses", EYEWEAR, ("sunglasses",)),
        AttributeQuestion("wearing hat", HEADWEAR, ("hat",)),
        AttributeQuestion("smiling", EXPRESSION, ("smiling",)),
        AttributeQuestion("male", GENDER, ("male",)),
        AttributeQuestion("female", GENDER, ("female",)),
        AttributeQuestion("white people", ETHNICITY, ("white",)),
        AttributeQuestion("black people", ETHNICITY, ("black",)),
        AttributeQuestion("asian people", ETHNICITY, ("east asian", "southeast asian")),
        AttributeQuestion("square face", FACE_SHAPE, ("square",)),
    )
}


# --- predictors --------------------------------------------------------------------------------
class AttributePredictor(ABC):
    """Says, per image, whether an attribute is present."""

    @property
    @abstractmethod
    def attributes(self) -> tuple[str, ...]:
        """The attributes it can decide."""

    @abstractmethod
    def predict(self, images: Sequence[PIL.Image.Image], attribute: str) -> torch.Tensor:
        """Bool tensor [len(images)]: is `attribute` present in each image."""

    def check(self, attributes: Sequence[str]) -> None:
        """Raise before any generation if some attribute cannot be decided."""
        missing = [a for a in attributes if a not in self.attributes]
        if missing:
            raise ValueError(
                f"{type(self).__name__} cannot decide {missing}; it knows {list(self.attributes)} "
                "(add an AttributeQuestion for each)"
            )


class ZeroShotAttributePredictor(AttributePredictor):
    """Nearest-class decision in a joint image-text embedding space.

    A class's feature is the normalised mean of its prompts' normalised text features (prompt
    ensembling); an image belongs to the class of highest cosine similarity. Subclasses provide
    the two encoders.
    """

    def __init__(self, questions: Mapping[str, AttributeQuestion] = QUESTIONS):
        self.questions = dict(questions)
        self._class_features: dict[str, torch.Tensor] = {}

    @property
    def attributes(self) -> tuple[str, ...]:
        return tuple(self.questions)

    @abstractmethod
    def encode_images(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        """[N, D] image features (any scale)."""

    @abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """[T, D] text features (any scale)."""

    def class_features(self, attribute: str) -> torch.Tensor:
        """[K, D] unit class features, in the question's class order (computed once)."""
        if attribute not in self._class_features:
            question = self.question(attribute)
            features = []
            for prompts in question.classes.values():
                per_prompt = _normalise(self.encode_texts(list(prompts)).float())
                features.append(_normalise(per_prompt.mean(dim=0, keepdim=True)))
            self._class_features[attribute] = torch.cat(features)
        return self._class_features[attribute]

    def question(self, attribute: str) -> AttributeQuestion:
        if attribute not in self.questions:
            self.check([attribute])
        return self.questions[attribute]

    def classify(self, images: Sequence[PIL.Image.Image], attribute: str) -> list[str]:
        """The winning class label per image."""
        labels = self.question(attribute).labels
        return [labels[i] for i in self._winners(images, attribute).tolist()]

    def predict(self, images, attribute):
        question = self.question(attribute)
        winners = self._winners(images, attribute)
        accepted = torch.tensor([question.labels.index(label) for label in question.accept], device=winners.device)
        return torch.isin(winners, accepted)

    def _winners(self, images, attribute) -> torch.Tensor:
        classes = self.class_features(attribute)
        if len(images) == 0:
            return torch.zeros(0, dtype=torch.long, device=classes.device)
        image_features = _normalise(self.encode_images(images).float()).to(classes.device)
        return (image_features @ classes.T).argmax(dim=1)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class CLIPWeightsError(ConfigError, ValueError):
    """The CLIP weights file cannot be loaded; the message says what to put where."""


# clip.load's preprocessing: OpenAI CLIP's image normalisation
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@lru_cache(maxsize=None)
def clip_module(name: str) -> ModuleType:
    """clip-anytorch's ``clip/<name>.py`` (``model``, ``simple_tokenizer``) run from the installed file
    without running ``clip/__init__.py``: that imports clip/clip.py, which imports pkg_resources, gone
    from setuptools >= 81. The file is found beside CLIP's vocabulary, as `ccp.priors.tokenizer` finds it."""
    from ccp.priors.tokenizer import clip_package_file

    path = clip_package_file(f"{name}.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"clip-anytorch's {path} was not found; pip install clip-anytorch")
    spec = importlib.util.spec_from_file_location(f"_ccp_clip_anytorch_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def clip_preprocess(n_px: int):
    """The image transform ``clip.load`` returns for a model of input resolution `n_px`."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    return Compose([Resize(n_px, interpolation=InterpolationMode.BICUBIC), CenterCrop(n_px), _to_rgb, ToTensor(),
                    Normalize(CLIP_MEAN, CLIP_STD)])


def _to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    return image.convert("RGB")


def load_clip(weights: str | Path, device: str | torch.device = "cpu"):
    """(model, preprocess) exactly as ``clip.load(weights, device, jit=False)`` gives them, without
    importing the ``clip`` package: the state dict of the TorchScript archive (OpenAI's files) or of a
    plain state-dict file, `build_model` (the architecture from the tensor shapes), fp16 weights made
    float32 on the CPU, and clip.load's preprocessing. Raises `CLIPWeightsError` for a file that is not
    CLIP weights."""
    path = Path(weights).expanduser()
    build_model = clip_module("model").build_model
    try:
        if is_torchscript(path):
            with warnings.catch_warnings():  # OpenAI ships TorchScript; torch >= 2.10 deprecates reading it
                warnings.filterwarnings("ignore", message=".*torch.jit.load.*is deprecated", category=FutureWarning)
                state_dict = torch.jit.load(str(path), map_location="cpu").eval().state_dict()
        else:
            state_dict = torch.load(str(path), map_location="cpu")
        model = build_model(state_dict).to(device)
    except Exception as err:
        raise CLIPWeightsError(
            f"{path} could not be loaded as CLIP weights ({type(err).__name__}: {err}); download "
            f"{CLIP_VIT_L14_URL} again and point text.clip_weights (text_alignment.clip_weights) at it"
        ) from err
    if str(device) == "cpu":
        model.float()
    return model, clip_preprocess(model.visual.input_resolution)


def clip_tokenize(texts: Sequence[str], context_length: int = 77) -> torch.Tensor:
    """``clip.tokenize(texts)``: [len(texts), 77] token ids (start, BPE, end, zeros), by clip-anytorch's
    own tokenizer; a text longer than `context_length` tokens raises, as clip.tokenize does."""
    tokenizer = _simple_tokenizer()
    sot, eot = tokenizer.encoder["<|startoftext|>"], tokenizer.encoder["<|endoftext|>"]
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        tokens = [sot, *tokenizer.encode(text), eot]
        if len(tokens) > context_length:
            raise RuntimeError(f"Input {text} is too long for context length {context_length}")
        result[i, : len(tokens)] = torch.tensor(tokens)
    return result


@lru_cache(maxsize=1)
def _simple_tokenizer():
    return clip_module("simple_tokenizer").SimpleTokenizer()


class CLIPAttributePredictor(ZeroShotAttributePredictor):
    """CLIP zero-shot attribute predictor (clip-anytorch), ViT-L/14 by default.

    `weights` is a local file (OpenAI's ``ViT-L-14.pt``, JIT archive or state dict); nothing is
    downloaded. The file is checked here, so an evaluation fails before generating anything. It is
    loaded as ``clip.load(weights, jit=False)`` loads it (`load_clip`), without importing ``clip``.
    A stand-in file (`ccp.evaluation.stand_in`) loads with a warning and ``stand_in_weights = True``.
    """

    def __init__(
        self,
        weights: str | Path = DEFAULT_CLIP_WEIGHTS,
        questions: Mapping[str, AttributeQuestion] = QUESTIONS,
        device: str | torch.device | None = None,
        batch_size: int = 32,
    ):
        super().__init__(questions)
        self.weights = Path(weights).expanduser()
        if not self.weights.is_file():
            raise FileNotFoundError(
                f"CLIP weights not found at {self.weights.resolve()}. The text-guided evaluation uses CLIP "
                f"ViT-L/14 from a local file: download {CLIP_VIT_L14_URL} on a machine with network access "
                f"and put it at {self.weights.resolve()}, or point the config's clip_weights at the file."
            )
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.preprocess = load_clip(self.weights, self.device)
        self.model.eval().requires_grad_(False)
        self.stand_in_weights = warn_if_stand_in(self.weights, "CLIP weights")
        self._tokenize = clip_tokenize
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def encode_images(self, images):
        features = []
        for start in range(0, len(images), self.batch_size):
            pixels = torch.stack([self.preprocess(im) for im in images[start : start + self.batch_size]])  # converts to RGB
            features.append(self.model.encode_image(pixels.to(self.device)).float())
        return torch.cat(features)

    @torch.no_grad()
    def encode_texts(self, texts):
        return self.model.encode_text(self._tokenize(list(texts)).to(self.device)).float()
