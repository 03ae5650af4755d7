"""The tiny SD3 pipeline (ccp.priors.tiny_sd3): plain diffusers loads and samples it offline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from ccp.cli.tiny_prior import main as tiny_prior_main
from ccp.priors.tiny_sd3 import build_tiny_sd3, save_tiny_sd3

PROMPT = "a photo of a dog on the beach"


def _sample(pipe, guidance_scale=5.0, output_type="np"):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, height=32, width=32, num_inference_steps=2, guidance_scale=guidance_scale,
                output_type=output_type, generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope="module")
def pipe0():
    return build_tiny_sd3(0)


def _state(pipe):
    return {f"{name}.{k}": v for name in ("transformer", "vae", "text_encoder", "text_encoder_2")
            for k, v in getattr(pipe, name).state_dict().items()}


def test_saved_folder_loads_in_plain_diffusers_and_samples_like_the_built_pipeline(pipe0, tmp_path):
    folder = save_tiny_sd3(tmp_path / "sd3", seed=0)
    assert list((folder / "transformer").glob("*.safetensors"))
    # diffusers drops the folder's null T5 entries and then refuses the pipeline unless they are
    # passed as None (they are not optional components): what every T5-less SD3 load must do
    loaded = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    assert loaded.text_encoder_3 is None and loaded.tokenizer_3 is None
    assert loaded.vae.config.shift_factor == pipe0.vae.config.shift_factor != 0
    image = _sample(loaded)
    assert image.shape == (1, 32, 32, 3)
    assert np.isfinite(image).all() and image.std() > 0
    np.testing.assert_allclose(image, _sample(pipe0), atol=1e-6, rtol=0)


def test_decode_applies_the_vae_shift_and_scale(pipe0):
    latents = _sample(pipe0, output_type="latent")
    assert latents.shape == (1, 4, 4, 4)  # 8x VAE, 4 latent channels
    config = pipe0.vae.config
    with torch.no_grad():
        decoded = pipe0.vae.decode(latents / config.scaling_factor + config.shift_factor).sample
        unshifted = pipe0.vae.decode(latents / config.scaling_factor).sample
    expected = pipe0.image_processor.postprocess(decoded, output_type="np")
    np.testing.assert_allclose(_sample(pipe0), expected, atol=1e-6, rtol=0)
    assert not np.allclose(expected, pipe0.image_processor.postprocess(unshifted, output_type="np"), atol=1e-4)


def test_weights_are_a_function_of_the_seed(pipe0):
    same, other = _state(build_tiny_sd3(0)), build_tiny_sd3(1)
    reference = _state(pipe0)
    assert same.keys() == reference.keys()
    assert all(torch.equal(same[k], reference[k]) for k in reference)
    other_transformer = other.transformer.state_dict()
    differing = [k for k, v in pipe0.transformer.state_dict().items()
                 if v.std() > 0 and not torch.equal(v, other_transformer[k])]
    assert differing and "pos_embed.proj.weight" in differing


def test_console_script_writes_an_sd3_folder(tmp_path, capsys):
    out = tmp_path / "tiny-sd3"
    tiny_prior_main([str(out), "--family", "sd3", "--seed", "0"])
    assert "SD3" in capsys.readouterr().out
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (out / sub).is_dir(), sub


def test_console_script_refuses_a_controlnet_for_sd3(tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        tiny_prior_main([str(tmp_path / "x"), "--family", "sd3", "--with-controlnet"])
    assert raised.value.code == 2
    assert "--with-controlnet" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_guidance_scale_changes_the_image(pipe0):
    unguided, guided = _sample(pipe0, guidance_scale=1.0), _sample(pipe0, guidance_scale=5.0)
    assert not np.allclose(unguided, guided, atol=1e-4)


def test_prompt_embeddings_fill_the_transformer_widths(pipe0):
    embeds, _, pooled, _ = pipe0.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=False)
    config = pipe0.transformer.config
    # 77 CLIP tokens, then the 256 zero tokens diffusers puts in T5's place
    assert embeds.shape == (1, 77 + 256, config.joint_attention_dim)
    assert pooled.shape == (1, config.pooled_projection_dim)
    assert torch.count_nonzero(embeds[:, 77:]) == 0
    # the two CLIP hidden states span the whole width: a wider one would be zero-padded, a
    # narrower one silently cropped (the pipeline pads by a negative amount)
    clip_widths = (pipe0.text_encoder.config.hidden_size, pipe0.text_encoder_2.config.hidden_size)
    assert config.joint_attention_dim == sum(clip_widths)
    assert (embeds[:, :77].abs().amax(dim=(0, 1)) > 0).all()
