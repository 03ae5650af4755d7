"""GCFG on the tiny SD 2.x prior (v-prediction) against diffusers' StableDiffusionPipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

from ccp.guidance import GuidanceSpec
from ccp.pipelines.gcfg import GCFGPipeline
from ccp.pipelines.gcfg_xl import GCFGXLPipeline
from ccp.priors.families import family_of
from ccp.priors.tiny import build_tiny_prior
from schedulers import FAMILIES, gcfg_with, reference_scheduler

SIZE, STEPS = 64, 4
LATENT = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="latent")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def prior():
    pipe = build_tiny_prior(0, family="sd2")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pair(prior, family):
    """ccp's pipeline with ccp-sample's scheduler for ``sampling.scheduler=family``, and diffusers' with its own."""
    components = {k: v for k, v in prior.components.items() if k != "image_encoder"}
    ref = StableDiffusionPipeline(**{**components, "scheduler": reference_scheduler(family, prior)})
    ref.set_progress_bar_config(disable=True)
    return gcfg_with(prior, family), ref


def test_default_scheduler_keeps_v_prediction(prior):
    pipe = GCFGPipeline.from_prior(prior)
    assert family_of(prior) == "sd2" and type(pipe) is GCFGPipeline and not isinstance(pipe, GCFGXLPipeline)
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.scheduler.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("family", FAMILIES)
def test_text_term_equals_diffusers_on_v_prediction(prior, family):
    pipe, ref = _pair(prior, family)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np")
    ours = pipe(GuidanceSpec.cfg("a photo of a cat", 7.5), num_images=2, generator=_gen(), **kw).images
    theirs = ref("a photo of a cat", guidance_scale=7.5, num_images_per_prompt=2, generator=_gen(), **kw).images
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    other = pipe(GuidanceSpec.cfg("a photo of a cat", 3.0), num_images=2, generator=_gen(), **kw).images
    assert np.abs(other - theirs).max() > 1e-3


def test_negative_prompt_terms_equal_diffusers_negative_prompt(prior):
    pipe, ref = _pair(prior, "dpmsolver++")
    g = 6.0
    ours = pipe(GuidanceSpec.cfg("a red car", g, negative_prompt="blurry"), num_images=2, generator=_gen(1), **LATENT)
    theirs = ref("a red car", negative_prompt="blurry", guidance_scale=g, num_images_per_prompt=2, generator=_gen(1),
                 **LATENT).images
    torch.testing.assert_close(ours.images, theirs, rtol=1e-4, atol=1e-5)
    plain = ref("a red car", guidance_scale=g, num_images_per_prompt=2, generator=_gen(1), **LATENT).images
    assert (plain - theirs).abs().max() > 1e-3


def test_v_prediction_is_what_the_scheduler_reads(prior):
    # the same model outputs read as epsilon give other latents: the equality above is not vacuous
    pipe, _ = _pair(prior, "dpmsolver++")
    v = pipe(GuidanceSpec.cfg("a dog", 5.0), generator=_gen(2), **LATENT).images
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(prior.scheduler.config, prediction_type="epsilon")
    eps = pipe(GuidanceSpec.cfg("a dog", 5.0), generator=_gen(2), **LATENT).images
    assert (v - eps).abs().max() > 1e-2
