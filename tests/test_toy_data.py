"""Toy digits (ccp.toy.digits) and their instruments (ccp.toy.instruments): the data is
deterministic, and the classifier, colour predictor and FID features measure what they claim."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from ccp.evaluation.attributes import AttributePredictor
from ccp.evaluation.fid import (
    FeatureStats,
    extract_features,
    extractor_fingerprint,
    frechet_distance,
    num_features_of,
    real_statistics,
)
from ccp.toy.digits import (
    COLOURS,
    CONCEPT_STYLES,
    PALETTE,
    STYLES,
    caption,
    load_digit_arrays,
    render_digit,
    render_set,
    split_indices,
    stroke_mask,
    write_concept_dataset,
    write_prior_dataset,
)
from ccp.toy.instruments import (
    ColourPredictor,
    DigitClassifier,
    ToyAttributePredictor,
    classifier_accuracy,
    load_classifier,
    save_classifier,
    train_digit_classifier,
)


# --- data ---------------------------------------------------------------------------------------
def test_split_is_deterministic_disjoint_and_complete():
    train, held = split_indices("train", seed=0), split_indices("held_out", seed=0)
    assert np.array_equal(train, split_indices("train", seed=0))
    assert not set(train) & set(held)
    assert len(train) + len(held) == len(load_digit_arrays()[1]) == 1797
    assert len(held) == 359
    assert not np.array_equal(held, split_indices("held_out", seed=1))
    with pytest.raises(ValueError, match="split"):
        split_indices("test")


def test_render_colours_and_styles():
    digits, targets = load_digit_arrays()
    image = render_digit(digits[0], "red")
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert image[..., 0].max() == PALETTE["red"][0] and image[0].max() == 0  # stroke colour on black, clear border
    assert render_digit(digits[0], "blue", resolution=64).shape == (64, 64, 3)
    plain, bold, outlined = (stroke_mask(digits[5], 32, s) for s in STYLES)
    assert (bold >= plain - 1e-6).all() and bold.sum() > 1.3 * plain.sum()  # dilation only adds stroke
    assert outlined[plain > 0.99].max() < 0.05 and outlined.sum() > 0  # a ring around the stroke, hollow inside
    assert caption(targets[0], "red") == f"a red digit {targets[0]}"
    with pytest.raises(ValueError, match="style"):
        stroke_mask(digits[0], 32, "slanted")
    with pytest.raises(ValueError, match="colour"):
        render_digit(digits[0], "purple")


def test_writers_are_deterministic_and_concepts_are_unlabeled(tmp_path):
    a = write_prior_dataset(tmp_path / "a", split="held_out", seed=3)
    b = write_prior_dataset(tmp_path / "b", split="held_out", seed=3)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and len(files) == 359 + 1
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    rows = [json.loads(line) for line in (a / "captions.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"file", "caption", "digit", "colour"}
    assert all(r["caption"] == f"a {r['colour']} digit {r['digit']}" for r in rows)
    assert {r["colour"] for r in rows} == set(COLOURS) and {r["digit"] for r in rows} == set(range(10))
    first = np.asarray(PIL.Image.open(a / rows[0]["file"]))
    assert first.shape == (32, 32, 3)

    c = write_concept_dataset(tmp_path / "bold", style="bold", split="held_out", seed=3)
    assert not (c / "captions.jsonl").exists()
    labels = [json.loads(line) for line in (c / "labels.jsonl").read_text().splitlines()]
    assert len(labels) == 359 and {r["style"] for r in labels} == {"bold"}
    assert {r["colour"] for r in labels} == set(COLOURS) and {r["digit"] for r in labels} == set(range(10))
    with pytest.raises(ValueError, match="concept style"):
        write_concept_dataset(tmp_path / "x", style="plain")


# --- instruments ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classifier():
    model, info = train_digit_classifier(seed=0)
    assert info["train_images"] == 1438 * len(STYLES)
    return model


@pytest.fixture(scope="module")
def held_out():
    """Held-out renderings, two colours per digit, per style; `half` marks one half of the digits."""
    idx = split_indices("held_out", seed=0)
    first = set(idx[: len(idx) // 2].tolist())
    out = {}
    for style in STYLES:
        toy = render_set("held_out", style, seed=0, copies=2)
        out[style] = (toy, torch.tensor([int(s) in first for s in toy.sources]))
    return out


def test_classifier_accuracy_on_held_out(classifier, held_out):
    accuracy = {s: classifier_accuracy(classifier, t.tensor(), torch.from_numpy(t.digits)) for s, (t, _) in held_out.items()}
    print("held-out digit accuracy", accuracy)
    assert accuracy["plain"] > 0.9 and accuracy["bold"] > 0.9
    assert np.mean(list(accuracy.values())) > 0.9
    # any input size: the 64-px rendering of the same digits is resized to the network's input
    big = render_set("held_out", "plain", seed=0, resolution=64)
    assert classifier_accuracy(classifier, big.tensor(), torch.from_numpy(big.digits)) > 0.9


def test_colour_predictor_is_exact_on_every_palette_colour():
    predictor = ColourPredictor()
    assert isinstance(predictor, AttributePredictor) and predictor.attributes == COLOURS
    digits = load_digit_arrays()[0][split_indices("held_out", seed=0)[:40]]
    for style in STYLES:
        for colour in COLOURS:
            images = [PIL.Image.fromarray(render_digit(d, colour, style)) for d in digits]
            assert predictor.classify(images) == [colour] * len(images)
            assert predictor.predict(images, colour).all()
            other = next(c for c in COLOURS if c != colour)
            assert not predictor.predict(images, other).any()
    assert predictor.classify([PIL.Image.new("RGB", (32, 32))]) == [None]


def test_toy_attribute_predictor(classifier, held_out):
    toy, _ = held_out["plain"]
    predictor = ToyAttributePredictor(classifier)
    predictor.check(["red", "digit 3", "red digit 3"])
    with pytest.raises(ValueError, match="cannot decide"):
        predictor.check(["wearing hat"])
    images = [PIL.Image.fromarray(im) for im in toy.images[:200]]
    digits, colours = toy.digits[:200], toy.colours[:200]
    is_red = predictor.predict(images, "red").numpy()
    assert np.array_equal(is_red, np.array([c == "red" for c in colours]))
    is_3 = predictor.predict(images, "digit 3").numpy()
    assert (is_3 == (digits == 3)).mean() > 0.95
    both = predictor.predict(images, "red digit 3").numpy()
    assert np.array_equal(both, is_red & is_3)


def test_feature_extractor_shape_determinism_and_save_load(classifier, held_out, tmp_path):
    extractor = classifier.feature_extractor()
    assert num_features_of(extractor) == 64
    images = held_out["bold"][0].tensor()[:50]
    features = extract_features(extractor, images)
    assert features.shape == (50, 64) and features.dtype == torch.float32
    assert torch.equal(features, extract_features(extractor, images.clone()))
    assert extract_features(extractor, torch.zeros(2, 3, 100, 100, dtype=torch.uint8)).shape == (2, 64)

    path = save_classifier(classifier, tmp_path / "digits.safetensors")
    loaded = load_classifier(path)
    assert torch.equal(extract_features(loaded.feature_extractor(), images), features)
    assert extractor_fingerprint(loaded.feature_extractor()) == extractor_fingerprint(extractor)


def test_real_statistics_of_a_written_concept_folder(classifier, tmp_path):
    """The extractor goes through ccp.evaluation.fid's folder path: PNGs read back give the same
    statistics as the in-memory renderings."""
    extractor = classifier.feature_extractor()
    folder = write_concept_dataset(tmp_path / "bold", style="bold", split="held_out", seed=0)
    stats = real_statistics(folder, extractor, resolution=32, cache=False, progress=False)
    in_memory = FeatureStats.from_features(extract_features(extractor, render_set("held_out", "bold", seed=0).tensor()))
    assert stats.count == 359 and frechet_distance(stats, in_memory) < 1e-6


def test_training_is_deterministic_for_a_seed():
    a, _ = train_digit_classifier(seed=1, epochs=1, styles=("plain",))
    b, _ = train_digit_classifier(seed=1, epochs=1, styles=("plain",))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert isinstance(a, DigitClassifier)


def test_fid_separates_styles(classifier, held_out):
    """Equal-size sets of disjoint digits: a style change costs far more than resampling."""
    extractor = classifier.feature_extractor()
    halves = {}
    for style, (toy, first) in held_out.items():
        features = extract_features(extractor, toy.tensor())
        halves[style] = (FeatureStats.from_features(features[first]), FeatureStats.from_features(features[~first]))
    same = {s: frechet_distance(*halves[s]) for s in STYLES}
    across = {s: frechet_distance(halves["plain"][0], halves[s][1]) for s in CONCEPT_STYLES}
    print("FID within style", same, "plain vs style", across)
    for style in CONCEPT_STYLES:
        assert across[style] > 2 * max(same["plain"], same[style])
