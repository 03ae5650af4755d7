"""Image-to-image and inpainting GCFG against diffusers' img2img and inpainting pipelines, with every
scheduler family of ``sampling.scheduler`` (the start timestep and the noising are the scheduler's)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

from ccp.config import ConfigError
from ccp.guidance import GuidanceSpec
from ccp.pipelines.gcfg import GCFGPipeline
from ccp.pipelines.sampling import noise_generators, sample_images
from ccp.pipelines.validation import ImageInputError
from schedulers import FAMILIES, gcfg_with, reference_scheduler

SIZE, STEPS = 64, 5


def _scheduler(prior):
    return DPMSolverMultistepScheduler.from_config(prior.scheduler.config)


@pytest.fixture(scope="module")
def components(tiny_prior):
    return {k: v for k, v in tiny_prior.components.items() if k != "image_encoder"}


@pytest.fixture(scope="module")
def gcfg(tiny_prior):
    pipe = GCFGPipeline.from_prior(tiny_prior, scheduler=_scheduler(tiny_prior))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(seed, size=SIZE):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))


def _mask():
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, SIZE // 2 :] = 255  # repaint the right half
    return PIL.Image.fromarray(mask)


@pytest.mark.filterwarnings("ignore:You have passed 2 text prompts:FutureWarning")  # diffusers: one image, two outputs
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("per_image_generators", [False, True])
def test_one_text_term_equals_diffusers_img2img(tiny_prior, components, per_image_generators, family):
    gcfg = gcfg_with(tiny_prior, family)
    ref = StableDiffusionImg2ImgPipeline(**{**components, "scheduler": reference_scheduler(family, tiny_prior)})
    ref.set_progress_bar_config(disable=True)
    gens = (lambda: noise_generators(3, range(2))) if per_image_generators else (lambda: torch.Generator().manual_seed(3))
    kw = dict(num_inference_steps=STEPS, output_type="latent")
    init, g, strength = _image(0), 6.0, 0.6
    ours = gcfg(GuidanceSpec.cfg("a red car", g), num_images=2, image=init, strength=strength, generator=gens(), **kw).images
    theirs = ref("a red car", image=init, strength=strength, guidance_scale=g, num_images_per_prompt=2,
                 generator=gens(), **kw).images
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # the init image and the strength both matter
    other = gcfg(GuidanceSpec.cfg("a red car", g), num_images=2, image=_image(1), strength=strength, generator=gens(), **kw)
    assert (other.images - theirs).abs().max() > 1e-2
    weaker = gcfg(GuidanceSpec.cfg("a red car", g), num_images=2, image=init, strength=0.4, generator=gens(), **kw)
    assert (weaker.images - theirs).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_mask_equals_diffusers_inpainting_with_a_plain_unet(tiny_prior, components, strength, family):
    gcfg = gcfg_with(tiny_prior, family)
    ref = StableDiffusionInpaintPipeline(**{**components, "scheduler": reference_scheduler(family, tiny_prior)})
    ref.set_progress_bar_config(disable=True)
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np")
    args = dict(image=_image(0), mask_image=_mask(), strength=strength)
    ours = gcfg(GuidanceSpec.cfg("a cat", 5.0), num_images=2, generator=noise_generators(4, range(2)), **args, **kw)
    theirs = ref("a cat", guidance_scale=5.0, num_images_per_prompt=2, generator=noise_generators(4, range(2)), **args, **kw)
    np.testing.assert_allclose(ours.images, theirs.images, rtol=0, atol=1e-5)
    latents = gcfg(GuidanceSpec.cfg("a cat", 5.0), num_images=2, generator=noise_generators(4, range(2)), **args,
                   **{**kw, "output_type": "latent"}).images
    # both outputs keep the init image's latents in the left half and repaint the right half differently
    half = latents.shape[-1] // 2
    assert (latents[0, :, :, :half] - latents[1, :, :, :half]).abs().max() < 1e-6
    assert (latents[0, :, :, half:] - latents[1, :, :, half:]).abs().max() > 1e-2


def test_per_output_init_images_match_one_by_one_in_any_batch(gcfg):
    spec = GuidanceSpec.cfg("a dog", 4.0)
    images = [_image(i) for i in range(3)]
    kw = dict(num_inference_steps=STEPS, output_type="latent", strength=0.5, seed=7)
    together = sample_images(gcfg, spec, range(3), image=images, batch_size=3, **kw)
    split = sample_images(gcfg, spec, range(3), image=images, batch_size=2, **kw)
    torch.testing.assert_close(together, split, rtol=0, atol=1e-5)
    alone = sample_images(gcfg, spec, [2], image=images[2], batch_size=1, **kw)  # image 2 of seed 7, by itself
    torch.testing.assert_close(together[2:], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(image="__missing__"), r"init image .* does not exist"),
        (dict(image="__corrupt__"), r"cannot be read as an image"),
        (dict(strength=0.0), r"strength must be in \(0, 1\]"),
        (dict(strength=1.5), r"strength must be in \(0, 1\]"),
        (dict(strength=float("nan")), r"strength must be a number"),
        (dict(strength=0.1), r"leaves no denoising step"),
        (dict(image=None, strength=0.5), r"needs an init image"),
        (dict(image=None, mask_image="__image__"), r"mask image needs an init image"),
        (dict(image=["__image__"] * 3), r"3 init images for 2 output images"),
        (dict(mask_image=["__image__"] * 3), r"3 mask images for 2 output images"),
    ],
)
def test_bad_init_input_fails_before_any_denoising(gcfg, tmp_path, monkeypatch, kwargs, match):
    good = tmp_path / "good.png"
    _image(0).save(good)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    names = {"__missing__": str(tmp_path / "nope.png"), "__corrupt__": str(corrupt), "__image__": str(good)}
    swap = lambda v: [names.get(x, x) for x in v] if isinstance(v, list) else names.get(v, v)  # noqa: E731
    args = {"image": str(good), "strength": 0.6, **{k: swap(v) for k, v in kwargs.items()}}
    monkeypatch.setattr(gcfg, "predict_noise", lambda *a, **k: pytest.fail("denoised despite bad input"))
    with pytest.raises(ImageInputError, match=match) as err:
        gcfg(GuidanceSpec.cfg("a cat", 5.0), num_images=2, num_inference_steps=STEPS, **args)
    assert isinstance(err.value, ConfigError)
