"""Training options of the one loop (docs/training.md): Min-SNR-gamma weights, noise offset,
learning-rate schedules (with exact resume), TF32, and the refusal of bad values before any model
loads. Expected values are computed here by hand: the noise schedule from its betas in float64
numpy, the learning rates from the schedules' formulas (Hang et al. 2023; diffusers' optimization).
"""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from lightning.pytorch.callbacks import ModelCheckpoint
from pixels import PixelData
from test_training_loop import SimulatedCrash, StopAt
from torch.utils.data import DataLoader

from ccp.config import ConfigError, compose
from ccp.methods.base import PromptTemplate
from ccp.methods.ours import NullTextConcept
from ccp.training import run as run_module
from ccp.training.module import LossConfig, OptimConfig, PersonalizationModule, TrainingConfig
from ccp.training.run import TrainConfigError, run_training
from ccp.training.schedules import TrainingOptionsError, min_snr_weights

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
T = 1000


def alpha_bar_by_hand(beta_start=0.00085, beta_end=0.012, num_train_timesteps=T) -> np.ndarray:
    """Stable Diffusion's "scaled_linear" DDPM schedule: betas linear in sqrt(beta)."""
    betas = np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_train_timesteps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def snr_weights_by_hand(timesteps, gamma: float, prediction_type: str) -> np.ndarray:
    ab = alpha_bar_by_hand()[np.asarray(timesteps)]
    snr = ab / (1.0 - ab)
    return np.minimum(snr, gamma) / (snr if prediction_type == "epsilon" else snr + 1.0)


@pytest.fixture(scope="module")
def prior(tiny_prior):
    return tiny_prior


def _module(prior, prediction_type="epsilon", **sections) -> PersonalizationModule:
    method = NullTextConcept(prior, PromptTemplate(), definition="value_mean")
    scheduler = DDPMScheduler(num_train_timesteps=T, prediction_type=prediction_type, **SD_BETAS)
    return PersonalizationModule(method, scheduler, vae=prior.vae, config=TrainingConfig(seed=5, **sections))


def _one_step(module: PersonalizationModule, latents: torch.Tensor, prediction: torch.Tensor):
    """The module's training step without a Trainer, its denoiser replaced by `prediction`."""
    seen = []

    def predict(noisy, timesteps):
        seen.append((noisy.detach().clone(), timesteps.clone()))
        return prediction

    module.method.predict_noise = predict
    with pytest.warns(UserWarning, match="self.log"):  # no trainer attached: nothing to log to
        loss = module.training_step({"latents": latents}, 0)
    (noisy, timesteps), = seen
    return loss, noisy, timesteps


# --- Min-SNR-gamma --------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_betas_on_constructed_timesteps(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=T, prediction_type=prediction_type, **SD_BETAS)
    timesteps = torch.tensor([0, 10, 120, 250, 500, 999])
    got = min_snr_weights(scheduler, timesteps, 5.0)
    expected = snr_weights_by_hand(timesteps, 5.0, prediction_type)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4)  # float32 1 - alpha_bar at t=0: ~3e-5
    # both regimes are present: clipped (snr > gamma) early, unclipped late
    ab = alpha_bar_by_hand()[timesteps.numpy()]
    assert (ab / (1 - ab) > 5).any() and (ab / (1 - ab) < 5).any()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_loss_is_the_weighted_mean_of_per_sample_mse(prior, prediction_type):
    g = torch.Generator().manual_seed(11)
    latents = torch.randn(8, 4, 8, 8, generator=g)
    prediction = torch.randn(8, 4, 8, 8, generator=g)
    plain = _module(prior, prediction_type)
    _, _, drawn = _one_step(plain, latents, prediction)
    ab = alpha_bar_by_hand()[drawn.numpy()]
    snr = ab / (1 - ab)
    gamma = float(np.sqrt(snr.min() * snr.max()))  # between the batch's extremes: some clipped, some not

    module = _module(prior, prediction_type, loss=LossConfig(snr_gamma=gamma))
    loss, noisy, timesteps = _one_step(module, latents, prediction)
    assert torch.equal(timesteps, drawn)  # the option draws nothing
    # the noise and target by hand, from the captured noisy input
    x, xt = latents.double().numpy(), noisy.double().numpy()
    a, s = np.sqrt(ab)[:, None, None, None], np.sqrt(1 - ab)[:, None, None, None]
    noise = (xt - a * x) / s
    target = noise if prediction_type == "epsilon" else a * noise - s * x
    per_sample = ((prediction.double().numpy() - target) ** 2).mean(axis=(1, 2, 3))
    weights = np.minimum(snr, gamma) / (snr if prediction_type == "epsilon" else snr + 1)
    assert loss.item() == pytest.approx(float((per_sample * weights).mean()), rel=1e-4)
    assert loss.item() != pytest.approx(float(per_sample.mean()), rel=1e-2)  # the weighting changed it


# --- noise offset ---------------------------------------------------------------------------------

def test_noise_offset_adds_a_per_channel_constant_from_the_step_generator(prior):
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    prediction = torch.zeros_like(latents)
    module = _module(prior, loss=LossConfig(noise_offset=0.1))
    _, noisy, timesteps = _one_step(module, latents, prediction)
    # the same draws by hand, in the diffusers scripts' order: noise, offset (B, C, 1, 1), timesteps
    g = module._generator(0)
    noise = torch.randn(latents.shape, generator=g)
    offset = torch.randn(3, 4, 1, 1, generator=g)
    drawn = torch.randint(0, T, (3,), generator=g)
    assert torch.equal(timesteps, drawn)
    ab = alpha_bar_by_hand()[drawn.numpy()][:, None, None, None]
    expected = np.sqrt(ab) * latents.double().numpy() + np.sqrt(1 - ab) * (noise + 0.1 * offset).double().numpy()
    np.testing.assert_allclose(noisy.double().numpy(), expected, rtol=1e-5, atol=1e-5)

    # off (the default): no extra draw, so the random stream is the one runs had before the option
    plain = _module(prior)
    _, noisy0, timesteps0 = _one_step(plain, latents, prediction)
    g = plain._generator(0)
    noise = torch.randn(latents.shape, generator=g)
    assert torch.equal(timesteps0, torch.randint(0, T, (3,), generator=g))
    ab0 = alpha_bar_by_hand()[timesteps0.numpy()][:, None, None, None]
    expected0 = np.sqrt(ab0) * latents.double().numpy() + np.sqrt(1 - ab0) * noise.double().numpy()
    np.testing.assert_allclose(noisy0.double().numpy(), expected0, rtol=1e-5, atol=1e-5)


# --- learning-rate schedules ----------------------------------------------------------------------

LR, STEPS, WARMUP = 1e-3, 8, 2


def lr_by_hand(name: str, k: int, warmup=WARMUP, total=STEPS, cycles=2, power=2.0) -> float:
    """The lr of optimizer step k (0-based): diffusers' formulas (its ramps start at 0), and ccp's
    constant, whose ramp already reaches lr/warmup at the first step."""
    if name == "constant":
        return LR * min(1.0, (k + 1) / warmup) if warmup else LR
    if k < warmup:
        return LR * k / warmup
    if name == "constant_with_warmup":
        return LR
    p = (k - warmup) / (total - warmup)
    if name == "linear":
        return LR * max(0.0, 1 - p)
    if name == "cosine":  # half a cosine
        return LR * 0.5 * (1 + math.cos(math.pi * p))
    if name == "cosine_with_restarts":
        return 0.0 if p >= 1 else LR * 0.5 * (1 + math.cos(math.pi * ((cycles * p) % 1.0)))
    if name == "polynomial":
        return (LR - 1e-7) * (1 - p) ** power + 1e-7
    raise AssertionError(name)


class Latents(torch.utils.data.Dataset):
    def __init__(self, n=4):
        self.latents = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, i):
        return {"latents": self.latents[i]}


class RecordLr(L.Callback):
    """The lr each optimizer step runs at, by step."""

    def __init__(self):
        self.lrs: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs[trainer.global_step] = optimizer.param_groups[0]["lr"]


def _trainer(max_steps, callbacks=(), accumulate=2):
    checkpoints = any(isinstance(c, ModelCheckpoint) for c in callbacks)  # else no checkpoint files at all
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, accumulate_grad_batches=accumulate,
                     logger=False, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=checkpoints, use_distributed_sampler=False, callbacks=list(callbacks))


@pytest.mark.parametrize("name, warmup", [
    ("constant", 0), ("constant", WARMUP), ("constant_with_warmup", WARMUP), ("linear", WARMUP),
    ("cosine", WARMUP), ("cosine_with_restarts", WARMUP), ("polynomial", WARMUP),
])
def test_lr_of_each_optimizer_step_follows_the_schedule_formula(prior, name, warmup):
    module = _module(prior, optim=OptimConfig(lr=LR, lr_scheduler=name, warmup_steps=warmup, num_cycles=2, power=2.0))
    record = RecordLr()
    # 2 micro-batches per optimizer step: the schedule moves once per optimizer step
    _trainer(STEPS, [record]).fit(module, DataLoader(Latents(), batch_size=2))
    assert sorted(record.lrs) == list(range(STEPS))
    expected = [lr_by_hand(name, k, warmup) for k in range(STEPS)]
    assert [record.lrs[k] for k in range(STEPS)] == pytest.approx(expected, rel=1e-9, abs=1e-15)


def _fit_scheduled(prior, ckpt_dir, extra=(), ckpt_path=None):
    optim = OptimConfig(lr=1e-3, lr_scheduler="cosine_with_restarts", warmup_steps=1, num_cycles=2)
    module = PersonalizationModule(NullTextConcept(prior, PromptTemplate(), definition="value_mean"),
                                   DDPMScheduler.from_config(prior.scheduler.config), vae=prior.vae,
                                   config=TrainingConfig(optim=optim, seed=7))
    record = RecordLr()
    trainer = _trainer(5, [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_last=True, save_top_k=-1),
                           record, *extra])
    try:
        trainer.fit(module, datamodule=PixelData(), ckpt_path=ckpt_path)
    except SimulatedCrash:
        pass
    return module, record.lrs


def test_resume_mid_schedule_continues_the_lr_and_weights_exactly(prior, tmp_path):
    full, full_lrs = _fit_scheduled(prior, tmp_path / "full")
    _, crashed_lrs = _fit_scheduled(prior, tmp_path / "crash", extra=[StopAt(3)])  # killed after 3 of 5 steps
    assert sorted(crashed_lrs) == [0, 1, 2]
    last = tmp_path / "crash" / "last.ckpt"
    start = torch.load(last, weights_only=False)["global_step"]
    assert 0 < start <= 3
    resumed, resumed_lrs = _fit_scheduled(prior, tmp_path / "crash", ckpt_path=str(last))
    assert sorted(resumed_lrs) == list(range(start, 5))
    assert crashed_lrs == {k: full_lrs[k] for k in crashed_lrs}  # exactly, lr by lr
    assert resumed_lrs == {k: full_lrs[k] for k in resumed_lrs}
    # warmup from 0, a decay, a restart to lr, a decay again
    assert [full_lrs[k] for k in range(5)] == pytest.approx(
        [lr_by_hand("cosine_with_restarts", k, warmup=1, total=5, cycles=2) for k in range(5)], rel=1e-9, abs=1e-15)
    want, got = full.method.trainable_state_dict(), resumed.method.trainable_state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


# --- TF32 -----------------------------------------------------------------------------------------

class RecordTf32(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)


@pytest.mark.parametrize("allow, before", [(True, False), (False, True)])
def test_allow_tf32_sets_the_backend_flags_for_the_fit_and_restores_them(prior, allow, before):
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = before
        record = RecordTf32()
        _trainer(1, [record], accumulate=1).fit(_module(prior, allow_tf32=allow), DataLoader(Latents(2), batch_size=2))
        assert record.flags == (allow, allow)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (before, before)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_tf32_is_on_in_the_gpu_presets_and_off_on_the_cpu():
    for trainer, on in (("cpu", False), ("gpu", True), ("ddp", True)):
        assert compose("train", overrides=[f"trainer={trainer}"]).trainer.allow_tf32 is on, trainer


# --- bad values, refused before any model loads ---------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["loss.snr_gamma=0"], r"loss.snr_gamma=0 must be > 0 .*or null"),
    (["loss.snr_gamma=-5.0"], r"loss.snr_gamma=-5.0 must be > 0"),
    (["loss.noise_offset=-0.1"], r"loss.noise_offset=-0.1 must be >= 0"),
    (["optim.lr_scheduler=cosin"], r"optim.lr_scheduler='cosin' is unknown; choose one of constant, "
                                   r"constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial"),
    (["optim.warmup_steps=20", "trainer.max_steps=10"], r"optim.warmup_steps=20 is longer than trainer.max_steps=10"),
    (["optim.warmup_steps=-1"], r"optim.warmup_steps=-1 must be a whole number >= 0"),
    (["optim.lr_scheduler=linear", "optim.warmup_steps=10", "trainer.max_steps=10"],
     r"optim.warmup_steps=10 leaves nothing of trainer.max_steps=10 for optim.lr_scheduler=linear"),
    (["optim.lr_scheduler=cosine", "trainer.max_steps=-1"], r"decays over trainer.max_steps, which is -1"),
    (["optim.lr_scheduler=cosine_with_restarts", "optim.num_cycles=0"], r"optim.num_cycles=0 must be a whole number >= 1"),
    (["optim.lr_scheduler=polynomial", "optim.power=0"], r"optim.power=0 must be > 0"),
    (["optim.lr_scheduler=polynomial", "optim.lr=1e-8"], r"optim.lr=1e-08 must be above 1e-07"),
    (["trainer.allow_tf32=maybe"], r"trainer.allow_tf32='maybe' must be true, false or null"),
])
def test_bad_options_are_refused_before_any_model_loads(tmp_path, monkeypatch, overrides, message):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(run_module, "load_prior", no_loading)
    cfg = compose("train", overrides=["experiment=tiny/ours", f"prior.path={tmp_path / 'prior'}",
                                      f"data.path={tmp_path}", *overrides])
    with pytest.raises(TrainConfigError, match=message) as err:
        run_training(cfg, tmp_path / "run")
    assert isinstance(err.value, ConfigError)


def test_a_decaying_schedule_without_a_trainer_says_it_needs_the_total_steps(prior):
    module = _module(prior, optim=OptimConfig(lr_scheduler="linear"))
    with pytest.raises(TrainingOptionsError, match="needs the run's total steps"):
        module.configure_optimizers()  # no Trainer: no trainer.max_steps to decay over
