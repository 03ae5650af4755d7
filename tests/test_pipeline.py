"""GCFGPipeline against diffusers' own pipelines (with every scheduler family of ``sampling.scheduler``),
and batching against a literal Algorithm 1."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from schedulers import FAMILIES, gcfg_with, reference_scheduler

from ccp.guidance import Condition, GuidanceSpec, GuidanceTerm, Source
from ccp.pipelines.gcfg import GCFGPipeline
from ccp.priors import load_controlnet

STEPS = 4
SIZE = 64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def prior(tiny_prior):
    # shares the tiny prior's modules, with its own DPM-Solver++ scheduler
    return StableDiffusionPipeline(**{**tiny_prior.components, "scheduler": DPMSolverMultistepScheduler.from_config(tiny_prior.scheduler.config)})


@pytest.fixture(scope="module")
def gcfg(prior):
    pipe = GCFGPipeline.from_prior(prior, scheduler=DPMSolverMultistepScheduler.from_config(prior.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def pair(tiny_prior, family):
    """ccp's pipeline with the `family` scheduler as ccp-sample builds it, and diffusers' with its own copy."""
    ref = StableDiffusionPipeline(**{**tiny_prior.components, "scheduler": reference_scheduler(family, tiny_prior)})
    ref.set_progress_bar_config(disable=True)
    return gcfg_with(tiny_prior, family), ref


@pytest.fixture(scope="module")
def control_image():
    rng = np.random.default_rng(0)
    return PIL.Image.fromarray((rng.random((SIZE, SIZE, 3)) > 0.5).astype(np.uint8) * 255)


def _np(out):
    return np.asarray(out.images)


def test_text_term_equals_diffusers_cfg(pair):
    gcfg, prior = pair
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np")
    ours = gcfg(GuidanceSpec.cfg("a photo of a cat", 7.5), num_images=2, generator=_gen(), **kw)
    ref = prior("a photo of a cat", guidance_scale=7.5, num_images_per_prompt=2, generator=_gen(), **kw)
    np.testing.assert_allclose(_np(ours), _np(ref), rtol=0, atol=1e-6)
    # and a different weight really changes the result (the comparison can fail)
    other = gcfg(GuidanceSpec.cfg("a photo of a cat", 3.0), num_images=2, generator=_gen(), **kw)
    assert np.abs(_np(other) - _np(ref)).max() > 1e-3


def test_negative_prompt_as_a_term_equals_diffusers_negative_prompt(pair):
    gcfg, prior = pair
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="latent")
    g = 6.0
    spec = GuidanceSpec.cfg("a red car", g, negative_prompt="blurry, low quality")
    assert [t.weight for t in spec.terms] == [g, 1 - g]
    ours = gcfg(spec, num_images=2, generator=_gen(1), **kw).images
    ref = prior("a red car", negative_prompt="blurry, low quality", guidance_scale=g, num_images_per_prompt=2, generator=_gen(1), **kw).images
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_guidance_rescale_equals_diffusers(pair):
    gcfg, prior = pair
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="latent")
    ours = gcfg(GuidanceSpec.cfg("a house", 7.5, rescale=0.7), generator=_gen(2), **kw).images
    ref = prior("a house", guidance_scale=7.5, guidance_rescale=0.7, generator=_gen(2), **kw).images
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    plain = gcfg(GuidanceSpec.cfg("a house", 7.5), generator=_gen(2), **kw).images
    assert (plain - ref).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_controlnet_term_equals_diffusers_controlnet_pipeline(tiny_prior, tiny_prior_dir, control_image, family):
    controlnet = load_controlnet(tiny_prior_dir / "controlnet")
    components = {k: v for k, v in tiny_prior.components.items() if k != "image_encoder"}
    ref_pipe = StableDiffusionControlNetPipeline(**{**components, "controlnet": controlnet,
                                                    "scheduler": reference_scheduler(family, tiny_prior)})
    ref_pipe.set_progress_bar_config(disable=True)
    pipe = gcfg_with(tiny_prior, family, controlnet=controlnet)
    g, scale = 6.5, 0.8
    # diffusers evaluates the ControlNet for both halves of CFG: the unconditional is the
    # ControlNet denoiser with the empty prompt and the same control image.
    spec = GuidanceSpec(
        terms=(GuidanceTerm("edges", Source("controlnet", Condition("a face", control_image, scale)), g),),
        unconditional=Source("controlnet", Condition("", control_image, scale)),
    )
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="latent")
    ours = pipe(spec, num_images=2, generator=_gen(4), **kw).images
    ref = ref_pipe(
        "a face", image=control_image, guidance_scale=g, controlnet_conditioning_scale=scale,
        num_images_per_prompt=2, generator=_gen(4), **kw,
    ).images
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    # the control image matters (guards against a ControlNet silently ignored)
    flipped = PIL.Image.fromarray(255 - np.asarray(control_image))
    spec2 = GuidanceSpec(
        terms=(GuidanceTerm("edges", Source("controlnet", Condition("a face", flipped, scale)), g),),
        unconditional=Source("controlnet", Condition("", flipped, scale)),
    )
    assert (pipe(spec2, num_images=2, generator=_gen(4), **kw).images - ref).abs().max() > 1e-5  # well above float noise (~1e-7)


@pytest.fixture(scope="module")
def other_unet(tiny_prior):
    torch.manual_seed(123)
    return UNet2DConditionModel(**tiny_prior.unet.config).eval()


def _literal_algorithm_1(pipe, spec, num_images, generator, steps, denoise_fns):
    """Algorithm 1 written out: one call per term per image, no batching."""
    scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    latents = pipe.prepare_latents(num_images, SIZE, SIZE, torch.float32, generator) / pipe.scheduler.init_noise_sigma
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = []
        for i in range(num_images):
            x = latents[i : i + 1]
            p_uncond = denoise_fns[spec.unconditional.denoiser](x, t, spec.unconditional.condition)
            p = p_uncond
            for term in spec.terms:
                p_i = denoise_fns[term.source.denoiser](x, t, term.source.condition)
                p = p + term.weight * (p_i - p_uncond)
            out.append(p)
        latents = scheduler.step(torch.cat(out), t, latents, return_dict=False)[0]
    return latents


def test_batched_gcfg_equals_literal_algorithm_1_with_two_denoisers(gcfg, other_unet):
    gcfg.add_denoiser("other", other_unet)
    spec = GuidanceSpec(
        terms=(
            GuidanceTerm("other", Source("other", Condition("a cat")), 1.5),
            GuidanceTerm("control", Source("prior", Condition("wearing a hat")), 4.0),
            GuidanceTerm("negative", Source("prior", Condition("blurry")), -0.5),
        )
    )
    with torch.no_grad():
        embeds = {p: gcfg.encode_prompt(p) for p in ["", "a cat", "wearing a hat", "blurry"]}
        fns = {
            "prior": lambda x, t, c: gcfg.unet(x, t, encoder_hidden_states=embeds[c.prompt or ""]).sample,
            "other": lambda x, t, c: other_unet(x, t, encoder_hidden_states=embeds[c.prompt or ""]).sample,
        }
        ref = _literal_algorithm_1(gcfg, spec, 3, _gen(5), STEPS, fns)
    ours = gcfg(spec, num_images=3, height=SIZE, width=SIZE, num_inference_steps=STEPS, generator=_gen(5), output_type="latent").images
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_each_denoiser_runs_once_per_step_on_all_its_conditions(gcfg, other_unet):
    gcfg.add_denoiser("other", other_unet)
    calls = {"prior": [], "other": []}
    hooks = [
        gcfg.unet.register_forward_hook(lambda m, a, k, o: calls["prior"].append(a[0].shape[0]), with_kwargs=True),
        other_unet.register_forward_hook(lambda m, a, k, o: calls["other"].append(a[0].shape[0]), with_kwargs=True),
    ]
    spec = GuidanceSpec(
        terms=(GuidanceTerm("other", Source("other"), 1.5), GuidanceTerm("control", Source("prior", Condition("a hat")), 5.0))
    )
    try:
        for n in (1, 4):
            for v in calls.values():
                v.clear()
            gcfg(spec, num_images=n, height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="latent")
            assert calls["prior"] == [2 * n] * STEPS  # unconditional + control prompt, one batch
            assert calls["other"] == [n] * STEPS
    finally:
        for h in hooks:
            h.remove()


def test_outputs_and_saving(gcfg, tmp_path):
    spec = GuidanceSpec.cfg("a tree", 4.0)
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=2)
    pil = gcfg(spec, num_images=2, generator=_gen(6), **kw).images
    arr = gcfg(spec, num_images=2, generator=_gen(6), output_type="np", **kw).images
    lat = gcfg(spec, num_images=2, generator=_gen(6), output_type="latent", **kw).images
    assert len(pil) == 2 and pil[0].size == (SIZE, SIZE)
    assert arr.shape == (2, SIZE, SIZE, 3) and 0 <= arr.min() and arr.max() <= 1
    np.testing.assert_array_equal(np.asarray(pil[0]), (arr[0] * 255).round().astype(np.uint8))
    assert lat.shape == (2, 4, SIZE // 8, SIZE // 8)
    gcfg.save_pretrained(tmp_path / "pipe")
    loaded = GCFGPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    again = loaded(spec, num_images=2, generator=_gen(6), output_type="latent", **kw).images
    torch.testing.assert_close(again, lat, rtol=0, atol=0)


def test_long_prompt_is_truncated_with_a_warning(gcfg, caplog):
    words = " ".join(["glasses"] * 100)
    truncated = gcfg.tokenizer.decode(gcfg.tokenizer(words, truncation=True).input_ids[1:-1])
    with caplog.at_level("WARNING", logger="ccp.pipelines.gcfg"):
        long_embeds = gcfg.encode_prompt(words)
    assert "truncated" in caplog.text
    torch.testing.assert_close(long_embeds, gcfg.encode_prompt(truncated), rtol=0, atol=0)
