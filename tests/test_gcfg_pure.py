"""GCFG's step is a function of its inputs: a weight-0 term costs no model call, and
`guided_prediction` alone reproduces the pipeline's samples and equals Eq. 3 over one call per term."""

from __future__ import annotations

import copy

import pytest
import torch

from ccp.guidance import Condition, GuidancePlan, GuidanceSpec, GuidanceTerm, Source
from ccp.models.null_text_unet import null_text_from_pipeline
from ccp.pipelines.gcfg import GCFGPipeline
from ccp.pipelines.prediction import guided_prediction
from ccp.pipelines.sampling import noise_generators
from ccp.priors import build_tiny_controlnet
from guidance_cases import SIZE, THREE_TERMS, random_image
from schedulers import gcfg_with

STEPS = 4
LATENT = dict(height=SIZE, width=SIZE, output_type="latent")


@pytest.fixture(scope="module")
def concept(tiny_prior):
    return null_text_from_pipeline(tiny_prior, definition="value_mean").eval()


def test_a_weight_0_term_costs_no_model_call(tiny_prior, concept):
    pipe = GCFGPipeline.from_prior(tiny_prior, concept_unet=concept, controlnet=build_tiny_controlnet(tiny_prior.unet, seed=3))
    pipe.set_progress_bar_config(disable=True)
    rows = {"unet": [], "concept_unet": [], "controlnet": []}
    hooks = [getattr(pipe, name).register_forward_pre_hook(lambda module, args, kwargs, name=name: rows[name].append(
        args[0].shape[0]), with_kwargs=True) for name in rows]
    text = GuidanceTerm("text", Source("prior", Condition(prompt="a cat")), 5.0)
    muted = GuidanceSpec(terms=(
        text,
        GuidanceTerm("concept", Source("concept"), 0.0),
        GuidanceTerm("other_prompt", Source("prior", Condition(prompt="a dog")), 0.0),
        GuidanceTerm("edges", Source("controlnet", Condition("a cat", random_image(2))), 0.0),
    ))
    kw = dict(num_images=2, num_inference_steps=STEPS, generator=noise_generators(0, range(2)), **LATENT)
    try:
        with_zeros = pipe(muted, **kw).images
    finally:
        for hook in hooks:
            hook.remove()
    # per step one prior call on the unconditional and "a cat" (2 images each); nothing else runs
    assert rows == {"unet": [4] * STEPS, "concept_unet": [], "controlnet": []}
    kw["generator"] = noise_generators(0, range(2))
    assert torch.equal(with_zeros, pipe(GuidanceSpec(terms=(text,)), **kw).images)


def test_guided_prediction_alone_reproduces_the_pipelines_sample(tiny_prior, concept):
    pipe = gcfg_with(tiny_prior, "EulerDiscreteScheduler", concept_unet=concept)
    generators = lambda: noise_generators(5, range(2))  # noqa: E731
    sampled = pipe(THREE_TERMS, num_images=2, num_inference_steps=STEPS, generator=generators(), **LATENT).images

    plan = GuidancePlan.from_spec(THREE_TERMS)
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(STEPS)
    conditions = pipe.batch_conditions(plan, 2, SIZE, SIZE, torch.float32)
    latents = pipe.prepare_latents(2, SIZE, SIZE, torch.float32, generators(), scheduler=scheduler)
    denoisers = pipe.denoisers
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = guided_prediction(latents, t, denoisers, plan, conditions, scheduler.scale_model_input)
            latents = scheduler.step(eps, t, latents, return_dict=False)[0]
    assert torch.equal(latents, sampled)


def test_guided_prediction_is_eq_3_over_one_call_per_term(tiny_prior, concept):
    pipe = gcfg_with(tiny_prior, "dpmsolver++", concept_unet=concept)
    plan = GuidancePlan.from_spec(THREE_TERMS)
    assert [(call.denoiser, len(call.conditions)) for call in plan.calls] == [("prior", 3), ("concept", 1)]
    conditions = pipe.batch_conditions(plan, 2, SIZE, SIZE, torch.float32)
    latents = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)
    denoisers = pipe.denoisers
    with torch.no_grad():
        guided = guided_prediction(latents, t, denoisers, plan, conditions)
        prior_rows = conditions["prior"].prompt_embeds.chunk(3)  # unconditional, "wearing glasses", "blurry"
        uncond, control, negative = (pipe.unet(latents, t, encoder_hidden_states=rows).sample for rows in prior_rows)
        concept_eps = denoisers["concept"](latents, t, conditions["concept"])
    expected = uncond + 1.5 * (concept_eps - uncond) + 5.0 * (control - uncond) - 1.0 * (negative - uncond)
    torch.testing.assert_close(guided, expected, rtol=1e-5, atol=1e-5)
