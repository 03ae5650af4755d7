"""The training module (ccp/training/module.py) pinned where the last mutation run
(benchmarks/results/mutation/report.md) showed no test would notice a change: one training step
replayed by hand from the documented random stream (posterior sampling, noise, noise offset,
timesteps, the method's own draws, in that order), prior preservation (class rows, their loss
and its weight), the Min-SNR weights on the instance rows only, the non-finite-loss flag and the
stop it triggers, the stream key, what is logged and how, the constructor's defaults and
refusals, fp32 master weights, the fit hooks (frozen parts, VAE, TF32 flags), the optimizer step,
the optimizer groups and schedules, and the checkpoint-mismatch message.

Every expected number is computed here from the scheduler's betas in float64 numpy and from a
generator seeded with the documented key, never by the module under test.
"""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

import ccp.training.module as module_mod
from ccp.methods.base import PromptTemplate
from stand_ins import TrainingOnlyMethod
from ccp.training.class_images import ClassImagesConfig
from ccp.training.module import (
    CheckpointMismatchError,
    LossConfig,
    NonFiniteLossError,
    OptimConfig,
    PersonalizationModule,
    SpeedConfig,
    TrainingConfig,
    to_fp32_master_weights,
)

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
P = 1_000_003


def alpha_bar(T: int) -> np.ndarray:
    betas = np.linspace(math.sqrt(SD_BETAS["beta_start"]), math.sqrt(SD_BETAS["beta_end"]), T, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def stream_key(seed: int, step: int = 0, micro: int = 0, rank: int = 0) -> int:
    """The documented key of the step's random stream: (seed, optimizer step, micro-batch, rank)."""
    return ((seed * P + step) * P + micro * 1009 + rank) % 2**63


class Recorder(TrainingOnlyMethod):
    """A constant prediction per channel that records what the loop gives it; its batch inputs
    read the batch ("ids") and draw from the step's generator, as real methods may."""

    name = "recorder"

    def __init__(self, channels: int = 3, init: float = 0.3, unet=None, extra: int = 0):
        super().__init__(prior=None, template=PromptTemplate())
        self.value = torch.nn.Parameter(torch.full((1, channels, 1, 1), float(init)))
        for i in range(extra):
            self.register_parameter(f"p{i}", torch.nn.Parameter(torch.zeros(1)))
        if unet is not None:
            self.unet = unet
        self.seen: list = []
        self.class_prompts: list = []
        self.moved: list = []
        self.after_steps = 0

    def predict_noise(self, noisy_latents, timesteps, **inputs):
        self.seen.append((noisy_latents.detach().clone(), timesteps.clone(), inputs))
        return self.value.expand_as(noisy_latents)

    def batch_inputs(self, batch, generator):
        ids = batch["ids"]
        return {"u": ids.float() + torch.rand(ids.shape[0], generator=generator)}

    def move_frozen(self, device, dtype=None):
        self.moved.append((device, dtype))

    def on_after_optimizer_step(self):
        self.after_steps += 1


class ClassRecorder(Recorder):
    """A method that supports prior preservation (it conditions class rows on the class prompt)."""

    def use_class_prompt(self, prompt):
        self.class_prompts.append(prompt)


class ScalingVAE(torch.nn.Module):
    """A VAE's scaling and shift (the cached-posterior path never calls encode)."""

    def __init__(self, scaling_factor=0.5, shift_factor=0.1):
        super().__init__()
        self.config = SimpleNamespace(scaling_factor=scaling_factor, shift_factor=shift_factor)


def recording_log(module):
    logged = []
    module.log = lambda name, value, **kw: logged.append((name, value, kw))
    return logged


def scheduler(prediction_type="epsilon", T=1000):
    return DDPMScheduler(num_train_timesteps=T, prediction_type=prediction_type, **SD_BETAS)


# --- one step, replayed by hand --------------------------------------------------------------------
def expected_step(seed, x_shape, T, pred, value, *, posterior=None, class_posterior=None, inst_ids, class_ids=None,
                  noise_offset=0.0, scale=0.5, shift=0.1):
    """Replays the documented order of draws from the step's generator; returns float64 arrays."""
    g = torch.Generator().manual_seed(stream_key(seed))
    x0 = (posterior[0] + posterior[1] * torch.randn(posterior[0].shape, generator=g) - shift) * scale
    if class_posterior is not None:
        xc = (class_posterior[0] + class_posterior[1] * torch.randn(class_posterior[0].shape, generator=g) - shift) * scale
        x0 = torch.cat([x0, xc])
    noise = torch.randn(x0.shape, generator=g)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((*x0.shape[:2], 1, 1), generator=g)
    t = torch.randint(0, T, (x0.shape[0],), generator=g)
    u = inst_ids.float() + torch.rand(inst_ids.shape[0], generator=g)
    if class_ids is not None:
        u = torch.cat([u, class_ids.float() + torch.rand(class_ids.shape[0], generator=g)])
    ab = alpha_bar(T)[t.numpy()][:, None, None, None]
    x, e = x0.double().numpy(), noise.double().numpy()
    noisy = np.sqrt(ab) * x + np.sqrt(1 - ab) * e
    target = e if pred == "epsilon" else np.sqrt(ab) * e - np.sqrt(1 - ab) * x
    sq = (value - target) ** 2
    return SimpleNamespace(t=t, u=u, noisy=noisy, sq=sq, ab=ab[:, 0, 0, 0])


def posterior_batch(n, c=3, hw=2, seed=0, ids_from=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, c, hw, hw, generator=g)
    std = torch.rand(n, c, hw, hw, generator=g) * 0.5 + 0.25
    return mean, std, torch.arange(ids_from, ids_from + n)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_one_step_is_the_documented_draws_noising_target_and_loss(pred):
    seed, T, value = 3, 1000, 0.3
    mean, std, ids = posterior_batch(5)
    method = Recorder(3, init=value)
    module = PersonalizationModule(method, scheduler(pred, T), vae=ScalingVAE(), config=TrainingConfig(seed=seed))
    logged = recording_log(module)
    loss = module.training_step({"latent_mean": mean, "latent_std": std, "ids": ids}, 0)
    ref = expected_step(seed, mean.shape, T, pred, value, posterior=(mean, std), inst_ids=ids)
    (noisy, timesteps, inputs), = method.seen
    assert torch.equal(timesteps, ref.t)
    np.testing.assert_allclose(noisy.double().numpy(), ref.noisy, rtol=1e-5, atol=1e-6)
    assert set(inputs) == {"u"}
    torch.testing.assert_close(inputs["u"], ref.u)
    assert float(loss.detach()) == pytest.approx(float(ref.sq.mean()), rel=1e-5)
    # logged once, on the step and in the progress bar, weighted by the batch (5 rows, not 3 channels)
    assert [(n, kw) for n, _, kw in logged] == [("train/loss", dict(prog_bar=True, on_step=True, batch_size=5))]
    assert logged[0][1] is loss
    assert module._nonfinite is not None and module._nonfinite.dtype == torch.bool and not bool(module._nonfinite)


def test_noise_offset_is_one_extra_draw_per_sample_and_channel_after_the_noise():
    seed, T, value = 3, 1000, -0.2
    mean, std, ids = posterior_batch(5, seed=1)
    method = Recorder(3, init=value)
    module = PersonalizationModule(method, scheduler("epsilon", T), vae=ScalingVAE(),
                                   config=TrainingConfig(loss=LossConfig(noise_offset=0.4), seed=seed))
    recording_log(module)
    loss = module.training_step({"latent_mean": mean, "latent_std": std, "ids": ids}, 0)
    ref = expected_step(seed, mean.shape, T, "epsilon", value, posterior=(mean, std), inst_ids=ids, noise_offset=0.4)
    (noisy, timesteps, inputs), = method.seen
    assert torch.equal(timesteps, ref.t)
    np.testing.assert_allclose(noisy.double().numpy(), ref.noisy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inputs["u"], ref.u)
    assert float(loss.detach()) == pytest.approx(float(ref.sq.mean()), rel=1e-5)


@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_prior_preservation_step_class_rows_after_instance_rows_and_their_weighted_loss(snr_gamma):
    seed, T, value, weight = 3, 1000, 0.3, 0.25
    mean, std, ids = posterior_batch(3, seed=2)
    cmean, cstd, cids = posterior_batch(2, seed=3, ids_from=10)
    method = ClassRecorder(3, init=value)
    preservation = ClassImagesConfig(enabled=True, class_prompt="a photo of a face", prior_loss_weight=weight)
    config = TrainingConfig(loss=LossConfig(snr_gamma=snr_gamma), prior_preservation=preservation, seed=seed)
    module = PersonalizationModule(method, scheduler("epsilon", T), vae=ScalingVAE(), config=config)
    assert method.class_prompts == ["a photo of a face"]
    logged = recording_log(module)
    batch = {"latent_mean": mean, "latent_std": std, "ids": ids,
             "class_latent_mean": cmean, "class_latent_std": cstd, "class_ids": cids}
    loss = module.training_step(batch, 0)
    ref = expected_step(seed, None, T, "epsilon", value, posterior=(mean, std), class_posterior=(cmean, cstd),
                        inst_ids=ids, class_ids=cids)
    (noisy, timesteps, inputs), = method.seen
    assert torch.equal(timesteps, ref.t) and timesteps.shape == (5,)
    np.testing.assert_allclose(noisy.double().numpy(), ref.noisy, rtol=1e-5, atol=1e-6)
    assert set(inputs) == {"u", "num_class"} and inputs["num_class"] == 2
    torch.testing.assert_close(inputs["u"], ref.u)
    per_sample = ref.sq.mean(axis=(1, 2, 3))
    prior = float(ref.sq[3:].mean())
    if snr_gamma is None:
        instance = float(ref.sq[:3].mean())
    else:  # Min-SNR weights on the instance rows only (epsilon: min(snr, gamma) / snr)
        snr = ref.ab[:3] / (1 - ref.ab[:3])
        instance = float((per_sample[:3] * np.minimum(snr, snr_gamma) / snr).mean())
    assert float(loss.detach()) == pytest.approx(instance + weight * prior, rel=1e-5)
    assert [(n, kw) for n, _, kw in logged] == [
        ("train/prior_loss", dict(on_step=True, batch_size=2)),
        ("train/loss", dict(prog_bar=True, on_step=True, batch_size=5)),
    ]
    assert float(logged[0][1]) == pytest.approx(prior, rel=1e-5) and not logged[0][1].requires_grad


# --- the non-finite flag and the stop ------------------------------------------------------------
class FakeStrategy:
    def __init__(self, ranks: float):
        self.ranks, self.calls = ranks, []

    def reduce(self, tensor, reduce_op=None):
        self.calls.append((tensor.clone(), reduce_op))
        return tensor * 0 + self.ranks if self.ranks is not None else tensor


def test_a_non_finite_loss_in_any_micro_step_is_kept_until_the_optimizer_step():
    method = Recorder(3, init=0.1)
    module = PersonalizationModule(method, scheduler(), vae=ScalingVAE(), config=TrainingConfig(seed=1))
    recording_log(module)
    assert module._nonfinite is None
    module.on_before_optimizer_step(None)  # nothing seen yet: no all-reduce, no stop
    mean, std, ids = posterior_batch(4)
    batch = {"latent_mean": mean, "latent_std": std, "ids": ids}
    strategy = FakeStrategy(None)  # returns the flag as it is (one rank)
    module._trainer = SimpleNamespace(strategy=strategy, world_size=1, global_step=0, global_rank=0,
                                      accumulate_grad_batches=3)
    module.training_step(batch, 0)
    assert bool(module._nonfinite) is False
    with torch.no_grad():
        method.value.fill_(float("nan"))
    module.training_step(batch, 1)
    assert bool(module._nonfinite) is True
    with torch.no_grad():
        method.value.fill_(0.1)
    module.training_step(batch, 2)  # a later finite micro-step does not clear it
    assert bool(module._nonfinite) is True
    with pytest.raises(NonFiniteLossError):
        module.on_before_optimizer_step(None)
    assert module._nonfinite is None
    (flag, op), = strategy.calls
    assert op == "sum" and flag.dtype == torch.float32 and float(flag) == 1.0
    module.training_step(batch, 3)
    module.on_before_optimizer_step(None)  # finite: no stop
    assert float(strategy.calls[-1][0]) == 0.0 and module._nonfinite is None


@pytest.mark.parametrize("ranks", [0.0, 1.0, 2.0])
def test_the_stop_counts_ranks_and_names_the_step_and_the_fixes(ranks):
    module = PersonalizationModule(Recorder(3), scheduler())
    module._trainer = SimpleNamespace(strategy=FakeStrategy(ranks), world_size=4, global_step=7, global_rank=0)
    module._nonfinite = torch.tensor(False)
    if ranks == 0:
        module.on_before_optimizer_step(None)
        return
    with pytest.raises(NonFiniteLossError) as info:
        module.on_before_optimizer_step(None)
    assert str(info.value) == (
        f"non-finite loss on {int(ranks)} of 4 rank(s) before optimizer step 8; every rank stops here, without "
        "updating. The last checkpoint is intact. Lower optim.lr, enable gradient clipping "
        "(trainer.gradient_clip_val), or use bf16-mixed instead of 16-mixed.")


# --- the stream key ------------------------------------------------------------------------------
@pytest.mark.parametrize("seed,step,rank,accumulate,batch_idx", [
    (0, 0, 0, 1, 0), (5, 11, 2, 3, 5), (2**62 + 12345, 3, 1, 4, 6), (7, 2**40, 3, 2, 9),
    (30_000_000, 3, 1, 3, 2)])  # a key whose value mod 2**64 is >= 2**63: the modulus matters
def test_the_generator_is_seeded_with_the_documented_key(seed, step, rank, accumulate, batch_idx):
    module = PersonalizationModule(Recorder(1), scheduler(T=10), config=TrainingConfig(seed=seed))
    module._trainer = SimpleNamespace(global_step=step, global_rank=rank, accumulate_grad_batches=accumulate)
    g = module._generator(batch_idx)
    assert g.initial_seed() == stream_key(seed, step, batch_idx % accumulate, rank)
    assert g.device == torch.device("cpu")


def test_without_a_trainer_the_key_has_step_rank_and_micro_batch_zero():
    module = PersonalizationModule(Recorder(1), scheduler(T=10), config=TrainingConfig(seed=9))
    assert module._generator(5).initial_seed() == stream_key(9)


# --- defaults and refusals -----------------------------------------------------------------------
class RecordingUNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def enable_gradient_checkpointing(self):
        self.calls.append("checkpointing")

    def to(self, *args, **kwargs):
        self.calls.append(("to", args, kwargs))
        return self


def test_the_defaults_are_the_papers_setting(monkeypatch):
    unet = RecordingUNet()
    method = Recorder(2, unet=unet)
    module = PersonalizationModule(method, scheduler())
    assert module.config == TrainingConfig() == TrainingConfig(
        optim=OptimConfig(name="adamw", lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8,
                          lr_scheduler="constant", warmup_steps=0, num_cycles=1, power=1.0),
        loss=LossConfig(snr_gamma=None, noise_offset=0.0), seed=0, allow_tf32=None,
        speed=SpeedConfig(gradient_checkpointing=False, channels_last=False, compile=False, compile_backend="inductor"),
        prior_preservation=ClassImagesConfig(enabled=False, class_prompt=None, prior_loss_weight=1.0))
    assert module._tf32_before is None and module._nonfinite is None
    assert module.strict_loading is False and module._vae_fp32 is None and module._compiled_predict is None
    assert module.method is method and module.vae is None and unet.calls == []  # no checkpointing, no channels_last
    assert module.noise_scheduler.config.num_train_timesteps == 1000
    with pytest.raises(RuntimeError, match="built without prior=; sampling callbacks need it"):
        module.trained_model()
    config = module.configure_optimizers()
    optimizer = config["optimizer"]
    assert type(optimizer) is torch.optim.AdamW
    (group,) = optimizer.param_groups
    assert (group["lr"], group["betas"], group["weight_decay"], group["eps"]) == (1e-5, (0.9, 0.999), 1e-2, 1e-8)
    schedule = config["lr_scheduler"]["scheduler"]
    for _ in range(3):
        optimizer.step()
        schedule.step()
        assert optimizer.param_groups[0]["lr"] == 1e-5  # constant, no warmup
    # the same stream as seed=0 spelled out
    assert module._generator(0).initial_seed() == stream_key(0)


def test_speed_options_reach_the_unet_and_compile_wraps_the_training_forward(monkeypatch):
    unet = RecordingUNet()
    PersonalizationModule(Recorder(2, unet=unet), scheduler(),
                          config=TrainingConfig(speed=SpeedConfig(gradient_checkpointing=True, channels_last=True)))
    assert unet.calls == ["checkpointing", ("to", (), {"memory_format": torch.channels_last})]
    unet = RecordingUNet()
    PersonalizationModule(Recorder(2, unet=unet), scheduler(),
                          config=TrainingConfig(speed=SpeedConfig(channels_last=True)))
    assert unet.calls == [("to", (), {"memory_format": torch.channels_last})]

    compiled = []

    def fake_compile(fn, backend=None):
        def wrapped(*args, **kwargs):
            compiled.append("called")
            return fn(*args, **kwargs)
        compiled.append((fn, backend))
        return wrapped

    monkeypatch.setattr(torch, "compile", fake_compile)
    method = Recorder(3)
    module = PersonalizationModule(method, scheduler(), config=TrainingConfig(speed=SpeedConfig(compile=True)))
    assert compiled == [(method.predict_noise, "inductor")]
    recording_log(module)
    module.training_step({"latents": torch.zeros(2, 3, 2, 2), "ids": torch.arange(2)}, 0)
    assert compiled[-1] == "called" and len(method.seen) == 1  # the training forward went through the compiled one
    compiled.clear()
    PersonalizationModule(Recorder(3), scheduler(),
                          config=TrainingConfig(speed=SpeedConfig(compile=True, compile_backend="eager")))
    assert compiled[0][1] == "eager"


# --- fp32 master weights --------------------------------------------------------------------------
class HalfParts(Recorder):
    def __init__(self):
        super().__init__(2)
        self.halfp = torch.nn.Parameter(torch.tensor([1.5, -2.25], dtype=torch.float16))
        self.register_buffer("stat", torch.tensor([0.5], dtype=torch.bfloat16))
        self.register_buffer("count", torch.tensor([3], dtype=torch.int64))
        self.register_buffer("empty", None)


def test_half_trainable_tensors_become_fp32_in_place_and_are_counted(caplog):
    method = HalfParts()
    half = method.halfp
    assert to_fp32_master_weights(method) == 2
    assert method.halfp is half and half.dtype == torch.float32 and half.tolist() == [1.5, -2.25]
    assert method.stat.dtype == torch.float32 and method.stat.tolist() == [0.5]
    assert method.count.dtype == torch.int64 and method.empty is None and method.value.dtype == torch.float32
    assert to_fp32_master_weights(method) == 0  # nothing left to cast
    with caplog.at_level(logging.INFO, logger="ccp.training.module"):
        PersonalizationModule(HalfParts(), scheduler())
    assert [r.getMessage() for r in caplog.records if r.name == "ccp.training.module"] == [
        "recorder: 2 trainable tensor(s) cast to fp32 master weights (frozen parts keep their dtype)"]


# --- fit hooks --------------------------------------------------------------------------------------
class RecordingVAE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.moves = []

    def to(self, *args, **kwargs):
        self.moves.append(args or kwargs)
        return self


def test_fit_start_refuses_half_trainable_weights_but_not_half_frozen_ones():
    method = Recorder(2, extra=1)
    module = PersonalizationModule(method, scheduler())
    method.p0.data = method.p0.data.half()
    method.p0.requires_grad_(False)  # frozen half: allowed
    module.on_fit_start()
    method.value.data = method.value.data.half()
    with pytest.raises(TypeError) as info:
        module.on_fit_start()
    assert str(info.value) == ("trainable weights must stay fp32 master weights, but 1 are not (e.g. value); "
                               "use trainer.precision=bf16-mixed (or 16-mixed) instead of a *-true half precision")


def test_fit_start_moves_frozen_parts_and_freezes_the_vae_and_tf32_is_set_then_restored():
    method, vae = Recorder(2), RecordingVAE()
    sched = scheduler()
    before_ab = sched.alphas_cumprod.clone()
    module = PersonalizationModule(method, sched, vae=vae, config=TrainingConfig(allow_tf32=True))
    vae.train()
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False
    try:
        module.on_fit_start()
        assert method.moved == [(torch.device("cpu"), None)]
        assert vae.moves == [(torch.device("cpu"),)]
        assert vae.weight.requires_grad is False and vae.training is False
        assert torch.equal(sched.alphas_cumprod, before_ab)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
        assert module._tf32_before == (False, False)
        module.on_fit_end()
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
        assert module._tf32_before is None
        # allow_tf32=False turns them off, and the previous values come back
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, True
        off = PersonalizationModule(Recorder(2), scheduler(), config=TrainingConfig(allow_tf32=False))
        off.on_fit_start()
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
        off.on_fit_end()
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
        # allow_tf32=None (default): the flags are left alone, and fit end has nothing to restore
        plain = PersonalizationModule(Recorder(2), scheduler())
        plain.on_fit_end()
        plain.on_fit_start()
        assert plain._tf32_before is None
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
        plain.on_fit_end()
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


# --- the optimizer step -------------------------------------------------------------------------------
def test_optimizer_step_runs_the_closure_frees_gradients_and_calls_the_method_hook():
    method = Recorder(2, init=1.0)
    module = PersonalizationModule(method, scheduler())
    optimizer = torch.optim.SGD([method.value], lr=0.5)

    def closure():
        loss = (method.value ** 2).sum()  # gradient 2 * value = 2
        loss.backward()
        return loss

    module.optimizer_step(0, 0, optimizer, closure)
    assert method.value.view(-1).tolist() == [0.0, 0.0]  # 1 - 0.5 * 2
    assert method.value.grad is None
    assert method.after_steps == 1


# --- optimizer groups and schedules -------------------------------------------------------------------
class Grouped(Recorder):
    def __init__(self):
        super().__init__(2, extra=2)

    def extra_param_groups(self):
        return [{"params": [self.p1], "lr": 0.5}]


def lrs(config, n):
    optimizer, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(n):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        schedule.step()
    return seen


def test_extra_groups_keep_their_own_lr_and_the_rest_train_at_optim_lr():
    method = Grouped()
    module = PersonalizationModule(method, scheduler(), config=TrainingConfig(optim=OptimConfig(lr=0.1)))
    config = module.configure_optimizers()
    groups = config["optimizer"].param_groups
    assert [len(g["params"]) for g in groups] == [2, 1]
    assert groups[0]["params"] == [method.value, method.p0] and groups[1]["params"] == [method.p1]
    assert [g["lr"] for g in groups] == [0.1, 0.5]
    assert config["lr_scheduler"]["interval"] == "step" and set(config) == {"optimizer", "lr_scheduler"}


def test_decaying_schedules_run_over_the_trainers_max_steps():
    lr, warmup, total, power, end = 0.1, 2, 6, 2.0, 1e-7
    optim = OptimConfig(lr=lr, warmup_steps=warmup, lr_scheduler="polynomial", power=power)
    module = PersonalizationModule(Recorder(2), scheduler(), config=TrainingConfig(optim=optim))
    module._trainer = SimpleNamespace(max_steps=total)
    seen = [g[0] for g in lrs(module.configure_optimizers(), 8)]

    def poly(step):  # warmup ramp from 0, then (lr - end) * remaining^power + end
        if step < warmup:
            return lr * step / warmup
        if step > total:
            return end
        return (lr - end) * (1 - (step - warmup) / (total - warmup)) ** power + end

    assert seen == pytest.approx([poly(s) for s in range(8)], rel=1e-6, abs=1e-12)

    optim = OptimConfig(lr=lr, lr_scheduler="cosine_with_restarts", num_cycles=2)
    module = PersonalizationModule(Recorder(2), scheduler(), config=TrainingConfig(optim=optim))
    module._trainer = SimpleNamespace(max_steps=8)
    seen = [g[0] for g in lrs(module.configure_optimizers(), 8)]
    expected = [lr * 0.5 * (1 + math.cos(math.pi * ((2 * s / 8) % 1.0))) for s in range(8)]
    assert seen == pytest.approx(expected, rel=1e-6, abs=1e-12)


# --- logged metrics -------------------------------------------------------------------------------------
def test_batch_end_logs_step_time_throughput_over_all_ranks_and_the_first_groups_lr(monkeypatch):
    clock = [10.0]
    monkeypatch.setattr(module_mod, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    method = Grouped()
    module = PersonalizationModule(method, scheduler(), config=TrainingConfig(optim=OptimConfig(lr=0.1)))
    optimizer = module.configure_optimizers()["optimizer"]
    module._trainer = SimpleNamespace(world_size=3, optimizers=[optimizer])
    logged = recording_log(module)
    batch = {"name": ["a", "b", "c", "d"], "latents": torch.zeros(4, 7, 2, 2), "ids": torch.arange(4)}
    module.on_train_batch_start(batch, 0)
    clock[0] = 12.5
    module.on_train_batch_end(None, batch, 0)
    assert logged == [
        ("train/step_time_s", 2.5, dict(on_step=True, batch_size=1)),
        ("train/images_per_s", 12 / 2.5, dict(on_step=True, prog_bar=True, batch_size=1)),  # 4 rows x 3 ranks
        ("train/lr", 0.1, dict(on_step=True, batch_size=1)),
    ]
    # a batch end without a recorded start: zero elapsed, the throughput bounded by the 1e-9 s floor
    logged.clear()
    module._step_started = None
    module.on_train_batch_end(None, batch, 0)
    assert logged[0][1] == 0.0 and logged[1][1] == pytest.approx(12 / 1e-9)


# --- checkpoints ------------------------------------------------------------------------------------------
def test_checkpoint_mismatch_message_names_counts_and_the_first_three_of_each():
    method = Recorder(2, extra=4)
    module = PersonalizationModule(method, scheduler())
    with pytest.raises(CheckpointMismatchError) as info:
        module.on_load_checkpoint({"state_dict": {"method.value": 0, "method.x": 0, "method.y": 0,
                                                  "method.w": 0, "method.z": 0}})
    assert str(info.value) == (
        "the checkpoint does not match method 'recorder' (4 trainable tensor(s) missing, e.g. "
        "['method.p0', 'method.p1', 'method.p2']; 4 unknown, e.g. ['method.w', 'method.x', 'method.y']). "
        "It was written by another method or method settings; resume from a checkpoint of this run, or start "
        "fresh with resume=null (or a new run_name)")
    with pytest.raises(CheckpointMismatchError) as info:
        module.on_load_checkpoint({})
    assert "(5 trainable tensor(s) missing, e.g. ['method.p0', 'method.p1', 'method.p2'])." in str(info.value)
    with pytest.raises(CheckpointMismatchError) as info:
        module.on_load_checkpoint({"state_dict": dict.fromkeys(
            ["method.value", "method.p0", "method.p1", "method.p2", "method.p3", "method.q"], 0)})
    assert "method 'recorder' (1 unknown, e.g. ['method.q']). It was" in str(info.value)
