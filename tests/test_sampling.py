"""The one sampling primitive and the pipeline's components.

Image i of seed s is one definition (`ccp.pipelines.sampling`): ccp-sample, the FID generator and
the alignment generator give the same image for the same (s, i) and guidance; its noise does not
depend on the batch it is drawn in, and it is diffusers' noise for ``Generator().manual_seed(s + i)``.
Extra denoisers are pipeline components: `.to()`, CPU offload and save/load see them.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from ccp.config import compose
from ccp.evaluation.alignment import SamplingConfig, generate
from ccp.evaluation.generation import PipelineSampler
from ccp.guidance import Condition, GuidanceSpec, GuidanceTerm, Source
from ccp.pipelines.extra_denoisers import EXTRA_DENOISERS
from ccp.pipelines.gcfg import GCFGPipeline
from ccp.pipelines.run import run_sampling
from ccp.pipelines.sampling import noise_generators, sample_images
from ccp.priors import load_controlnet

SEED, STEPS, SIZE = 5, 2, 64
SPEC = GuidanceSpec.cfg("a photo of a face", 7.5)  # = conf/guidance/cfg.yaml


@pytest.fixture(scope="module")
def pipe(tiny_prior):
    pipe = GCFGPipeline.from_prior(tiny_prior)  # DPM-Solver++, as ccp-sample builds it
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _uint8(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_ccp_sample_fid_and_alignment_draw_the_same_image_i_of_seed_s(pipe, tiny_prior_dir, tmp_path):
    cfg = compose("sample", [f"prior.path={tiny_prior_dir}", f"sampling.height={SIZE}", f"sampling.width={SIZE}",
                             f"sampling.steps={STEPS}", f"sampling.seed={SEED}", "sampling.num_images=3",
                             "sampling.batch_size=3", "device=cpu"])
    out = run_sampling(cfg, tmp_path)
    cli = [_uint8(PIL.Image.open(out / "images" / f"{i:05d}.png")) for i in range(3)]

    fid = PipelineSampler(pipe, SPEC, num_inference_steps=STEPS, height=SIZE, width=SIZE, batch_size=3)([0, 1, 2], SEED)
    config = SamplingConfig(steps=STEPS, height=SIZE, width=SIZE, seed=SEED)
    alignment = generate(pipe, SPEC, [0, 1, 2], config)
    for i in range(3):
        np.testing.assert_array_equal(fid[i].permute(1, 2, 0).numpy(), cli[i])
        np.testing.assert_array_equal(_uint8(alignment[i]), cli[i])
    assert not np.array_equal(cli[0], cli[1])  # different images, so the equalities could fail
    # another seed is another image i
    other = generate(pipe, SPEC, [2], SamplingConfig(steps=STEPS, height=SIZE, width=SIZE, seed=SEED + 1))
    assert not np.array_equal(_uint8(other[0]), cli[2])


def test_noise_of_image_i_is_independent_of_the_batch_and_equals_diffusers_seeding(pipe, tiny_prior):
    generators = noise_generators(SEED, [0, 1, 2])
    assert all(g.device.type == "cpu" for g in generators)  # the same noise on any device
    batch = pipe.prepare_latents(3, SIZE, SIZE, torch.float32, generators)
    alone = pipe.prepare_latents(1, SIZE, SIZE, torch.float32, noise_generators(SEED, [2]))
    torch.testing.assert_close(alone[0], batch[2], rtol=0, atol=0)
    # image i of seed s is diffusers' image for Generator().manual_seed(s + i)
    reference = StableDiffusionPipeline(**tiny_prior.components)
    reference.scheduler = pipe.scheduler
    reference.set_progress_bar_config(disable=True)
    ours = sample_images(pipe, SPEC, [2], seed=SEED, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                         output_type="latent")
    theirs = reference("a photo of a face", guidance_scale=7.5, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                       generator=torch.Generator().manual_seed(SEED + 2), output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def _other_unet(tiny_prior) -> UNet2DConditionModel:
    other = copy.deepcopy(tiny_prior.unet)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.05)
    return other


def test_extra_denoisers_are_components_that_move_offload_save_and_load(tiny_prior, tiny_prior_dir, tmp_path):
    pipe = GCFGPipeline.from_prior(tiny_prior)
    pipe.set_progress_bar_config(disable=True)
    other = _other_unet(tiny_prior)
    controlnet = load_controlnet(tiny_prior_dir / "controlnet")
    pipe.add_denoiser("other", other)
    pipe.add_denoiser("other+controlnet", other, controlnet=controlnet)
    assert pipe.components["other"] is other and pipe.components["other_controlnet"] is controlnet
    assert pipe.denoisers["other+controlnet"].unet is other  # one module, two denoisers
    spec = GuidanceSpec(terms=(GuidanceTerm("text", Source("other", Condition("a photo of a face")), 5.0),))
    kw = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="latent")
    before = sample_images(pipe, spec, [0], seed=SEED, **kw)

    pipe.save_pretrained(tmp_path / "saved")
    table = json.loads((tmp_path / "saved" / EXTRA_DENOISERS).read_text())
    assert table == {"other": {"unet": "other", "controlnet": None},
                     "other+controlnet": {"unet": "other", "controlnet": "other_controlnet"}}
    loaded = GCFGPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    assert set(loaded.denoisers) == {"prior", "other", "other+controlnet"}
    assert loaded.denoisers["other+controlnet"].unet is loaded.other
    for a, b in zip(loaded.other.parameters(), other.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # (reloaded text encoder and VAE round differently in the last bits; "other" vs the prior differs by far more)
    torch.testing.assert_close(sample_images(loaded, spec, [0], seed=SEED, **kw), before, rtol=0, atol=1e-4)
    on_prior = GuidanceSpec(terms=(GuidanceTerm("text", Source("prior", Condition("a photo of a face")), 5.0),))
    assert (sample_images(loaded, on_prior, [0], seed=SEED, **kw) - before).abs().max() > 1e-3

    loaded.to(torch.float64)  # a dtype move reaches the extra modules
    assert {p.dtype for p in loaded.other.parameters()} == {torch.float64}
    assert {p.dtype for p in loaded.other_controlnet.parameters()} == {torch.float64}
    loaded.enable_model_cpu_offload(device="cpu")  # offload hooks go on every component
    assert hasattr(loaded.other, "_hf_hook") and hasattr(loaded.other_controlnet, "_hf_hook")

    with pytest.raises(ValueError, match="already registered"):
        pipe.add_denoiser("other", _other_unet(tiny_prior))
    pipe.add_denoiser("other", other)  # the same module again: nothing changes
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        pipe.add_denoiser("bad", controlnet)
