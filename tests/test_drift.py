"""Unconditional drift (ccp.evaluation.drift): the method's unconditional source alone vs the prior's,
same seeds; an unchanged UNet gives no drift, a perturbed one does."""

from __future__ import annotations

import copy

import pytest
import torch

from ccp.evaluation.drift import DriftConfig, UnconditionalSamples, drift, prior_unconditional, sample_unconditional
from ccp.guidance import Condition, GuidanceSpec, Source
from ccp.methods import method_class
from ccp.methods.base import PromptTemplate
from ccp.methods.export import TrainedModel
from ccp.pipelines.gcfg import GCFGPipeline
from ccp.toy.digits import STYLES
from ccp.toy.instruments import DigitClassifier, digit_judge, style_index, train_digit_classifier

CONFIG = DriftConfig(num_samples=8, steps=2, height=64, width=64, batch_size=4, seed=3)


@pytest.fixture(scope="module")
def pipe(tiny_prior):
    pipe = GCFGPipeline.from_prior(tiny_prior)
    pipe.add_denoiser("same", tiny_prior.unet)  # the prior's own weights under another name
    perturbed = copy.deepcopy(tiny_prior.unet)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.5 * (p.std() if p.numel() > 1 else 0.1))
    pipe.add_denoiser("perturbed", perturbed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def judge():
    # one epoch (a few seconds): an untrained network's features are ~constant, so every FID ~0
    classifier, _ = train_digit_classifier(seed=0, epochs=1)
    return digit_judge(classifier)


def _own(denoiser: str) -> GuidanceSpec:
    return GuidanceSpec(terms=(), unconditional=Source(denoiser, Condition(prompt="")))


def test_unchanged_unet_has_no_drift_and_a_perturbed_one_does(pipe, judge):
    prior = sample_unconditional(pipe, prior_unconditional(), judge, CONFIG)
    same = sample_unconditional(pipe, _own("same"), judge, CONFIG)
    moved = sample_unconditional(pipe, _own("perturbed"), judge, CONFIG)
    assert prior.features.shape == (8, 64) and prior.styles.shape == (8,)
    assert torch.equal(same.features, prior.features)  # same seeds, same weights: the same images
    bold = style_index("bold")
    still = drift(same, prior, bold)
    shifted = drift(moved, prior, bold)
    assert still["num_samples"] == shifted["num_samples"] == 8
    assert still["style_share"] == still["prior_style_share"]
    assert shifted["prior_style_share"] == still["prior_style_share"]
    assert abs(still["fid"]) < 1e-3
    assert shifted["fid"] > 0.05 and shifted["fid"] > 1000 * abs(still["fid"]), (still, shifted)
    assert not torch.equal(moved.features, prior.features)


def test_ours_falls_back_to_the_prior_and_a_baseline_to_its_own_model(pipe, judge):
    template = PromptTemplate()
    ours = TrainedModel(pipe, "concept", method_class("ours"), template).unconditional()
    dreambooth = TrainedModel(pipe, "dreambooth", method_class("dreambooth"), template).unconditional()
    assert ours.terms == () and ours.unconditional == Source("prior", Condition(prompt=""))
    assert dreambooth.terms == () and dreambooth.unconditional == Source("dreambooth", Condition(prompt=""))
    # ours is not special-cased: its unconditional is sampled, and equals the prior's
    small = DriftConfig(num_samples=2, steps=2, height=64, width=64, batch_size=2, seed=3)
    a = sample_unconditional(pipe, ours, judge, small)
    b = sample_unconditional(pipe, prior_unconditional(), judge, small)
    assert drift(a, b, 1)["fid"] == pytest.approx(0.0, abs=1e-3)


def test_style_share_counts_the_concept_style():
    features = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    own = UnconditionalSamples(features, torch.tensor([1, 1, 0, 2]))
    prior = UnconditionalSamples(features + 1.0, torch.tensor([0, 0, 0, 1]))
    result = drift(own, prior, style_index("bold"))
    assert STYLES[1] == "bold"
    assert result["style_share"] == 0.5 and result["prior_style_share"] == 0.25
    assert result["fid"] == pytest.approx(3.0, rel=1e-6)  # shifted by 1 in each of 3 dims, same covariance
    with pytest.raises(ValueError, match="same DriftConfig"):
        drift(UnconditionalSamples(features[:2], torch.tensor([0, 0])), prior, 1)
    with pytest.raises(ValueError, match="style head"):
        style_index("italic")
    with pytest.raises(ValueError, match="num_samples"):
        DriftConfig(num_samples=1).check()


def test_digit_judge_reads_the_style_head():
    torch.manual_seed(1)
    classifier = DigitClassifier().eval()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    features, styles = digit_judge(classifier, batch_size=2)(images)
    with torch.no_grad():
        expected = classifier.style_head(classifier.features(images)).argmax(1)
    assert features.shape == (5, 64)
    assert torch.equal(styles, expected)
