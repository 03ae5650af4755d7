"""Metric definitions on hand-built cases: edge F1 (tolerance, precision/recall orientation), every
Table 3 attribute question, the Fréchet distance in closed form, and FID's resize setting from the
configs to the feature extractor."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ccp.config import compose
from ccp.evaluation import fid as fid_module
from ccp.evaluation.attributes import QUESTIONS, TABLE3_PROMPTS, ZeroShotAttributePredictor
from ccp.evaluation.canny import DEFAULT_TOLERANCE, disk, edge_f1
from ccp.evaluation.fid import FeatureStats, frechet_distance, run_fid


# --- edge F1 ----------------------------------------------------------------------------------------
def line(rows, col, size=20):
    m = np.zeros((size, size), dtype=np.uint8)
    m[rows, col] = 255
    return m


def test_edge_f1_tolerance_is_two_pixels_euclidean():
    assert DEFAULT_TOLERANCE == 2
    cond = line(slice(2, 12), 5)
    # a copy shifted by 2 columns: every pixel at distance exactly 2, inside the default tolerance
    assert edge_f1(cond, line(slice(2, 12), 7)).as_dict() == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    # shifted by 3: every pixel 3 away, outside it
    assert edge_f1(cond, line(slice(2, 12), 8)).f1 == 0.0
    # tolerance 0 is exact overlap
    assert edge_f1(cond, line(slice(2, 12), 6), tolerance=0).f1 == 0.0
    assert edge_f1(cond, cond, tolerance=0).f1 == 1.0
    # Euclidean, not chessboard or city-block: (1, 1) is sqrt(2) away, (2, 1) is sqrt(5) > 2; in every direction
    single = np.zeros((9, 9), dtype=np.uint8)
    single[4, 4] = 255
    for (dy, dx), inside in {(1, 1): True, (2, 0): True, (0, 2): True, (2, 1): False, (2, 2): False}.items():
        for sy in (1, -1):
            for sx in (1, -1):
                other = np.zeros_like(single)
                other[4 + sy * dy, 4 + sx * dx] = 255
                expected = 1.0 if inside else 0.0
                assert edge_f1(single, other).as_dict() == dict(precision=expected, recall=expected, f1=expected)
                assert edge_f1(other, single).as_dict() == dict(precision=expected, recall=expected, f1=expected)
    # the structuring elements themselves: r = 0 is the pixel alone, r = 2 the 13 offsets with dy^2 + dx^2 <= 4
    assert disk(0).tolist() == [[1]]
    assert disk(2).tolist() == [[0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0], [0, 0, 1, 0, 0]]
    # tolerance 1: a one-pixel shift matches, a diagonal one (sqrt(2)) does not
    assert edge_f1(cond, line(slice(2, 12), 6), tolerance=1).f1 == 1.0
    assert edge_f1(single, np.roll(np.roll(single, 1, 0), 1, 1), tolerance=1).f1 == 0.0


def test_edge_f1_outside_the_image_is_not_edge():
    # an edge pixel on the image border is far from the other map's only pixel: no match through the border
    cond, gen = np.zeros((12, 12), np.uint8), np.zeros((12, 12), np.uint8)
    cond[6, 6] = 255
    gen[0, 0] = gen[11, 11] = gen[0, 11] = 255
    assert edge_f1(cond, gen).as_dict() == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


@pytest.mark.parametrize("tolerance", [-1, 1.5])
def test_edge_f1_tolerance_must_be_a_non_negative_integer(tolerance):
    cond = line(slice(2, 12), 5)
    with pytest.raises(ValueError, match="non-negative integer"):
        edge_f1(cond, cond, tolerance=tolerance)


def test_edge_f1_refuses_maps_it_cannot_compare():
    with pytest.raises(ValueError, match="differ in size"):
        edge_f1(np.zeros((8, 8)), np.zeros((8, 9)))
    with pytest.raises(ValueError, match="edge map, got shape"):
        edge_f1(np.zeros((2, 8, 8, 3)), np.zeros((2, 8, 8, 3)))


def test_edge_precision_is_over_generated_and_recall_over_condition():
    cond = line(slice(2, 12), 5)  # 10 edge pixels
    gen = cond.copy()
    gen[2:12, 15] = 255  # the same 10 plus 10 spurious ones, 10 columns away
    score = edge_f1(cond, gen)
    # precision: 10 of the 20 generated pixels are near the condition; recall: all 10 condition pixels are found
    assert score.precision == pytest.approx(0.5) and score.recall == pytest.approx(1.0)
    assert score.f1 == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    swapped = edge_f1(gen, cond)  # a generated map missing half the condition's edges
    assert swapped.precision == pytest.approx(1.0) and swapped.recall == pytest.approx(0.5)
    # neither perfect: 4 of 10 condition pixels found, 4 of 20 generated pixels right (exact overlap)
    cond = line(slice(0, 10), 2)
    gen = line(slice(6, 10), 2)
    gen[0:16, 12] = 255
    score = edge_f1(cond, gen, tolerance=0)
    assert (score.precision, score.recall) == pytest.approx((0.2, 0.4))
    assert score.f1 == pytest.approx(2 * 0.2 * 0.4 / 0.6)


def test_edge_f1_empty_maps():
    empty, cond = np.zeros((8, 8), np.uint8), line(slice(1, 4), 2, size=8)
    assert edge_f1(empty, empty).as_dict() == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert edge_f1(cond, empty).as_dict() == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert edge_f1(empty, cond).f1 == 0.0
    # three-channel maps (a ControlNet condition image) count a pixel as edge when any channel is set
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[1:4, 2, 1] = 255
    assert edge_f1(rgb, cond, tolerance=0).f1 == 1.0


# --- Table 3 attribute questions ------------------------------------------------------------------------
# Written from the paper's prompts, not read from the code: for each prompt, which competing answers
# count as the attribute being present.
ACCEPTED = {
    "wearing glasses": {"eyeglasses", "sunglasses"},
    "wearing sunglasses": {"sunglasses"},
    "wearing hat": {"hat"},
    "smiling": {"smiling"},
    "male": {"male"},
    "female": {"female"},
    "white people": {"white"},
    "black people": {"black"},
    "asian people": {"east asian", "southeast asian"},
    "square face": {"square"},
}
REJECTED = {
    "wearing glasses": {"no glasses"},
    "wearing sunglasses": {"eyeglasses", "no glasses"},
    "wearing hat": {"no hat"},
    "smiling": {"not smiling"},
    "male": {"female"},
    "female": {"male"},
    "white people": {"black", "east asian", "southeast asian", "indian", "latino hispanic", "middle eastern"},
    "black people": {"white", "east asian", "southeast asian", "indian", "latino hispanic", "middle eastern"},
    "asian people": {"white", "black", "indian", "latino hispanic", "middle eastern"},
    "square face": {"round", "oval", "oblong", "heart"},
}


class RandomEmbeddings(ZeroShotAttributePredictor):
    """Texts get fixed random 64-d features; an "image" is given as the class it should show and is
    embedded at the sum of that class's unit prompt features (so it is nearest that class)."""

    def __init__(self):
        super().__init__()
        self.table: dict[str, torch.Tensor] = {}

    def encode_texts(self, texts):
        for t in texts:
            if t not in self.table:
                g = torch.Generator().manual_seed(len(self.table) + 1)
                self.table[t] = torch.randn(64, generator=g) * (1 + len(self.table) % 3)  # any scale
        return torch.stack([self.table[t] for t in texts])

    def encode_images(self, images):
        rows = []
        for attribute, label in images:
            prompts = self.questions[attribute].classes[label]
            feats = self.encode_texts(list(prompts))
            rows.append((feats / feats.norm(dim=-1, keepdim=True)).sum(0) * 3.0)
        return torch.stack(rows)


def test_table3_prompts_each_have_a_question():
    assert set(TABLE3_PROMPTS) == set(QUESTIONS) == set(ACCEPTED)
    assert len(TABLE3_PROMPTS) == 10


@pytest.mark.parametrize("attribute", sorted(ACCEPTED))
def test_each_answer_is_accepted_or_rejected_as_the_prompt_means(attribute):
    predictor = RandomEmbeddings()
    labels = ACCEPTED[attribute] | REJECTED[attribute]
    assert set(QUESTIONS[attribute].labels) == labels  # no answer left unjudged
    images = [(attribute, label) for label in sorted(labels)]
    assert predictor.classify(images, attribute) == sorted(labels)  # the nearest class wins
    present = predictor.predict(images, attribute).tolist()
    assert present == [label in ACCEPTED[attribute] for label in sorted(labels)]


# --- Fréchet distance ------------------------------------------------------------------------------
# Rows of a 4x4 Hadamard matrix without its constant column: three mean-zero, mutually orthogonal
# columns, each with sum of squares 4, so the unbiased covariance of mu + H diag(a) is diag(4 a^2 / 3).
H = torch.tensor([[1.0, 1, 1], [-1, 1, -1], [1, -1, -1], [-1, -1, 1]], dtype=torch.float64)


def gaussian_like(mu, scale):
    return torch.tensor(mu, dtype=torch.float64) + H * torch.tensor(scale, dtype=torch.float64)


def test_frechet_distance_of_diagonal_gaussians_in_closed_form():
    mu1, a1 = [0.0, 1.0, -2.0], [1.0, 2.0, 0.5]
    mu2, a2 = [0.5, -1.0, -2.0], [3.0, 2.0, 1.5]
    var1 = [4 * a * a / 3 for a in a1]
    var2 = [4 * a * a / 3 for a in a2]
    # ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), with diagonal S: sum (sqrt(v1) - sqrt(v2))^2
    expected = sum((x - y) ** 2 for x, y in zip(mu1, mu2)) + sum(
        (math.sqrt(v) - math.sqrt(w)) ** 2 for v, w in zip(var1, var2))
    real = FeatureStats.from_features(gaussian_like(mu1, a1))
    fake = FeatureStats.from_features(gaussian_like(mu2, a2).float())  # float32 features, as the extractor returns
    torch.testing.assert_close(real.mean, torch.tensor(mu1, dtype=torch.float64))
    torch.testing.assert_close(real.cov, torch.diag(torch.tensor(var1, dtype=torch.float64)))
    assert frechet_distance(real, fake) == pytest.approx(expected, rel=1e-5)
    assert frechet_distance(real, FeatureStats.from_features(gaussian_like(mu1, a1))) == pytest.approx(0.0, abs=1e-6)
    # statistics accumulated in parts are the statistics of the whole
    parts = FeatureStats.from_features(gaussian_like(mu2, a2)[:1]).add_(FeatureStats.from_features(gaussian_like(mu2, a2)[1:]))
    assert frechet_distance(real, parts) == pytest.approx(expected, rel=1e-5)


# --- FID resize setting: configs to the extractor ------------------------------------------------------
class ExtractorBuilt(Exception):
    pass


@pytest.fixture
def record_extractor(monkeypatch):
    seen = {}

    def fake_extractor(weights=None, device=None, antialias=False):
        seen["antialias"] = antialias
        raise ExtractorBuilt

    monkeypatch.setattr(fid_module, "inception_feature_extractor", fake_extractor)
    return seen


@pytest.fixture
def fid_files(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    weights = tmp_path / fid_module.INCEPTION_WEIGHTS_FILE
    weights.write_bytes(b"stands for the weights")
    return real, weights


@pytest.mark.parametrize("overrides, expected", [([], False), (["fid.antialias=true"], True)])
def test_eval_config_reaches_the_extractor_with_its_resize_setting(overrides, expected, record_extractor, fid_files, tmp_path):
    from ccp.evaluation.run import fid_config

    real, weights = fid_files
    cfg = compose("eval", overrides=[*overrides, f"fid.real_path={real}", f"fid.inception_weights={weights}"])
    fid_cfg = fid_config(cfg, tmp_path / "out")
    with pytest.raises(ExtractorBuilt):
        run_fid(fid_cfg, lambda indices: None, progress=False)
    assert record_extractor["antialias"] is expected


def test_reproduce_path_reaches_the_extractor_without_antialias(record_extractor, fid_files, tmp_path, monkeypatch):
    from ccp.reproduce import measure

    real, weights = fid_files

    def fid_metric(model, sampling, fid_cfg, feature_extractor=None, device=None, progress=True):
        return run_fid(fid_cfg, lambda indices: None, feature_extractor=feature_extractor, progress=False), None

    monkeypatch.setattr(measure, "fid_metric", fid_metric)
    monkeypatch.setattr(measure, "sampling_config", lambda cfg, weights, seed=0: None)
    cfg = compose("reproduce", overrides=[f"data.face.path={real}", f"fid.inception_weights={weights}",
                                          "fid.feature_extractor=inception"])
    cell = SimpleNamespace(dataset="face", dir=tmp_path / "cell", method="ours", model=None)
    with pytest.raises(ExtractorBuilt):
        measure.measure_fid(cfg, cell, progress=False, weights={"concept_weight": 1.0})
    assert record_extractor["antialias"] is False


def test_statistics_of_different_sizes_and_single_vectors():
    one = FeatureStats.from_features(torch.tensor([1.0, 2.0, 3.0]))  # one feature vector
    assert one.count == 1 and torch.equal(one.features_sum, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(one.features_cov_sum, torch.outer(one.features_sum, one.features_sum))
    with pytest.raises(ValueError, match="3-d, generated 2-d"):
        frechet_distance(one, FeatureStats.from_features(torch.ones(4, 2)))


def test_no_images_no_answers():
    answers = RandomEmbeddings().predict([], "smiling")
    assert answers.shape == (0,) and answers.dtype == torch.bool


def test_every_fid_setting_reaches_the_statistics_and_the_sampler(monkeypatch, fid_files, tmp_path):
    # the config's real-image settings go to the real statistics, its sample settings to the sharded sampler
    real, _ = fid_files
    seen = {}

    def real_statistics(source, extractor, **kwargs):
        seen["real"] = dict(kwargs, source=source, extractor=extractor)
        return "real-stats"

    def fid_over_samples(generate_fn, num_samples, real_stats, extractor, shard_dir, shard_size, rank, world_size, **kwargs):
        seen["fake"] = dict(kwargs, num_samples=num_samples, real_stats=real_stats, extractor=extractor,
                            shard_dir=shard_dir, shard_size=shard_size, rank=rank, world_size=world_size)
        return 12.5

    monkeypatch.setattr(fid_module, "real_statistics", real_statistics)
    monkeypatch.setattr(fid_module, "fid_over_samples", fid_over_samples)
    cfg = fid_module.FIDConfig(real_path=str(real), shard_dir=str(tmp_path / "shards"), resolution=64, num_samples=7,
                               shard_size=3, batch_size=2, seed=11, keep_images=True, center_crop=True,
                               max_real_images=5, stats_cache_dir=str(tmp_path / "stats"), feature_batch_size=4,
                               num_workers=0)
    extractor = fid_module.RandomConvFeatures(0)
    assert run_fid(cfg, lambda indices: None, feature_extractor=extractor, rank=1, world_size=3, run_key="k",
                   progress=False) == 12.5
    r = seen["real"]
    assert (r["source"], r["extractor"], r["resolution"], r["center_crop"], r["max_images"], r["cache_dir"],
            r["batch_size"], r["num_workers"], r["progress"]) == (str(real), extractor, 64, True, 5, str(tmp_path / "stats"),
                                                                 4, 0, False)
    f = seen["fake"]
    assert (f["num_samples"], f["real_stats"], f["extractor"], f["shard_dir"], f["shard_size"], f["rank"], f["world_size"],
            f["batch_size"], f["base_seed"], f["keep_images"], f["run_key"], f["progress"]) == (
        7, "real-stats", extractor, str(tmp_path / "shards"), 3, 1, 3, 2, 11, True, "k", False)
    # samples of another size than the real images' would compare different things: refused
    sized = lambda indices: None
    sized.height = 32
    with pytest.raises(fid_module.FIDConfigError, match="height 32 but fid.resolution=64"):
        run_fid(cfg, sized, feature_extractor=extractor, progress=False)
    sized.height, sized.width = 64, 48
    with pytest.raises(fid_module.FIDConfigError, match="width 48"):
        run_fid(cfg, sized, feature_extractor=extractor, progress=False)
