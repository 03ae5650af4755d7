"""Single-file checkpoints (original SD layout) as denoisers, read by diffusers' from_single_file."""

from __future__ import annotations

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel
from safetensors.torch import save_file

from ccp.config import ConfigError
from ccp.guidance import GuidanceSpec
from ccp.pipelines.gcfg import GCFGPipeline
from ccp.priors.single_file import SingleFileError, load_single_file_unet, save_unet_single_file, unet_to_original
from ccp.priors.tiny import TINY_UNET_CONFIG


def test_written_single_file_loads_and_equals_its_folder_form(tiny_prior, tiny_prior_dir, tmp_path):
    folder_unet = UNet2DConditionModel.from_pretrained(tiny_prior_dir, subfolder="unet")
    path = save_unet_single_file(folder_unet, tmp_path / "style.safetensors")
    keys = unet_to_original(folder_unet)
    # the original layout's names, as SD v1.x checkpoints have them
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in keys
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in keys  # first up block's upsampler
    assert "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight" in keys

    loaded = load_single_file_unet(path, tiny_prior_dir)
    ours, theirs = loaded.state_dict(), folder_unet.state_dict()
    assert ours.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)

    # a full checkpoint (VAE and text encoder beside the UNet, as community files come) loads the same UNet
    full = {**keys, "first_stage_model.encoder.conv_in.weight": torch.zeros(3),
            "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.zeros(77)}
    save_file(full, str(tmp_path / "full.safetensors"))
    from_full = load_single_file_unet(tmp_path / "full.safetensors", tiny_prior_dir).state_dict()
    assert all(torch.equal(from_full[k], theirs[k]) for k in theirs)

    # as a denoiser it samples exactly what the folder form samples
    pipe = GCFGPipeline.from_prior(tiny_prior, scheduler=DPMSolverMultistepScheduler.from_config(tiny_prior.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    pipe.add_denoiser("single_file", loaded)
    pipe.add_denoiser("folder", folder_unet)
    kw = dict(height=64, width=64, num_inference_steps=3, output_type="latent")
    a = pipe(GuidanceSpec.cfg("a cat", 5.0, denoiser="single_file"), generator=torch.Generator().manual_seed(0), **kw).images
    b = pipe(GuidanceSpec.cfg("a cat", 5.0, denoiser="folder"), generator=torch.Generator().manual_seed(0), **kw).images
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_single_file_of_another_architecture_is_refused(tiny_prior_dir, tmp_path):
    other = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "block_out_channels": (16, 32), "norm_num_groups": 8})
    path = save_unet_single_file(other, tmp_path / "other.safetensors")
    with pytest.raises(SingleFileError, match=r"other\.safetensors is not a checkpoint of the prior's architecture") as err:
        load_single_file_unet(path, tiny_prior_dir)
    assert isinstance(err.value, ConfigError)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: None, r"does not exist"),
        (lambda p: p.write_bytes(b"not safetensors at all"), r"cannot be read as safetensors"),
        (lambda p: save_file({"first_stage_model.encoder.conv_in.weight": torch.zeros(2)}, str(p)),
         r"holds no Stable Diffusion UNet .*first_stage_model"),
    ],
)
def test_missing_corrupt_or_unet_less_file_is_refused(tiny_prior_dir, tmp_path, make, match):
    path = tmp_path / "model.safetensors"
    make(path)
    with pytest.raises(SingleFileError, match=match):
        load_single_file_unet(path, tiny_prior_dir)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"pickle")
    with pytest.raises(SingleFileError, match=r"not a \.safetensors file"):
        load_single_file_unet(ckpt, tiny_prior_dir)
