"""Several ControlNets: one term over summed residuals equals diffusers' multi-ControlNet pipeline;
separate terms each with their own image, scale and weight; image lists checked before denoising."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionControlNetPipeline
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from ccp.guidance import Condition, GuidanceConfigError, GuidanceSpec, GuidanceTerm, Source
from ccp.pipelines.gcfg import GCFGPipeline
from ccp.pipelines.sampling import noise_generators, sample_images
from ccp.priors import build_tiny_controlnet, load_controlnet
from schedulers import FAMILIES, gcfg_with, reference_scheduler

SIZE, STEPS = 64, 4


def _image(seed):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray((rng.random((SIZE, SIZE, 3)) > 0.5).astype(np.uint8) * 255)


@pytest.fixture(scope="module")
def nets(tiny_prior, tiny_prior_dir):
    # two different ControlNets ("canny" and "depth" stand-ins)
    return load_controlnet(tiny_prior_dir / "controlnet"), build_tiny_controlnet(tiny_prior.unet, seed=11)


@pytest.fixture(scope="module")
def pipe(tiny_prior, nets):
    gcfg = GCFGPipeline.from_prior(tiny_prior, scheduler=DPMSolverMultistepScheduler.from_config(tiny_prior.scheduler.config))
    gcfg.add_denoiser("canny", tiny_prior.unet, nets[0])
    gcfg.add_denoiser("depth", tiny_prior.unet, nets[1])
    gcfg.add_denoiser("canny+depth", tiny_prior.unet, MultiControlNetModel(list(nets)))
    gcfg.set_progress_bar_config(disable=True)
    return gcfg


@pytest.mark.parametrize("family", FAMILIES)
def test_classic_cfg_on_two_controlnets_equals_diffusers_multi_controlnet(tiny_prior, nets, family):
    pipe = gcfg_with(tiny_prior, family)  # the scheduler is ccp-sample's for sampling.scheduler=family
    pipe.add_denoiser("canny+depth", tiny_prior.unet, MultiControlNetModel(list(nets)))
    components = {k: v for k, v in tiny_prior.components.items() if k != "image_encoder"}
    ref = StableDiffusionControlNetPipeline(**{
        **components, "controlnet": MultiControlNetModel(list(nets)), "scheduler": reference_scheduler(family, tiny_prior),
    })
    ref.set_progress_bar_config(disable=True)
    images, scales, g = (_image(0), _image(1)), (0.7, 1.2), 6.0
    spec = GuidanceSpec(
        terms=(GuidanceTerm("control", Source("canny+depth", Condition("a face", images, scales)), g),),
        unconditional=Source("canny+depth", Condition("", images, scales)),
    )
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="latent")
    ours = pipe(spec, num_images=2, generator=noise_generators(5, range(2)), **kw).images
    theirs = ref("a face", image=list(images), controlnet_conditioning_scale=list(scales), guidance_scale=g,
                 num_images_per_prompt=2, generator=noise_generators(5, range(2)), **kw).images
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # the second ControlNet counts: without it (strength 0) the result moves
    first_only = GuidanceSpec(
        terms=(GuidanceTerm("control", Source("canny+depth", Condition("a face", images, (0.7, 0.0))), g),),
        unconditional=Source("canny+depth", Condition("", images, (0.7, 0.0))),
    )
    other = pipe(first_only, num_images=2, generator=noise_generators(5, range(2)), **kw).images
    assert (other - theirs).abs().max() > 1e-2


def test_separate_controlnet_terms_are_gcfg_with_one_call_per_denoiser(pipe):
    canny, depth = _image(0), _image(1)
    spec = GuidanceSpec(terms=(
        GuidanceTerm("canny", Source("canny", Condition("a face", canny, 0.5)), 3.0),
        GuidanceTerm("depth", Source("depth", Condition("a face", depth, 1.0)), 2.0),
    ))
    calls = []
    denoisers = pipe.denoisers
    for name in ("prior", "canny", "depth"):
        original = type(denoisers[name]).__call__
        denoisers[name] = _counting(denoisers[name], original, calls, name)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)
    from ccp.guidance import GuidancePlan

    plan = GuidancePlan.from_spec(spec)
    conditions = pipe.batch_conditions(plan, 2, SIZE, SIZE, torch.float32)
    guided = pipe.predict_noise(plan, latents, t, conditions, denoisers=denoisers)
    assert sorted(calls) == ["canny", "depth", "prior"]  # one batched call per denoiser
    uncond = denoisers["prior"].inner(pipe.scheduler.scale_model_input(latents, t), t, conditions["prior"])
    eps = {n: denoisers[n].inner(pipe.scheduler.scale_model_input(latents, t), t, conditions[n]) for n in ("canny", "depth")}
    expected = uncond + 3.0 * (eps["canny"] - uncond) + 2.0 * (eps["depth"] - uncond)
    torch.testing.assert_close(guided, expected, rtol=1e-5, atol=1e-5)


class _counting:
    def __init__(self, denoiser, call, calls, name):
        self.inner, self._call, self._calls, self._name = denoiser, call, calls, name
        self.dtype, self.kind = denoiser.dtype, denoiser.kind

    def __call__(self, latents, t, cond):
        self._calls.append(self._name)
        return self._call(self.inner, latents, t, cond)


# Batch invariance is not bitwise in float32: the UNet/ControlNet convolutions and matmuls pick other kernels and
# blockings for another batch size or thread count, so the same output image rounds differently. Measured on the
# same latents (this test at strength 8, every pair of torch threads {1, 2, 4} x batch_size {1, 2, 3}): at most
# 1.5e-5 on outputs up to 25 (float32 ulp at 16..32 is 1.9e-6, so ~8 ulp of the largest value); a loaded
# 2-core run of the old test saw 2.2e-5. BATCH_ATOL = 4x the measured worst, absolute (rtol=0: the rounding
# comes from the large values, so a relative bound would be loosest where it matters least and tightest near 0).
# A wrong pairing moves the latents by ~2e-3 (>25x BATCH_ATOL); the test checks that margin itself below.
BATCH_ATOL = 6e-5


def test_per_output_control_images_follow_their_outputs_in_any_batch(pipe):
    per_output = [_image(i) for i in range(3)]

    def canny(images):
        # strength 8, not 0.8: the tiny random ControlNet moves the latents little; at 0.8 a swapped pairing moved
        # them 3.4e-4, only ~25x the batch-composition rounding; at 8 it is ~2e-3, ~140x.
        return GuidanceSpec(terms=(GuidanceTerm("canny", Source("canny", Condition("a face", images, 8.0)), 4.0),))

    kw = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="latent", seed=3)
    together = sample_images(pipe, canny(per_output), range(3), batch_size=3, **kw)
    split = sample_images(pipe, canny(per_output), range(3), batch_size=2, **kw)
    torch.testing.assert_close(together, split, rtol=0, atol=BATCH_ATOL)
    alone = sample_images(pipe, canny(per_output[1]), [1], batch_size=1, **kw)
    torch.testing.assert_close(alone, together[1:2], rtol=0, atol=BATCH_ATOL)
    # the bug this test exists for (control images paired with the wrong outputs) fails by a wide margin
    swapped = sample_images(pipe, canny([per_output[1], per_output[0], per_output[2]]), range(3), batch_size=3, **kw)
    assert (swapped[:2] - together[:2]).abs().max() > 10 * BATCH_ATOL
    wrong_alone = sample_images(pipe, canny(per_output[0]), [1], batch_size=1, **kw)
    assert (wrong_alone - together[1:2]).abs().max() > 10 * BATCH_ATOL


@pytest.mark.parametrize(
    ("denoiser", "image", "scale", "match"),
    [
        ("canny", [0, 1, 2], 1.0, r"a list of 3 images for 2 output images"),
        ("canny+depth", (0,), 1.0, r"has 2 ControlNets but got 1 control image entries"),
        ("canny+depth", [0, 1], 1.0, r"has 2 ControlNets but got a list"),
        ("canny+depth", (0, [0, 1, 2]), 1.0, r"a list of 3 images for 2 output images"),
        ("canny+depth", (0, 1), (0.5, 0.5, 0.5), r"3 strengths for 2 ControlNet"),
    ],
)
def test_bad_control_image_lists_fail_before_any_denoising(pipe, monkeypatch, denoiser, image, scale, match):
    def build(entry):
        if isinstance(entry, tuple):
            return tuple(build(e) for e in entry)
        if isinstance(entry, list):
            return [_image(i) for i in entry]
        return _image(entry)

    spec = GuidanceSpec(terms=(GuidanceTerm("control", Source(denoiser, Condition("a face", build(image), scale)), 3.0),))
    monkeypatch.setattr(pipe, "predict_noise", lambda *a, **k: pytest.fail("denoised despite bad input"))
    with pytest.raises(GuidanceConfigError, match=match):
        pipe(spec, num_images=2, num_inference_steps=STEPS, height=SIZE, width=SIZE)
