"""Every method samples its current weights in memory (`sampling_pipeline`, what validation grids
and in-training metrics use): the same images as its export loaded back, no file written and no
export made, the method's own tensors shared rather than copied, its training state untouched, and
each update of the weights visible in the next sample."""

from __future__ import annotations

import builtins
import io
import os
import tempfile

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiffusionPipeline, ModelMixin
from transformers import PreTrainedModel

from ccp.methods import TRAINABLE, DreamBooth, PromptTemplate, build_method
from ccp.methods.export import in_memory
from ccp.pipelines.gcfg import GCFGPipeline
from ccp.pipelines.sampling import sample_images
from ccp.priors.tiny import SD15_SCHEDULER_CONFIG

NAMES = sorted(TRAINABLE)
SAMPLE = dict(seed=0, num_inference_steps=3, height=32, width=32, output_type="np")
CAPTIONS = ["a red digit 3", "a blue digit 5"]  # text_to_image trains on captions; the others ignore them


# --- helpers -----------------------------------------------------------------------------------
def perturb(method, seed: int = 0, scale: float = 0.05) -> None:
    """Move every trainable tensor a little (relative to its spread; zeros by `scale`), so the
    method differs from the prior it was built on."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.trainable_parameters():
            spread = float(p.float().std()) if p.numel() > 1 else 0.0
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale * (spread or 1.0))


def train_step(method, lr: float = 1e-2, seed: int = 0) -> None:
    """One step of the training loop's update: predict, MSE to the noise, AdamW, hook."""
    g = torch.Generator().manual_seed(seed)
    latents, noise = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    timesteps = torch.tensor([150, 650])
    noisy = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG).add_noise(latents, noise, timesteps)
    condition = torch.rand(2, 3, 32, 32, generator=g)  # controlnet's conditioning images (latents 4x4: 32 px)
    inputs = method.batch_inputs({"caption": CAPTIONS, "condition": condition}, torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(list(method.trainable_parameters()), lr=lr, weight_decay=0.0)
    F.mse_loss(method.predict_noise(noisy, timesteps, **inputs).float(), noise).backward()
    opt.step()
    method.on_after_optimizer_step()


def sample(method, pipe, denoiser) -> np.ndarray:
    spec = type(method).default_guidance(denoiser, method.template, control_prompt="smiling")
    return sample_images(pipe, spec, [0, 1], **SAMPLE)


def sample_in_memory(method, prior) -> np.ndarray:
    """As the validation callbacks do: the method in eval mode, no gradients, mode restored."""
    was_training = method.training
    method.eval()
    try:
        with torch.no_grad():
            return sample(method, *method.sampling_pipeline(prior))
    finally:
        method.train(was_training)


def all_modules(method) -> list[tuple[str, torch.nn.Module]]:
    """The method's module tree and the frozen parts it runs (outside the tree)."""
    found = [(f"method.{n}", m) for n, m in method.named_modules()]
    for key, frozen in method._frozen.items():
        found += [(f"frozen.{key}.{n}", m) for n, m in frozen.named_modules()]
    return found


def training_state(method) -> dict:
    """Per module its training flag; per tensor its requires_grad, device, dtype and storage."""
    state = {}
    for name, module in all_modules(method):
        state[name] = module.training
        for key, p in module.named_parameters(recurse=False):
            state[f"{name}.{key}"] = (p.requires_grad, p.device, p.dtype, p.data_ptr())
        for key, b in module.named_buffers(recurse=False):
            state[f"{name}.{key}"] = (b.device, b.dtype, b.data_ptr())
    return state


def pipeline_parameters(pipe) -> list[torch.nn.Parameter]:
    return [p for c in pipe.components.values() if isinstance(c, torch.nn.Module) for p in c.parameters()]


@pytest.fixture
def refuse_files(monkeypatch):
    """Any file written, temporary folder made, or weights saved fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("in-memory sampling wrote a file, made a temporary folder or saved weights")

    for name in ("TemporaryDirectory", "NamedTemporaryFile", "TemporaryFile", "SpooledTemporaryFile", "mkdtemp", "mkstemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            refuse()
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND):
            refuse()
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    monkeypatch.setattr(torch, "save", refuse)
    monkeypatch.setattr(safetensors.torch, "save_file", refuse)
    for cls in (ModelMixin, DiffusionPipeline, PreTrainedModel):
        monkeypatch.setattr(cls, "save_pretrained", refuse)
    return refuse


# --- 1. what is sampled in memory is what the export samples ------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_in_memory_samples_equal_the_exports(name, tiny_prior, tmp_path):
    method = build_method(name, tiny_prior)
    untrained = sample_in_memory(method, tiny_prior)
    perturb(method)
    got = sample_in_memory(method, tiny_prior)
    method.export(tmp_path)
    expected = sample(method, *type(method).load_export(tiny_prior, tmp_path))
    assert got.shape == (2, 32, 32, 3) and np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert np.abs(got - untrained).max() > 1e-3, f"{name}: the perturbed weights did not reach the in-memory sample"


def test_text_to_image_samples_with_the_exported_scheduler(tmp_path):
    """A prior built in memory has scheduler values diffusers marks as defaulted (the tiny prior's
    PNDM: ``timestep_spacing``), which a DPM-Solver++ made from its config would not inherit; the
    export saves them, so the in-memory pipeline must sample with them too."""
    from ccp.priors.tiny import build_tiny_prior

    prior = build_tiny_prior(0)
    assert "timestep_spacing" in prior.scheduler.config.get("_use_default_values", [])
    method = build_method("text_to_image", prior)
    perturb(method)
    pipe, denoiser = method.sampling_pipeline(prior)
    got = sample(method, pipe, denoiser)
    method.export(tmp_path)
    loaded, loaded_denoiser = type(method).load_export(prior, tmp_path)
    assert pipe.scheduler.config.timestep_spacing == loaded.scheduler.config.timestep_spacing == "leading"
    np.testing.assert_allclose(got, sample(method, loaded, loaded_denoiser), atol=1e-5, rtol=0)


# --- 2 and 3. no files, no export; storage shared, training state untouched ----------------------
@pytest.mark.parametrize("name", NAMES)
def test_in_memory_sampling_shares_storage_writes_nothing_and_keeps_training_state(name, tiny_prior, refuse_files, monkeypatch):
    method = build_method(name, tiny_prior)
    perturb(method)
    method.train()
    monkeypatch.setattr(method, "export", refuse_files)
    monkeypatch.setattr(type(method), "load_export", classmethod(refuse_files))
    prior_ptrs = {p.data_ptr() for c in tiny_prior.components.values() if isinstance(c, torch.nn.Module) for p in c.parameters()}
    before = training_state(method)

    model = in_memory(method, tiny_prior)  # what the training module's callbacks sample
    pipe, denoiser = model.pipe, model.denoiser
    assert isinstance(pipe, GCFGPipeline) and denoiser in pipe.denoisers and model.export_dir is None
    with torch.no_grad():  # sampled in train mode on purpose: no part of sampling may change the flags
        images = sample_images(pipe, model.guidance(control_prompt="smiling"), [0, 1], **SAMPLE)
    assert np.isfinite(images).all()
    after = training_state(method)
    changed = [k for k in before if before[k] != after.get(k)]
    assert not changed and before.keys() == after.keys(), f"{name}: sampling changed the training state: {changed[:5]}"

    # The method's own parameters are in the pipeline as they are: the same objects, the same storage.
    in_pipe = pipeline_parameters(pipe)
    ids, ptrs = {id(p) for p in in_pipe}, {p.data_ptr() for p in in_pipe}
    own = list(method.trainable_parameters())
    assert own and all(id(p) in ids for p in own), f"{name}: a trained tensor is not the one the pipeline runs"
    # Nothing is copied: every tensor the pipeline runs is the prior's or the method's.
    method_ptrs = {p.data_ptr() for _, m in all_modules(method) for p in m.parameters(recurse=False)}
    assert ptrs <= prior_ptrs | method_ptrs, f"{name}: the pipeline holds {len(ptrs - prior_ptrs - method_ptrs)} copied tensors"
    assert len(ptrs) <= len(prior_ptrs) + len({p.data_ptr() for p in own})

    sampled = pipe.denoisers[denoiser].modules()[0]
    if name in ("dreambooth", "text_to_image", "ours", "oft", "custom_diffusion"):
        assert sampled is method.unet
        assert sampled.conv_in.weight.data_ptr() == method.unet.conv_in.weight.data_ptr()
    if name in ("textual_inversion", "custom_diffusion"):
        assert pipe.tokenizer is method.tokenizer and pipe.text_encoder is method._frozen["text_encoder"]
        table = pipe.text_encoder.get_input_embeddings()
        assert table.added.weight is method.token_embeds.weight
        assert table.base.weight.data_ptr() == tiny_prior.text_encoder.get_input_embeddings().weight.data_ptr()
    if name in ("textual_inversion", "custom_diffusion", "oft"):  # frozen copies run the prior's weights
        frozen = method.unet
        assert frozen.conv_in.weight.data_ptr() == tiny_prior.unet.conv_in.weight.data_ptr()
    if name == "text_to_image":
        assert pipe.unet is method.unet and denoiser == "prior"
    if name == "textual_inversion":
        # its frozen UNet copy (already on the training device), the prior's weights
        assert sampled is method.unet and denoiser == "prior"


def test_dreambooth_in_memory_is_not_cast_or_moved(tiny_prior):
    """The trained weights are sampled as they are: a UNet of another dtype than the prior's is
    neither converted (in place or not) nor replaced by a copy."""
    method = DreamBooth(tiny_prior, PromptTemplate())
    method.unet.to(torch.float64)
    pointer = method.unet.conv_in.weight.data_ptr()
    pipe, denoiser = method.sampling_pipeline(tiny_prior)
    assert pipe.denoisers[denoiser].modules()[0] is method.unet
    assert {p.dtype for p in method.unet.parameters()} == {torch.float64}
    assert method.unet.conv_in.weight.data_ptr() == pointer
    assert {p.dtype for p in tiny_prior.unet.parameters()} == {torch.float32}


# --- 4. the pipeline follows the weights as they train ------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_in_memory_sampling_tracks_training(name, tiny_prior):
    method = build_method(name, tiny_prior)
    perturb(method)
    pipe, denoiser = method.sampling_pipeline(tiny_prior)
    method.eval()
    with torch.no_grad():
        first = sample(method, pipe, denoiser)
    method.train()
    train_step(method)
    method.eval()
    with torch.no_grad():
        again = sample(method, pipe, denoiser)  # the same pipeline object, built before the step
        fresh = sample(method, *method.sampling_pipeline(tiny_prior))
    assert np.abs(again - first).max() > 1e-4, f"{name}: the step did not change the in-memory sample"
    np.testing.assert_allclose(again, fresh, atol=1e-6, rtol=0)
