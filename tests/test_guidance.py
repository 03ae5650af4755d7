"""GCFG as math: Eq. 3, its special cases, the batching plan and spec validation (no models)."""

from __future__ import annotations

import pytest
import torch

from ccp.guidance import (
    UNCONDITIONAL,
    Condition,
    GuidanceConfigError,
    GuidancePlan,
    GuidanceSpec,
    GuidanceTerm,
    Source,
    combine,
    reference_prediction,
    rescale,
)
from ccp.pipelines.validation import check_guidance_against


def _preds(n, seed=0, shape=(2, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


def test_combine_is_eq3_and_its_convex_form():
    uncond, *conds = _preds(4)
    weights = [1.5, -0.75, 5.0]
    expected = uncond.clone()
    for w, c in zip(weights, conds):
        expected += w * (c - uncond)
    out = combine(uncond, conds, weights)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    # (1 - sum w) eps_0 + sum w_i eps_i, the form of §4.2's concept-centric generation
    convex = (1 - sum(weights)) * uncond + sum(w * c for w, c in zip(weights, conds))
    torch.testing.assert_close(out, convex, rtol=0, atol=1e-10)


def test_single_term_is_classic_cfg_and_weight_one_is_the_conditional():
    uncond, cond = _preds(2)
    torch.testing.assert_close(combine(uncond, [cond], [7.5]), uncond + 7.5 * (cond - uncond), rtol=0, atol=0)
    torch.testing.assert_close(combine(uncond, [cond], [1.0]), cond, rtol=0, atol=1e-12)
    torch.testing.assert_close(combine(uncond, [], []), uncond, rtol=0, atol=0)


def test_negative_prompt_is_a_term_with_weight_one_minus_g():
    # Eq. 7: (1 - g) eps(neg) + g eps(pos) == GCFG with terms pos@g and neg@(1-g) over any eps_0
    uncond, pos, neg = _preds(3)
    g = 7.5
    out = combine(uncond, [pos, neg], [g, 1 - g])
    torch.testing.assert_close(out, (1 - g) * neg + g * pos, rtol=0, atol=1e-10)


def test_combine_without_unconditional_only_when_weights_sum_to_one():
    uncond, a, b = _preds(3)
    weights = [1.25, -0.25]
    torch.testing.assert_close(combine(None, [a, b], weights), combine(uncond, [a, b], weights), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="2 predictions but 1 weights"):
        combine(uncond, [a, b], [1.0])


def test_reference_and_rescale_match_the_single_term_case_of_diffusers():
    uncond, cond = _preds(2)
    guided = combine(uncond, [cond], [7.5])
    assert reference_prediction(uncond, [cond], [7.5]) is cond
    torch.testing.assert_close(rescale(guided, cond, 0.0), guided, rtol=0, atol=0)
    full = rescale(guided, cond, 1.0)
    dims = list(range(1, guided.ndim))
    torch.testing.assert_close(full.std(dim=dims), cond.std(dim=dims), rtol=1e-10, atol=0)
    # several terms: the reference is the weight-normalised conditional
    a, b = _preds(2, seed=1)
    ref = reference_prediction(uncond, [a, b], [3.0, 1.0])
    torch.testing.assert_close(ref, uncond + 0.75 * (a - uncond) + 0.25 * (b - uncond), rtol=0, atol=1e-12)


def _spec(*terms, uncond=Source("prior", Condition(prompt=""))):
    return GuidanceSpec(terms=tuple(terms), unconditional=uncond)


def test_plan_batches_each_denoiser_once_with_unconditional_first():
    spec = _spec(
        GuidanceTerm("concept", Source("concept"), 1.5),
        GuidanceTerm("control", Source("prior", Condition(prompt="wearing glasses")), 5.0),
        GuidanceTerm("negative", Source("prior", Condition(prompt="blurry")), -1.0),
    )
    plan = GuidancePlan.from_spec(spec)
    assert plan.denoisers == ["prior", "concept"]
    prior, concept = plan.calls
    assert [c.prompt for c in prior.conditions] == ["", "wearing glasses", "blurry"]
    assert prior.slots == ((UNCONDITIONAL,), (1,), (2,))
    assert concept.slots == ((0,),)
    assert plan.batch_size(8) == {"prior": 24, "concept": 8}
    # route distinguishable chunks back
    outputs = {"prior": torch.arange(3.0).repeat_interleave(2), "concept": torch.full((2,), 9.0)}
    uncond, terms = plan.split(outputs)
    assert uncond.tolist() == [0.0, 0.0]
    assert [t.tolist() for t in terms] == [[9.0, 9.0], [1.0, 1.0], [2.0, 2.0]]


def test_plan_merges_equal_conditions_and_skips_an_unused_unconditional():
    # the term asks for exactly the unconditional's prediction: evaluated once, used twice
    spec = _spec(GuidanceTerm("same", Source("prior", Condition(prompt="")), 0.5), GuidanceTerm("c", Source("concept"), 0.25))
    plan = GuidancePlan.from_spec(spec)
    assert plan.calls[0].slots == ((UNCONDITIONAL, 0),)
    # weights summing to one give eps_0 a zero coefficient: the prior is not evaluated at all
    spec = _spec(GuidanceTerm("c", Source("concept"), 1.25), GuidanceTerm("d", Source("other"), -0.25))
    plan = GuidancePlan.from_spec(spec)
    assert not spec.needs_unconditional
    assert plan.denoisers == ["concept", "other"]


def test_from_config_reads_terms_and_reports_bad_values():
    cfg = {
        "unconditional": {"denoiser": "prior", "prompt": ""},
        "terms": {
            "concept": {"denoiser": "concept", "weight": "1.25"},
            "control": {"denoiser": "prior", "prompt": "smiling", "weight": 5},
            "off": {"denoiser": "prior", "prompt": "x", "weight": 1, "enabled": False},
        },
        "rescale": 0.5,
    }
    spec = GuidanceSpec.from_config(cfg)
    assert [(t.name, t.weight, t.source.denoiser, t.source.condition.prompt) for t in spec.terms] == [
        ("concept", 1.25, "concept", None),
        ("control", 5.0, "prior", "smiling"),
    ]
    assert spec.rescale == 0.5
    bad = {"terms": {"control": {"denoiser": "prior", "weight": "abc"}}}
    with pytest.raises(GuidanceConfigError, match=r"guidance\.terms\.control\.weight must be a number, got 'abc'"):
        GuidanceSpec.from_config(bad)
    with pytest.raises(GuidanceConfigError, match="has no weight"):
        GuidanceSpec.from_config({"terms": {"control": {"denoiser": "prior"}}})
    with pytest.raises(GuidanceConfigError, match="needs a `denoiser`"):
        GuidanceSpec.from_config({"terms": {"control": {"weight": 1.0}}})
    with pytest.raises(GuidanceConfigError, match="must be finite"):
        GuidanceSpec.from_config({"terms": {"control": {"denoiser": "prior", "weight": "nan"}}})
    with pytest.raises(GuidanceConfigError, match=r"rescale must be in \[0, 1\]"):
        GuidanceSpec.from_config({"rescale": 2})


def test_check_guidance_names_the_problem_and_the_fix(tmp_path):
    kinds = {"prior": "unet", "controlnet": "controlnet"}
    with pytest.raises(GuidanceConfigError, match=r"denoiser 'concept', which is not configured; configured: \['controlnet', 'prior'\]"):
        check_guidance_against(_spec(GuidanceTerm("concept", Source("concept"), 1.0)), kinds)
    with pytest.raises(GuidanceConfigError, match="has no control image; set guidance.terms.edges.control_image"):
        check_guidance_against(_spec(GuidanceTerm("edges", Source("controlnet", Condition(prompt="a face")), 1.0)), kinds)
    missing = tmp_path / "nope.png"
    with pytest.raises(GuidanceConfigError, match="nope.png does not exist"):
        check_guidance_against(
            _spec(GuidanceTerm("edges", Source("controlnet", Condition(prompt="", control_image=str(missing))), 1.0)), kinds
        )
    with pytest.raises(GuidanceConfigError, match="takes no prompt"):
        check_guidance_against(_spec(GuidanceTerm("c", Source("concept", Condition(prompt="a face")), 1.0)), {"concept": "concept", "prior": "unet"})
    with pytest.raises(GuidanceConfigError, match="unconditional uses denoiser 'prior'"):
        check_guidance_against(_spec(GuidanceTerm("c", Source("concept"), 2.0)), {"concept": "concept"})
    # an unused unconditional (weights sum to one) needs no prior
    check_guidance_against(_spec(GuidanceTerm("c", Source("concept"), 1.0)), {"concept": "concept"})
