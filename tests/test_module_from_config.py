"""`PersonalizationModule` built from the composed ccp-train config: a training option is its yaml
key plus the code that reads it (run.py names no option), and every option is checked once,
before the prior loads; checkpoints hold no copy of the options."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from omegaconf import OmegaConf
from pixels import write_random_pngs

import ccp.training.module as module_lib
import ccp.training.optim as optim_lib
import ccp.training.run as run_lib
import ccp.training.schedules as schedules_lib
from ccp.config import compose
from ccp.training.module import OptimConfig, PersonalizationModule, TrainingConfig
from ccp.training.run import TrainConfigError, check_config, run_training


class ModuleBuilt(Exception):
    """Stops a run once its module exists."""


def tiny_cfg(prior_dir, tmp_path, *extra):
    images = write_random_pngs(tmp_path / "images", 4)
    return compose("train", overrides=["prior=tiny", "data=tiny", "method=ours", "trainer=cpu", "logger=none",
                                       f"prior.path={prior_dir}", f"data.path={images}",
                                       f"data.cache_dir={tmp_path / 'cache'}", "data.batch_size=2",
                                       "trainer.global_batch_size=2", "trainer.max_steps=2",
                                       "validation.every_n_steps=0", *extra])


@pytest.fixture
def loads(monkeypatch) -> mock.Mock:
    """ccp-train's prior loader, its calls counted."""
    loader = mock.Mock(wraps=run_lib.load_prior)
    monkeypatch.setattr(run_lib, "load_prior", loader)
    return loader


def built_module(monkeypatch) -> list[PersonalizationModule]:
    """The module run_training builds, the run stopped right after building it."""
    built = []

    class Recording(PersonalizationModule):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)
            raise ModuleBuilt

    monkeypatch.setattr(run_lib, "PersonalizationModule", Recording)
    return built


def test_a_new_option_is_its_yaml_key_and_the_field_its_user_reads(tiny_prior_dir, tmp_path, monkeypatch):
    @dataclass(frozen=True)
    class OptimWithANewOption(OptimConfig):
        max_grad_norm: float = 0.0  # the new option, as its user would declare it

    monkeypatch.setattr(module_lib, "OptimConfig", OptimWithANewOption)
    cfg = tiny_cfg(tiny_prior_dir, tmp_path, "optim.lr=3e-4")
    OmegaConf.update(cfg, "optim.max_grad_norm", 0.5, force_add=True)  # the line added to the yaml
    built = built_module(monkeypatch)
    with pytest.raises(ModuleBuilt):
        run_training(cfg, tmp_path / "run")  # run.py as it is: it names no option
    (module,) = built
    assert module.config.optim.max_grad_norm == 0.5 and module.config.optim.lr == 3e-4


def test_the_module_gets_every_section_of_the_config(tiny_prior_dir, tmp_path, monkeypatch):
    cfg = tiny_cfg(tiny_prior_dir, tmp_path, "optim.betas=[0.8,0.95]", "optim.lr_scheduler=cosine",
                   "loss.snr_gamma=5.0", "loss.noise_offset=0.1", "speed.channels_last=true", "seed=11",
                   "trainer.allow_tf32=false")
    built = built_module(monkeypatch)
    with pytest.raises(ModuleBuilt):
        run_training(cfg, tmp_path / "run")
    config = built[0].config
    assert config == TrainingConfig.from_cfg(cfg)
    assert (config.optim.betas, config.optim.lr_scheduler) == ((0.8, 0.95), "cosine")
    assert (config.loss.snr_gamma, config.loss.noise_offset, config.speed.channels_last) == (5.0, 0.1, True)
    assert (config.seed, config.allow_tf32, config.prior_preservation.enabled) == (11, False, False)


def test_a_key_no_option_reads_is_refused_before_the_prior_loads(tiny_prior_dir, tmp_path, loads):
    cfg = tiny_cfg(tiny_prior_dir, tmp_path)
    OmegaConf.update(cfg, "optim.weight_decy", 0.1, force_add=True)  # misspelt in a yaml file
    with pytest.raises(TrainConfigError, match=r"optim.weight_decy: no training option reads it; "
                                               r"did you mean optim.weight_decay\?"):
        run_training(cfg, tmp_path / "run")
    assert loads.call_count == 0


@pytest.fixture
def check_calls(monkeypatch):
    """Calls of each option check, wherever it is called from."""
    calls = {"check_lr_schedule": 0, "check_loss_options": 0, "check_optimizer_name": 0}
    defined = {"check_lr_schedule": schedules_lib, "check_loss_options": schedules_lib,
               "check_optimizer_name": optim_lib}
    for name, home in defined.items():
        real = getattr(home, name)

        def counted(*args, _name=name, _real=real, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        for module in (home, run_lib, module_lib, schedules_lib, optim_lib):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, counted)
    return calls


def test_each_option_is_checked_once_for_a_whole_run(tiny_prior_dir, tmp_path, check_calls, loads):
    cfg = tiny_cfg(tiny_prior_dir, tmp_path, "loss.snr_gamma=5.0", "optim.lr_scheduler=cosine",
                   "optim.warmup_steps=1", "trainer.max_steps=3")
    run_training(cfg, tmp_path / "run")  # three optimizer steps: no check in the steps or the module
    assert check_calls == {"check_lr_schedule": 1, "check_loss_options": 1, "check_optimizer_name": 1}
    assert loads.call_count == 1


@pytest.mark.parametrize("override, message", [
    ("optim.lr_scheduler=cosin", r"optim.lr_scheduler='cosin' is unknown"),
    ("optim.name=sgd", r"optim.name='sgd' is unknown; choose one of adamw, adamw8bit"),
    ("loss.noise_offset=-1.0", r"loss.noise_offset=-1.0 must be >= 0"),
])
def test_a_bad_value_is_refused_once_before_the_prior_loads(tiny_prior_dir, tmp_path, check_calls, loads,
                                                            override, message):
    with pytest.raises(TrainConfigError, match=message):
        run_training(tiny_cfg(tiny_prior_dir, tmp_path, override), tmp_path / "run")
    assert loads.call_count == 0 and all(calls <= 1 for calls in check_calls.values())  # the failing one last


def test_snr_weights_on_a_sample_predicting_prior_are_refused_before_it_loads(tiny_prior_dir, tmp_path, loads):
    prior = shutil.copytree(tiny_prior_dir, tmp_path / "sample-prior")
    config_file = prior / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "sample"}))
    with pytest.raises(TrainConfigError, match="not the prior's prediction_type='sample'; set loss.snr_gamma=null"):
        check_config(tiny_cfg(prior, tmp_path, "loss.snr_gamma=5.0"), tmp_path / "run")
    check_config(tiny_cfg(prior, tmp_path), tmp_path / "run")  # without the weights: fine
    assert loads.call_count == 0


def test_checkpoints_hold_the_trained_state_and_no_copy_of_the_options(tiny_prior_dir, tmp_path):
    # Nothing of TrainingConfig is saved: checkpoints written before the module took its config
    # objects resume as they did (exact resume: test_training_loop, test_train_cli, test_training_options).
    run_training(tiny_cfg(tiny_prior_dir, tmp_path), tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert "hyper_parameters" not in ckpt and "datamodule_hyper_parameters" not in ckpt
    assert ckpt["state_dict"] and all(key.startswith("method.") for key in ckpt["state_dict"])
