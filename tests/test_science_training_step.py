"""The training step against a hand computation: timesteps, noising, targets, loss, and a short
run on a task whose optimum is known in closed form. Also the metrics a run logs (CSV logger).

Every expected value here is computed from the scheduler's betas in float64 numpy, never by the
scheduler or the module under test.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import Dataset

from ccp.methods.base import PromptTemplate
from stand_ins import TrainingOnlyMethod
from ccp.training.module import LossConfig, OptimConfig, PersonalizationModule, TrainingConfig
from ccp.training.sampler import resumable_loader

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def alpha_bar_by_hand(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str) -> np.ndarray:
    """DDPM's cumulative product of (1 - beta_t), from the schedule's definition (Ho et al. 2020;
    "scaled_linear" is Stable Diffusion's: betas linear in sqrt(beta))."""
    if beta_schedule == "scaled_linear":
        betas = np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_train_timesteps, dtype=np.float64) ** 2
    elif beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    else:
        raise AssertionError(beta_schedule)
    return np.cumprod(1.0 - betas)


class ConstantPrediction(TrainingOnlyMethod):
    """A method whose prediction is one learnable value per latent channel, whatever the input.
    It records what the loop fed it, so the test can check the loop's inputs."""

    name = "constant"

    def __init__(self, channels: int, init: float = 0.0, record: bool = True):
        super().__init__(prior=None, template=PromptTemplate())
        self.value = torch.nn.Parameter(torch.full((1, channels, 1, 1), float(init)))
        self.record = record
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def predict_noise(self, noisy_latents, timesteps):
        if self.record:
            self.seen.append((noisy_latents.detach().clone(), timesteps.detach().clone()))
        return self.value.expand_as(noisy_latents)



def one_step(prediction_type: str, latents: torch.Tensor, num_train_timesteps: int = 1000, value: float = 0.3,
             schedule: dict = SD_BETAS, seed: int = 0):
    method = ConstantPrediction(latents.shape[1], init=value)
    scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, prediction_type=prediction_type, **schedule)
    module = PersonalizationModule(method, scheduler, config=TrainingConfig(seed=seed))
    with pytest.warns(UserWarning, match="self.log"):  # no trainer attached: nothing to log to
        loss = module.training_step({"latents": latents}, 0)
    (noisy, timesteps), = method.seen
    return loss, noisy, timesteps


def test_timesteps_cover_every_training_timestep_uniformly():
    # 20,000 draws over T = 10: each count ~ Binomial(20000, 0.1), sd 42; a chi-square test with 9
    # degrees of freedom at p = 1e-6 rejects above 44.7.
    T, n = 10, 20_000
    _, _, timesteps = one_step("epsilon", torch.zeros(n, 1, 1, 1), num_train_timesteps=T, schedule=dict(beta_schedule="linear"))
    assert timesteps.dtype == torch.long and timesteps.shape == (n,)
    assert int(timesteps.min()) == 0 and int(timesteps.max()) == T - 1  # both ends reachable, nothing beyond
    counts = np.bincount(timesteps.numpy(), minlength=T)
    chi2 = float(((counts - n / T) ** 2 / (n / T)).sum())
    assert chi2 < 44.7, counts


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_noisy_latents_target_and_loss_match_the_ddpm_forward_process(prediction_type):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(64, 4, 3, 3, generator=g) * 1.7 + 0.4
    value = 0.3
    loss, noisy, timesteps = one_step(prediction_type, x0, value=value)
    ab = alpha_bar_by_hand(1000, **SD_BETAS)[timesteps.numpy()][:, None, None, None]
    x0_np, noisy_np = x0.double().numpy(), noisy.double().numpy()
    # x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, so eps is what is left once the signal is removed
    eps = (noisy_np - np.sqrt(ab) * x0_np) / np.sqrt(1.0 - ab)
    # that residual must be the step's standard normal noise (256 * 9 values: mean and sd within ~4 se)
    assert abs(eps.mean()) < 4 / math.sqrt(eps.size)
    assert abs(eps.std() - 1.0) < 4 / math.sqrt(2 * eps.size)
    if prediction_type == "epsilon":
        target = eps
    else:  # v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022)
        target = np.sqrt(ab) * eps - np.sqrt(1.0 - ab) * x0_np
    expected = float(((value - target) ** 2).mean())
    assert loss.ndim == 0 and loss.requires_grad
    assert float(loss.detach()) == pytest.approx(expected, rel=2e-4)


def test_noise_depends_on_seed_but_repeats_for_the_same_seed():
    x0 = torch.zeros(8, 4, 2, 2)
    _, a, ta = one_step("epsilon", x0, seed=0)
    _, b, tb = one_step("epsilon", x0, seed=0)
    _, c, _ = one_step("epsilon", x0, seed=1)
    assert torch.equal(a, b) and torch.equal(ta, tb)
    assert not torch.allclose(a, c)


class FixedLatents(Dataset):
    def __init__(self, latents: torch.Tensor):
        self.latents = latents

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, i):
        return {"latents": self.latents[i]}


class FixedData(L.LightningDataModule):
    def __init__(self, latents, batch_size):
        super().__init__()
        self.latents, self.batch_size = latents, batch_size

    def train_dataloader(self):
        return resumable_loader(FixedLatents(self.latents), batch_size=self.batch_size, trainer=self.trainer, seed=0)


def test_constant_prediction_converges_to_the_mean_v_target(tmp_path):
    # With every latent equal to m, the v-target is sqrt(ab_t) eps - sqrt(1 - ab_t) m, whose mean
    # over eps ~ N(0, 1) and t ~ U{0..T-1} is -m * mean_t sqrt(1 - ab_t): the MSE optimum of a constant.
    T = 20
    schedule = dict(beta_start=0.01, beta_end=0.3, beta_schedule="linear")
    m = torch.tensor([2.0, -1.0])
    optimum = -m.double().numpy() * np.sqrt(1.0 - alpha_bar_by_hand(T, **schedule)).mean()
    latents = m.view(1, 2, 1, 1).expand(256, 2, 2, 2).clone()
    method = ConstantPrediction(2, init=0.0, record=False)
    module = PersonalizationModule(method, DDPMScheduler(num_train_timesteps=T, prediction_type="v_prediction", **schedule),
                                   config=TrainingConfig(optim=OptimConfig(lr=0.02, weight_decay=0.0), seed=0))
    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer = L.Trainer(max_steps=300, accelerator="cpu", devices=1, logger=logger, log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    started = time.perf_counter()
    trainer.fit(module, datamodule=FixedData(latents, batch_size=64))
    fit_seconds = time.perf_counter() - started
    learned = method.value.detach().view(-1).double().numpy()
    # Adam at lr 0.02 jitters around the optimum by O(lr); the start (0) is 1.4 and 0.7 away.
    np.testing.assert_allclose(learned, optimum, atol=0.08)

    # What the run logged, read back from the CSV logger's file
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    per_step = {int(r["step"]): r for r in rows if r.get("train/loss")}
    assert len(per_step) == 300  # one row per optimizer step
    losses = [float(per_step[s]["train/loss"]) for s in sorted(per_step)]
    assert all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-50:]) < 0.6 * np.mean(losses[:10])  # the loss fell while the constant moved
    timing = [r for r in rows if r.get("train/step_time_s")]
    assert len(timing) == 300
    for r in timing:
        assert float(r["train/lr"]) == pytest.approx(0.02)  # no warmup: the configured lr throughout
        step_time = float(r["train/step_time_s"])
        assert 0 < step_time < fit_seconds  # one step's duration, within the whole run's
        # images/s = batch (64 latents) x world size (1) / step time, as logged in the same row
        assert float(r["train/images_per_s"]) == pytest.approx(64 / step_time, rel=1e-4)
    # peak memory is a CUDA statistic: a CPU run does not log it
    assert all(not r.get("train/peak_memory_gb") for r in rows)


def test_learning_rate_warmup_is_linear_then_flat():
    method = ConstantPrediction(1)
    module = PersonalizationModule(method, DDPMScheduler(num_train_timesteps=10),
                                   config=TrainingConfig(optim=OptimConfig(lr=0.5, warmup_steps=4)))
    config = module.configure_optimizers()
    optimizer, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(7):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    # step k (0-based) uses lr * min(1, (k + 1) / warmup)
    assert seen == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5, 0.5, 0.5])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_loss_weights_each_sample_by_hand(prediction_type):
    # Hang et al. 2023: snr_t = ab / (1 - ab); weight min(snr, gamma) / snr (epsilon), / (snr + 1) (v)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(32, 4, 2, 2, generator=g)
    gamma, value = 5.0, 0.2
    method = ConstantPrediction(4, init=value)
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, **SD_BETAS)
    module = PersonalizationModule(method, scheduler, config=TrainingConfig(loss=LossConfig(snr_gamma=gamma), seed=0))
    with pytest.warns(UserWarning, match="self.log"):
        loss = module.training_step({"latents": x0}, 0)
    (noisy, timesteps), = method.seen
    ab = alpha_bar_by_hand(1000, **SD_BETAS)[timesteps.numpy()]
    a = ab[:, None, None, None]
    eps = (noisy.double().numpy() - np.sqrt(a) * x0.double().numpy()) / np.sqrt(1 - a)
    target = eps if prediction_type == "epsilon" else np.sqrt(a) * eps - np.sqrt(1 - a) * x0.double().numpy()
    per_sample = ((value - target) ** 2).mean(axis=(1, 2, 3))
    snr = ab / (1 - ab)
    weights = np.minimum(snr, gamma) / (snr if prediction_type == "epsilon" else snr + 1)
    assert weights.min() < 0.5 * weights.max()  # the batch spans clipped and unclipped timesteps
    assert float(loss.detach()) == pytest.approx(float((per_sample * weights).mean()), rel=2e-4)


def test_noise_offset_adds_one_shared_shift_per_sample_and_channel():
    # noise = eps + offset * z[b, c] (one z per image and channel, broadcast over pixels): the spatial
    # mean of each (b, c) map then varies by 1/HW + offset^2 instead of 1/HW
    x0 = torch.zeros(64, 4, 16, 16)
    offset = 0.5
    for noise_offset, expected in ((0.0, 1 / 256), (offset, 1 / 256 + offset**2)):
        method = ConstantPrediction(4)
        scheduler = DDPMScheduler(num_train_timesteps=1000, **SD_BETAS)
        module = PersonalizationModule(method, scheduler,
                                       config=TrainingConfig(loss=LossConfig(noise_offset=noise_offset), seed=0))
        with pytest.warns(UserWarning, match="self.log"):
            module.training_step({"latents": x0}, 0)
        (noisy, timesteps), = method.seen
        ab = alpha_bar_by_hand(1000, **SD_BETAS)[timesteps.numpy()][:, None, None, None]
        noise = noisy.double().numpy() / np.sqrt(1 - ab)  # x0 = 0: x_t is the scaled noise alone
        spatial_means = noise.mean(axis=(2, 3))  # 256 (b, c) values
        assert float(spatial_means.var()) == pytest.approx(expected, rel=0.3)


class PosteriorVAE(torch.nn.Module):
    """Only the scaling a VAE's config carries (the cached-posterior path never calls encode)."""

    def __init__(self, scaling_factor, shift_factor=None):
        super().__init__()
        self.config = SimpleNamespace(scaling_factor=scaling_factor, shift_factor=shift_factor)


@pytest.mark.parametrize("shift", [None, 0.1159])
def test_cached_posterior_latents_are_sampled_and_scaled_by_hand(shift):
    g = torch.Generator().manual_seed(4)
    mean = torch.randn(16, 4, 8, 8, generator=g)
    std = torch.rand(16, 4, 8, 8, generator=g) * 0.5 + 0.25
    scale = 0.18215
    module = PersonalizationModule(ConstantPrediction(4), DDPMScheduler(num_train_timesteps=10),
                                   vae=PosteriorVAE(scale, shift))
    latents = module.latents_from_batch({"latent_mean": mean, "latent_std": std}, torch.Generator().manual_seed(0))
    # latents = (mean + std * eps - shift) * scale: eps must come out standard normal
    eps = (latents.double() / scale + (shift or 0.0) - mean.double()) / std.double()
    assert abs(float(eps.mean())) < 4 / math.sqrt(eps.numel())
    assert abs(float(eps.std()) - 1.0) < 0.05
    # zero spread: exactly the scaled mean
    exact = module.latents_from_batch({"latent_mean": mean, "latent_std": torch.zeros_like(std)}, torch.Generator())
    torch.testing.assert_close(exact, (mean - (shift or 0.0)) * scale)
    # cached latents are used as they are
    assert module.latents_from_batch({"latents": mean}, torch.Generator()) is mean


def test_a_checkpoint_of_other_trainable_tensors_is_refused_with_their_names():
    from ccp.training.module import CheckpointMismatchError

    module = PersonalizationModule(ConstantPrediction(2), DDPMScheduler(num_train_timesteps=10))
    assert module._checkpoint_keys() == {"method.value"}
    module.on_load_checkpoint({"state_dict": {"method.value": torch.zeros(1, 2, 1, 1)}})  # the right tensors: accepted
    with pytest.raises(CheckpointMismatchError, match=r"method 'constant'.*1 trainable tensor\(s\) missing, e\.g\. \['method\.value'\]"):
        module.on_load_checkpoint({"state_dict": {}})
    with pytest.raises(CheckpointMismatchError, match=r"1 unknown, e\.g\. \['method\.other'\]"):
        module.on_load_checkpoint({"state_dict": {"method.value": torch.zeros(1), "method.other": torch.zeros(1)}})
    # what a checkpoint keeps: the trainable tensors only
    saved = {"state_dict": {"method.value": torch.zeros(1), "frozen.weight": torch.zeros(1)}}
    module.on_save_checkpoint(saved)
    assert list(saved["state_dict"]) == ["method.value"]


def test_optimizer_is_adamw_with_the_configured_hyperparameters_stepped_per_step():
    method = ConstantPrediction(2)
    module = PersonalizationModule(method, DDPMScheduler(num_train_timesteps=10),
                                   config=TrainingConfig(optim=OptimConfig(lr=3e-4, betas=(0.8, 0.95), weight_decay=0.05,
                                                                           eps=1e-6)))
    config = module.configure_optimizers()
    optimizer = config["optimizer"]
    assert type(optimizer) is torch.optim.AdamW and config["lr_scheduler"]["interval"] == "step"
    (group,) = optimizer.param_groups
    assert group["params"] == [method.value]
    assert (group["lr"], group["betas"], group["weight_decay"], group["eps"]) == (3e-4, (0.8, 0.95), 0.05, 1e-6)
    frozen = ConstantPrediction(1)
    frozen.value.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        PersonalizationModule(frozen, DDPMScheduler(num_train_timesteps=10)).configure_optimizers()


def test_each_step_micro_batch_and_rank_draws_its_own_noise():
    def first_draw(step, rank, batch_idx, accumulate=2, seed=0):
        module = PersonalizationModule(ConstantPrediction(1), DDPMScheduler(num_train_timesteps=10),
                                       config=TrainingConfig(seed=seed))
        module._trainer = SimpleNamespace(global_step=step, global_rank=rank, accumulate_grad_batches=accumulate)
        return float(torch.randn((), generator=module._generator(batch_idx)))

    draws = {(s, r, b): first_draw(s, r, b) for s in (0, 1, 7) for r in (0, 1, 3) for b in (0, 1)}
    assert len(set(draws.values())) == len(draws)  # every (step, rank, micro-batch) has its own stream
    assert first_draw(7, 1, 1) == draws[(7, 1, 1)]  # and the same one again (a resumed run repeats it)
    assert first_draw(7, 1, 3) == draws[(7, 1, 1)]  # micro-batch index within the accumulation window
    assert first_draw(7, 1, 1, seed=1) != draws[(7, 1, 1)]
