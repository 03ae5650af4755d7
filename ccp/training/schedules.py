"""Learning-rate schedules (``optim.lr_scheduler``) and the Min-SNR loss weights (``loss.snr_gamma``).

The schedules are diffusers' (`diffusers.optimization.get_scheduler`, as in its training scripts'
``--lr_scheduler``), stepped once per optimizer step, so ``optim.warmup_steps`` and the total
(``trainer.max_steps``) count optimizer steps whatever the accumulation and the number of devices.
One difference: ``constant`` with ``warmup_steps > 0`` ramps up linearly from ``lr / warmup_steps``
to ``lr`` (ccp's warmup before these schedules existed; diffusers' ``constant`` ignores the warmup),
while ``constant_with_warmup`` and the decaying schedules start their ramp from 0 as in diffusers.
"""

from __future__ import annotations

import math

import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr

from ccp.config import ConfigError

CONSTANT_SCHEDULES = ("constant", "constant_with_warmup")
DECAYING_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial")
LR_SCHEDULES = CONSTANT_SCHEDULES + DECAYING_SCHEDULES
POLYNOMIAL_LR_END = 1e-7  # diffusers' get_scheduler gives the polynomial decay no other end value
SNR_PREDICTION_TYPES = ("epsilon", "v_prediction")


class TrainingOptionsError(ConfigError, ValueError):
    """A loss or learning-rate option that cannot train; the message says what to change."""


def _number(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TrainingOptionsError(f"{key}={value!r} must be a finite number")
    return float(value)


def _whole(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TrainingOptionsError(f"{key}={value!r} must be a whole number >= 0")
    return value


def check_lr_schedule(name: str, lr: float, warmup_steps: int = 0, max_steps: int | None = None,
                      num_cycles: int = 1, power: float = 1.0) -> None:
    """Refuse a schedule that diffusers would reject or that could not run its course (`max_steps`:
    the run's optimizer steps, -1 for unlimited as in Lightning, None when not known yet)."""
    if name not in LR_SCHEDULES:
        raise TrainingOptionsError(f"optim.lr_scheduler={name!r} is unknown; choose one of {', '.join(LR_SCHEDULES)}")
    warmup = _whole(warmup_steps, "optim.warmup_steps")
    if name in DECAYING_SCHEDULES and max_steps is not None:
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps <= 0:
            raise TrainingOptionsError(
                f"optim.lr_scheduler={name} decays over trainer.max_steps, which is {max_steps!r}; set "
                "trainer.max_steps to the run's number of optimizer steps, or use optim.lr_scheduler=constant")
        if warmup >= max_steps:
            raise TrainingOptionsError(
                f"optim.warmup_steps={warmup} leaves nothing of trainer.max_steps={max_steps} for "
                f"optim.lr_scheduler={name} to decay over; lower optim.warmup_steps below trainer.max_steps")
    elif isinstance(max_steps, int) and max_steps > 0 and warmup > max_steps:
        raise TrainingOptionsError(
            f"optim.warmup_steps={warmup} is longer than trainer.max_steps={max_steps}: the run would end before "
            "reaching optim.lr; lower optim.warmup_steps (or raise trainer.max_steps)")
    if name == "cosine_with_restarts":
        if isinstance(num_cycles, bool) or not isinstance(num_cycles, int) or num_cycles < 1:
            raise TrainingOptionsError(f"optim.num_cycles={num_cycles!r} must be a whole number >= 1 "
                                       "(the hard restarts of cosine_with_restarts)")
    if name == "polynomial":
        if _number(power, "optim.power") <= 0:
            raise TrainingOptionsError(f"optim.power={power!r} must be > 0 (1.0: linear decay to {POLYNOMIAL_LR_END})")
        if _number(lr, "optim.lr") <= POLYNOMIAL_LR_END:
            raise TrainingOptionsError(f"optim.lr={lr} must be above {POLYNOMIAL_LR_END}, where the polynomial "
                                       "schedule ends; raise optim.lr or choose another optim.lr_scheduler")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, name: str = "constant", warmup_steps: int = 0,
                       max_steps: int | None = None, num_cycles: int = 1,
                       power: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule ``optim.lr_scheduler`` over `optimizer`, to be stepped after every optimizer step
    (ccp-train has checked the settings against trainer.max_steps before any weights loaded)."""
    if name in DECAYING_SCHEDULES and max_steps is None:  # a module trained without a Trainer
        raise TrainingOptionsError(f"optim.lr_scheduler={name} needs the run's total steps (trainer.max_steps); "
                                   "train it with a Trainer that has max_steps set")
    if name == "constant" and warmup_steps:
        # Step k runs at lr * (k + 1) / warmup: the first step already learns (diffusers' ramps start at 0).
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps))
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps,
                         num_cycles=num_cycles, power=power)


def check_loss_options(snr_gamma: float | None = None, noise_offset: float = 0.0,
                       prediction_type: str | None = None) -> None:
    """Refuse loss options that cannot train (`prediction_type`: the prior scheduler's, when known)."""
    if snr_gamma is not None:
        if _number(snr_gamma, "loss.snr_gamma") <= 0:
            raise TrainingOptionsError(f"loss.snr_gamma={snr_gamma!r} must be > 0 (5.0 in Hang et al. 2023), "
                                       "or null for the plain MSE")
        if prediction_type is not None and prediction_type not in SNR_PREDICTION_TYPES:
            raise TrainingOptionsError(f"loss.snr_gamma weights epsilon or v_prediction losses, not the prior's "
                                       f"prediction_type={prediction_type!r}; set loss.snr_gamma=null")
    if _number(noise_offset, "loss.noise_offset") < 0:
        raise TrainingOptionsError(f"loss.noise_offset={noise_offset!r} must be >= 0 (0: off; 0.05-0.1 are usual)")


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Per-sample Min-SNR-gamma weights (Hang et al. 2023), as diffusers' train_text_to_image.py:
    min(snr, gamma) / snr for epsilon prediction, min(snr, gamma) / (snr + 1) for v-prediction
    (ccp-train refuses any other prediction type before the prior loads: `check_loss_options`)."""
    prediction_type = noise_scheduler.config.prediction_type
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = snr.clamp(max=snr_gamma)
    return clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)
