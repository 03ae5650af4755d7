"""Defaults for people who run this on GPUs: ccp-train picks the GPUs when CUDA is there (and says so),
sampling and evaluation run in half precision with TF32 on CUDA and in fp32 on a CPU, and nothing is
downloaded unless `prior.allow_download=true`. CUDA is stood in for by replacing the one function that
counts devices (this machine has none)."""

from __future__ import annotations


import pytest
import torch
from omegaconf import OmegaConf

import ccp.config
from ccp.config import compose
from ccp.priors import PriorNotFoundError

TRAIN = ["prior=tiny", "prior.path=unused", "data=tiny", "data.path=unused"]


def trainer_for(monkeypatch, gpus: int, *overrides) -> dict:
    monkeypatch.setattr(ccp.config, "cuda_device_count", lambda: gpus)
    return OmegaConf.to_container(compose("train", [*TRAIN, *overrides]).trainer, resolve=True)


def test_plain_ccp_train_uses_the_gpus_it_finds(monkeypatch):
    cpu, one, eight = (trainer_for(monkeypatch, n) for n in (0, 1, 8))
    pick = ("accelerator", "devices", "strategy", "precision", "allow_tf32")
    assert [cpu[k] for k in pick] == ["cpu", 1, "auto", "32-true", False]
    assert [one[k] for k in pick] == ["gpu", 1, "auto", "bf16-mixed", True]
    assert [eight[k] for k in pick] == ["gpu", -1, "ddp", "bf16-mixed", True]
    # the same as naming the group that fits the hardware (every other key too)
    for auto, name in ((cpu, "cpu"), (one, "gpu"), (eight, "ddp")):
        named = trainer_for(monkeypatch, 8, f"trainer={name}")
        assert {k: v for k, v in auto.items() if k not in ("auto", "max_steps")} == \
            {k: v for k, v in named.items() if k != "max_steps"}, name


def test_a_named_trainer_or_key_wins_over_the_hardware(monkeypatch):
    assert trainer_for(monkeypatch, 8, "trainer=cpu")["accelerator"] == "cpu"
    assert trainer_for(monkeypatch, 8, "trainer.precision=16-mixed")["precision"] == "16-mixed"  # e.g. a V100
    assert trainer_for(monkeypatch, 8, "trainer.devices=2")["devices"] == 2


def test_ccp_train_says_which_hardware_it_chose(monkeypatch):
    from ccp.training.run import log_trainer_choice

    for gpus, said in ((0, "trainer=auto: no CUDA device found"), (4, "trainer=auto: 4 CUDA device(s) found")):
        monkeypatch.setattr(ccp.config, "cuda_device_count", lambda g=gpus: g)
        monkeypatch.setattr("ccp.training.run.cuda_device_count", lambda g=gpus: g)
        line = log_trainer_choice(compose("train", TRAIN).trainer)
        assert said in line and "name trainer=cpu|gpu|ddp to choose" in line
    named = log_trainer_choice(compose("train", [*TRAIN, "trainer=cpu"]).trainer)
    assert named.startswith("trainer: accelerator=cpu devices=1") and "trainer=auto" not in named


def test_sampling_and_evaluation_default_to_half_precision_on_cuda_and_fp32_on_cpu(monkeypatch):
    from ccp.pipelines.run import SampleConfigError, sampling_precision

    for name in ("sample", "eval"):
        assert compose(name, ["prior.path=x"] if name == "sample" else []).prior.dtype == "auto"
    assert compose("reproduce", ["scale=full"]).prior.dtype == "auto"
    assert sampling_precision("auto", torch.device("cpu")) == torch.float32
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        assert sampling_precision("auto", torch.device("cuda")) == torch.bfloat16
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # TF32 on for CUDA
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a T4 or V100
        assert sampling_precision("auto", torch.device("cuda:1")) == torch.float16
        assert sampling_precision("float32", torch.device("cuda")) == torch.float32  # a named dtype wins
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    with pytest.raises(SampleConfigError, match="prior.dtype: unknown dtype 'fp8'"):
        sampling_precision("fp8", torch.device("cpu"))


class Refused(OSError):
    pass


@pytest.fixture
def hub_calls(monkeypatch):
    """Every from_pretrained of a hub id, recorded and refused (nothing here is cached)."""
    from diffusers import ControlNetModel, StableDiffusionPipeline, StableDiffusionXLPipeline

    calls = []

    def record(cls):
        def from_pretrained(name, **kwargs):
            calls.append((cls.__name__, name, kwargs.get("local_files_only")))
            raise Refused(f"{name} is not in the cache")
        return from_pretrained

    for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline, ControlNetModel):
        monkeypatch.setattr(cls, "from_pretrained", record(cls))
    return calls


def test_hub_ids_are_read_from_the_cache_only_unless_downloads_are_allowed(hub_calls, tmp_path):
    from ccp.pipelines.run import run_sampling

    cfg = compose("sample", ["prior.path=someone/some-model", "sampling.steps=1"])
    with pytest.raises(PriorNotFoundError, match=r"set prior.allow_download=true, or download it first"):
        run_sampling(cfg, tmp_path / "offline")
    allowed = compose("sample", ["prior.path=someone/some-model", "prior.allow_download=true"])
    with pytest.raises(PriorNotFoundError) as err:
        run_sampling(allowed, tmp_path / "online")
    assert "prior.allow_download" not in str(err.value)  # it was allowed: the message does not ask for it
    assert hub_calls == [("StableDiffusionPipeline", "someone/some-model", True),
                         ("StableDiffusionPipeline", "someone/some-model", False)]


def test_training_evaluation_and_controlnets_pass_the_same_switch(hub_calls, tmp_path, monkeypatch):
    from ccp.priors.loading import load_controlnet, load_prior
    from ccp.training.run import run_training

    cfg = compose("train", ["prior.path=stable-diffusion-v1-5/stable-diffusion-v1-5", f"data.path={tmp_path}",
                            "trainer=cpu"])
    assert cfg.prior.allow_download is False  # prior=sd15's default is a hub id: offline unless allowed
    monkeypatch.setattr("ccp.training.run.check_config", lambda cfg, run_dir: type("Plan", (), {"callbacks": []})())
    with pytest.raises(PriorNotFoundError, match="prior.allow_download=true"):
        run_training(cfg, tmp_path / "run")
    with pytest.raises(PriorNotFoundError):
        load_controlnet("lllyasviel/sd-controlnet-canny")
    with pytest.raises(PriorNotFoundError):
        load_prior("stabilityai/stable-diffusion-xl-base-1.0", allow_download=True)
    assert hub_calls == [("StableDiffusionPipeline", "stable-diffusion-v1-5/stable-diffusion-v1-5", True),
                         ("ControlNetModel", "lllyasviel/sd-controlnet-canny", True),
                         ("StableDiffusionXLPipeline", "stabilityai/stable-diffusion-xl-base-1.0", False)]


@pytest.mark.timeout(300)
def test_half_precision_sampling_stays_within_the_measured_tolerance_of_fp32(tiny_prior_dir, tmp_path):
    """What prior.dtype=auto picks on CUDA, through ccp-sample's path on this CPU: three GCFG terms.
    benchmarks/sampling_precision.py measured, at 25 steps x 8 images on the tiny prior: bf16 mean
    0.43 and max 4 levels off fp32, fp16 0.055 and 1. Allowed here (4 steps, other images): 3x that."""
    import numpy as np
    import PIL.Image

    from ccp.models import NullTextUNet2DConditionModel
    from ccp.pipelines.run import run_sampling
    from ccp.priors import load_prior

    pipe = load_prior(str(tiny_prior_dir))
    NullTextUNet2DConditionModel.from_prior(pipe.unet, pipe.text_encoder, pipe.tokenizer,
                                            definition="value_mean").save_pretrained(tmp_path / "concept")
    images = {}
    for dtype in ("float32", "bfloat16", "float16"):
        cfg = compose("sample", [f"prior.path={tiny_prior_dir}", f"concept.path={tmp_path / 'concept'}",
                                 "guidance=concept_control", f"prior.dtype={dtype}", "device=cpu", "sampling.steps=4",
                                 "sampling.num_images=2", "sampling.height=64", "sampling.width=64"])
        out = run_sampling(cfg, tmp_path / dtype)
        images[dtype] = np.stack([np.asarray(PIL.Image.open(p)) for p in sorted((out / "images").glob("*.png"))])
    for dtype, (mean, largest) in {"bfloat16": (1.3, 12), "float16": (0.2, 3)}.items():
        diff = np.abs(images[dtype].astype(int) - images["float32"].astype(int))
        assert diff.mean() <= mean and diff.max() <= largest, (dtype, diff.mean(), diff.max())
        assert diff.max() > 0  # it did run in half precision
