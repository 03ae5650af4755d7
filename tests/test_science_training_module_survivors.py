"""The training module (ccp/training/module.py) pinned where the mutation run of 2026-11-29
(benchmarks/results/mutation/report.md) left survivors: the peak-memory log of a CUDA step, the fp32
copy an SDXL fp16 VAE encodes with, the in-memory model the sampling callbacks get (and its
refusal without a prior), the mismatch message of instance and class inputs, the optimizer name
reaching the optimizer, and the scheduler table moving to the module's device.

CUDA is stood in for on the CPU: the module's device is set by hand and the CUDA memory counter
is replaced by a recorder; the device move is observed on the meta device. Every expected value
is written down here by hand.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

import ccp.training.module as module_mod
import ccp.training.optim as optim_mod
from ccp.methods.base import PromptTemplate
from ccp.training.module import OptimConfig, PersonalizationModule, TrainingConfig, join_inputs
from stand_ins import TrainingOnlyMethod


class Constant(TrainingOnlyMethod):
    """One trainable tensor; records the devices its frozen parts are moved to."""

    name = "constant"

    def __init__(self):
        super().__init__(prior=None, template=PromptTemplate())
        self.value = torch.nn.Parameter(torch.full((1, 3, 1, 1), 0.25))
        self.moved: list = []

    def predict_noise(self, noisy_latents, timesteps, **inputs):
        return self.value.expand_as(noisy_latents)

    def batch_inputs(self, batch, generator):
        return {}

    def move_frozen(self, device, dtype=None):
        self.moved.append(device)


class SdxlConstant(Constant):
    def __init__(self):
        super().__init__()
        self.sdxl = True  # as Method sets it for an SDXL prior


class Sampleable(Constant):
    """Builds its sampling pipeline on whatever prior it is given (recorded)."""

    def __init__(self):
        super().__init__()
        self.sampled_on: list = []

    def sampling_pipeline(self, prior):
        self.sampled_on.append(prior)
        return ("pipeline on", prior), "concept"


class Config(dict):
    """diffusers' FrozenDict in short: keys readable as attributes too."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


class HalfVAE(torch.nn.Module):
    """An fp16 VAE with force_upcast (SDXL's): encode multiplies the pixels by its one weight and
    records the dtypes it saw."""

    def __init__(self, weight=1.5, force_upcast=True, scaling_factor=0.5):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([weight, -2.0], dtype=torch.float16), requires_grad=False)
        self.config = Config(force_upcast=force_upcast, scaling_factor=scaling_factor, shift_factor=None)
        self.seen: list = []

    @property
    def dtype(self):  # as diffusers' ModelMixin
        return self.w.dtype

    def encode(self, pixels):
        self.seen.append((pixels.dtype, self.w.dtype))
        latents = pixels * self.w[0]
        return SimpleNamespace(latent_dist=SimpleNamespace(sample=lambda generator: latents))


def scheduler():
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def recording_log(module):
    logged = []
    module.log = lambda name, value, **kw: logged.append((name, value, kw))
    return logged


# --- the peak memory of a CUDA step ---------------------------------------------------------------
def test_a_cuda_step_also_logs_its_peak_memory_in_gib_of_the_modules_device(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(module_mod, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    asked = []

    def max_memory_allocated(device=None):
        asked.append(device)
        return 3 * 2**29  # 1.5 GiB

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", max_memory_allocated)
    method = Constant()
    module = PersonalizationModule(method, scheduler(), config=TrainingConfig(optim=OptimConfig(lr=0.2)))
    optimizer = torch.optim.SGD([method.value], lr=0.2)
    module._trainer = SimpleNamespace(world_size=2, optimizers=[optimizer])
    module._device = torch.device("cuda", 1)  # as Lightning sets it for the second GPU
    logged = recording_log(module)
    batch = {"latents": torch.zeros(3, 4, 2, 2)}
    module.on_train_batch_start(batch, 0)
    clock[0] = 101.5
    module.on_train_batch_end(None, batch, 0)
    assert logged == [
        ("train/step_time_s", 1.5, dict(on_step=True, batch_size=1)),
        ("train/images_per_s", 6 / 1.5, dict(on_step=True, prog_bar=True, batch_size=1)),  # 3 rows x 2 ranks
        ("train/lr", 0.2, dict(on_step=True, batch_size=1)),
        ("train/peak_memory_gb", 1.5, dict(on_step=True, batch_size=1)),
    ]
    assert asked == [torch.device("cuda", 1)]


def test_a_cpu_step_logs_no_peak_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: pytest.fail("asked on the CPU"))
    method = Constant()
    module = PersonalizationModule(method, scheduler())
    module._trainer = SimpleNamespace(world_size=1, optimizers=[torch.optim.SGD([method.value], lr=0.1)])
    logged = recording_log(module)
    module.on_train_batch_end(None, {"latents": torch.zeros(2, 4, 2, 2)}, 0)
    assert [name for name, _, _ in logged] == ["train/step_time_s", "train/images_per_s", "train/lr"]


# --- the fp32 copy an SDXL fp16 VAE encodes with ------------------------------------------------------
def test_an_sdxl_fp16_vae_encodes_through_one_fp32_copy_and_keeps_its_own_dtype():
    vae = HalfVAE()
    module = PersonalizationModule(SdxlConstant(), scheduler(), vae=vae)
    assert module.upcast_vae
    encoder = module._encoding_vae()
    assert encoder is not vae and isinstance(encoder, HalfVAE)
    assert encoder.w.dtype == torch.float32 and encoder.w.tolist() == [1.5, -2.0]
    assert vae.w.dtype == torch.float16  # the prior's VAE (shared with sampling) is untouched
    assert module._encoding_vae() is encoder  # copied once

    # pixels reach the copy in fp32; latents = sample * scaling_factor = pixels * 1.5 * 0.5
    pixels = torch.tensor([[[[1.0, -2.0], [0.5, 4.0]]]])
    latents = module.latents_from_batch({"pixel_values": pixels}, torch.Generator())
    assert encoder.seen == [(torch.float32, torch.float32)] and vae.seen == []
    assert latents.dtype == torch.float32
    assert latents.flatten().tolist() == [0.75, -1.5, 0.375, 3.0]


@pytest.mark.parametrize("method_cls, force_upcast", [(Constant, True), (SdxlConstant, False)])
def test_without_upcast_the_vae_encodes_itself(method_cls, force_upcast):
    vae = HalfVAE(force_upcast=force_upcast)
    module = PersonalizationModule(method_cls(), scheduler(), vae=vae)
    assert not module.upcast_vae
    assert module._encoding_vae() is vae
    assert module._vae_fp32 is None


# --- the model the sampling callbacks get -------------------------------------------------------------
def test_trained_model_is_the_methods_pipeline_on_the_prior_built_in_memory():
    method, prior = Sampleable(), object()
    module = PersonalizationModule(method, scheduler(), prior=prior)
    model = module.trained_model()
    assert method.sampled_on == [prior]
    assert model.pipe == ("pipeline on", prior) and model.pipe[1] is prior
    assert model.denoiser == "concept"
    assert model.method is Sampleable
    assert model.template is method.template
    assert model.export_dir is None


def test_trained_model_without_a_prior_says_what_is_missing():
    module = PersonalizationModule(Sampleable(), scheduler())
    with pytest.raises(RuntimeError, match=r"^this PersonalizationModule was built without prior=; "
                                           r"sampling callbacks need it$"):
        module.trained_model()


# --- instance and class inputs --------------------------------------------------------------------------
def test_join_inputs_names_both_key_sets_when_they_differ():
    rows = {"u": torch.zeros(2), "b": torch.zeros(2)}
    class_rows = {"u": torch.zeros(1), "c": torch.zeros(1), "a": torch.zeros(1)}
    message = "instance and class batches gave different inputs: ['b', 'u'] vs ['a', 'c', 'u']"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        join_inputs(rows, class_rows)


def test_join_inputs_puts_class_rows_after_instance_rows():
    joined = join_inputs({"u": torch.tensor([1.0, 2.0])}, {"u": torch.tensor([3.0])})
    assert list(joined) == ["u"] and joined["u"].tolist() == [1.0, 2.0, 3.0]


# --- the optimizer name ------------------------------------------------------------------------------------
def test_the_configured_optimizer_name_builds_that_optimizer(monkeypatch):
    class AdamW8bit(torch.optim.AdamW):
        pass

    monkeypatch.setattr(optim_mod, "_bitsandbytes", lambda: SimpleNamespace(optim=SimpleNamespace(AdamW8bit=AdamW8bit)))
    method = Constant()
    module = PersonalizationModule(method, scheduler(), config=TrainingConfig(optim=OptimConfig(lr=0.3, name="adamw8bit")))
    config = module.configure_optimizers()
    optimizer = config["optimizer"]
    assert type(optimizer) is AdamW8bit
    assert optimizer.param_groups[0]["params"] == [method.value] and optimizer.param_groups[0]["lr"] == 0.3


# --- devices ----------------------------------------------------------------------------------------------
def test_fit_start_moves_the_scheduler_table_to_the_modules_device():
    method, noise = Constant(), scheduler()
    module = PersonalizationModule(method, noise)
    module._device = torch.device("meta")  # stands in for an accelerator
    module.on_fit_start()
    assert method.moved == [torch.device("meta")]
    assert noise.alphas_cumprod.device == torch.device("meta") and noise.alphas_cumprod.shape == (1000,)
