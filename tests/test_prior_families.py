"""SD 2.x and SDXL priors: the tiny builders, family detection, loading and its errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from ccp.cli.tiny_prior import main as tiny_prior_main
from ccp.config import ConfigError
from ccp.priors import PriorNotFoundError, build_tiny_prior, check_prior_folder, load_prior
from ccp.priors.families import UnsupportedPriorFamilyError, detect_family, family_of

EOS_ID = 49407


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One tiny prior folder per family, written through the CLI."""
    out = {}
    for family in ("sd1", "sd2", "sdxl"):
        folder = tmp_path_factory.mktemp(f"tiny-{family}")
        tiny_prior_main([str(folder), "--family", family, "--seed", "3"])
        out[family] = folder
    return out


def _weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(("family", "pipeline"), [("sd1", StableDiffusionPipeline), ("sd2", StableDiffusionPipeline),
                                                  ("sdxl", StableDiffusionXLPipeline)])
def test_cli_folder_loads_as_its_family_with_the_in_memory_weights(folders, family, pipeline):
    loaded = load_prior(folders[family])
    assert type(loaded) is pipeline
    assert detect_family(folders[family]) == family == family_of(loaded)
    built = build_tiny_prior(3, family=family)
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    for name in names:
        assert _weights_equal(getattr(loaded, name), getattr(built, name)), name


def test_sd2_shape_is_v_prediction_with_linear_projections(folders):
    pipe = load_prior(folders["sd2"])
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.use_linear_projection is True
    assert pipe.text_encoder.config.hidden_act == "gelu"
    # OpenCLIP's tokenizer pads with "!" (id 0) after the EOS, SD v1.x's with the EOS
    ids = pipe.tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert ids[3] == EOS_ID and set(ids[4:]) == {0}


def test_sdxl_shape_conditions_on_both_encoders_and_the_pooled_projection(folders):
    pipe = load_prior(folders["sdxl"])
    unet = pipe.unet
    assert unet.config.addition_embed_type == "text_time"
    widths = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert unet.config.cross_attention_dim == widths
    # what diffusers' _get_add_time_ids checks: 6 time ids x the time embedding + the pooled projection
    expected = 6 * unet.config.addition_time_embed_dim + pipe.text_encoder_2.config.projection_dim
    assert unet.add_embedding.linear_1.in_features == expected
    assert pipe.vae.config.scaling_factor == 0.13025
    assert pipe.config.force_zeros_for_empty_prompt is True
    ids_1 = pipe.tokenizer("a cat", padding="max_length", max_length=77).input_ids
    ids_2 = pipe.tokenizer_2("a cat", padding="max_length", max_length=77).input_ids
    assert ids_1[:4] == ids_2[:4] and set(ids_1[4:]) == {EOS_ID} and set(ids_2[4:]) == {0}


def test_sdxl_tiny_prior_samples_through_diffusers(folders):
    pipe = load_prior(folders["sdxl"])
    out = pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    again = pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    other = pipe("a dog", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3)
    assert (out == again).all() and not (out == other).all()  # the prompt reaches the image


def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "prior")


@pytest.mark.parametrize("component", ["text_encoder_2", "tokenizer_2"])
def test_sdxl_folder_missing_its_second_encoder_is_named(folders, tmp_path, component):
    folder = _copy(folders["sdxl"], tmp_path)
    shutil.rmtree(folder / component)
    with pytest.raises(PriorNotFoundError) as err:
        load_prior(folder)
    message = str(err.value)
    assert "SDXL prior folder" in message and f"{component}/" in message
    assert "stable-diffusion-xl-base-1.0" in message  # how to obtain it


def test_sdxl_folder_missing_second_encoder_weights_is_named(folders, tmp_path):
    folder = _copy(folders["sdxl"], tmp_path)
    (folder / "text_encoder_2" / "model.safetensors").unlink()
    with pytest.raises(PriorNotFoundError, match="text_encoder_2/ weights"):
        check_prior_folder(folder)


@pytest.mark.parametrize(("asked", "found"), [("sdxl", "sd1"), ("sd1", "sdxl"), ("sd2", "sd1"), ("sd1", "sd2")])
def test_wrong_family_is_refused_before_loading(folders, asked, found):
    with pytest.raises(ConfigError) as err:
        load_prior(folders[found], family=asked)
    message = str(err.value)
    assert f"prior.family={asked}" in message and f"prior.family={found}" in message


def test_family_auto_and_matching_family_load(folders):
    assert type(load_prior(folders["sdxl"], family="auto")) is StableDiffusionXLPipeline
    assert family_of(load_prior(folders["sd2"], family="sd2")) == "sd2"
    with pytest.raises(ConfigError, match="prior.family='sd3'"):
        load_prior(folders["sd1"], family="sd3")


@pytest.mark.parametrize(("class_name", "kind"), [("StableDiffusion3Pipeline", "SD3"), ("FluxPipeline", "FLUX")])
def test_transformer_prior_gets_not_supported_yet(tmp_path, class_name, kind):
    folder = tmp_path / "transformer-prior"
    folder.mkdir()
    index = {"_class_name": class_name, "transformer": ["diffusers", "SD3Transformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedPriorFamilyError) as err:
        load_prior(folder)
    message = str(err.value)
    assert kind in message and "not supported yet" in message
    assert "SD v1.x, SD 2.x, SDXL" in message


def test_unknown_family_name_is_refused():
    with pytest.raises(ValueError, match="family='sd3'"):
        build_tiny_prior(0, family="sd3")
