"""Priors: the offline CLIP tokenizer, the tiny SD-shaped prior, and SD v1.5 folder loading."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ccp.cli.tiny_prior import main as tiny_prior_main
from ccp.priors import (
    PriorNotFoundError,
    build_clip_tokenizer,
    build_tiny_controlnet,
    build_tiny_prior,
    check_prior_folder,
    load_controlnet,
    load_prior,
    resolve_dtype,
)

BOS_ID, EOS_ID = 49406, 49407

# Strings on which the HF tokenizer must agree with OpenAI's reference BPE. HTML entities
# ("&amp;") and mojibake are left out on purpose: the reference runs ftfy + html.unescape first,
# which transformers' (fast) CLIPTokenizer, and hence SD v1.x in diffusers, does not.
PROMPTS = [
    "a photo of a cat",
    "A PHOTO of a Cat",
    "Hello, World!!! What's up? I'm fine; you'll see...",
    "numbers 0 7 42 2023 3.14159 1,000,000",
    "<ffhq> portrait of a person",
    "a <sks> dog, (high-res), #tag @user",
    "café naïve résumé Zürich",
    "東京 の 写真 😀 🐱",
    "tabs\tand\nnewlines   and   spaces",
    "snake_case kebab-case CamelCase",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer()


@pytest.fixture(scope="module")
def reference_ids():
    from clip.simple_tokenizer import SimpleTokenizer

    ref = SimpleTokenizer()
    return lambda text: [BOS_ID, *ref.encode(text), EOS_ID]


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _any_weight_differs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sb = b.state_dict()
    return any(not torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def _public_config(config) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _copy_prior(tiny_prior_dir, tmp_path):
    return shutil.copytree(tiny_prior_dir, tmp_path / "prior")


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_special_tokens_and_sizes(tokenizer):
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    assert tokenizer.bos_token_id == BOS_ID
    assert tokenizer.eos_token_id == EOS_ID
    assert tokenizer.pad_token_id == EOS_ID
    assert tokenizer.convert_ids_to_tokens([BOS_ID, EOS_ID]) == ["<|startoftext|>", "<|endoftext|>"]


def test_tokenizer_known_sd_ids(tokenizer):
    # The ids SD v1.x's tokenizer (openai/clip-vit-large-patch14) gives for this prompt.
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.parametrize("text", PROMPTS)
def test_tokenizer_matches_reference_bpe(tokenizer, reference_ids, text):
    assert tokenizer(text).input_ids == reference_ids(text)


def test_tokenizer_pads_with_eos(tokenizer):
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert set(ids[7:]) == {EOS_ID}


def test_tokenizer_truncates_long_prompt_to_77(tokenizer, reference_ids):
    words = ["cat", "dog", "tree", "house", "river"] * 20
    prompt = " ".join(words)  # 100 words, one token each
    full = reference_ids(prompt)
    assert len(full) == 102

    ids = tokenizer(prompt, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert ids[1:76] == full[1:76]


def test_tokenizer_save_and_reload_keeps_ids(tokenizer, tmp_path):
    from transformers import CLIPTokenizer

    tokenizer.save_pretrained(tmp_path / "tok")
    reloaded = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    assert len(reloaded) == 49408
    assert reloaded.model_max_length == 77
    assert reloaded.pad_token_id == EOS_ID
    for text in PROMPTS:
        assert reloaded(text).input_ids == tokenizer(text).input_ids, text


def test_prior_folder_tokenizer_matches(tiny_prior, tokenizer):
    assert tiny_prior.tokenizer.model_max_length == 77
    assert tiny_prior.tokenizer.pad_token_id == EOS_ID
    for text in PROMPTS:
        assert tiny_prior.tokenizer(text).input_ids == tokenizer(text).input_ids, text


# --------------------------------------------------------------------------- tiny prior


def test_tiny_prior_is_deterministic_per_seed():
    a, b, c = build_tiny_prior(0), build_tiny_prior(0), build_tiny_prior(1)
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(a, name), getattr(b, name))
        assert _any_weight_differs(getattr(a, name), getattr(c, name)), name


def test_tiny_prior_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_tiny_prior(5)
    assert torch.equal(torch.rand(4), expected)


def test_cli_writes_loadable_prior_equal_to_in_memory(tmp_path):
    out = tmp_path / "tiny"
    tiny_prior_main([str(out), "--seed", "3"])
    assert not (out / "controlnet").exists()

    loaded = load_prior(out)
    built = build_tiny_prior(3)
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(loaded, name), getattr(built, name))
    assert type(loaded.scheduler) is type(built.scheduler)
    assert _public_config(loaded.scheduler.config) == _public_config(built.scheduler.config)


def test_cli_with_controlnet_matches_unet(tmp_path):
    out = tmp_path / "tiny"
    tiny_prior_main([str(out), "--seed", "2", "--with-controlnet"])
    controlnet = load_controlnet(out / "controlnet")
    unet = load_prior(out).unet

    for key in ("cross_attention_dim", "block_out_channels", "down_block_types", "layers_per_block", "in_channels"):
        assert controlnet.config[key] == unet.config[key], key

    built = build_tiny_prior(2)
    _assert_same_weights(controlnet, build_tiny_controlnet(built.unet, seed=2 + 3))


def test_controlnet_weights_are_not_zero_initialised(tiny_prior_dir):
    controlnet = load_controlnet(tiny_prior_dir / "controlnet")
    zero_convs = list(controlnet.controlnet_down_blocks) + [controlnet.controlnet_mid_block]
    for conv in zero_convs:
        assert conv.weight.abs().sum() > 0


def test_controlnet_residuals_fit_the_unet(tiny_prior, tiny_prior_dir):
    controlnet = load_controlnet(tiny_prior_dir / "controlnet")
    unet, hidden = tiny_prior.unet, tiny_prior.text_encoder.config.hidden_size
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 77, hidden, generator=torch.Generator().manual_seed(1))
    cond = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([500])
    with torch.no_grad():
        down, mid = controlnet(latents, t, text, controlnet_cond=cond, return_dict=False)
        plain = unet(latents, t, text).sample
        controlled = unet(
            latents, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
    assert controlled.shape == plain.shape == latents.shape
    assert not torch.allclose(controlled, plain)


def test_vae_downsamples_by_8(tiny_prior):
    vae = tiny_prior.vae
    assert vae.config.latent_channels == 4
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(image).latent_dist.mean
        decoded = vae.decode(latents).sample
    assert latents.shape == (1, 4, 8, 8)
    assert decoded.shape == (1, 3, 64, 64)
    assert tiny_prior.vae_scale_factor == 8


def test_unet_consumes_text_encoder_output(tiny_prior):
    unet, text_encoder, tokenizer = tiny_prior.unet, tiny_prior.text_encoder, tiny_prior.tokenizer
    assert unet.config.in_channels == 4 and unet.config.out_channels == 4
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size
    assert text_encoder.config.vocab_size == len(tokenizer) == 49408
    assert text_encoder.config.max_position_embeddings == 77

    ids = tokenizer("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text = text_encoder(ids.repeat(2, 1))[0]
        out = unet(latents, torch.tensor([10, 900]), text).sample
    assert text.shape == (2, 77, unet.config.cross_attention_dim)
    assert out.shape == latents.shape


def test_scheduler_has_sd15_betas(tiny_prior):
    scheduler = tiny_prior.scheduler
    cfg = scheduler.config
    assert cfg.num_train_timesteps == 1000
    assert cfg.beta_start == pytest.approx(0.00085)
    assert cfg.beta_end == pytest.approx(0.012)
    assert cfg.beta_schedule == "scaled_linear"
    assert cfg.prediction_type == "epsilon"
    expected = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(scheduler.betas.double(), expected, rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------------- loading errors


def test_missing_folder_says_how_to_get_sd15(tmp_path):
    missing = tmp_path / "no-such-prior"
    with pytest.raises(PriorNotFoundError) as err:
        load_prior(missing)
    assert str(missing) in str(err.value)
    assert "huggingface-cli download" in str(err.value)
    assert isinstance(err.value, FileNotFoundError)


def test_folder_without_model_index(tiny_prior_dir, tmp_path):
    folder = _copy_prior(tiny_prior_dir, tmp_path)
    (folder / "model_index.json").unlink()
    with pytest.raises(PriorNotFoundError, match="model_index.json"):
        load_prior(folder)


@pytest.mark.parametrize("component", ["vae", "unet", "text_encoder", "tokenizer", "scheduler"])
def test_missing_component_folder_is_named(tiny_prior_dir, tmp_path, component):
    folder = _copy_prior(tiny_prior_dir, tmp_path)
    shutil.rmtree(folder / component)
    with pytest.raises(PriorNotFoundError) as err:
        load_prior(folder)
    message = str(err.value)
    assert f"{component}/" in message
    others = {"vae", "unet", "text_encoder", "tokenizer", "scheduler"} - {component}
    missing_part = message.split("missing:")[1].split("\n")[0]
    assert not any(f"{o}/" in missing_part for o in others), message


@pytest.mark.parametrize(
    ("component", "weights"),
    [
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ],
)
def test_missing_weights_file_is_named(tiny_prior_dir, tmp_path, component, weights):
    folder = _copy_prior(tiny_prior_dir, tmp_path)
    (folder / component / weights).unlink()
    with pytest.raises(PriorNotFoundError, match=f"{component}/ weights"):
        check_prior_folder(folder)


def test_component_not_declared_in_model_index(tiny_prior_dir, tmp_path):
    folder = _copy_prior(tiny_prior_dir, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    del index["unet"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(PriorNotFoundError, match=r"unet \(not declared"):
        check_prior_folder(folder)


def test_complete_copy_passes_check(tiny_prior_dir, tmp_path):
    folder = _copy_prior(tiny_prior_dir, tmp_path)
    assert check_prior_folder(folder) == folder


def test_unreachable_hub_id_raises_prior_not_found(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # never touch the network in tests
    with pytest.raises(PriorNotFoundError, match="huggingface-cli download"):
        load_prior("ccp-test-nobody/not-a-real-model")


def test_load_controlnet_without_config(tiny_prior_dir, tmp_path):
    folder = shutil.copytree(tiny_prior_dir / "controlnet", tmp_path / "controlnet")
    (folder / "config.json").unlink()
    with pytest.raises(PriorNotFoundError) as err:
        load_controlnet(folder)
    assert str(folder) in str(err.value) and "config.json" in str(err.value)


def test_resolve_dtype():
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("fp16") is torch.float16
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype(torch.float16) is torch.float16
    assert resolve_dtype(None) is None


@pytest.mark.parametrize("bad", ["float17", "int8x", "Tensor"])
def test_resolve_dtype_rejects_unknown(bad):
    with pytest.raises(ValueError, match=bad):
        resolve_dtype(bad)


def test_load_prior_in_float16(tiny_prior_dir, tiny_prior):
    pipe = load_prior(tiny_prior_dir, dtype="float16")
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.float16}
    assert {p.dtype for p in pipe.text_encoder.parameters()} == {torch.float16}
    # Loading at half precision keeps the stored weights (to fp16 rounding).
    reference = tiny_prior.unet.state_dict()
    for key, value in pipe.unet.state_dict().items():
        assert torch.equal(value, reference[key].half()), key
