"""The null-text conversion's default and its calibration inputs, pinned independently: the
documented default definition, the 8 timesteps evenly spread over [0, 999], the noising by SD v1.5's
schedule computed by hand, and the features as the mean empty-prompt cross-attention output."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch
from diffusers.models.attention import BasicTransformerBlock

from ccp.methods.base import PromptTemplate
from ccp.methods.ours import NullTextConcept
from ccp.models.null_text_unet import (
    DEFAULT_NULL_TEXT_DEFINITION,
    NullTextCalibration,
    empty_prompt_embedding,
)

# 999 * k / 7 for k = 0..7, rounded to the nearest integer by hand
SPREAD = [0, 143, 285, 428, 571, 714, 856, 999]


def sd15_alpha_bar() -> np.ndarray:
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def test_default_definition_is_calibrated():
    # README: "The default is `calibrated`"
    assert DEFAULT_NULL_TEXT_DEFINITION == "calibrated"
    calibration = NullTextCalibration()
    assert calibration.resolved_timesteps() == SPREAD
    assert (calibration.batch_size, calibration.seed) == (2, 0)


def test_calibration_noises_latents_with_the_sd15_schedule():
    g = torch.Generator().manual_seed(7)
    z0 = torch.randn(2, 4, 16, 16, generator=g) * 0.8 + 0.3
    unet = SimpleNamespace(config=SimpleNamespace(sample_size=16, in_channels=4), device=torch.device("cpu"),
                           dtype=torch.float32)
    pairs = NullTextCalibration(latents=z0).noisy_latents(unet)
    assert [t for t, _ in pairs] == SPREAD
    ab = sd15_alpha_bar()
    residuals = []
    for t, x_t in pairs:
        assert x_t.shape == z0.shape and x_t.dtype == torch.float32
        # x_t = sqrt(ab_t) z0 + sqrt(1 - ab_t) eps: what is left once the signal is removed is N(0, 1) noise
        eps = (x_t.double() - math.sqrt(ab[t]) * z0.double()) / math.sqrt(1.0 - ab[t])
        assert abs(float(eps.mean())) < 4 / math.sqrt(eps.numel())
        assert abs(float(eps.std()) - 1.0) < 0.1
        residuals.append(eps)
    # fresh noise at every timestep, not one draw reused
    assert all(not torch.allclose(residuals[0], r, atol=1e-2) for r in residuals[1:])
    # default latents: standard normal at the UNet's sample size, batch 2
    default = NullTextCalibration().noisy_latents(unet)
    z = default[0][1]  # t = 0: x_0 is z0 up to sqrt(ab_0) ~ 0.99957 and 0.029 noise
    assert z.shape == (2, 4, 16, 16) and abs(float(z.std()) - 1.0) < 0.1


def test_default_concept_model_is_calibrated_on_the_prior_empty_prompt(tiny_prior):
    model = NullTextConcept(tiny_prior, PromptTemplate())
    config = model.unet.config
    assert config.null_text_definition == "calibrated"
    assert config.null_text_calibration["timesteps"] == SPREAD
    assert config.null_text_calibration["batch_size"] == 2 and config.null_text_calibration["seed"] == 0

    # by hand: run the prior on the documented calibration inputs with the empty prompt and average
    # each cross-attention's output over batch, positions and timesteps
    unet = tiny_prior.unet
    text = empty_prompt_embedding(tiny_prior.text_encoder, tiny_prior.tokenizer)
    sums, counts, handles = {}, {}, []
    for name, block in unet.named_modules():
        if isinstance(block, BasicTransformerBlock) and block.attn2 is not None:
            def hook(module, args, output, name=name):
                flat = output.reshape(-1, output.shape[-1]).double()
                sums[name] = sums.get(name, 0) + flat.sum(0)
                counts[name] = counts.get(name, 0) + flat.shape[0]
            handles.append(block.attn2.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for t, x_t in NullTextCalibration().noisy_latents(unet):
                unet(x_t, t, encoder_hidden_states=text.expand(x_t.shape[0], -1, -1))
    finally:
        for h in handles:
            h.remove()
    features = model.unet.null_text_features()
    assert set(features) == set(sums) and len(features) > 0
    for name, feature in features.items():
        assert counts[name] == 8 * 2 * (counts[name] // 16)  # 8 timesteps x 2 latents x positions
        torch.testing.assert_close(feature.double(), sums[name] / counts[name], rtol=1e-5, atol=1e-6)


def test_null_text_is_the_empty_prompt_as_the_sd_pipeline_encodes_it(tiny_prior):
    # diffusers' own encoding of the negative/empty prompt: "" padded to the tokenizer's 77 tokens
    reference, _ = tiny_prior.encode_prompt("", torch.device("cpu"), 1, do_classifier_free_guidance=False)
    null_text = empty_prompt_embedding(tiny_prior.text_encoder, tiny_prior.tokenizer)
    assert null_text.shape == (1, tiny_prior.tokenizer.model_max_length, reference.shape[-1])
    torch.testing.assert_close(null_text, reference)


def test_calibration_records_what_went_into_the_features_and_uses_a_given_schedule():
    from diffusers import DDIMScheduler

    assert NullTextCalibration().to_config() == {
        "timesteps": SPREAD, "batch_size": 2, "seed": 0, "latents": "standard normal", "scheduler": "DDPMScheduler"}
    z0 = torch.ones(3, 4, 8, 8)
    # the prior's own schedule when given: here linear betas 1e-4..0.02 over 1000 steps (DDPM's)
    linear = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    calibration = NullTextCalibration(latents=z0, timesteps=[500], scheduler=linear, seed=3)
    assert calibration.to_config() == {
        "timesteps": [500], "batch_size": 3, "seed": 3, "latents": "user-provided", "scheduler": "DDIMScheduler"}
    unet = SimpleNamespace(config=SimpleNamespace(sample_size=8, in_channels=4), device=torch.device("cpu"),
                           dtype=torch.float32)
    ((t, x_t),) = calibration.noisy_latents(unet)
    ab = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))[500]
    eps = (x_t.double() - math.sqrt(ab)) / math.sqrt(1 - ab)  # z0 = 1 everywhere
    assert abs(float(eps.mean())) < 0.15 and abs(float(eps.std()) - 1.0) < 0.1
    # with SD v1.5's schedule instead, the same x_t would not be standard normal noise around the signal
    ab_sd = sd15_alpha_bar()[500]
    wrong = (x_t.double() - math.sqrt(ab_sd)) / math.sqrt(1 - ab_sd)
    assert abs(float(wrong.mean())) > 0.15
