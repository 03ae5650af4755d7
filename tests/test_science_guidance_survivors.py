"""Guidance config parsing and condition identity, pinned where the last mutation run
(benchmarks/results/mutation/report.md) showed no test would notice a change: the merge key of a
condition with several control images or scales, the resolution of named control images kept as
lists (one per output) and tuples (one per ControlNet), per-ControlNet control scales read from a
config, and the messages of refused inputs (each names the setting and the fix)."""

from __future__ import annotations

import pytest
import torch

from ccp.guidance.combine import combine, reference_prediction
from ccp.guidance.terms import Condition, GuidanceConfigError, GuidanceSpec


class Image:
    """A stand-in control image: compared by identity, as the plan compares images."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"Image({self.name})"


# --- Condition.key: what the plan merges on ----------------------------------------------------------
def test_key_of_per_controlnet_scales_is_a_hashable_tuple_equal_for_list_and_tuple():
    as_list = Condition(prompt="p", control_scale=[1.0, 0.5])
    as_tuple = Condition(prompt="p", control_scale=(1.0, 0.5))
    assert as_list.key() == ("p", None, (1.0, 0.5))
    assert as_list.key() == as_tuple.key()
    assert {as_list.key(): "once"}[as_tuple.key()] == "once"  # usable as a dict key: the plan's merge table
    assert Condition(prompt="p", control_scale=[1.0, 0.6]).key() != as_list.key()
    assert Condition(prompt="p", control_scale=0.5).key() == ("p", None, 0.5)


def test_key_of_one_image_per_controlnet_is_the_identity_of_each():
    a, b, c = Image("a"), Image("b"), Image("c")
    assert Condition(control_image=(a, b)).key() == (None, (id(a), id(b)), 1.0)
    assert Condition(control_image=(a, b)).key() == Condition(control_image=(a, b)).key()
    # another image for the second ControlNet, or the same images swapped: a different input, never merged
    assert Condition(control_image=(a, c)).key() != Condition(control_image=(a, b)).key()
    assert Condition(control_image=(b, a)).key() != Condition(control_image=(a, b)).key()
    # nested: a ControlNet without an image keeps its None
    assert Condition(control_image=(a, None)).key() == (None, (id(a), None), 1.0)


# --- from_config: named control images ----------------------------------------------------------------
def spec_with(term: dict, control_images=None) -> GuidanceSpec:
    entry = {"denoiser": "controlnet", "weight": 2.0, "prompt": "a face", **term}
    return GuidanceSpec.from_config({"terms": {"control": entry}}, control_images)


def test_named_control_images_resolve_inside_lists_and_tuples_keeping_their_kind():
    edges, depth = Image("edges"), Image("depth")
    named = {"edges": edges, "depth": depth}
    # a list: one image per output (stays a list)
    image = spec_with({"control_image": ["edges", "depth", "edges"]}, named).terms[0].source.condition.control_image
    assert type(image) is list and image == [edges, depth, edges] and image[0] is edges
    # a tuple: one image per ControlNet (stays a tuple); an unknown name is a path and stays as it is
    image = spec_with({"control_image": ("edges", "cond/pose.png")}, named).terms[0].source.condition.control_image
    assert type(image) is tuple and image == (edges, "cond/pose.png")
    # per output, per ControlNet
    image = spec_with({"control_image": [("edges", "depth"), ("depth", "edges")]}, named).terms[0].source.condition.control_image
    assert type(image) is list and image == [(edges, depth), (depth, edges)]
    assert all(type(im) is tuple for im in image)
    # a single name and no image at all
    assert spec_with({"control_image": "depth"}, named).terms[0].source.condition.control_image is depth
    assert spec_with({}, named).terms[0].source.condition.control_image is None


# --- from_config: numbers ---------------------------------------------------------------------------
def test_per_controlnet_control_scales_are_read_as_a_tuple_of_floats():
    condition = spec_with({"control_scale": [0.5, "1.5", 2]}).terms[0].source.condition
    assert condition.control_scale == (0.5, 1.5, 2.0)
    assert type(condition.control_scale) is tuple and all(type(s) is float for s in condition.control_scale)
    assert spec_with({"control_scale": (0.25,)}).terms[0].source.condition.control_scale == (0.25,)
    assert spec_with({"control_scale": "0.75"}).terms[0].source.condition.control_scale == 0.75


def test_a_bad_per_controlnet_scale_is_named_by_its_index():
    with pytest.raises(GuidanceConfigError) as err:
        spec_with({"control_scale": [0.5, "strong"]})
    assert str(err.value) == ("guidance.terms.control.control_scale[1] must be a number, got 'strong' "
                              "(e.g. guidance.terms.control.control_scale[1]=1.5)")


def test_a_boolean_is_not_a_number():
    with pytest.raises(GuidanceConfigError) as err:
        spec_with({"weight": True})
    assert str(err.value) == "guidance.terms.control.weight must be a number, got True"
    with pytest.raises(GuidanceConfigError) as err:
        spec_with({"control_scale": [1.0, False]})
    assert str(err.value) == "guidance.terms.control.control_scale[1] must be a number, got False"


# --- combine / reference_prediction: refusals ---------------------------------------------------------
def test_nothing_to_combine_is_refused_with_its_reason():
    with pytest.raises(ValueError) as err:
        combine(None, [], [])
    assert str(err.value) == "nothing to combine: no unconditional prediction and no terms"


def test_reference_prediction_without_weights_or_unconditional_is_refused_with_its_reason():
    a, b = torch.ones(2), torch.zeros(2)
    with pytest.raises(ValueError) as err:
        reference_prediction(None, [a, b], [1.0, -1.0])  # weights sum to zero: nothing to normalise by
    assert str(err.value) == "no reference prediction: weights sum to zero and no unconditional"
    # with the unconditional it falls back to it
    uncond = torch.full((2,), 3.0)
    assert torch.equal(reference_prediction(uncond, [a, b], [1.0, -1.0]), uncond)
