"""EMA against a hand computation of the configured decay schedule, through real training steps,
and across a checkpoint resume."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import DDPMScheduler
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

import ccp
from ccp.training.callbacks import EMACallback
from ccp.training.module import OptimConfig, PersonalizationModule, TrainingConfig
from test_science_training_step import ConstantPrediction, FixedData

CONFIGURED = OmegaConf.load(Path(ccp.__file__).parent / "conf" / "train.yaml").ema


def decay_by_hand(k: int, decay: float, use_ema_warmup: bool, power: float, inv_gamma: float = 1.0,
                  update_after_step: int = 0) -> float:
    """The decay of the k-th EMA update (k = 1, 2, ...), as diffusers' EMAModel defines it: counting
    from the update after `update_after_step`, the first counted update copies the weights (decay 0);
    then 1 - (1 + s / inv_gamma)^-power with warmup (else (1 + s) / (10 + s)), capped at `decay`."""
    s = k - update_after_step - 1
    if s <= 0:
        return 0.0
    value = 1 - (1 + s / inv_gamma) ** -power if use_ema_warmup else (1 + s) / (10 + s)
    return min(value, decay)


class RecordWeights(L.Callback):
    """The trained value after every optimizer step."""

    def __init__(self):
        self.values: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(pl_module.method.value.detach().clone().double())


def fit(steps, tmp_path, resume_from=None, checkpoint_every=None, **ema_kwargs):
    torch.manual_seed(0)
    method = ConstantPrediction(3, init=0.0, record=False)
    module = PersonalizationModule(method, DDPMScheduler(num_train_timesteps=50),
                                   config=TrainingConfig(optim=OptimConfig(lr=0.1, weight_decay=0.0), seed=0))
    ema, record = EMACallback(**ema_kwargs), RecordWeights()
    callbacks = [record, ema]
    if checkpoint_every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=checkpoint_every, save_top_k=-1,
                                         filename="{step}"))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
                        enable_checkpointing=bool(checkpoint_every), enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, default_root_dir=tmp_path)
    latents = torch.randn(16, 3, 2, 2, generator=torch.Generator().manual_seed(0)) + torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1)
    trainer.fit(module, datamodule=FixedData(latents, batch_size=4), ckpt_path=resume_from)
    return module, ema, record.values


def test_configured_schedule_is_the_warmup_one():
    # the README promises a decay that ramps up, so short runs still get a useful EMA
    assert CONFIGURED.use_ema_warmup is True
    assert 0 < CONFIGURED.power <= 1 and 0.99 < CONFIGURED.decay < 1
    assert [round(decay_by_hand(k, CONFIGURED.decay, True, 0.75), 6) for k in (1, 2, 3, 17)] == [
        0.0, round(1 - 2 ** -0.75, 6), round(1 - 3 ** -0.75, 6), round(1 - 17 ** -0.75, 6)]


def test_shadow_follows_the_configured_decay_schedule(tmp_path):
    kwargs = dict(decay=CONFIGURED.decay, use_ema_warmup=CONFIGURED.use_ema_warmup, power=CONFIGURED.power)
    steps = 8
    module, ema, values = fit(steps, tmp_path, **kwargs)
    assert len(values) == steps and ema.ema.optimization_step == steps
    shadow = torch.zeros(1, 3, 1, 1, dtype=torch.float64)  # the initial weights (init=0.0)
    for k, value in enumerate(values, start=1):
        d = decay_by_hand(k, **kwargs)
        shadow = d * shadow + (1 - d) * value
    assert not torch.allclose(shadow, values[-1], atol=1e-3)  # the EMA lags the weights: a real test
    torch.testing.assert_close(ema.ema.shadow_params[0].double(), shadow, rtol=0, atol=1e-6)
    # the weights the export and validation see are the shadow, and the training weights come back
    trained = module.method.value.detach().clone()
    with ema.swapped_in(module):
        torch.testing.assert_close(module.method.value.detach().double(), shadow, rtol=0, atol=1e-6)
    assert torch.equal(module.method.value.detach(), trained)


def test_constant_decay_without_warmup(tmp_path):
    # use_ema_warmup=false: diffusers' other ramp (1 + s) / (10 + s), capped by decay
    kwargs = dict(decay=0.31, use_ema_warmup=False, power=0.75)
    _, ema, values = fit(5, tmp_path, **kwargs)
    shadow = torch.zeros(1, 3, 1, 1, dtype=torch.float64)
    for k, value in enumerate(values, start=1):
        d = decay_by_hand(k, **kwargs)
        shadow = d * shadow + (1 - d) * value
    assert [decay_by_hand(k, **kwargs) for k in range(1, 6)] == [0.0, 2 / 11, 3 / 12, 4 / 13, 0.31]  # the cap bites at k = 5 (5/14)
    torch.testing.assert_close(ema.ema.shadow_params[0].double(), shadow, rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")  # the resumed run continues the same folder
def test_resume_restores_the_shadow_and_its_step(tmp_path):
    kwargs = dict(decay=CONFIGURED.decay, use_ema_warmup=CONFIGURED.use_ema_warmup, power=CONFIGURED.power)
    _, straight, straight_values = fit(6, tmp_path / "straight", **kwargs)
    _, first, _ = fit(3, tmp_path / "resumed", checkpoint_every=3, **kwargs)
    saved = [s.clone() for s in first.ema.shadow_params]
    _, resumed, resumed_values = fit(6, tmp_path / "resumed", resume_from=tmp_path / "resumed" / "ckpt" / "step=3.ckpt",
                                     checkpoint_every=3, **kwargs)
    assert len(resumed_values) == 3  # steps 4..6 only
    assert resumed.ema.optimization_step == 6
    # steps 4..6 continue from the checkpointed shadow, as the uninterrupted run did
    shadow = saved[0].double()
    for k, value in enumerate(resumed_values, start=4):
        d = decay_by_hand(k, **kwargs)
        shadow = d * shadow + (1 - d) * value
    torch.testing.assert_close(resumed.ema.shadow_params[0].double(), shadow, rtol=0, atol=1e-6)
    torch.testing.assert_close(resumed.ema.shadow_params[0], straight.ema.shadow_params[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.stack(resumed_values), torch.stack(straight_values[3:]), rtol=0, atol=1e-7)


def test_an_ema_update_is_a_few_fused_ops_whatever_the_number_of_tensors():
    """One update is a handful of foreach ops, not a few kernels per weight tensor (about 700 tensors on
    SD's UNet: on a GPU each op is a launch, and the per-tensor loop costs more than its arithmetic)."""
    from types import SimpleNamespace

    from torch.profiler import ProfilerActivity, profile

    def top_level_ops_per_update(num_tensors: int) -> int:
        params = [torch.nn.Parameter(torch.randn(8)) for _ in range(num_tensors)]
        module = SimpleNamespace(method=SimpleNamespace(trainable_parameters=lambda: params), device=torch.device("cpu"))
        ema = EMACallback(decay=0.9, use_ema_warmup=False)
        ema.setup(None, module, "fit")
        ema.on_train_batch_end(SimpleNamespace(global_step=1), module, None, None, 0)  # the first update copies
        before = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.add_(1.0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ema.on_train_batch_end(SimpleNamespace(global_step=2), module, None, None, 0)
        d = ema.ema.cur_decay_value
        for shadow, old, new in zip(ema.ema.shadow_params, before, params):  # s - (1 - d)(s - p)
            torch.testing.assert_close(shadow, old - (1 - d) * (old - new), rtol=1e-6, atol=1e-6)
        return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)

    assert top_level_ops_per_update(200) == top_level_ops_per_update(10) <= 4
