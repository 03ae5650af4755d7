"""GCFG on the tiny SDXL prior against diffusers' SDXL pipelines, batching, saving and ccp-sample."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from ccp.config import ConfigError, compose
from ccp.guidance import Condition, GuidanceSpec, GuidanceTerm, Source
from ccp.pipelines import run as sample_cli
from ccp.pipelines.gcfg import GCFGPipeline
from ccp.pipelines.gcfg_xl import GCFGXLPipeline
from ccp.pipelines.sampling import noise_generators
from ccp.priors.loading import load_prior
from ccp.priors.tiny import TINY_UNET_CONFIG, build_tiny_controlnet, build_tiny_prior, save_tiny_prior
from schedulers import FAMILIES, gcfg_with, reference_scheduler

SIZE, STEPS = 64, 3
LATENT = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="latent")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _scheduler(prior):
    return DPMSolverMultistepScheduler.from_config(prior.scheduler.config)


@pytest.fixture(scope="module")
def prior():
    return build_tiny_prior(0, family="sdxl")


@pytest.fixture(scope="module")
def components(prior):
    return {k: v for k, v in prior.components.items() if k not in ("image_encoder", "feature_extractor")}


def _reference(cls, components, prior, family="dpmsolver++", **extra):
    pipe = cls(**{**components, "scheduler": reference_scheduler(family, prior), **extra})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ref(prior, components):
    return _reference(StableDiffusionXLPipeline, components, prior)


@pytest.fixture(scope="module")
def gcfg(prior):
    pipe = GCFGPipeline.from_prior(prior, scheduler=_scheduler(prior))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(seed, size=SIZE):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))


def test_from_prior_gives_the_xl_pipeline(prior, gcfg):
    assert isinstance(gcfg, GCFGXLPipeline)
    assert gcfg.text_encoder_2 is prior.text_encoder_2 and gcfg.tokenizer_2 is prior.tokenizer_2
    assert gcfg.config.force_zeros_for_empty_prompt is True
    embeds = gcfg.encode_text("a cat")
    assert embeds["prompt_embeds"].shape == (1, 77, 64) and embeds["pooled_embeds"].shape == (1, 32)


@pytest.mark.parametrize("family", FAMILIES)  # the SDXL prior's own is Euler
def test_text_term_equals_diffusers_sdxl(prior, components, family):
    ref, gcfg = _reference(StableDiffusionXLPipeline, components, prior, family), gcfg_with(prior, family)
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np")
    ours = gcfg(GuidanceSpec.cfg("a photo of a cat", 7.5), generator=_gen(), **kw).images
    theirs = ref("a photo of a cat", guidance_scale=7.5, generator=_gen(), **kw).images
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    # several images from one generator, and from one generator per image
    for gens in (lambda: _gen(1), lambda: noise_generators(1, range(3))):
        ours = gcfg(GuidanceSpec.cfg("a photo of a cat", 7.5), num_images=3, generator=gens(), **LATENT).images
        theirs = ref("a photo of a cat", guidance_scale=7.5, num_images_per_prompt=3, generator=gens(), **LATENT).images
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    other = gcfg(GuidanceSpec.cfg("a photo of a cat", 3.0), num_images=3, generator=gens(), **LATENT).images
    assert (other - theirs).abs().max() > 1e-3


def test_size_conditioning_equals_diffusers(ref, gcfg):
    size = dict(original_size=(128, 96), crops_coords_top_left=(8, 0), target_size=(64, 64))
    ours = gcfg(GuidanceSpec.cfg("a dog", 5.0), generator=_gen(2), **size, **LATENT).images
    theirs = ref("a dog", guidance_scale=5.0, generator=_gen(2), **size, **LATENT).images
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    default = gcfg(GuidanceSpec.cfg("a dog", 5.0), generator=_gen(2), **LATENT).images
    assert (default - theirs).abs().max() > 1e-4  # the time ids reach the UNet


def test_negative_prompt_terms_equal_diffusers_negative_prompt(ref, gcfg):
    g = 6.0
    spec = GuidanceSpec.cfg("a red car", g, negative_prompt="blurry, low quality")
    assert [t.weight for t in spec.terms] == [g, 1 - g]
    ours = gcfg(spec, num_images=2, generator=_gen(3), **LATENT).images
    theirs = ref("a red car", negative_prompt="blurry, low quality", guidance_scale=g, num_images_per_prompt=2,
                 generator=_gen(3), **LATENT).images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    plain = ref("a red car", guidance_scale=g, num_images_per_prompt=2, generator=_gen(3), **LATENT).images
    assert (plain - theirs).abs().max() > 1e-3


def test_empty_prompt_is_zeros_only_under_force_zeros(prior, components, gcfg):
    zeros = gcfg.encode_text("")
    assert not zeros["prompt_embeds"].any() and not zeros["pooled_embeds"].any()
    assert zeros["pooled_embeds"].shape == (1, 32)

    encoded = GCFGXLPipeline(**{**components, "scheduler": _scheduler(prior)}, force_zeros_for_empty_prompt=False)
    encoded.set_progress_bar_config(disable=True)
    empty = encoded.encode_text("")
    assert empty["prompt_embeds"].abs().max() > 1e-2
    assert empty["pooled_embeds"].abs().max() > 1e-2
    theirs = _reference(StableDiffusionXLPipeline, components, prior, force_zeros_for_empty_prompt=False)
    ours = encoded(GuidanceSpec.cfg("a house", 7.5), num_images=2, generator=_gen(4), **LATENT).images
    ref_encoded = theirs("a house", guidance_scale=7.5, num_images_per_prompt=2, generator=_gen(4), **LATENT).images
    torch.testing.assert_close(ours, ref_encoded, rtol=1e-5, atol=1e-6)
    zeroed = gcfg(GuidanceSpec.cfg("a house", 7.5), num_images=2, generator=_gen(4), **LATENT).images
    assert (zeroed - ref_encoded).abs().max() > 1e-3  # the flag changes the unconditional


@pytest.mark.parametrize("family", FAMILIES)
def test_controlnet_term_equals_diffusers_sdxl_controlnet(prior, components, family):
    controlnet = build_tiny_controlnet(prior.unet, seed=3)
    theirs_pipe = _reference(StableDiffusionXLControlNetPipeline, components, prior, family, controlnet=controlnet)
    pipe = gcfg_with(prior, family, controlnet=controlnet)
    image, g, scale = _image(0), 6.5, 0.8

    def spec(control):
        return GuidanceSpec(
            terms=(GuidanceTerm("edges", Source("controlnet", Condition("a face", control, scale)), g),),
            unconditional=Source("controlnet", Condition("", control, scale)),
        )

    ours = pipe(spec(image), num_images=2, generator=_gen(5), **LATENT).images
    theirs = theirs_pipe("a face", image=image, guidance_scale=g, controlnet_conditioning_scale=scale,
                         num_images_per_prompt=2, generator=_gen(5), **LATENT).images
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # the ControlNet's residuals matter, and so does its image (weakly: random conditioning weights);
    # the same inputs reproduce bit for bit, so 1e-5 is well above noise
    plain = pipe(GuidanceSpec.cfg("a face", g), num_images=2, generator=_gen(5), **LATENT).images
    assert (plain - theirs).abs().max() > 1e-2
    flipped = pipe(spec(_image(1)), num_images=2, generator=_gen(5), **LATENT).images
    assert (flipped - theirs).abs().max() > 1e-5


class NullTextStandIn(UNet2DConditionModel):
    """The SDXL null-text concept model's interface: no text input; time ids only in added_cond_kwargs,
    the text and pooled embeddings fixed buffers (here the zero empty-prompt embeddings)."""

    def forward(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=True):
        assert encoder_hidden_states is None and set(added_cond_kwargs) == {"time_ids"}
        n = sample.shape[0]
        text = torch.zeros(n, 77, self.config.cross_attention_dim, dtype=sample.dtype)
        pooled = torch.zeros(n, self.config.projection_class_embeddings_input_dim - 6 * self.config.addition_time_embed_dim,
                             dtype=sample.dtype)
        return super().forward(sample, timestep, encoder_hidden_states=text,
                               added_cond_kwargs={"text_embeds": pooled, **added_cond_kwargs}, return_dict=return_dict)


@pytest.fixture(scope="module")
def concept_pipe(prior):
    concept = NullTextStandIn.from_config(prior.unet.config)
    concept.load_state_dict(prior.unet.state_dict())
    pipe = GCFGPipeline.from_prior(prior, concept_unet=concept.eval(), scheduler=_scheduler(prior))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_concept_denoiser_gets_the_time_ids(ref, concept_pipe):
    # the stand-in with zero buffers is the prior's unconditional: as the unconditional source, diffusers' CFG
    spec = GuidanceSpec(terms=(GuidanceTerm("text", Source("prior", Condition("a cat")), 5.0),),
                        unconditional=Source("concept"))
    # (two batches where diffusers runs one: CPU convolutions round differently, ~1e-5)
    ours = concept_pipe(spec, num_images=2, generator=_gen(6), **LATENT).images
    theirs = ref("a cat", guidance_scale=5.0, num_images_per_prompt=2, generator=_gen(6), **LATENT).images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=5e-5)
    size = dict(original_size=(32, 32), target_size=(32, 32))
    resized = concept_pipe(spec, num_images=2, generator=_gen(6), **size, **LATENT).images
    theirs_resized = ref("a cat", guidance_scale=5.0, num_images_per_prompt=2, generator=_gen(6), **size, **LATENT).images
    torch.testing.assert_close(resized, theirs_resized, rtol=1e-4, atol=5e-5)
    assert (resized - ours).abs().max() > 1e-3


def test_each_denoiser_runs_once_per_step_on_all_its_conditions(concept_pipe):
    calls = {"prior": [], "concept": []}

    def record(name):
        def hook(module, args, kwargs, output):
            added = kwargs["added_cond_kwargs"]
            calls[name].append((args[0].shape[0], added["time_ids"].shape[0], sorted(added)))
        return hook

    hooks = [concept_pipe.unet.register_forward_hook(record("prior"), with_kwargs=True),
             concept_pipe.concept_unet.register_forward_hook(record("concept"), with_kwargs=True)]
    spec = GuidanceSpec(terms=(GuidanceTerm("concept", Source("concept"), 1.5),
                               GuidanceTerm("control", Source("prior", Condition("a hat")), 5.0)))
    try:
        for n in (1, 3):
            for v in calls.values():
                v.clear()
            concept_pipe(spec, num_images=n, **LATENT)
            assert calls["prior"] == [(2 * n, 2 * n, ["text_embeds", "time_ids"])] * STEPS  # "" + "a hat", one batch
            assert calls["concept"] == [(n, n, ["time_ids"])] * STEPS
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.filterwarnings("ignore:You have passed 2 text prompts:FutureWarning")
@pytest.mark.parametrize("family", FAMILIES)
def test_img2img_equals_diffusers_sdxl_img2img(prior, components, family):
    gcfg = gcfg_with(prior, family)
    theirs_pipe = _reference(StableDiffusionXLImg2ImgPipeline, components, prior, family, requires_aesthetics_score=False)
    kw = dict(num_inference_steps=5, output_type="latent")
    for gens in (lambda: _gen(7), lambda: noise_generators(7, range(2))):
        ours = gcfg(GuidanceSpec.cfg("a red car", 6.0), num_images=2, image=_image(2), strength=0.6, generator=gens(),
                    **kw).images
        theirs = theirs_pipe("a red car", image=_image(2), strength=0.6, guidance_scale=6.0, num_images_per_prompt=2,
                             generator=gens(), **kw).images
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    other = gcfg(GuidanceSpec.cfg("a red car", 6.0), num_images=2, image=_image(3), strength=0.6, generator=gens(), **kw)
    assert (other.images - theirs).abs().max() > 1e-2


def test_save_and_load_round_trip(prior, components, tmp_path):
    pipe = GCFGXLPipeline(**{**components, "scheduler": _scheduler(prior)}, force_zeros_for_empty_prompt=False)
    pipe.set_progress_bar_config(disable=True)
    other = UNet2DConditionModel.from_config(prior.unet.config)
    pipe.add_denoiser("other", other.eval())
    spec = GuidanceSpec(terms=(GuidanceTerm("text", Source("prior", Condition("a tree")), 4.0),
                               GuidanceTerm("other", Source("other", Condition("a tree")), 1.5)))
    before = pipe(spec, num_images=2, generator=_gen(8), **LATENT).images
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = GCFGPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, GCFGXLPipeline) and loaded.config.force_zeros_for_empty_prompt is False
    assert set(loaded.denoisers) == {"prior", "other"}
    torch.testing.assert_close(loaded(spec, num_images=2, generator=_gen(8), **LATENT).images, before, rtol=0, atol=0)


def test_add_denoiser_refuses_an_sd15_unet(gcfg):
    with pytest.raises(ValueError, match="does not fit the SDXL prior"):
        gcfg.add_denoiser("sd15", UNet2DConditionModel(**TINY_UNET_CONFIG))
    assert "sd15" not in gcfg.denoisers


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return save_tiny_prior(tmp_path_factory.mktemp("tiny-sdxl"), seed=0, family="sdxl")


def test_ccp_sample_on_an_sdxl_folder_equals_the_pipeline(sdxl_dir, tmp_path):
    cfg = compose("sample", overrides=[f"prior.path={sdxl_dir}", "sampling.steps=2", "sampling.num_images=2",
                                       "guidance.terms.text.weight=4.5"])
    out = sample_cli.run_sampling(cfg, tmp_path / "out")
    got = [np.asarray(PIL.Image.open(p)) for p in sorted((out / "images").glob("*.png"))]
    assert len(got) == 2 and got[0].shape == (SIZE, SIZE, 3)  # default size: unet sample_size x VAE factor

    pipe = GCFGPipeline.from_prior(load_prior(sdxl_dir))
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, GCFGXLPipeline)
    spec = GuidanceSpec(terms=(GuidanceTerm("text", Source("prior", Condition("a photo of a face")), 4.5),))
    direct = pipe(spec, num_images=2, num_inference_steps=2, generator=noise_generators(0, range(2))).images
    for a, b in zip(got, direct, strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert not np.array_equal(got[0], got[1])


def test_ccp_sample_refuses_another_family(sdxl_dir, tmp_path):
    cfg = compose("sample", overrides=[f"prior.path={sdxl_dir}", "prior.family=sd1", "sampling.steps=1"])
    with pytest.raises(ConfigError, match="prior.family=sd1"):
        sample_cli.run_sampling(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "images").exists()
