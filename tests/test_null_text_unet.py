"""The null-text concept UNet (§4.3, Eq. 4-6): conversion, both feature definitions, loading, training."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from safetensors.torch import load_file, save_file

from ccp.models import (
    NullTextCalibration,
    NullTextFeaturesMissingError,
    NullTextUNet2DConditionModel,
    calibrated_features,
)

CALIBRATION = dict(timesteps=(0, 333, 666, 999), batch_size=2, seed=0)
DROPPED = re.compile(r"transformer_blocks\.\d+\.(attn2|norm2)\.")


def _cross_attention_blocks(unet):
    return {
        name: block
        for name, block in unet.named_modules()
        if isinstance(block, BasicTransformerBlock) and block.attn2 is not None
    }


def _empty_prompt(pipe):
    ids = pipe.tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def _convert(pipe, unet=None, **kwargs):
    return NullTextUNet2DConditionModel.from_prior(unet or pipe.unet, pipe.text_encoder, pipe.tokenizer, **kwargs)


def _inputs(seed=123, batch=2):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=generator)


@pytest.fixture(scope="module")
def value_mean_unet(tiny_prior):
    return _convert(tiny_prior, definition="value_mean")


@pytest.fixture(scope="module")
def calibrated_unet(tiny_prior):
    return _convert(tiny_prior, definition="calibrated", calibration=NullTextCalibration(**CALIBRATION))


def test_conversion_drops_cross_attention_and_keeps_everything_else(tiny_prior):
    prior = copy.deepcopy(tiny_prior.unet).requires_grad_(False)  # frozen prior: the result must still train
    model = _convert(tiny_prior, unet=prior, definition="value_mean")
    blocks = _cross_attention_blocks(prior)
    assert blocks

    names = [name for name, _ in model.named_parameters()]
    assert not [n for n in names if "attn2" in n or DROPPED.search(n)]
    dropped = sum(p.numel() for b in blocks.values() for m in (b.attn2, b.norm2) for p in m.parameters())
    assert dropped > 0
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in prior.parameters()) - dropped
    assert all(p.requires_grad for p in model.parameters())

    buffers = dict(model.named_buffers())
    features = {name: buffers[f"{name}.attn2.feature"] for name in blocks}
    assert len([b for b in buffers if b.endswith("attn2.feature")]) == len(blocks)
    for name, feature in features.items():
        assert feature.shape == (blocks[name].attn2.to_out[0].out_features,)
        assert not feature.requires_grad and torch.isfinite(feature).all()

    prior_state = prior.state_dict()
    prior_storage = {p.untyped_storage().data_ptr() for p in prior.parameters()}
    for key, value in model.state_dict().items():
        if not key.endswith("attn2.feature"):
            assert torch.equal(value, prior_state[key]), key
        # Training the concept model must never write into the prior's weights.
        assert value.untyped_storage().data_ptr() not in prior_storage, key


def test_value_mean_feature_is_eq5_on_the_empty_prompt(tiny_prior, value_mean_unet):
    assert value_mean_unet.config.null_text_definition == "value_mean"
    null_text = _empty_prompt(tiny_prior)
    features = value_mean_unet.null_text_features()
    with torch.no_grad():
        for name, block in _cross_attention_blocks(tiny_prior.unet).items():
            attn = block.attn2
            expected = attn.to_out[0](attn.to_v(null_text).mean(dim=1))[0]
            torch.testing.assert_close(features[name], expected, rtol=1e-6, atol=1e-6)


def test_calibrated_feature_is_the_mean_prior_cross_attention_output(tiny_prior, calibrated_unet):
    prior = tiny_prior.unet
    null_text = _empty_prompt(tiny_prior)
    calibration = NullTextCalibration(**CALIBRATION)
    recorded = {}
    blocks = _cross_attention_blocks(prior)
    handles = [
        block.attn2.register_forward_hook(lambda m, a, out, name=name: recorded.setdefault(name, []).append(out))
        for name, block in blocks.items()
    ]
    try:
        pairs = calibration.noisy_latents(prior)
        assert [t for t, _ in pairs] == list(CALIBRATION["timesteps"])
        with torch.no_grad():
            for t, x_t in pairs:
                assert x_t.shape == (2, 4, 8, 8)
                prior(x_t, t, encoder_hidden_states=null_text.expand(x_t.shape[0], -1, -1))
    finally:
        for handle in handles:
            handle.remove()

    features = calibrated_unet.null_text_features()
    for name in blocks:
        outputs = torch.cat([o.reshape(-1, o.shape[-1]) for o in recorded[name]])
        torch.testing.assert_close(features[name], outputs.mean(dim=0), rtol=1e-5, atol=1e-6)
    recorded_config = calibrated_unet.config.null_text_calibration
    assert recorded_config["timesteps"] == list(CALIBRATION["timesteps"]) and recorded_config["seed"] == 0


def test_calibration_is_deterministic_per_seed(tiny_prior):
    null_text = _empty_prompt(tiny_prior)

    def features(seed):
        calibration = NullTextCalibration(timesteps=(100, 900), batch_size=1, seed=seed)
        return torch.cat(list(calibrated_features(tiny_prior.unet, null_text, calibration).values()))

    first = features(0)
    assert torch.equal(features(0), first)
    assert not torch.allclose(features(1), first)


def test_uniform_prior_attention_makes_value_mean_exact(tiny_prior, value_mean_unet):
    # With to_k == 0 every query sees equal logits, so the prior's cross-attention output is the
    # token-mean of the values: the value_mean null-text UNet must then reproduce it exactly.
    prior = copy.deepcopy(tiny_prior.unet)
    with torch.no_grad():
        for block in _cross_attention_blocks(prior).values():
            block.attn2.to_k.weight.zero_()
            if block.attn2.to_k.bias is not None:
                block.attn2.to_k.bias.zero_()
    model = _convert(tiny_prior, unet=prior, definition="value_mean")
    null_text = _empty_prompt(tiny_prior).expand(2, -1, -1)
    x = _inputs()
    with torch.no_grad():
        for t in (0, 500, 999):
            expected = prior(x, t, encoder_hidden_states=null_text).sample
            torch.testing.assert_close(model(x, t).sample, expected, rtol=1e-5, atol=1e-5)
        # Controls: the original (non-uniform) prior and a zero feature both give different outputs.
        original = tiny_prior.unet(x, 500, encoder_hidden_states=null_text).sample
        assert not torch.allclose(value_mean_unet(x, 500).sample, original, rtol=1e-5, atol=1e-5)
        for feature in model.null_text_features().values():
            feature.zero_()
        assert not torch.allclose(model(x, 500).sample, expected, rtol=1e-3, atol=1e-3)


def test_encoder_hidden_states_is_optional_and_ignored(value_mean_unet):
    x = _inputs()
    with torch.no_grad():
        out = value_mean_unet(x, 10).sample
        assert out.shape == x.shape and torch.isfinite(out).all()
        text = torch.randn(2, 77, 32)
        assert torch.equal(value_mean_unet(x, 10, encoder_hidden_states=text).sample, out)
        assert torch.equal(value_mean_unet(x, 10, None).sample, out)


@pytest.mark.parametrize("definition", ["value_mean", "calibrated"])
def test_save_and_load_round_trip(definition, value_mean_unet, calibrated_unet, tmp_path):
    model = value_mean_unet if definition == "value_mean" else calibrated_unet
    model.save_pretrained(tmp_path)
    loaded = NullTextUNet2DConditionModel.from_pretrained(tmp_path)
    assert loaded.config.null_text_definition == definition
    assert loaded.config.null_text_calibration == model.config.null_text_calibration
    x = _inputs(seed=7)
    with torch.no_grad():
        assert torch.equal(loaded(x, 321).sample, model(x, 321).sample)


@pytest.mark.parametrize("subfolder", [False, True])
def test_loading_a_plain_unet_folder_is_refused(tiny_prior_dir, subfolder):
    kwargs = {"subfolder": "unet"} if subfolder else {}
    folder = tiny_prior_dir if subfolder else tiny_prior_dir / "unet"
    with pytest.raises(NullTextFeaturesMissingError) as err:
        NullTextUNet2DConditionModel.from_pretrained(folder, **kwargs)
    message = str(err.value)
    assert str(tiny_prior_dir / "unet") in message and "from_prior" in message


@pytest.mark.parametrize("drop", ["all", "one"])
def test_loading_without_feature_keys_is_refused(value_mean_unet, tmp_path, drop):
    value_mean_unet.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    keys = sorted(k for k in state if k.endswith("attn2.feature"))
    assert keys
    for key in keys if drop == "all" else keys[:1]:
        del state[key]
    save_file(state, weights)
    with pytest.raises(NullTextFeaturesMissingError, match=re.escape(str(tmp_path))):
        NullTextUNet2DConditionModel.from_pretrained(tmp_path)


def test_backward_reaches_unet_parameters_not_features(tiny_prior):
    model = _convert(tiny_prior, definition="value_mean").train()
    model(_inputs(), 400).sample.pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())
    for feature in model.null_text_features().values():
        assert feature.grad is None and not feature.requires_grad


def test_bad_conversions_are_rejected(tiny_prior, value_mean_unet):
    with pytest.raises(ValueError, match="value_mean"):
        _convert(tiny_prior, definition="mean")
    with pytest.raises(ValueError, match="already a null-text UNet"):
        _convert(tiny_prior, unet=value_mean_unet)
