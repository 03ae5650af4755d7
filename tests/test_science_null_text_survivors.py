"""The null-text UNet (ccp/models/null_text_unet.py) pinned where the last mutation run
(benchmarks/results/mutation/report.md) showed no test would notice a change."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock

from ccp.models.null_text_unet import (
    NullTextCrossAttention,
    NullTextFeaturesMissingError,
    NullTextUNet2DConditionModel,
    UnsupportedPriorError,
    cross_attention_blocks,
    empty_prompt_embedding,
)


def test_a_fresh_null_text_attention_holds_a_nan_feature_saved_with_the_model():
    attn = NullTextCrossAttention(5)
    assert attn.feature.shape == (5,) and all(math.isnan(v) for v in attn.feature.tolist())
    assert list(attn.state_dict()) == ["feature"]
    assert attn.extra_repr() == "dim=5"
    with torch.no_grad():
        attn.feature.copy_(torch.arange(5.0))
    h = torch.zeros(2, 3, 5, dtype=torch.float64)
    out = attn(h, encoder_hidden_states=torch.ones(2, 7, 9))
    assert out.dtype == torch.float64 and out.shape == (2, 3, 5)
    assert torch.equal(out, torch.arange(5.0, dtype=torch.float64).expand(2, 3, 5))


# --- the empty prompt, as SD pipelines encode it ------------------------------------------------------
class FakeTokens:
    def __init__(self, n):
        self.input_ids = torch.arange(n).view(1, n)
        self.attention_mask = (torch.arange(n) < 2).long().view(1, n)


class FakeTokenizer:
    model_max_length = 6

    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return FakeTokens(kwargs.get("max_length") or 3)


class FakeEncoder:
    """Reports the meta device, so every tensor it is handed shows where it was moved."""

    def __init__(self, use_attention_mask):
        self.device = torch.device("meta")
        self.config = SimpleNamespace(use_attention_mask=use_attention_mask) if use_attention_mask is not None else SimpleNamespace()
        self.calls = []

    def __call__(self, ids, attention_mask=None):
        self.calls.append((ids, attention_mask))
        return ("hidden", "pooled")


@pytest.mark.parametrize("use_mask", [None, False, True])
def test_the_empty_prompt_is_padded_to_the_tokenizers_max_length_and_encoded_on_the_encoders_device(use_mask):
    tokenizer, encoder = FakeTokenizer(), FakeEncoder(use_mask)
    assert empty_prompt_embedding(encoder, tokenizer) == "hidden"
    assert tokenizer.calls == [(("",), dict(padding="max_length", max_length=6, truncation=True, return_tensors="pt"))]
    (ids, mask), = encoder.calls
    assert ids.device.type == "meta" and ids.shape == (1, 6)
    if use_mask:
        assert mask.device.type == "meta" and mask.shape == (1, 6)
    else:
        assert mask is None


def test_the_empty_prompt_embedding_of_the_tiny_prior_is_bos_eos_then_padding(tiny_prior):
    tok, enc = tiny_prior.tokenizer, tiny_prior.text_encoder
    n = tok.model_max_length
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([[tok.bos_token_id, tok.eos_token_id] + [pad] * (n - 2)])
    with torch.no_grad():
        expected = enc(ids)[0]
    got = empty_prompt_embedding(enc, tok)
    assert got.shape == (1, n, enc.config.hidden_size)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# --- which transformer blocks convert -------------------------------------------------------------------
def block(**kwargs):
    torch.manual_seed(0)
    args = dict(dim=8, num_attention_heads=1, attention_head_dim=8, cross_attention_dim=4)
    args.update(kwargs)
    return BasicTransformerBlock(**args)


def test_sd_blocks_convert_in_order_and_blocks_without_attn2_are_skipped():
    converted = block()
    converted.attn2 = NullTextCrossAttention(8)
    plain, good = block(cross_attention_dim=None), block()
    tree = torch.nn.Sequential(converted, plain, good)
    found = cross_attention_blocks(tree)
    assert [(n, b) for n, b in found] == [("0", converted), ("2", good)]
    with pytest.raises(UnsupportedPriorError) as info:
        cross_attention_blocks(torch.nn.Sequential(plain))
    assert str(info.value) == "the UNet has no cross-attention transformer blocks to convert"


@pytest.mark.parametrize("kind", ["ada_norm", "only_cross", "self_attention", "residual", "added_kv", "all"])
def test_unsupported_blocks_are_refused_naming_the_block_and_every_problem(kind):
    norm = "norm_type='ada_norm' (only 'layer_norm', as in SD, is supported)"
    cross = "attn2 is not a pure text cross-attention"
    residual = "attn2 has a residual connection or added KV projections"
    if kind == "ada_norm":
        b, problems = block(norm_type="ada_norm", num_embeds_ada_norm=10), [norm]
    elif kind == "only_cross":
        b, problems = block(only_cross_attention=True), [cross]
    elif kind == "self_attention":
        b, problems = block(cross_attention_dim=None, double_self_attention=True), [cross]
    elif kind == "residual":
        b, problems = block(), [residual]
        b.attn2.residual_connection = True
    elif kind == "added_kv":
        b, problems = block(), [residual]
        b.attn2.added_kv_proj_dim = 4
    else:
        b, problems = block(norm_type="ada_norm", num_embeds_ada_norm=10, only_cross_attention=True), [norm, cross, residual]
        b.attn2.residual_connection = True
    tree = torch.nn.Sequential(block(), b)
    with pytest.raises(UnsupportedPriorError) as info:
        cross_attention_blocks(tree)
    assert str(info.value) == f"cannot convert transformer block 1: {'; '.join(problems)}"


# --- the model built from a config -----------------------------------------------------------------------
def test_a_model_built_from_a_config_records_its_null_text_settings_and_replaces_every_attn2(tiny_prior):
    prior_blocks = cross_attention_blocks(tiny_prior.unet)
    model = NullTextUNet2DConditionModel.from_config(tiny_prior.unet.config)
    assert model.config.null_text_definition == "calibrated"
    assert model.config.null_text_source == "empty_prompt"
    assert model.config.null_text_calibration is None and model.config.null_text_pooled_dim is None
    used = model.config["_use_default_values"]
    assert isinstance(used, list) and not [k for k in used if k.startswith("null_text_")]
    assert model.pooled_null_text is None and "pooled_null_text" not in model.state_dict()
    blocks = dict(cross_attention_blocks(model))
    assert list(blocks) == [n for n, _ in prior_blocks]
    for name, prior_block in prior_blocks:
        attn = blocks[name].attn2
        assert type(attn) is NullTextCrossAttention and isinstance(blocks[name].norm2, torch.nn.Identity)
        assert attn.feature.shape == (prior_block.attn2.to_out[0].out_features,)
    model = NullTextUNet2DConditionModel.from_config(tiny_prior.unet.config, null_text_definition="value_mean",
                                                     null_text_source="zeros")
    assert (model.config.null_text_definition, model.config.null_text_source) == ("value_mean", "zeros")
    with pytest.raises(ValueError, match="null-text definition must be one of"):
        NullTextUNet2DConditionModel.from_config(tiny_prior.unet.config, null_text_definition="mean")
    with pytest.raises(ValueError, match="null_text must be one of"):
        NullTextUNet2DConditionModel.from_config(tiny_prior.unet.config, null_text_source="blank")


def test_an_sdxl_config_gets_a_nan_pooled_buffer_of_the_pooled_width():
    from ccp.priors.tiny import TINY_SDXL_UNET_CONFIG

    model = NullTextUNet2DConditionModel.from_config(TINY_SDXL_UNET_CONFIG)
    c = model.config
    width = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    assert c.null_text_pooled_dim == width
    assert model.pooled_null_text.shape == (width,) and torch.isnan(model.pooled_null_text).all()
    assert "pooled_null_text" in model.state_dict()
    model = NullTextUNet2DConditionModel.from_config(TINY_SDXL_UNET_CONFIG, null_text_pooled_dim=width)
    assert model.pooled_null_text.shape == (width,)


# --- loading ---------------------------------------------------------------------------------------------------
def test_loading_returns_the_info_only_when_asked_and_names_nan_features(tiny_prior, tmp_path):
    model = NullTextUNet2DConditionModel.from_null_text(tiny_prior.unet, torch.zeros(1, 77, tiny_prior.unet.config.cross_attention_dim),
                                                        definition="value_mean")
    model.save_pretrained(tmp_path / "good" / "unet")
    loaded = NullTextUNet2DConditionModel.from_pretrained(tmp_path / "good", subfolder="unet")
    assert isinstance(loaded, NullTextUNet2DConditionModel)
    pair = NullTextUNet2DConditionModel.from_pretrained(tmp_path / "good", subfolder="unet", output_loading_info=True)
    assert isinstance(pair, tuple) and pair[0].__class__ is NullTextUNet2DConditionModel
    assert pair[1]["missing_keys"] == [] and pair[1]["unexpected_keys"] == []
    for name, feature in loaded.null_text_features().items():
        torch.testing.assert_close(feature, model.null_text_features()[name])
    # saved with NaN features (never converted): refused, every block named by its feature key
    fresh = NullTextUNet2DConditionModel.from_config(tiny_prior.unet.config)
    fresh.save_pretrained(tmp_path / "nan")
    keys = sorted(f"{n}.attn2.feature" for n, _ in cross_attention_blocks(fresh))
    with pytest.raises(NullTextFeaturesMissingError) as info:
        NullTextUNet2DConditionModel.from_pretrained(tmp_path / "nan")
    assert str(info.value) == (
        f"{tmp_path / 'nan'} does not hold null-text UNet features ({len(keys)} missing, e.g. {keys[0]}); "
        "it is probably a plain UNet folder or an incomplete save. Convert the prior with "
        "NullTextUNet2DConditionModel.from_prior(unet, text_encoder, tokenizer) (for any family: "
        "null_text_from_pipeline(prior)) and save_pretrained that.")


# --- calibration inputs land on the UNet's device and dtype ------------------------------------------------
def test_calibration_latents_are_moved_to_the_unets_device_and_dtype():
    from ccp.models.null_text_unet import NullTextCalibration

    config = SimpleNamespace(sample_size=2, in_channels=3)
    calibration = NullTextCalibration(timesteps=[0, 500, 999], batch_size=2, seed=4)
    on_meta = calibration.noisy_latents(SimpleNamespace(config=config, device=torch.device("meta"), dtype=torch.float16))
    assert [t for t, _ in on_meta] == [0, 500, 999]
    assert all(x.device.type == "meta" and x.dtype == torch.float16 and x.shape == (2, 3, 2, 2) for _, x in on_meta)
    as_f64 = calibration.noisy_latents(SimpleNamespace(config=config, device=torch.device("cpu"), dtype=torch.float64))
    as_f32 = calibration.noisy_latents(SimpleNamespace(config=config, device=torch.device("cpu"), dtype=torch.float32))
    for (_, a), (_, b) in zip(as_f64, as_f32):
        assert a.dtype == torch.float64 and torch.equal(a, b.double())  # the same draws, only the dtype differs
