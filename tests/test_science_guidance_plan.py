"""The guidance plan merges two sources into one evaluation exactly when the denoiser would be run
on the same input: the same denoiser under a condition equal in every field a denoiser reads
(prompt, control image, control scale). Anything else is evaluated separately, and each prediction
is routed back to its own place in Eq. 3."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ccp.guidance.combine import combine, reference_prediction
from ccp.guidance.plan import UNCONDITIONAL, GuidancePlan
from ccp.guidance.terms import Condition, GuidanceSpec, GuidanceTerm, Source

IMAGE_A = torch.zeros(1, 3, 8, 8)
IMAGE_B = torch.ones(1, 3, 8, 8)
BASE = Condition(prompt="a face", control_image=IMAGE_A, control_scale=0.8)
# For every field of Condition: a value different from BASE's (a new field must be added here,
# which forces a decision about whether the plan reads it)
CHANGED = {"prompt": "a face wearing glasses", "control_image": IMAGE_B, "control_scale": 0.5}


def spec_of(*sources, weights=None, unconditional=Source("prior", Condition(prompt=""))):
    weights = weights or [1.5] * len(sources)
    return GuidanceSpec(terms=tuple(GuidanceTerm(f"t{i}", s, w) for i, (s, w) in enumerate(zip(sources, weights))),
                        unconditional=unconditional)


def test_every_condition_field_is_covered():
    assert {f.name for f in dataclasses.fields(Condition)} == set(CHANGED)


def test_equal_conditions_on_one_denoiser_are_one_evaluation():
    same = Condition(prompt="a face", control_image=IMAGE_A, control_scale=0.8)  # equal, built separately
    plan = GuidancePlan.from_spec(spec_of(Source("controlnet", BASE), Source("controlnet", same)))
    calls = {c.denoiser: c for c in plan.calls}
    assert len(calls["controlnet"].conditions) == 1
    assert calls["controlnet"].slots == ((0, 1),)
    assert plan.batch_size(2) == {"prior": 2, "controlnet": 2}


@pytest.mark.parametrize("field", sorted(CHANGED))
def test_conditions_differing_in_any_field_are_never_merged(field):
    other = dataclasses.replace(BASE, **{field: CHANGED[field]})
    plan = GuidancePlan.from_spec(spec_of(Source("controlnet", BASE), Source("controlnet", other)))
    call = next(c for c in plan.calls if c.denoiser == "controlnet")
    assert len(call.conditions) == 2 and call.slots == ((0,), (1,))
    assert call.conditions[0] == BASE and call.conditions[1] == other


def test_equal_conditions_on_different_denoisers_are_not_merged():
    plain = Condition(prompt="a face")
    plan = GuidancePlan.from_spec(spec_of(Source("prior", plain), Source("concept", plain)))
    assert [(c.denoiser, c.slots) for c in plan.calls] == [("prior", ((UNCONDITIONAL,), (0,))), ("concept", ((1,),))]


def test_the_unconditional_merges_with_an_equal_term_condition():
    # a term on the prior with the empty prompt is the unconditional's own evaluation
    plan = GuidancePlan.from_spec(spec_of(Source("prior", Condition(prompt="")), Source("prior", Condition(prompt="x"))))
    (call,) = plan.calls
    assert call.slots == ((UNCONDITIONAL, 0), (1,))


def test_split_routes_every_chunk_back_to_its_sources():
    # three images; each evaluation of a call is a constant equal to (call number * 10 + condition number)
    spec = spec_of(Source("prior", Condition(prompt="x")), Source("concept", Condition()),
                   Source("prior", Condition(prompt="x")), Source("prior", Condition(prompt="")))
    plan = GuidancePlan.from_spec(spec)
    assert [(c.denoiser, c.slots) for c in plan.calls] == [
        ("prior", ((UNCONDITIONAL, 3), (0, 2))), ("concept", ((1,),))]
    outputs = {"prior": torch.cat([torch.full((3, 4, 2, 2), 0.0), torch.full((3, 4, 2, 2), 1.0)]),
               "concept": torch.full((3, 4, 2, 2), 10.0)}
    uncond, terms = plan.split(outputs)
    assert torch.all(uncond == 0.0)
    assert [float(t.unique()) for t in terms] == [1.0, 10.0, 1.0, 0.0]
    assert all(t.shape == (3, 4, 2, 2) for t in terms)


def test_unconditional_is_skipped_only_when_its_eq3_coefficient_is_zero():
    term = Source("concept", Condition())
    skipped = GuidancePlan.from_spec(spec_of(term, Source("prior", Condition(prompt="x")), weights=[0.25, 0.75]))
    assert all(UNCONDITIONAL not in s for c in skipped.calls for s in c.slots)
    assert skipped.split({"concept": torch.zeros(1, 1), "prior": torch.ones(1, 1)})[0] is None
    kept = GuidancePlan.from_spec(spec_of(term, weights=[0.75]))
    assert kept.calls[0].denoiser == "prior" and kept.calls[0].slots == ((UNCONDITIONAL,),)


def test_combine_and_reference_prediction_by_hand():
    u, a, b = torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([-2.0])
    # Eq. 3: u + 2 (a - u) + 0.5 (b - u) = 1 + 4 - 1.5
    assert float(combine(u, [a, b], [2.0, 0.5])) == pytest.approx(3.5)
    # the reference is the weight-normalised conditional: u + (2/2.5)(a - u) + (0.5/2.5)(b - u)
    assert float(reference_prediction(u, [a, b], [2.0, 0.5])) == pytest.approx(1 + 0.8 * 2 + 0.2 * -3)
    assert float(reference_prediction(u, [a, b], [0.25, 0.75])) == pytest.approx(0.25 * 3 + 0.75 * -2)
    assert float(reference_prediction(None, [a, b], [0.25, 0.75])) == pytest.approx(0.25 * 3 + 0.75 * -2)
    assert float(reference_prediction(u, [a], [7.0])) == 3.0  # one term: its own prediction
    # weights summing to zero: nothing to normalise by, the unconditional is the reference
    assert float(reference_prediction(u, [a, b], [1.0, -1.0])) == 1.0
    assert float(reference_prediction(u, [], [])) == 1.0
    with pytest.raises(ValueError, match="weights sum to zero"):
        reference_prediction(None, [a, b], [1.0, -1.0])


def test_from_config_reads_every_field_a_denoiser_sees():
    edges = torch.full((1, 3, 8, 8), 0.5)
    cfg = {
        "terms": {
            "off": {"denoiser": "prior", "prompt": "x", "weight": 1, "enabled": False},  # skipped, not the end
            "control": {"denoiser": "controlnet", "prompt": "a face", "control_image": "edges", "control_scale": 0.6,
                        "weight": 3},
            "path": {"denoiser": "controlnet", "control_image": "not/a/key.png", "weight": 1},
            "concept": {"denoiser": "concept", "weight": 1.5},
        },
    }
    spec = GuidanceSpec.from_config(cfg, control_images={"edges": edges})
    control, path, concept = spec.terms
    assert [t.name for t in spec.terms] == ["control", "path", "concept"]
    assert control.source == Source("controlnet", Condition(prompt="a face", control_image=edges, control_scale=0.6))
    assert control.source.condition.control_image is edges  # the loaded image itself, found by its key
    assert path.source.condition.control_image == "not/a/key.png" and path.source.condition.control_scale == 1.0
    assert path.source.condition.prompt is None
    assert concept.source == Source("concept", Condition())
    # defaults: the prior's empty prompt as the unconditional, no rescale
    assert spec.unconditional == Source("prior", Condition(prompt=""))
    assert spec.rescale == 0.0
    assert GuidanceSpec.from_config({"rescale": 0}).rescale == 0.0
    assert GuidanceSpec.from_config({"rescale": 1}).rescale == 1.0


@pytest.mark.parametrize("cfg, message", [
    ({"rescale": -0.1}, r"guidance\.rescale must be in \[0, 1\]"),
    ({"rescale": "x"}, r"guidance\.rescale must be a number"),
    ({"terms": {"t": {"denoiser": "prior", "weight": 1, "control_scale": "x"}}}, r"guidance\.terms\.t\.control_scale"),
    ({"terms": {"t": {"denoiser": "prior", "weight": 1, "prompt": 3}}}, r"guidance\.terms\.t\.prompt must be a string"),
])
def test_from_config_names_the_bad_setting(cfg, message):
    from ccp.guidance.terms import GuidanceConfigError

    with pytest.raises(GuidanceConfigError, match=message):
        GuidanceSpec.from_config(cfg)


def test_cfg_with_a_negative_prompt_is_diffusers_negative_prompt_guidance():
    spec = GuidanceSpec.cfg("a face", 7.5, negative_prompt="blurry")
    assert [(t.name, t.source, t.weight) for t in spec.terms] == [
        ("prompt", Source("prior", Condition(prompt="a face")), 7.5),
        ("negative", Source("prior", Condition(prompt="blurry")), 1.0 - 7.5)]
    assert spec.unconditional == Source("prior", Condition(prompt="")) and spec.rescale == 0.0
    assert not spec.needs_unconditional  # 1 - 7.5 - (1 - 7.5) = 0
    # Eq. 3 then equals diffusers' eps_neg + g (eps_pos - eps_neg), whatever the unconditional is
    pos, neg, uncond = torch.tensor([2.0]), torch.tensor([-1.0]), torch.tensor([100.0])
    assert float(combine(uncond, [pos, neg], spec.weights)) == pytest.approx(-1.0 + 7.5 * 3.0)
    plain = GuidanceSpec.cfg("a face", 3.0, denoiser="concept", rescale=0.7)
    assert len(plain.terms) == 1 and plain.unconditional == Source("concept", Condition(prompt=""))
    assert plain.rescale == 0.7


def test_from_config_reads_the_unconditional():
    spec = GuidanceSpec.from_config({"unconditional": {"denoiser": "concept"}, "terms": {}})
    assert spec.unconditional == Source("concept", Condition())
    from ccp.guidance.terms import GuidanceConfigError

    with pytest.raises(GuidanceConfigError, match=r"guidance\.unconditional: needs a `denoiser`"):
        GuidanceSpec.from_config({"unconditional": {"prompt": ""}})
