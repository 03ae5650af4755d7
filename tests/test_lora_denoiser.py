"""A LoRA adapter as its own denoiser on the prior UNet: equals a merged copy, adds only its weights."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from ccp.config import ConfigError
from ccp.guidance import Condition, GuidanceSpec, GuidanceTerm, Source
from ccp.pipelines.gcfg import GCFGPipeline
from ccp.priors.lora import LoRAShapeError
from ccp.priors.tiny import TINY_UNET_CONFIG, build_tiny_prior

STEPS, SIZE = 4, 64
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def write_lora(unet: UNet2DConditionModel, folder, seed: int = 1):
    """A LoRA with random (non-zero) B, saved as diffusers' training scripts save one."""
    trained = copy.deepcopy(unet)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trained.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
        with torch.no_grad():
            for name, param in trained.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.2)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(trained))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors", layers


def _storages(modules) -> dict[int, int]:
    found = {}
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            found[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return found


@pytest.fixture()
def prior():
    return build_tiny_prior(0)  # its own: the LoRA is attached to this prior's UNet


def _pipe(prior):
    pipe = GCFGPipeline.from_prior(prior, scheduler=DPMSolverMultistepScheduler.from_config(prior.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_lora_denoiser_equals_a_merged_copy_and_adds_only_its_weights(prior, tmp_path):
    lora_file, layers = write_lora(prior.unet, tmp_path)
    pipe = _pipe(prior)
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="latent")
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    prior_only = pipe(GuidanceSpec.cfg("a cat", 5.0), generator=gen(), **kw).images
    before = _storages(pipe.components[k] for k in ("unet", "vae", "text_encoder"))
    base_ptrs = {n: p.data_ptr() for n, p in pipe.unet.named_parameters()}

    pipe.add_lora_denoiser("style", lora_file)

    after = _storages(pipe.components[k] for k in ("unet", "vae", "text_encoder"))
    added = sum(nbytes for ptr, nbytes in after.items() if ptr not in before)
    adapter_bytes = sum(t.numel() * t.element_size() for t in layers.values())
    assert set(before) <= set(after)  # every prior tensor is still there, none copied
    assert 0 < added <= adapter_bytes
    base_now = {n.replace(".base_layer", ""): p.data_ptr() for n, p in pipe.unet.named_parameters() if "lora_" not in n}
    assert base_now == base_ptrs  # the LoRA layers wrap the prior's own weight tensors

    # the prior's own calls still see the base weights
    torch.testing.assert_close(pipe(GuidanceSpec.cfg("a cat", 5.0), generator=gen(), **kw).images, prior_only, rtol=0, atol=0)
    ours = pipe(GuidanceSpec.cfg("a cat", 5.0, denoiser="style"), generator=gen(), **kw).images

    merged = copy.deepcopy(build_tiny_prior(0).unet)
    merged.load_lora_adapter(str(lora_file), prefix="unet", adapter_name="merged")
    merged.fuse_lora()
    merged.unload_lora()
    ref = StableDiffusionPipeline(**{**prior.components, "unet": merged,
                                     "scheduler": DPMSolverMultistepScheduler.from_config(prior.scheduler.config)})
    ref.set_progress_bar_config(disable=True)
    theirs = ref("a cat", guidance_scale=5.0, generator=gen(), **kw).images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)  # merging re-rounds the weights
    assert (ours - prior_only).abs().max() > 1e-1

    # mixed in GCFG: prior unconditional and control prompt, LoRA as a third term, in one sample
    spec = GuidanceSpec(terms=(
        GuidanceTerm("control", Source("prior", Condition("a cat")), 4.0),
        GuidanceTerm("style", Source("style", Condition("a cat")), 1.5),
    ))
    mixed = pipe(spec, generator=gen(), **kw).images
    assert torch.isfinite(mixed).all() and (mixed - prior_only).abs().max() > 1e-2


def test_lora_of_another_architecture_is_refused_before_attaching(prior, tmp_path):
    other = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "block_out_channels": (16, 32), "norm_num_groups": 8})
    lora_file, _ = write_lora(other, tmp_path)
    pipe = _pipe(prior)
    with pytest.raises(LoRAShapeError, match=r"does not fit the prior UNet: .*input size 16, the prior's layer has 32") as err:
        pipe.add_lora_denoiser("style", lora_file)
    assert isinstance(err.value, ConfigError)
    assert not getattr(pipe.unet, "_hf_peft_config_loaded", False) and "style" not in pipe.denoisers


def test_missing_or_text_encoder_lora_is_refused(prior, tmp_path):
    pipe = _pipe(prior)
    with pytest.raises(LoRAShapeError, match=r"does not exist"):
        pipe.add_lora_denoiser("style", tmp_path / "nope.safetensors")
    _, layers = write_lora(prior.unet, tmp_path)
    text = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)}
    with pytest.raises(LoRAShapeError, match=r"not for the UNet .* export a UNet-only LoRA"):
        pipe.add_lora_denoiser("style", {**{f"unet.{k}": v for k, v in layers.items()}, **text})
