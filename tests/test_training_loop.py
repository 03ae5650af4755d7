"""The one training loop: exact resume, SIGTERM, non-finite loss, EMA, global batch arithmetic."""

from __future__ import annotations

import os
import signal

import lightning as L
import pytest
import torch
from diffusers import DDPMScheduler
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader

from ccp.methods.base import PromptTemplate
from ccp.methods.ours import NullTextConcept
from ccp.training.callbacks import EMACallback, SaveLastOnInterrupt
from ccp.training.module import (NonFiniteLossError, OptimConfig, PersonalizationModule, SpeedConfig, TrainingConfig,
                                 accumulation_steps)
from ccp.training.sampler import ResumableSampler
from pixels import PixelData, Pixels

STEPS = 4


class SimulatedCrash(RuntimeError):
    """Stands for a process killed mid-run."""


class StopAt(L.Callback):
    """Simulates a crash (or a SIGTERM) once a given optimizer step is reached."""

    def __init__(self, step, sigterm=False):
        self.step, self.sigterm = step, sigterm

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            if self.sigterm:
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise SimulatedCrash(f"killed at step {self.step}")


@pytest.fixture(scope="module")
def prior(tiny_prior):
    return tiny_prior


def _module(prior):
    method = NullTextConcept(prior, PromptTemplate(), definition="value_mean")
    return PersonalizationModule(method, DDPMScheduler.from_config(prior.scheduler.config), vae=prior.vae,
                                 config=TrainingConfig(optim=OptimConfig(lr=1e-3), seed=7))


def _fit(prior, ckpt_dir, max_steps, extra=(), ckpt_path=None):
    module = _module(prior)
    ema = EMACallback(decay=0.9)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[
            ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_last=True, save_top_k=-1),
            ema,
            SaveLastOnInterrupt(ckpt_dir),
            *extra,
        ],
    )
    try:
        trainer.fit(module, datamodule=PixelData(), ckpt_path=ckpt_path)
    except SimulatedCrash:
        pass
    except SIGTERMException as stop:  # Lightning's clean exit (a SystemExit with status 0)
        assert stop.code in (None, 0)
    return module, ema, trainer


def _weights(module):
    return {k: v.detach().clone() for k, v in module.method.trainable_state_dict().items()}


@pytest.fixture(scope="module")
def uninterrupted(prior, tmp_path_factory):
    module, ema, trainer = _fit(prior, tmp_path_factory.mktemp("full"), STEPS)
    assert trainer.global_step == STEPS
    return _weights(module), [p.clone() for p in ema.ema.shadow_params]


def _assert_same(module, ema, reference):
    weights, shadow = reference
    got = _weights(module)
    assert got.keys() == weights.keys()
    for k in weights:
        torch.testing.assert_close(got[k], weights[k], rtol=0, atol=0, msg=k)
    for a, b in zip(ema.ema.shadow_params, shadow):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_training_changes_weights_and_checkpoints_hold_only_trainable_state(prior, uninterrupted, tmp_path):
    before = _weights(_module(prior))
    after, _ = uninterrupted
    assert any(not torch.equal(before[k], after[k]) for k in before)
    _, _, trainer = _fit(prior, tmp_path, 1)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    # no VAE, no text encoder: only the method's trained state (and its buffers)
    assert all(k.startswith("method.unet.") for k in ckpt["state_dict"])
    assert not any("vae" in k or "text_encoder" in k for k in ckpt["state_dict"])
    assert "EMACallback" in str(ckpt["callbacks"].keys())


def test_resume_after_a_crash_reaches_the_same_weights(prior, uninterrupted, tmp_path):
    _fit(prior, tmp_path, STEPS, extra=[StopAt(3)])  # dies right after step 3 (checkpointed each step)
    os.remove(tmp_path / "last.ckpt")
    os.replace(tmp_path / "epoch=0-step=2.ckpt", tmp_path / "last.ckpt")  # pretend it died before saving step 3
    module, ema, trainer = _fit(prior, tmp_path, STEPS, ckpt_path=str(tmp_path / "last.ckpt"))
    assert trainer.global_step == STEPS
    _assert_same(module, ema, uninterrupted)


def test_sigterm_saves_last_and_resume_matches(prior, uninterrupted, tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    _, _, trainer = _fit(prior, ckpt_dir, STEPS, extra=[StopAt(2, sigterm=True)])
    assert trainer.global_step < STEPS  # it stopped early, cleanly
    saved = torch.load(ckpt_dir / "last.ckpt", weights_only=False)
    assert saved["global_step"] == trainer.global_step
    module, ema, trainer = _fit(prior, ckpt_dir, STEPS, ckpt_path=str(ckpt_dir / "last.ckpt"))
    _assert_same(module, ema, uninterrupted)


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(prior, tmp_path, monkeypatch):
    _fit(prior, tmp_path, 1)
    good = (tmp_path / "last.ckpt").read_bytes()
    module = _module(prior)
    predict = module.method.predict_noise
    monkeypatch.setattr(module.method, "predict_noise", lambda x, t: predict(x, t) * float("nan"))
    before = {k: v.clone() for k, v in module.method.trainable_state_dict().items()}
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, use_distributed_sampler=False,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True)],
    )
    with pytest.raises(NonFiniteLossError, match="non-finite loss on 1 of 1 rank.*before optimizer step 1.*last checkpoint is intact"):
        trainer.fit(module, DataLoader(Pixels(), batch_size=2))
    assert (tmp_path / "last.ckpt").read_bytes() == good
    after = module.method.trainable_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # stopped before the update


def test_resumable_sampler_splits_ranks_and_skips_consumed():
    full = ResumableSampler(10, seed=1)
    stream = [i for i, _ in zip(full, range(25))]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # a new permutation each epoch
    ranks = [ResumableSampler(10, seed=1, rank=r, world_size=2) for r in (0, 1)]
    per_rank = [[i for i, _ in zip(s, range(12))] for s in ranks]
    assert per_rank[0] == stream[0:24:2] and per_rank[1] == stream[1:24:2]
    resumed = ResumableSampler(10, seed=1, rank=1, world_size=2)
    resumed.start = 5
    assert [i for i, _ in zip(resumed, range(7))] == per_rank[1][5:12]


def test_global_batch_arithmetic():
    assert accumulation_steps(32, 4, 8) == 1
    assert accumulation_steps(32, 4, 1) == 8
    with pytest.raises(ValueError, match="not a multiple of per-device batch 3 x 2"):
        accumulation_steps(32, 3, 2)


def test_validation_does_not_recompile_the_compiled_training_forward(prior, tmp_path):
    from ccp.training.callbacks import ValidationGrid

    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(len(example_inputs))
        return graph_module.forward

    def compiles(validation_every: int) -> int:
        torch._dynamo.reset()
        graphs.clear()
        method = NullTextConcept(prior, PromptTemplate(), definition="value_mean")
        speed = SpeedConfig(compile=True, compile_backend=counting_backend)
        module = PersonalizationModule(method, DDPMScheduler.from_config(prior.scheduler.config), vae=prior.vae, prior=prior,
                                       config=TrainingConfig(optim=OptimConfig(lr=1e-3), speed=speed))
        grid = ValidationGrid(tmp_path / f"grid{validation_every}", every_n_steps=validation_every, num_images=1,
                              steps=2, control_prompt="smiling")
        trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                            enable_checkpointing=False, enable_model_summary=False, callbacks=[grid])
        trainer.fit(module, DataLoader(Pixels(), batch_size=2))
        if validation_every:
            assert len(list((tmp_path / f"grid{validation_every}").glob("step_*.png"))) == 3
        return len(graphs)

    without = compiles(0)
    assert without >= 1  # the training forward was compiled
    assert compiles(1) == without  # three validation grids (eval mode, other batch size) added no graph


def test_checkpoints_are_written_to_the_file_and_an_interrupted_save_keeps_the_last(tmp_path, monkeypatch):
    from ccp.training.callbacks import FileCheckpointIO

    io = FileCheckpointIO()
    path = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1

    def dies_midway(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1  # the previous checkpoint, whole
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary left behind
