"""Guidance specs cut to a batch of outputs (ccp/guidance/terms.py, GuidanceSpec.for_outputs) and
the CLIP attribute predictor's set-up and decision (ccp/evaluation/attributes.py), pinned where the
mutation run of 2026-11-29 (benchmarks/results/mutation/report.md) left survivors.

CLIP itself is replaced by a stand-in `clip` module on sys.path that records how it is loaded
(the weights path, device and jit flag), so device choice, batch size and freezing are checked
without a model; its import warns the way clip-anytorch's import of pkg_resources does.
"""

from __future__ import annotations


import pytest
import torch

from ccp.evaluation.attributes import AttributeQuestion, CLIPAttributePredictor, ZeroShotAttributePredictor
from ccp.guidance.terms import Condition, GuidanceSpec, GuidanceTerm, Source


# --- GuidanceSpec.for_outputs ---------------------------------------------------------------------------
def spec_with(*images, rescale=0.0, uncond_image=None):
    terms = tuple(GuidanceTerm(f"t{i}", Source(f"net{i}", Condition("p", image, 0.5)), 1.0 + i)
                  for i, image in enumerate(images))
    return GuidanceSpec(terms=terms, unconditional=Source("prior", Condition("", uncond_image)), rescale=rescale)


def images_of(spec):
    return [t.source.condition.control_image for t in spec.terms]


def test_a_per_output_list_is_cut_to_the_positions_and_keeps_the_rest_of_the_source():
    per_output = ["a", "b", "c"]
    spec = spec_with(per_output)
    out = spec.for_outputs([2, 0], 3)
    (term,) = out.terms
    assert term.source.condition.control_image == ["c", "a"]
    assert (term.name, term.weight, term.source.denoiser) == ("t0", 1.0, "net0")
    assert (term.source.condition.prompt, term.source.condition.control_scale) == ("p", 0.5)
    assert per_output == ["a", "b", "c"]


def test_the_cut_keeps_rescale():
    out = spec_with(["a", "b"], rescale=0.7).for_outputs([1], 2)
    assert out.rescale == 0.7
    assert images_of(out) == [["b"]]


def test_two_outputs_are_cut_too():
    # total 2 is per-output (only a single output makes a one-entry list ambiguous)
    assert images_of(spec_with(["a", "b"]).for_outputs([1], 2)) == [["b"]]


def test_different_lists_are_cut_each_and_one_shared_list_once():
    shared, other = ["a", "b", "c"], ["x", "y", "z"]
    out = spec_with(shared, other, shared, uncond_image=other).for_outputs([1, 2], 3)
    first, second, third = images_of(out)
    assert first == ["b", "c"] and second == ["y", "z"] and third == ["b", "c"]
    assert third is first  # the same list is cut once: those conditions still share it
    assert out.unconditional.condition.control_image is second


def test_one_entry_per_controlnet_each_cut_or_kept():
    single = "edge map"
    spec = spec_with((["a", "b", "c"], single))
    (image,) = images_of(spec.for_outputs([0, 2], 3))
    assert image == (["a", "c"], "edge map")
    assert isinstance(image, tuple) and image[1] is single


def test_per_output_lists_inside_another_list_are_cut():
    nested = [["a", "b"], ["c", "d"], ["e", "f"]]  # three entries, each one per output of 2
    assert images_of(spec_with(nested).for_outputs([1], 2)) == [[["b"], ["d"], ["f"]]]


@pytest.mark.parametrize("image, positions, total", [
    (["a", "b"], [0, 2], 3),  # a list that is not one per output stays as given
    (["a"], [0], 1),          # a single output: nothing to cut
    ("a", [1], 2),            # one image for all outputs
    (None, [1], 2),
])
def test_sources_without_a_per_output_list_are_kept_as_they_are(image, positions, total):
    spec = spec_with(image)
    out = spec.for_outputs(positions, total)
    assert out.terms[0].source is spec.terms[0].source
    assert out.unconditional is spec.unconditional


# --- ZeroShotAttributePredictor.predict ------------------------------------------------------------------
class FixedWinners(ZeroShotAttributePredictor):
    """Winners given as they are, on the device they are given on."""

    def __init__(self, winners):
        super().__init__({"q": AttributeQuestion("q", {"x": ("x",), "y": ("y",), "z": ("z",)}, ("z", "x"))})
        self.winners = winners

    def encode_images(self, images):
        raise AssertionError("not used")

    def encode_texts(self, texts):
        raise AssertionError("not used")

    def _winners(self, images, attribute):
        return self.winners


def test_predict_accepts_the_accepted_classes_indices():
    predictor = FixedWinners(torch.tensor([0, 1, 2, 2, 1]))
    assert predictor.predict([None] * 5, "q").tolist() == [True, False, True, True, False]


def test_predict_builds_the_accepted_indices_on_the_winners_device(monkeypatch):
    seen = []
    isin = torch.isin

    def recording_isin(elements, test_elements):
        seen.append((elements.device, test_elements.device, test_elements.tolist() if test_elements.device.type != "meta" else None))
        return isin(elements, test_elements)

    monkeypatch.setattr(torch, "isin", recording_isin)
    result = FixedWinners(torch.zeros(3, dtype=torch.long, device="meta")).predict([None] * 3, "q")
    assert seen == [(torch.device("meta"), torch.device("meta"), None)]  # meta stands in for an accelerator
    assert result.device == torch.device("meta") and result.shape == (3,)


# --- CLIPAttributePredictor: how CLIP is loaded ---------------------------------------------------------
@pytest.fixture
def fake_clip(tmp_path, monkeypatch):
    """`load_clip` stood in for (recording its calls, returning a small module); and a weights file."""
    import ccp.evaluation.attributes as attributes

    loads = []

    def load_clip(weights, device="cpu"):
        loads.append(dict(weights=str(weights), device=device))
        return torch.nn.Linear(2, 2), "preprocess"

    monkeypatch.setattr(attributes, "load_clip", load_clip)
    weights = tmp_path / "ViT-L-14.pt"
    weights.write_bytes(b"weights")
    return weights, loads


def build(fake, **kwargs):
    weights, loads = fake
    return CLIPAttributePredictor(weights, **kwargs), loads


def test_clip_loads_the_file_on_the_given_device_and_is_frozen(fake_clip):
    from ccp.evaluation.attributes import clip_tokenize

    predictor, loads = build(fake_clip, device="cuda:3")
    assert predictor.device == torch.device("cuda", 3)
    assert loads == [dict(weights=str(fake_clip[0]), device=torch.device("cuda", 3))]
    assert isinstance(predictor.model, torch.nn.Linear) and predictor.preprocess == "preprocess"
    assert predictor.model.training is False
    assert [p.requires_grad for p in predictor.model.parameters()] == [False, False]
    assert predictor._tokenize is clip_tokenize
    assert predictor.batch_size == 32
    assert predictor.stand_in_weights is False  # a file without the stand-in marker


def test_batch_size_is_an_int(fake_clip):
    predictor, _ = build(fake_clip, device="cpu", batch_size=5.0)
    assert predictor.batch_size == 5 and type(predictor.batch_size) is int


@pytest.mark.parametrize("available, expected", [(True, "cuda"), (False, "cpu")])
def test_without_a_device_clip_goes_to_cuda_when_there_is_one(fake_clip, monkeypatch, available, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    predictor, loads = build(fake_clip)
    assert predictor.device == torch.device(expected)
    assert [load["device"] for load in loads] == [torch.device(expected)]
