"""Half precision on the CPU: fp32 master weights over a bf16/fp16 prior, bf16-mixed and 16-mixed
training of every method, precision settings refused before loading, GCFG over denoisers of
different dtypes, the VAE shift factor, strict resume, and the EMA swapped in place."""

from __future__ import annotations

import lightning as L
import PIL.Image
import pytest
import torch
from diffusers import DDPMScheduler
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader, Dataset

from ccp.config import compose
from ccp.guidance import Condition, GuidanceSpec, GuidanceTerm, Source
from ccp.methods import TRAINABLE, build_method
from ccp.methods.base import PromptTemplate
from ccp.models.null_text_unet import NullTextUNet2DConditionModel
from ccp.pipelines.gcfg import GCFGPipeline
from ccp.pipelines.sampling import noise_generators
from ccp.priors.loading import load_prior
from ccp.training.callbacks import EMACallback
from ccp.training.module import CheckpointMismatchError, OptimConfig, PersonalizationModule, TrainingConfig
from ccp.training.run import TrainConfigError, check_config

FAST = {"ours": {"definition": "value_mean"}}


class Captioned(Dataset):
    def __init__(self, n=4, size=64):
        self.images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "caption": "a photo of a face", "condition": (self.images[i] + 1) / 2}


@pytest.fixture(scope="module")
def bf16_prior(tiny_prior_dir):
    return load_prior(tiny_prior_dir, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def fp16_prior(tiny_prior_dir):
    return load_prior(tiny_prior_dir, dtype=torch.float16)


def _module(prior, name):
    method = build_method(name, prior, PromptTemplate(), **FAST.get(name, {}))
    return PersonalizationModule(method, DDPMScheduler.from_config(prior.scheduler.config), vae=prior.vae,
                                 config=TrainingConfig(optim=OptimConfig(lr=1e-3)))


def _train(module, steps=2, **trainer_kwargs):
    before = {k: v.detach().clone() for k, v in module.method.trainable_state_dict().items()}
    losses = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[Losses()], **trainer_kwargs)
    trainer.fit(module, DataLoader(Captioned(), batch_size=2))
    return before, losses


def _frozen_dtypes(method) -> set[torch.dtype]:
    own = {id(p) for p in method.parameters()}
    return {p.dtype for m in method._frozen.values() for p in m.parameters() if id(p) not in own}


@pytest.mark.parametrize("name", sorted(TRAINABLE))
def test_bf16_mixed_over_a_bf16_prior_trains_fp32_master_weights(bf16_prior, name):
    module = _module(bf16_prior, name)
    assert {p.dtype for p in module.method.trainable_parameters()} == {torch.float32}
    assert _frozen_dtypes(module.method) <= {torch.bfloat16}  # frozen parts keep the prior's dtype
    assert bf16_prior.unet.dtype == torch.bfloat16  # the prior itself is not converted
    before, losses = _train(module, precision="bf16-mixed")
    after = module.method.trainable_state_dict()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert {v.dtype for k, v in after.items() if k in dict(module.method.named_parameters())} == {torch.float32}
    # an lr-1e-3 AdamW update is visible in fp32 master weights (in bf16 most would round away)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed


@pytest.mark.parametrize("name", sorted(TRAINABLE))
def test_fp16_mixed_with_a_grad_scaler_runs_every_method(fp16_prior, name):
    # The "Attempting to unscale FP16 gradients" failure of fp16 master weights: GradScaler.unscale_
    # refuses fp16 gradients, so this passes only if the trainable weights are fp32.
    module = _module(fp16_prior, name)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    before, losses = _train(module, steps=2, plugins=[plugin])
    assert all(torch.isfinite(torch.tensor(losses)))
    assert scaler._scale is not None  # the scaler scaled the loss and unscaled the gradients
    after = module.method.trainable_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_fp16_master_weights_are_what_the_grad_scaler_refuses(fp16_prior):
    """The control for the test above: the same step with fp16 trainable weights fails as the
    diffusers scripts do."""
    unet = NullTextUNet2DConditionModel.from_prior(fp16_prior.unet, fp16_prior.text_encoder, fp16_prior.tokenizer,
                                                   definition="value_mean")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    x = torch.randn(1, 4, 8, 8, dtype=torch.float16)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = unet(x, torch.tensor([10])).sample.float().pow(2).mean()
    scaler.scale(loss).backward()
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler.unscale_(optimizer)


def test_half_true_precision_is_refused_at_fit_start(bf16_prior):
    module = _module(bf16_prior, "ours")
    with pytest.raises(TypeError, match="fp32 master weights.*bf16-mixed"):
        _train(module, precision="bf16-true")


def _cfg(prior_dir, image_dir, *extra):
    return compose("train", overrides=["experiment=tiny/ours", f"prior.path={prior_dir}", f"data.path={image_dir}", *extra])


def test_precision_settings_are_checked_before_loading(tiny_prior_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):  # the data check reads the folder too
        PIL.Image.new("RGB", (64, 64), (i * 90, 40, 200)).save(images / f"{i}.png")
    with pytest.raises(TrainConfigError, match="prior.dtype=bfloat16 with trainer.precision=32-true.*bf16-mixed"):
        check_config(_cfg(tiny_prior_dir, images, "prior.dtype=bfloat16", "trainer.precision=32-true"), tmp_path)
    with pytest.raises(TrainConfigError, match="trainer.precision=bf16-true would train bf16 master weights"):
        check_config(_cfg(tiny_prior_dir, images, "trainer.precision=bf16-true"), tmp_path)
    with pytest.raises(TrainConfigError, match="optim.name='sgd' is unknown"):
        check_config(_cfg(tiny_prior_dir, images, "optim.name=sgd"), tmp_path)
    check_config(_cfg(tiny_prior_dir, images, "prior.dtype=bfloat16", "trainer.precision=bf16-mixed"), tmp_path)


def test_ours_exports_fp32_from_a_bf16_prior(bf16_prior, tmp_path):
    module = _module(bf16_prior, "ours")
    path = module.method.export(tmp_path)
    assert NullTextUNet2DConditionModel.from_pretrained(path).dtype == torch.float32


# --- GCFG over denoisers of different dtypes ---------------------------------------------------------
def _three_terms(extra: str | None) -> GuidanceSpec:
    terms = [GuidanceTerm("concept", Source("concept"), 1.5),
             GuidanceTerm("control", Source("prior", Condition(prompt="a smiling face")), 4.0)]
    if extra:
        terms.append(GuidanceTerm("style", Source(extra, Condition(prompt="a face")), 1.0))
    return GuidanceSpec(terms=tuple(terms))


def _sample(pipe, spec):
    pipe.set_progress_bar_config(disable=True)
    return pipe(spec, num_images=2, num_inference_steps=4, generator=noise_generators(0, [0, 1]),
                output_type="latent").images


def test_gcfg_mixes_a_bf16_prior_an_fp32_concept_and_a_bf16_checkpoint(tiny_prior, bf16_prior):
    concept32 = NullTextUNet2DConditionModel.from_prior(tiny_prior.unet, tiny_prior.text_encoder, tiny_prior.tokenizer,
                                                        definition="value_mean")
    # a second checkpoint: the prior's UNet with perturbed weights
    other32 = build_method("dreambooth", tiny_prior, PromptTemplate()).unet.requires_grad_(False)
    with torch.no_grad():
        for p in other32.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    reference = GCFGPipeline.from_prior(tiny_prior, concept_unet=concept32)
    reference.add_denoiser("style", other32)
    mixed = GCFGPipeline.from_prior(bf16_prior, concept_unet=concept32)
    mixed.add_denoiser("style", other32.to(torch.bfloat16))
    assert (mixed.unet.dtype, mixed.concept_unet.dtype, mixed.style.dtype) == (torch.bfloat16, torch.float32, torch.bfloat16)

    spec = _three_terms("style")
    fp32 = _sample(reference, spec)
    half = _sample(mixed, spec)
    assert half.dtype == torch.float32  # latents and Eq. 3 in fp32
    relative = float((half - fp32).norm() / fp32.norm())
    # measured 0.012 on this tiny prior at 4 steps; bf16 has 8 mantissa bits (0.4% per rounding)
    print(f"bf16 vs fp32 relative latent difference: {relative:.4f}")
    assert relative < 0.03, relative
    assert concept32.dtype == torch.float32  # sampling did not convert the caller's model


def test_decoding_adds_back_the_vae_shift_factor(tiny_prior_dir):
    prior = load_prior(tiny_prior_dir)
    prior.vae.register_to_config(shift_factor=0.25)
    pipe = GCFGPipeline.from_prior(prior)
    pipe.set_progress_bar_config(disable=True)
    spec = GuidanceSpec.cfg("a face", 3.0)
    kwargs = dict(num_images=1, num_inference_steps=3, output_type="latent")
    latents = pipe(spec, generator=noise_generators(0, [0]), **kwargs).images
    images = pipe(spec, generator=noise_generators(0, [0]), **{**kwargs, "output_type": "pt"}).images
    decoded = prior.vae.decode(latents / prior.vae.config.scaling_factor + 0.25).sample
    expected = (decoded / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)
    unshifted = (prior.vae.decode(latents / prior.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert (images - unshifted).abs().max() > 1e-3  # the shift matters for this VAE


# --- checkpoints and EMA --------------------------------------------------------------------------
def test_resume_refuses_a_checkpoint_of_another_method(tiny_prior):
    ours = _module(tiny_prior, "ours")
    dreambooth = _module(tiny_prior, "textual_inversion")
    checkpoint = {"state_dict": {f"method.{k}": v for k, v in dreambooth.method.trainable_state_dict().items()}}
    with pytest.raises(CheckpointMismatchError, match="missing.*resume=null"):
        ours.on_load_checkpoint(checkpoint)
    own = {f"method.{k}": v for k, v in ours.method.trainable_state_dict().items()}
    dropped = dict(own)
    dropped.pop(sorted(own)[0])
    with pytest.raises(CheckpointMismatchError, match="1 trainable tensor\\(s\\) missing"):
        ours.on_load_checkpoint({"state_dict": dropped})
    ours.on_load_checkpoint({"state_dict": own})  # a matching checkpoint loads


def _ema_on(params, **kwargs):
    from diffusers.training_utils import EMAModel

    callback = EMACallback(**kwargs)
    callback.ema = EMAModel(params, decay=0.9, use_ema_warmup=False)
    return callback


def test_ema_swap_exchanges_storage_without_copies():
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    callback = _ema_on(params)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    callback.ema.step(params)
    live = [p.detach().clone() for p in params]
    shadow = [s.clone() for s in callback.ema.shadow_params]
    pointers = {p.data_ptr() for p in params} | {s.data_ptr() for s in callback.ema.shadow_params}
    module = type("M", (), {"method": type("Mt", (), {"trainable_parameters": lambda self: iter(params)})()})()
    with callback.swapped_in(module):
        assert all(torch.equal(p, s) for p, s in zip(params, shadow))
        inside = {p.data_ptr() for p in params} | {s.data_ptr() for s in callback.ema.shadow_params}
        assert inside == pointers  # the same storages, exchanged
    assert all(torch.equal(p, v) for p, v in zip(params, live))
    assert all(torch.equal(s, v) for s, v in zip(callback.ema.shadow_params, shadow))


def test_ema_on_the_host_updates_as_diffusers_does():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(3))]
    device_ema, host_ema = _ema_on(params), _ema_on(params, device="cpu")
    for _ in range(3):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape))
        device_ema.ema.step(params)
        host_ema._step_on_host(params)
    for a, b in zip(device_ema.ema.shadow_params, host_ema.ema.shadow_params):
        assert torch.equal(a, b)
    assert host_ema.ema.optimization_step == device_ema.ema.optimization_step == 3
    # the copying swap (shadow in another dtype/device) restores exactly too
    host_ema.ema.shadow_params = [s.double() for s in host_ema.ema.shadow_params]
    live = [p.detach().clone() for p in params]
    host_ema._swap(params)
    assert all(torch.equal(p, s) for p, s in zip(params, device_ema.ema.shadow_params))  # EMA weights swapped in
    host_ema._swap(params)
    assert all(torch.equal(p, v) for p, v in zip(params, live))
    with pytest.raises(Exception, match="ema.device='cuda:1'"):
        EMACallback(device="cuda:1")


def test_wrapping_a_prior_leaves_its_parts_where_they_are(tiny_prior_dir):
    # During training the prior's VAE is on the training device and the rest on the CPU; wrapping
    # it for a validation sample must not move the rest after the VAE (diffusers' pipe.device).
    prior = load_prior(tiny_prior_dir)
    prior.vae.to("meta")
    pipe = GCFGPipeline.from_prior(prior)
    assert pipe.unet.device.type == "cpu" and pipe.text_encoder.device.type == "cpu"
    concept = NullTextUNet2DConditionModel.from_prior(prior.unet, prior.text_encoder, prior.tokenizer,
                                                      definition="value_mean")
    GCFGPipeline.from_prior(prior, concept_unet=concept)
    assert concept.device == prior.device  # a model passed in joins the prior's device
    assert prior.unet.device.type == "cpu" and prior.vae.device.type == "meta"
