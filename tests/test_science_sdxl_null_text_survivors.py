"""The null-text UNet's SDXL parts and its construction/loading helpers (ccp/models/null_text_unet.py),
pinned where the last mutation run (benchmarks/results/mutation/report.md) showed no test would
notice a change. Expected values come from the tiny text encoders called directly, from hand, or
from recording stand-ins."""

from __future__ import annotations

import inspect
import re
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from ccp.models.null_text_unet import (
    NullTextCalibration,
    NullTextFeaturesMissingError,
    NullTextUNet2DConditionModel,
    UnsupportedPriorError,
    null_text_from_pipeline,
    sdxl_empty_prompt,
    size_time_ids,
)
from ccp.priors.tiny import TINY_SDXL_UNET_CONFIG, TINY_UNET_CONFIG, build_tiny_prior

TIME_IDS = torch.tensor([[96.0, 80.0, 8.0, 0.0, 64.0, 64.0]])


@pytest.fixture(scope="module")
def sdxl():
    return build_tiny_prior(0, family="sdxl")


@pytest.fixture(scope="module")
def zeros_model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG).eval()
    pooled = torch.linspace(-1, 1, 32).view(1, 32)
    return NullTextUNet2DConditionModel.from_null_text(unet, torch.zeros(1, 77, 64), pooled, "value_mean",
                                                       source="zeros")


# --- size_time_ids -------------------------------------------------------------------------------------
def test_size_time_ids_are_the_pixel_size_twice_with_no_crop_in_the_samples_dtype_and_device():
    ids = size_time_ids(torch.zeros(3, 4, 5, 7, dtype=torch.float16))
    assert ids.dtype == torch.float16 and ids.shape == (3, 6)
    assert ids.tolist() == [[40.0, 56.0, 0.0, 0.0, 40.0, 56.0]] * 3
    assert size_time_ids(torch.zeros(1, 4, 5, 7), vae_scale=4).tolist() == [[20.0, 28.0, 0.0, 0.0, 20.0, 28.0]]
    meta = size_time_ids(torch.zeros(2, 4, 5, 7, device="meta", dtype=torch.bfloat16))
    assert meta.device.type == "meta" and meta.dtype == torch.bfloat16 and meta.shape == (2, 6)


# --- the SDXL empty prompt -----------------------------------------------------------------------------
def test_sdxl_empty_prompt_is_both_penultimate_hidden_states_and_the_projected_pooled_output(sdxl):
    got_text, got_pooled = sdxl_empty_prompt(sdxl.text_encoder, sdxl.tokenizer, sdxl.text_encoder_2, sdxl.tokenizer_2)
    hidden = []
    with torch.no_grad():
        for tok, enc in ((sdxl.tokenizer, sdxl.text_encoder), (sdxl.tokenizer_2, sdxl.text_encoder_2)):
            n = tok.model_max_length
            pad = tok.pad_token_id
            ids = torch.tensor([[tok.bos_token_id, tok.eos_token_id] + [pad] * (n - 2)])
            out = enc(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        pooled = out.text_embeds
    assert got_text.shape == (1, 77, 64) and got_pooled.shape == (1, 32)
    torch.testing.assert_close(got_text, torch.cat(hidden, dim=-1), rtol=0, atol=0)
    torch.testing.assert_close(got_pooled, pooled, rtol=0, atol=0)
    # the penultimate layer is neither the last nor the one before it
    assert not torch.equal(hidden[0], out.hidden_states[-1]) and not torch.equal(hidden[0], out.hidden_states[-3])


def test_sdxl_empty_prompt_without_a_projected_encoder_is_refused(sdxl):
    with pytest.raises(UnsupportedPriorError) as info:
        sdxl_empty_prompt(sdxl.text_encoder, sdxl.tokenizer, sdxl.text_encoder, sdxl.tokenizer)
    assert str(info.value) == "no text encoder with a pooled projection (SDXL's text_encoder_2) was given"


class FakeTokenizer:
    model_max_length = 6

    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return SimpleNamespace(input_ids=torch.arange(kwargs.get("max_length") or 3).view(1, -1))


class Out(tuple):
    hidden_states = None


class CallableEncoder:
    def __init__(self, pooled, scale):
        self.device = torch.device("meta")
        self.pooled, self.scale, self.calls = pooled, scale, []

    def __call__(self, ids, **kwargs):
        self.calls.append((ids, kwargs))
        first = torch.full((1, 3), 7.0 * self.scale) if self.pooled else torch.ones(1, 6, 2)
        out = Out((first,))
        out.hidden_states = tuple(torch.full((1, 6, 2), float(v) * self.scale) for v in (1, 2, 3))
        return out


@pytest.mark.parametrize("with_first", [True, False])
def test_sdxl_empty_prompt_pads_to_max_length_on_each_encoders_device(with_first):
    tok, tok_2 = FakeTokenizer(), FakeTokenizer()
    enc, enc_2 = CallableEncoder(False, 1.0), CallableEncoder(True, 10.0)
    if with_first:
        text, pooled = sdxl_empty_prompt(enc, tok, enc_2, tok_2)
    else:
        text, pooled = sdxl_empty_prompt(None, None, enc_2, tok_2)
    call = (("",), dict(padding="max_length", max_length=6, truncation=True, return_tensors="pt"))
    assert tok_2.calls == [call]
    assert tok.calls == ([call] if with_first else [])
    for e in (enc, enc_2) if with_first else (enc_2,):
        (ids, kwargs), = e.calls
        assert ids.device.type == "meta" and ids.shape == (1, 6) and kwargs == {"output_hidden_states": True}
    assert torch.equal(pooled, torch.full((1, 3), 70.0))
    expected = [torch.full((1, 6, 2), 2.0)] if with_first else []
    expected.append(torch.full((1, 6, 2), 20.0))
    assert torch.equal(text, torch.cat(expected, dim=-1))


# --- null_text_from_pipeline's arguments to from_prior -------------------------------------------------
@pytest.fixture
def recorded(monkeypatch):
    calls = []

    def fake_from_prior(unet, text_encoder, tokenizer, **kwargs):
        calls.append(((unet, text_encoder, tokenizer), kwargs))
        return "model"

    monkeypatch.setattr(NullTextUNet2DConditionModel, "from_prior", staticmethod(fake_from_prior))
    return calls


def _prior(config, scheduler=True, sdxl=True):
    prior = SimpleNamespace(unet="u", text_encoder="te", tokenizer="tok", config=config)
    if sdxl:
        prior.text_encoder_2, prior.tokenizer_2 = "te2", "tok2"
    if scheduler:
        prior.scheduler = "the prior's scheduler"
    return prior


@pytest.mark.parametrize("config, source", [({}, "zeros"), ({"force_zeros_for_empty_prompt": True}, "zeros"),
                                            ({"force_zeros_for_empty_prompt": False}, "empty_prompt")])
def test_sdxl_pipelines_null_text_follows_force_zeros_which_defaults_to_true(recorded, config, source):
    assert null_text_from_pipeline(_prior(config)) == "model"
    (args, kwargs), = recorded
    assert args == ("u", "te", "tok")
    assert kwargs.keys() == {"text_encoder_2", "tokenizer_2", "null_text", "calibration"}
    assert kwargs["null_text"] == source and kwargs["text_encoder_2"] == "te2" and kwargs["tokenizer_2"] == "tok2"
    assert isinstance(kwargs["calibration"], NullTextCalibration)
    assert kwargs["calibration"].scheduler == "the prior's scheduler"


def test_a_given_calibration_is_kept_and_a_prior_without_scheduler_gets_none(recorded):
    mine = NullTextCalibration(num_timesteps=3)
    null_text_from_pipeline(_prior({}), calibration=mine, null_text="empty_prompt")
    null_text_from_pipeline(_prior({}, scheduler=False, sdxl=False))
    null_text_from_pipeline(_prior({}, sdxl=False), calibration=None)
    (_, first), (_, second), (_, third) = recorded
    assert first["calibration"] is mine and first["null_text"] == "empty_prompt"
    assert second == {}
    assert third.keys() == {"calibration"} and third["calibration"].scheduler == "the prior's scheduler"
    assert third["calibration"].num_timesteps == 8


# --- the calibration's noisy latents with any scheduler ------------------------------------------------
class OwnScheduler:
    """A scheduler with its own add_noise and a DDPM-compatible config, with or without init_noise_sigma."""

    config = {"num_train_timesteps": 1000}

    def __init__(self, sigma=None):
        if sigma is not None:
            self.init_noise_sigma = sigma
        self.timesteps = []

    def add_noise(self, z0, noise, t):
        self.timesteps.append(t)
        return z0 + 100.0 * noise + t.view(-1, 1, 1, 1)


@pytest.mark.parametrize("sigma", [None, 1.0])
def test_calibration_uses_the_schedulers_own_add_noise_when_it_works_in_the_unets_space(sigma):
    z0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    scheduler = OwnScheduler(sigma)
    unet = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float64)
    pairs = NullTextCalibration(timesteps=[5, 900], latents=z0, scheduler=scheduler, seed=4).noisy_latents(unet)
    g = torch.Generator().manual_seed(4)
    assert [t for t, _ in pairs] == [5, 900]
    for (t, x_t), expected_t in zip(pairs, (5, 900)):
        noise = torch.randn(z0.shape, generator=g)
        assert x_t.dtype == torch.float64
        torch.testing.assert_close(x_t, (z0 + 100.0 * noise + expected_t).double())
    assert [ts.tolist() for ts in scheduler.timesteps] == [[5, 5], [900, 900]]


def test_calibration_with_a_sigma_space_scheduler_noises_with_ddpm_on_its_betas():
    z0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    scheduler = OwnScheduler(2.0)
    unet = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)
    (t, x_t), = NullTextCalibration(timesteps=[700], latents=z0, scheduler=scheduler, seed=4).noisy_latents(unet)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(4))
    ddpm = DDPMScheduler(num_train_timesteps=1000)
    a = ddpm.alphas_cumprod[700]
    torch.testing.assert_close(x_t, a.sqrt() * z0 + (1 - a).sqrt() * noise)
    assert scheduler.timesteps == []


# --- the model's construction, config, forward and loading ---------------------------------------------
def test_positional_arguments_reach_the_unet_and_the_config_keeps_the_parents_defaults_list():
    rest = {k: v for k, v in TINY_UNET_CONFIG.items() if k != "sample_size"}
    model = NullTextUNet2DConditionModel(8, null_text_definition="value_mean", null_text_calibration={"seed": 3},
                                         null_text_source="zeros", **rest)
    assert model.config.sample_size == 8 and model.conv_in.in_channels == 4
    assert model.config.null_text_definition == "value_mean"
    assert model.config.null_text_calibration == {"seed": 3}
    assert model.config.null_text_source == "zeros"
    assert model.config.null_text_pooled_dim is None and model.pooled_null_text is None
    # diffusers lists the UNet arguments left at their defaults (a positional one counts as such)
    params = set(inspect.signature(UNet2DConditionModel.__init__).parameters) - {"self"}
    assert set(model.config["_use_default_values"]) == params - set(rest)
    by_name = NullTextUNet2DConditionModel(**TINY_UNET_CONFIG)
    assert set(by_name.config["_use_default_values"]) == params - set(TINY_UNET_CONFIG)


def test_sdxl_model_takes_forward_keywords_and_casts_the_pooled_null_text_to_the_samples_dtype(zeros_model):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        as_tuple = zeros_model(x, 10, added_cond_kwargs={"time_ids": TIME_IDS}, return_dict=False)
        as_output = zeros_model(x, 10, added_cond_kwargs={"time_ids": TIME_IDS})
    assert isinstance(as_tuple, tuple) and isinstance(as_output, UNet2DConditionOutput)
    assert torch.equal(as_tuple[0], as_output.sample)
    added = zeros_model._added_conditioning(x.double(), {"time_ids": TIME_IDS})
    assert added["text_embeds"].dtype == torch.float64 and added["text_embeds"].shape == (2, 32)
    assert torch.equal(added["text_embeds"], torch.linspace(-1, 1, 32).double().expand(2, -1))
    assert torch.equal(added["time_ids"], TIME_IDS.expand(2, -1))


def test_sdxl_model_errors_say_exactly_what_to_pass(zeros_model):
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError) as info:
        zeros_model._added_conditioning(x, {"time_ids": TIME_IDS, "text_embeds": torch.zeros(1, 32)})
    assert str(info.value) == (
        "this null-text UNet's pooled text embedding is fixed (its pooled_null_text buffer); "
        "pass added_cond_kwargs={'time_ids': ...} without 'text_embeds'"
    )
    with pytest.raises(ValueError) as info:
        zeros_model._added_conditioning(x, None)
    assert str(info.value) == (
        "this SDXL null-text UNet needs the image's size/crop conditioning: call it with "
        "added_cond_kwargs={'time_ids': ids}, ids of shape [batch, 6] = (original h, w, crop top, left, "
        "target h, w) in pixels, e.g. ccp.models.null_text_unet.size_time_ids(sample) for uncropped "
        "images of the latents' size"
    )


def test_loading_a_model_whose_pooled_null_text_is_nan_is_refused(zeros_model, tmp_path):
    zeros_model.save_pretrained(tmp_path)
    loaded = NullTextUNet2DConditionModel.from_pretrained(tmp_path)
    assert torch.equal(loaded.pooled_null_text, zeros_model.pooled_null_text)
    model, info = NullTextUNet2DConditionModel.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(model, NullTextUNet2DConditionModel) and info["missing_keys"] == []
    broken = NullTextUNet2DConditionModel.from_config(zeros_model.config)
    broken.load_state_dict(zeros_model.state_dict())
    with torch.no_grad():
        broken.pooled_null_text.fill_(float("nan"))
    broken.save_pretrained(tmp_path / "nan")
    message = (
        f"{tmp_path / 'nan'} does not hold null-text UNet features (1 missing, e.g. pooled_null_text); "
        "it is probably a plain UNet folder or an incomplete save. Convert the prior with "
        "NullTextUNet2DConditionModel.from_prior(unet, text_encoder, tokenizer) (for any family: "
        "null_text_from_pipeline(prior)) and save_pretrained that."
    )
    with pytest.raises(NullTextFeaturesMissingError, match="^" + re.escape(message) + "$"):
        NullTextUNet2DConditionModel.from_pretrained(tmp_path / "nan")
