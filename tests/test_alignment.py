"""Text-guided and spatial-guided alignment (Table 2): edge F1 definitions on constructed maps,
attribute questions and predictors, the evaluation loops against a fake pipeline with known
answers, and spatial alignment end to end on the tiny prior with its ControlNet."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import PIL.Image
import pytest
import torch

from ccp.evaluation.alignment import (
    SpatialAlignmentConfig,
    TextAlignmentConfig,
    alignment_table,
    fit,
    select_conditions,
    spatial_alignment,
    spatial_guidance,
    text_alignment,
)
from ccp.evaluation.attributes import (
    QUESTIONS,
    TABLE3_PROMPTS,
    AttributeQuestion,
    CLIPAttributePredictor,
    ZeroShotAttributePredictor,
)
from ccp.evaluation.canny import canny_edges, disk, edge_f1, edge_map_image
from ccp.methods.base import PromptTemplate
from ccp.methods.dreambooth import DreamBooth
from ccp.methods.export import TrainedModel
from ccp.methods.ours import NullTextConcept

TEMPLATE = PromptTemplate()


# --- edge F1 ----------------------------------------------------------------------------------
def lines(size=40, *segments):
    """Edge map with horizontal segments (row, first column, last column)."""
    edges = np.zeros((size, size), np.uint8)
    for row, first, last in segments:
        edges[row, first : last + 1] = 255
    return edges


def test_identical_maps_score_one():
    edges = lines(40, (10, 0, 19), (25, 5, 30))
    assert edge_f1(edges, edges, tolerance=0).as_dict() == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert edge_f1(edges, edges, tolerance=2).f1 == 1.0


def test_disjoint_far_apart_lines_score_zero():
    score = edge_f1(lines(40, (5, 0, 39)), lines(40, (30, 0, 39)), tolerance=2)
    assert score.as_dict() == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_one_pixel_shift_is_matched_within_tolerance_only():
    cond, shifted = lines(40, (10, 0, 39)), lines(40, (11, 0, 39))
    assert edge_f1(cond, shifted, tolerance=2).f1 == 1.0
    assert edge_f1(cond, shifted, tolerance=1).f1 == 1.0
    assert edge_f1(cond, shifted, tolerance=0).f1 < 1.0
    assert edge_f1(cond, shifted, tolerance=0).f1 == 0.0


def test_tolerance_is_euclidean():
    assert disk(2).sum() == 13  # offsets with dy^2 + dx^2 <= 4
    point = np.zeros((20, 20), np.uint8)
    point[10, 10] = 255
    diagonal1, diagonal2 = np.zeros_like(point), np.zeros_like(point)
    diagonal1[11, 11] = diagonal2[12, 12] = 255
    assert edge_f1(point, diagonal1, tolerance=2).f1 == 1.0  # distance 1.41
    assert edge_f1(point, diagonal2, tolerance=2).f1 == 0.0  # distance 2.83
    assert edge_f1(point, diagonal2, tolerance=3).f1 == 1.0


def test_empty_map_conventions():
    empty, some = np.zeros((16, 16), np.uint8), lines(16, (3, 2, 9))
    assert edge_f1(empty, empty).as_dict() == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert edge_f1(some, empty).f1 == 0.0
    assert edge_f1(empty, some).f1 == 0.0


def test_partial_overlap_by_hand():
    cond = lines(40, (10, 0, 19))  # 20 pixels
    gen = lines(40, (10, 10, 14), (30, 0, 4))  # 5 on the condition line, 5 far from it
    exact = edge_f1(cond, gen, tolerance=0)
    assert exact.precision == 5 / 10 and exact.recall == 5 / 20
    assert exact.f1 == pytest.approx(2 * 0.5 * 0.25 / 0.75)  # 1/3
    # r = 2: the condition pixels within 2 of columns 10..14 are columns 8..16 -> 9 of 20
    tolerant = edge_f1(cond, gen, tolerance=2)
    assert tolerant.precision == 0.5 and tolerant.recall == 9 / 20
    assert tolerant.f1 == pytest.approx(2 * 0.5 * 0.45 / 0.95)


def test_edge_f1_rejects_maps_of_different_size():
    with pytest.raises(ValueError, match="differ in size"):
        edge_f1(np.zeros((8, 8)), np.zeros((8, 9)))


def test_canny_of_a_square_and_the_controlnet_image():
    image = np.zeros((32, 32, 3), np.uint8)
    image[8:24, 8:24] = 255
    edges = canny_edges(PIL.Image.fromarray(image))
    assert edges.dtype == np.uint8 and set(np.unique(edges)) == {0, 255}
    assert edges[:, :4].sum() == 0 and edges[14:18, 14:18].sum() == 0  # far from the border, inside
    assert edges[7:9, 8:24].any(axis=0).all()  # top side, within a pixel
    control = edge_map_image(edges)
    assert control.mode == "RGB" and (np.asarray(control) == edges[:, :, None]).all()
    assert (canny_edges(torch.from_numpy(image).permute(2, 0, 1).float() / 255) == edges).all()


# --- attribute questions and predictors -------------------------------------------------------
def test_questions_cover_table3():
    assert len(TABLE3_PROMPTS) == 10 and set(QUESTIONS) == set(TABLE3_PROMPTS)
    assert QUESTIONS["male"].classes is QUESTIONS["female"].classes
    assert len(QUESTIONS["asian people"].classes) == 7
    assert set(QUESTIONS["wearing glasses"].accept) == {"eyeglasses", "sunglasses"}


def test_question_validation():
    with pytest.raises(ValueError, match="two competing"):
        AttributeQuestion("x", {"a": ("a",)}, ("a",))
    with pytest.raises(ValueError, match="must name classes"):
        AttributeQuestion("x", {"a": ("a",), "b": ("b",)}, ("c",))
    with pytest.raises(ValueError, match="always be yes"):
        AttributeQuestion("x", {"a": ("a",), "b": ("b",)}, ("a", "b"))


COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "white": (1.0, 1.0, 1.0)}
COLOUR_CLASSES = {"red": ("a red image", "a red and white image"), "green": ("a green image",), "blue": ("a blue image",)}
COLOUR_QUESTIONS = {
    "red": AttributeQuestion("red", COLOUR_CLASSES, ("red",)),
    "blue": AttributeQuestion("blue", COLOUR_CLASSES, ("blue",)),
    "not green": AttributeQuestion("not green", COLOUR_CLASSES, ("red", "blue")),
}


class ColourPredictor(ZeroShotAttributePredictor):
    """Zero-shot on a 3-d 'embedding' whose answers are known: image = its mean RGB, text = the
    colour it names (a prompt naming two colours gets their mean)."""

    def encode_images(self, images):
        return torch.tensor(np.stack([np.asarray(im, np.float64).reshape(-1, 3).mean(0) for im in images]))

    def encode_texts(self, texts):
        return torch.tensor(np.array([np.mean([COLOURS[w] for w in t.split() if w in COLOURS], axis=0) for t in texts]))


def solid(rgb, size=8):
    return PIL.Image.new("RGB", (size, size), tuple(rgb))


def test_zero_shot_predictor_has_known_answers():
    predictor = ColourPredictor(COLOUR_QUESTIONS)
    images = [solid((200, 10, 10)), solid((10, 10, 200)), solid((10, 200, 10)), solid((120, 60, 100))]
    assert predictor.classify(images, "red") == ["red", "blue", "green", "red"]
    assert predictor.predict(images, "red").tolist() == [True, False, False, True]
    assert predictor.predict(images, "blue").tolist() == [False, True, False, False]
    assert predictor.predict(images, "not green").tolist() == [True, True, False, True]
    assert predictor.predict(images, "red").dtype == torch.bool
    assert predictor.predict([], "red").tolist() == []
    # prompt ensembling: the class feature is the normalised mean of the normalised prompt features
    red, pink = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 0.5, 0.5])
    mean = (red + pink / pink.norm()) / 2
    assert torch.allclose(predictor.class_features("red")[0], mean / mean.norm())
    with pytest.raises(ValueError, match="cannot decide"):
        predictor.predict(images, "purple")


@pytest.fixture(scope="module")
def tiny_clip_file(tmp_path_factory):
    """A randomly initialised, tiny CLIP (ViT) saved as a state dict, the way clip.load reads one."""
    from clip.model import CLIP

    torch.manual_seed(0)
    model = CLIP(embed_dim=16, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
                 context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.pt"
    torch.save(model.state_dict(), path)
    return path


def test_clip_predictor_loads_a_local_file_and_decides_by_nearest_class(tiny_clip_file):
    import clip

    predictor = CLIPAttributePredictor(tiny_clip_file, device="cpu")
    images = [solid((200, 10, 10), 40), solid((10, 10, 200), 48), solid((30, 160, 40), 32)]
    flags = predictor.predict(images, "wearing hat")
    assert flags.dtype == torch.bool and flags.shape == (3,)
    # the same decision computed by hand from the CLIP model
    model, preprocess = predictor.model, predictor.preprocess
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(im) for im in images])).float()
        classes = []
        for prompts in QUESTIONS["wearing hat"].classes.values():
            t = model.encode_text(clip.tokenize(list(prompts))).float()
            t = (t / t.norm(dim=-1, keepdim=True)).mean(0)
            classes.append(t / t.norm())
    winners = ((img / img.norm(dim=-1, keepdim=True)) @ torch.stack(classes).T).argmax(1)
    assert flags.tolist() == (winners == 0).tolist()  # class 0 is "hat"


class FakePipe:
    """GCFGPipeline-like: answers `pipe(guidance=..., generator=[...], ...)` with solid images
    whose colour is known from the prompt and each image's seed, and records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, guidance, num_images, height, width, num_inference_steps, generator, output_type, eta=0.0):
        seeds = [g.initial_seed() for g in generator]
        self.calls.append({"spec": guidance, "num_images": num_images, "seeds": seeds,
                           "size": (height, width), "steps": num_inference_steps, "output_type": output_type})
        words = " ".join(t.source.condition.prompt or "" for t in guidance.terms).replace(",", " ").split()
        images = []
        for seed in seeds:
            if "red" in words:  # right colour unless seed % 4 == 0: 3 of 4
                rgb = (10, 10, 200) if seed % 4 == 0 else (200, 10, 10)
            else:  # "blue": right colour for even seeds only: 1 of 2
                rgb = (10, 10, 200) if seed % 2 == 0 else (200, 10, 10)
            images.append(solid(rgb, width))
        return type("Output", (), {"images": images})()


@pytest.mark.parametrize("method_cls", [NullTextConcept, DreamBooth])
def test_text_alignment_per_prompt_and_mean(method_cls, tmp_path):
    pipe = FakePipe()
    denoiser = "concept" if method_cls is NullTextConcept else "dreambooth"
    config = TextAlignmentConfig(prompts=("red", "blue"), images_per_prompt=8, batch_size=3, steps=2,
                                 height=16, width=16, seed=100, concept_weight=1.25, control_weight=4.0)
    out = tmp_path / "results" / "text.json"
    result = text_alignment(TrainedModel(pipe, denoiser, method_cls, TEMPLATE), ColourPredictor(COLOUR_QUESTIONS),
                            config, out=out, image_dir=tmp_path / "images", progress=False)
    # seeds 100..107: red is right for 6 of 8 (seeds 100 and 104 are wrong), blue for 4 of 8
    assert result["per_prompt"] == {
        "red": {"alignment": 0.75, "found": 6, "total": 8},
        "blue": {"alignment": 0.5, "found": 4, "total": 8},
    }
    assert result["mean"] == 0.625 and result["num_images"] == 16 and result["method"] == method_cls.name
    # plumbing: per-image seeds in batches of 3, the method's own guidance with the prompt
    assert [c["seeds"] for c in pipe.calls] == [[100, 101, 102], [103, 104, 105], [106, 107]] * 2
    assert all(c["size"] == (16, 16) and c["steps"] == 2 and c["output_type"] == "pil" for c in pipe.calls)
    for prompt, call in (("red", pipe.calls[0]), ("blue", pipe.calls[3])):
        assert call["spec"] == method_cls.default_guidance(denoiser, TEMPLATE, prompt, 1.25, 4.0)
    prompts = [t.source.condition.prompt for t in pipe.calls[0]["spec"].terms]
    assert prompts == ([None, "red"] if method_cls is NullTextConcept else ["a photo of face, red"])
    # JSON written atomically, images saved
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert sorted(p.name for p in out.parent.iterdir()) == ["text.json"]
    assert len(list((tmp_path / "images" / "red").glob("*.png"))) == 8


def test_alignment_table_arithmetic():
    table = alignment_table({"a": [True, False, False, False], "b": torch.tensor([True, True]), "c": [False] * 3})
    assert table["per_prompt"]["a"] == {"alignment": 0.25, "found": 1, "total": 4}
    assert table["per_prompt"]["b"]["alignment"] == 1.0 and table["per_prompt"]["c"]["alignment"] == 0.0
    assert table["mean"] == pytest.approx((0.25 + 1.0 + 0.0) / 3)
    with pytest.raises(ValueError):
        alignment_table({"a": []})


def test_text_alignment_fails_before_sampling(tmp_path):
    pipe = FakePipe()
    model = TrainedModel(pipe, "concept", NullTextConcept, TEMPLATE)
    missing = tmp_path / "nowhere" / "ViT-L-14.pt"
    with pytest.raises(FileNotFoundError, match="ViT-L-14.pt") as err:
        text_alignment(model, config=TextAlignmentConfig(clip_weights=str(missing)))
    assert str(missing) in str(err.value) and "clip_weights" in str(err.value)
    with pytest.raises(ValueError, match="cannot decide"):
        text_alignment(model, ColourPredictor(COLOUR_QUESTIONS), TextAlignmentConfig(prompts=("red", "wearing hat")),
                       progress=False)
    assert pipe.calls == []


# --- spatial-guided -------------------------------------------------------------------------------
def test_select_conditions_and_fit(tmp_path):
    for i in range(6):
        solid((i * 40, 0, 0), 8).save(tmp_path / f"{i}.png")
    chosen = select_conditions(tmp_path, 3, seed=1)
    assert chosen == select_conditions(tmp_path, 3, seed=1) and len(set(chosen)) == 3
    assert chosen == sorted(chosen, key=lambda p: p.name)
    assert select_conditions(tmp_path, 6) == sorted(tmp_path.glob("*.png"))
    with pytest.raises(ValueError, match="fewer than"):
        select_conditions(tmp_path, 7)
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 10:30] = 255  # the centre square of a 2:1 image
    assert (np.asarray(fit(PIL.Image.fromarray(wide), 10, 10)) == 255).all()


def test_spatial_guidance_per_method():
    edges = object()
    config = SpatialAlignmentConfig(concept_weight=1.5, control_weight=6.0, control_scale=0.8)
    ours = spatial_guidance(TrainedModel(None, "concept", NullTextConcept, TEMPLATE), "prior+controlnet", edges, False,
                            config)
    assert [(t.name, t.source.denoiser, t.weight) for t in ours.terms] == [
        ("concept", "concept", 1.5), ("spatial", "prior+controlnet", 6.0)]
    spatial = ours.terms[1].source.condition
    assert spatial.control_image is edges and spatial.control_scale == 0.8 and spatial.prompt == ""
    assert ours.unconditional.denoiser == "prior" and ours.unconditional.condition.control_image is None
    # baselines: unconditional and CFG term both on the method's UNet + ControlNet
    base = spatial_guidance(TrainedModel(None, "dreambooth", DreamBooth, TEMPLATE), "dreambooth+controlnet", edges,
                            True, config)
    for source, prompt in ((base.unconditional, ""), (base.terms[0].source, "a photo of face")):
        assert source.denoiser == "dreambooth+controlnet"
        assert source.condition.prompt == prompt and source.condition.control_image is edges
    assert base.terms[0].weight == 6.0


class Spy:
    """Passes everything to the pipeline and records the guidance of each call."""

    def __init__(self, pipe):
        self.pipe, self.specs = pipe, []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, guidance, **kwargs):
        self.specs.append(guidance)
        return self.pipe(guidance=guidance, **kwargs)


@pytest.fixture(scope="module")
def condition_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("conditions")
    square = np.zeros((96, 96, 3), np.uint8)
    square[24:72, 24:72] = (230, 200, 180)
    disc = np.zeros((96, 96, 3), np.uint8)
    yy, xx = np.mgrid[:96, :96]
    disc[(yy - 48) ** 2 + (xx - 40) ** 2 < 30 ** 2] = (90, 160, 220)
    PIL.Image.fromarray(square).save(folder / "a_square.png")
    PIL.Image.fromarray(disc).save(folder / "b_disc.jpg")
    return folder


def test_spatial_alignment_end_to_end_on_the_tiny_prior(tiny_prior, tiny_prior_dir, condition_dir, tmp_path):
    from ccp.models.null_text_unet import NullTextUNet2DConditionModel
    from ccp.pipelines.gcfg import GCFGPipeline
    from ccp.priors import load_controlnet

    concept = NullTextUNet2DConditionModel.from_prior(tiny_prior.unet, tiny_prior.text_encoder, tiny_prior.tokenizer)
    spy = Spy(GCFGPipeline.from_prior(tiny_prior, concept_unet=concept))
    controlnet = load_controlnet(tiny_prior_dir / "controlnet")
    seen = []  # what the ControlNet's conditioning embedding receives
    controlnet.controlnet_cond_embedding.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    config = SpatialAlignmentConfig(num_conditions=2, samples_per_condition=1, steps=2, height=64, width=64)
    out = tmp_path / "spatial.json"
    result = spatial_alignment(TrainedModel(spy, "concept", NullTextConcept, TEMPLATE), condition_dir, controlnet,
                               config, out=out, image_dir=tmp_path / "images", progress=False)

    assert result["count"] == 2 and [c["condition"] for c in result["per_condition"]] == ["a_square.png", "b_disc.jpg"]
    scores = [s for c in result["per_condition"] for key in ("f1", "precision", "recall") for s in c[key]]
    assert all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in scores)
    assert result["mean_f1"] == pytest.approx(np.mean([c["f1"][0] for c in result["per_condition"]]))
    assert json.loads(out.read_text())["mean_f1"] == result["mean_f1"]
    # each call's spec: concept term + ControlNet term whose control image is that condition's canny map
    assert len(spy.specs) == 2
    for spec, name in zip(spy.specs, ["a_square.png", "b_disc.jpg"]):
        expected = canny_edges(fit(PIL.Image.open(condition_dir / name).convert("RGB"), 64, 64))
        assert expected.any()
        term = spec.terms[-1]
        assert term.source.denoiser == "prior+controlnet" and spec.terms[0].source.denoiser == "concept"
        assert (np.asarray(term.source.condition.control_image) == expected[:, :, None]).all()
    # ... and that map is what the ControlNet sees, at every step
    assert len(seen) == 2 * config.steps
    for i, name in enumerate(["a_square.png", "b_disc.jpg"]):
        expected = canny_edges(fit(PIL.Image.open(condition_dir / name).convert("RGB"), 64, 64))
        for cond in seen[i * config.steps : (i + 1) * config.steps]:
            assert torch.equal(cond[0, 0], torch.from_numpy(expected).float() / 255)
    saved = tmp_path / "images" / "a_square_png"
    assert (saved / "condition_canny.png").is_file() and (saved / "00000.png").is_file()


def test_spatial_alignment_baseline_puts_the_controlnet_on_its_own_unet(tiny_prior, tiny_prior_dir, condition_dir):
    from ccp.methods.dreambooth import register_unet_denoiser
    from ccp.priors import load_controlnet

    pipe, denoiser = register_unet_denoiser(tiny_prior, "dreambooth", copy.deepcopy(tiny_prior.unet))
    spy = Spy(pipe)
    config = SpatialAlignmentConfig(num_conditions=1, samples_per_condition=2, steps=2, height=64, width=64,
                                    seed=3, batch_size=1)
    result = spatial_alignment(TrainedModel(spy, denoiser, DreamBooth, TEMPLATE), condition_dir,
                               load_controlnet(tiny_prior_dir / "controlnet"), config, progress=False)
    assert result["count"] == 2 and len(result["per_condition"][0]["f1"]) == 2
    added = pipe.denoisers["dreambooth+controlnet"]
    assert added.unet is pipe.denoisers["dreambooth"].unet and added.unet is not tiny_prior.unet
    spec = spy.specs[0]
    assert spec.unconditional.denoiser == spec.terms[0].source.denoiser == "dreambooth+controlnet"
