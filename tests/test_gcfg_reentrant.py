"""Calls on one GCFG pipeline may interleave: a call started from another's step callback gives
the images it gives alone, and so does the call it interrupted; neither writes an attribute of the
pipeline."""

from __future__ import annotations

import pytest
import torch

from ccp.guidance import GuidanceSpec
from ccp.models.null_text_unet import null_text_from_pipeline
from ccp.pipelines.gcfg import GCFGPipeline
from ccp.pipelines.sampling import noise_generators
from guidance_cases import SIZE, THREE_TERMS, random_image, right_half_mask
from schedulers import gcfg_with

STEPS = 4
LATENT = dict(height=SIZE, width=SIZE, output_type="latent")


@pytest.fixture(scope="module")
def concept(tiny_prior):
    return null_text_from_pipeline(tiny_prior, definition="value_mean").eval()


# a multistep solver (history) and one that scales inputs and adds noise by its step index
@pytest.mark.parametrize("family", ["dpmsolver++", "EulerDiscreteScheduler"])
def test_a_call_started_inside_another_gives_the_images_of_two_calls_in_turn(tiny_prior, concept, family, monkeypatch):
    pipe = gcfg_with(tiny_prior, family, concept_unet=concept)
    outer_kw = dict(guidance=THREE_TERMS, num_images=2, num_inference_steps=STEPS, **LATENT)
    # inpainting: the blend noises the init latents with the scheduler's own step index
    inner_kw = dict(guidance=GuidanceSpec.cfg("a cat", 4.0), num_images=1, num_inference_steps=STEPS + 2,
                    image=random_image(1), mask_image=right_half_mask(), strength=0.7, **LATENT)
    outer_alone = pipe(generator=noise_generators(3, range(2)), **outer_kw).images
    inner_alone = pipe(generator=noise_generators(9, [0]), **inner_kw).images

    inner = []

    def start_another(i, t, latents):
        if i == 1:
            inner.append(pipe(generator=noise_generators(9, [0]), **inner_kw).images)

    writes = []
    set_attribute = GCFGPipeline.__setattr__
    monkeypatch.setattr(GCFGPipeline, "__setattr__", lambda self, name, value: writes.append(name) or set_attribute(self, name, value))
    outer = pipe(generator=noise_generators(3, range(2)), callback_on_step_end=start_another, **outer_kw).images
    monkeypatch.undo()

    assert torch.equal(inner[0], inner_alone)
    assert torch.equal(outer, outer_alone)
    assert writes == []  # neither call wrote an attribute of the pipeline
