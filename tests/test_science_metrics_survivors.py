"""Metric code pinned where the last mutation run (benchmarks/results/mutation/report.md) showed no
test would notice a change: the unit normalisation of CLIP features, the validation of attribute
questions, where the zero-shot answers live, how statistics enter torchmetrics' FID (side, device,
no cross-rank sum), the FID config checks and their messages, the Inception weights lookup, the
arguments run_fid passes on, and the seeded random extractor the FID tests run on."""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ccp.evaluation import fid as fid_module
from ccp.evaluation.attributes import AttributeQuestion, ZeroShotAttributePredictor, _normalise
from ccp.evaluation.fid import (
    INCEPTION_WEIGHTS_FILE,
    FeatureStats,
    FIDConfig,
    FIDConfigError,
    InceptionWeightsError,
    RandomConvFeatures,
    fill_metric_state,
    frechet_distance,
    hub_weights_path,
    resolve_inception_weights,
    run_fid,
)
from ccp.evaluation.inception import GivenFeatures


# --- _normalise: unit rows --------------------------------------------------------------------------
def test_normalise_makes_each_row_a_unit_vector():
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, -2.0]])  # norms 5, 0.5 (below 1) and 2
    expected = torch.tensor([[0.6, 0.8], [0.6, 0.8], [0.0, -1.0]])
    torch.testing.assert_close(_normalise(x), expected)
    # a zero vector stays zero (no division by zero)
    assert torch.equal(_normalise(torch.zeros(1, 3)), torch.zeros(1, 3))
    # the last axis of any shape: one vector, and a [2, 1, 2] batch
    torch.testing.assert_close(_normalise(torch.tensor([3.0, 4.0])), torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(_normalise(torch.tensor([[[3.0, 4.0]], [[0.0, 0.5]]])),
                               torch.tensor([[[0.6, 0.8]], [[0.0, 1.0]]]))


# --- AttributeQuestion validation ---------------------------------------------------------------------
TWO = {"a": ("a photo of a",), "b": ("a photo of b", "another photo of b")}


def refused(classes, accept) -> str:
    with pytest.raises(ValueError) as err:
        AttributeQuestion("q", classes, accept)
    return str(err.value)


def test_a_question_with_two_classes_and_one_accepted_is_valid():
    question = AttributeQuestion("q", TWO, ("b",))
    assert question.labels == ("a", "b") and question.accept == ("b",)
    three = AttributeQuestion("q", {**TWO, "c": ("c",)}, ("a", "c"))
    assert three.labels == ("a", "b", "c")


def test_invalid_questions_are_refused_saying_why():
    assert refused({"a": ("a",)}, ("a",)) == "'q': a question needs at least two competing classes"
    assert refused({"a": ("a",), "b": ()}, ("a",)) == "'q': every class needs at least one text prompt"
    assert refused(TWO, ("c",)) == "'q': accept=('c',) must name classes of ['a', 'b']"
    assert refused(TWO, ("a", "c")) == "'q': accept=('a', 'c') must name classes of ['a', 'b']"
    assert refused(TWO, ()) == "'q': accept=() must name classes of ['a', 'b']"
    assert refused(TWO, ("a", "b")) == "'q': every class is accepted, so the answer would always be yes"


# --- zero-shot predictor: unknown attributes, answer type and device ----------------------------------
class AxisEmbeddings(ZeroShotAttributePredictor):
    """Class "a" along e0, "b" along e1; an image is given as its feature vector. `device` is where
    the text features live (meta stands in for an accelerator: shapes and devices, no values)."""

    def __init__(self, device="cpu"):
        super().__init__({"q": AttributeQuestion("q", TWO, ("b",))})
        self.device = torch.device(device)

    def encode_texts(self, texts):
        rows = [[1.0, 0.0] if t == "a photo of a" else [0.0, 2.0] for t in texts]
        return torch.tensor(rows, device=self.device)

    def encode_images(self, images):
        return torch.tensor(images, dtype=torch.float32)


def test_an_unknown_attribute_is_refused_before_anything_is_encoded():
    with pytest.raises(ValueError) as err:
        AxisEmbeddings().question("wearing a scarf")
    assert str(err.value) == ("AxisEmbeddings cannot decide ['wearing a scarf']; it knows ['q'] "
                              "(add an AttributeQuestion for each)")
    assert AxisEmbeddings().question("q").accept == ("b",)


def test_winners_are_class_indices_for_every_batch_size():
    predictor = AxisEmbeddings()
    winners = predictor._winners([[0.1, 3.0], [5.0, 0.2]], "q")
    assert winners.dtype == torch.long and winners.tolist() == [1, 0]
    empty = predictor._winners([], "q")
    assert empty.dtype == torch.long and empty.shape == (0,)
    assert predictor.predict([[0.1, 3.0], [5.0, 0.2]], "q").tolist() == [True, False]


def test_answers_live_on_the_device_of_the_class_features():
    predictor = AxisEmbeddings("meta")
    assert predictor.class_features("q").device.type == "meta"
    # image features come from another device: they are moved to the class features', as are the answers
    assert predictor.predict([[0.1, 3.0], [5.0, 0.2]], "q").device.type == "meta"
    assert predictor.predict([], "q").device.type == "meta"


# --- statistics into torchmetrics' FID ----------------------------------------------------------------
def new_metric(dim=3):
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=GivenFeatures(dim), sync_on_compute=False)


FEATURES = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0], [2.0, 2.0, 0.0], [1.0, -1.0, 1.0]], dtype=torch.float64)


def test_statistics_fill_the_real_side_by_default_and_only_the_side_asked_for():
    stats = FeatureStats.from_features(FEATURES)
    metric = new_metric()
    fill_metric_state(metric, stats)
    assert torch.equal(metric.real_features_sum, FEATURES.sum(0))
    assert torch.equal(metric.real_features_cov_sum, FEATURES.T @ FEATURES)
    assert int(metric.real_features_num_samples) == 4
    assert not metric.fake_features_sum.any() and not metric.fake_features_cov_sum.any()
    assert int(metric.fake_features_num_samples) == 0
    fill_metric_state(metric, FeatureStats.from_features(FEATURES[:2]), real=False)
    assert torch.equal(metric.fake_features_sum, FEATURES[:2].sum(0))
    assert int(metric.fake_features_num_samples) == 2
    assert int(metric.real_features_num_samples) == 4  # untouched


def test_statistics_of_another_width_are_refused():
    with pytest.raises(ValueError) as err:
        fill_metric_state(new_metric(3), FeatureStats.from_features(torch.ones(2, 2)))
    assert str(err.value) == "the metric has 3-d features, the statistics 2-d"


def test_statistics_move_to_the_metric_device():
    metric = new_metric().to("meta")  # stands in for an accelerator
    fill_metric_state(metric, FeatureStats.from_features(FEATURES))
    assert metric.real_features_sum.device.type == "meta"
    assert metric.real_features_cov_sum.device.type == "meta"


def numpy_frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Independent FID: scipy's matrix square root on numpy moments."""
    import numpy as np
    from scipy import linalg

    a, b = a.double().numpy(), b.double().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


FAKE = torch.tensor([[0.5, 1.0, 1.0], [2.0, -1.0, 0.0], [1.0, 1.0, 3.0], [0.0, 0.5, -2.0], [1.5, 0.0, 1.0]],
                    dtype=torch.float64)


def test_frechet_distance_matches_scipy_and_warns_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "compute before update" warning leaks out
        value = frechet_distance(FeatureStats.from_features(FEATURES), FeatureStats.from_features(FAKE))
    assert value == pytest.approx(numpy_frechet(FEATURES, FAKE), rel=1e-6)


def test_frechet_distance_is_per_rank_even_under_torch_distributed(monkeypatch):
    # every rank computes the FID of the complete statistics it was given (fid_from_shards after the barrier):
    # the metric must not sum them across ranks. A second rank holding the same statistics is simulated.
    import torchmetrics.metric

    real, fake = FeatureStats.from_features(FEATURES), FeatureStats.from_features(FAKE)
    expected = numpy_frechet(FEATURES, FAKE)
    monkeypatch.setattr(torchmetrics.metric, "jit_distributed_available", lambda: True)
    monkeypatch.setattr(torchmetrics.metric, "gather_all_tensors", lambda t, group=None: [t, t.clone()])
    assert frechet_distance(real, fake) == pytest.approx(expected, rel=1e-6)


def test_adding_statistics_of_another_width_is_refused():
    with pytest.raises(ValueError) as err:
        FeatureStats.from_features(torch.ones(2, 3)).add_(FeatureStats.from_features(torch.ones(2, 2)))
    assert str(err.value) == "cannot add statistics of 2-d features to 3-d ones"


# --- Inception weights lookup ------------------------------------------------------------------------
@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def test_hub_weights_path_is_where_torch_hub_keeps_checkpoints(torch_home):
    # torch.hub.load_state_dict_from_url saves to <hub dir>/checkpoints/<file name>
    assert hub_weights_path() == torch_home / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"


def test_weights_come_from_the_setting_else_the_hub_cache(torch_home, tmp_path):
    given = tmp_path / "inception.pth"
    given.write_bytes(b"x")
    hub = torch_home / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    with pytest.raises(InceptionWeightsError) as err:
        resolve_inception_weights(None)
    message = str(err.value)
    assert message.startswith(f"FID needs the InceptionV3 weights file {INCEPTION_WEIGHTS_FILE} ")
    assert f"here: fid.inception_weights is not set and the torch hub cache has no {hub}. " in message
    assert message.endswith(f"or put it at {hub} (the torch hub cache, $TORCH_HOME/hub/checkpoints/).")
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"x")
    assert resolve_inception_weights(None) == hub
    assert resolve_inception_weights(given) == given  # the setting wins over the cache
    missing = tmp_path / "missing.pth"
    with pytest.raises(InceptionWeightsError) as err:
        resolve_inception_weights(missing)
    assert f"here: fid.inception_weights={missing} does not exist. " in str(err.value)


# --- FIDConfig -------------------------------------------------------------------------------------
@pytest.fixture
def valid(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    weights = tmp_path / INCEPTION_WEIGHTS_FILE
    weights.write_bytes(b"stands for the weights")
    return dict(real_path=str(real), shard_dir=str(tmp_path / "shards"), inception_weights=str(weights))


def config_error(**settings) -> str:
    with pytest.raises(FIDConfigError) as err:
        FIDConfig(**settings).check()
    return str(err.value)


def test_smallest_valid_settings_pass_and_give_the_weights(valid):
    cfg = FIDConfig(**valid, resolution=1, num_samples=2, shard_size=1, batch_size=1, feature_batch_size=1)
    assert cfg.check() == Path(valid["inception_weights"])
    assert cfg.check(need_weights=False) is None


@pytest.mark.parametrize("key", ["resolution", "num_samples", "shard_size", "batch_size", "feature_batch_size"])
@pytest.mark.parametrize("value", [0, -3, 2.5, True, "8"])
def test_sizes_must_be_positive_integers(valid, key, value):
    assert config_error(**valid, **{key: value}) == f"fid.{key} must be a positive integer, got {value!r}"


def test_each_missing_setting_is_named(valid, tmp_path):
    assert config_error(**valid | {"num_samples": 1}) == "fid.num_samples must be at least 2"
    assert config_error(**valid | {"shard_dir": None}) == (
        "fid.shard_dir is not set; set fid.shard_dir=/path/for/sample/shards")
    missing = tmp_path / "no-such-folder"
    for real_path in (str(missing), None, ""):
        assert config_error(**valid | {"real_path": real_path}) == (
            f"fid.real_path={real_path} is not a folder; set it to the real images (e.g. data/ffhq)")


def test_unknown_settings_are_refused_listing_the_known_ones():
    known = sorted(f.name for f in dataclasses.fields(FIDConfig))
    with pytest.raises(FIDConfigError) as err:
        FIDConfig.from_mapping({"num_samples": 10, "samples": 10, "resolutoin": 64})
    assert str(err.value) == f"unknown fid setting(s) ['resolutoin', 'samples']; known: {known}"
    assert FIDConfig.from_mapping({"num_samples": 10}).num_samples == 10


# --- run_fid: what it passes on ----------------------------------------------------------------------
class Stop(Exception):
    """Raised by a patched step to end run_fid once the arguments it passed on are recorded."""


def test_run_fid_builds_the_extractor_from_a_mapping_config_with_its_weights_and_device(valid, monkeypatch):
    seen = {}

    def extractor(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        raise Stop

    monkeypatch.setattr(fid_module, "inception_feature_extractor", extractor)
    with pytest.raises(Stop):
        run_fid({**valid, "resolution": 64, "antialias": True}, lambda indices, seed: None, device="meta")
    assert seen["args"] == (Path(valid["inception_weights"]), "meta")
    assert seen["kwargs"] == {"antialias": True}


def test_run_fid_passes_the_sampler_and_shows_progress_by_default(valid, monkeypatch):
    seen = {}

    def real_statistics(source, extractor, **kwargs):
        seen["real_progress"] = kwargs["progress"]
        return "real-stats"

    def fid_over_samples(generate_fn, *args, **kwargs):
        seen["generate_fn"], seen["fake_progress"] = generate_fn, kwargs["progress"]
        return 3.5

    monkeypatch.setattr(fid_module, "real_statistics", real_statistics)
    monkeypatch.setattr(fid_module, "fid_over_samples", fid_over_samples)

    def generate(indices, seed):
        return None

    assert run_fid(FIDConfig(**valid), generate, feature_extractor=RandomConvFeatures()) == 3.5
    assert seen == {"real_progress": True, "generate_fn": generate, "fake_progress": True}


def test_run_fid_refuses_samples_of_another_size_saying_what_to_do(valid):
    def generate(indices, seed):
        return None

    generate.height, generate.width = 64, 64
    with pytest.raises(FIDConfigError) as err:
        run_fid(FIDConfig(**valid, resolution=32), generate, feature_extractor=RandomConvFeatures())
    assert str(err.value) == ("samples are height 64 but fid.resolution=32: the real images are resized to "
                              "fid.resolution, so sample at that size (or set fid.resolution to the sample size)")


# --- RandomConvFeatures: the test extractor is fixed by its seed -------------------------------------
def reference_parameters(seed):
    """N(0, 0.5^2) draws from a generator seeded with `seed`, in parameter order: conv 3->6 (3x3), fc 24->8."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * 0.5 for shape in ((6, 3, 3, 3), (6,), (8, 24), (8,))]


def reference_features(images, conv_w, conv_b, fc_w, fc_b):
    """The net written out: [-1, 1] pixels, bilinear resize to 16, 3x3 conv stride 2 (-> 7x7), tanh,
    2x2 adaptive average pool (bins rows/cols 0-3 and 3-6 of 7), flatten channel-major, linear."""
    x = F.interpolate(images.float() / 127.5 - 1.0, size=(16, 16), mode="bilinear", align_corners=False)
    h = torch.tanh(F.conv2d(x, conv_w, conv_b, stride=2))
    assert h.shape[-2:] == (7, 7)
    bins = (slice(0, 4), slice(3, 7))
    pooled = torch.stack([torch.stack([h[:, :, r, c].mean(dim=(-2, -1)) for c in bins], -1) for r in bins], -2)
    return pooled.reshape(images.shape[0], 24) @ fc_w.T + fc_b


def test_random_conv_features_are_fixed_by_the_seed(monkeypatch):
    torch.manual_seed(123)  # the global generator plays no part
    net = RandomConvFeatures()
    params = list(net.parameters())
    assert [tuple(p.shape) for p in params] == [(6, 3, 3, 3), (6,), (8, 24), (8,)]
    for p, q in zip(params, reference_parameters(0)):
        assert torch.equal(p, q)
    torch.manual_seed(7)
    assert all(torch.equal(p, q) for p, q in zip(RandomConvFeatures(0).parameters(), params))
    assert not any(torch.equal(p, q) for p, q in zip(RandomConvFeatures(1).parameters(), params))
    assert not any(p.requires_grad for p in params) and not net.training
    assert net.num_features == 8


def test_random_conv_features_compute_the_documented_net():
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (3, 3, 20, 24), generator=g, dtype=torch.uint8)
    net = RandomConvFeatures(2)
    features = net(images)
    assert features.shape == (3, 8) and features.dtype == torch.float32
    torch.testing.assert_close(features, reference_features(images, *reference_parameters(2)), rtol=1e-5, atol=1e-6)
    # mid-grey is 0 after the [-1, 1] mapping (127.5 would be; 128 is 1/127.5 above it)
    grey = torch.full((1, 3, 16, 16), 128, dtype=torch.uint8)
    conv_w, conv_b, fc_w, fc_b = reference_parameters(2)
    inner = torch.tanh(conv_b + conv_w.sum(dim=(1, 2, 3)) * (128 / 127.5 - 1))  # constant image: constant conv output
    torch.testing.assert_close(net(grey), (inner.repeat_interleave(4) @ fc_w.T + fc_b)[None], rtol=1e-5, atol=1e-6)
    assert not math.isnan(float(features.sum()))
