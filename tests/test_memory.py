"""Memory: the optimisers of ``optim.name`` (ccp.training.optim), the byte estimate of
`ccp.methods.params.memory_estimate` against a measured training step, and ``ccp-params --memory``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rss import measuring_env
from ccp.config import ConfigError
from ccp.methods import build_method
from ccp.methods.params import memory_estimate, optimizer_state_bytes
from ccp.training.optim import (
    OPTIMIZERS,
    OptimizerConfigError,
    build_optimizer,
    check_optimizer_name,
    optimizer_state_bytes_per_param,
)

bitsandbytes = pytest.importorskip("bitsandbytes", reason="optim.name=adamw8bit needs the memory extra")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 256 x 512 weights: above bitsandbytes' 4,096-value threshold, so their state is 8-bit
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))


def _train(name: str, steps: int = 60) -> tuple[list[float], torch.optim.Optimizer]:
    model = _model()
    optimizer = build_optimizer(model.parameters(), name, lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 256, generator=generator), torch.randn(64, 256, generator=generator)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, optimizer


# --- optimisers ---------------------------------------------------------------------------------
def test_adamw8bit_trains_like_adamw_on_cpu():
    fp32, _ = _train("adamw")
    int8, optimizer = _train("adamw8bit")
    assert isinstance(optimizer, bitsandbytes.optim.AdamW8bit)
    weight = optimizer.param_groups[0]["params"][0]
    assert optimizer.state[weight]["state1"].dtype == torch.uint8  # really 8-bit
    assert int8[0] == pytest.approx(fp32[0])
    assert int8[-1] < 0.05 * int8[0] and fp32[-1] < 0.05 * fp32[0]
    assert int8[-1] == pytest.approx(fp32[-1], rel=0.25)


def test_adamw8bit_state_round_trips_through_a_checkpoint():
    """Lightning checkpoints `optimizer.state_dict()` and resumes with `load_state_dict`."""
    losses, optimizer = _train("adamw8bit", steps=5)
    model = _model()
    resumed = build_optimizer(model.parameters(), "adamw8bit", lr=1e-3)
    resumed.load_state_dict(optimizer.state_dict())
    for p, q in zip(optimizer.param_groups[0]["params"], resumed.param_groups[0]["params"]):
        assert torch.equal(optimizer.state[p]["state1"], resumed.state[q]["state1"])
        assert optimizer.state[p]["step"] == resumed.state[q]["step"]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_state_bytes_is_what_the_optimizer_allocates(name):
    _, optimizer = _train(name, steps=1)
    params = optimizer.param_groups[0]["params"]
    shared = {id(t) for s in optimizer.state.values() for k, t in s.items() if k.startswith("qmap")}
    allocated = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                    if torch.is_tensor(t) and id(t) not in shared)
    assert allocated == optimizer_state_bytes([p.shape for p in params], name)
    assert optimizer_state_bytes_per_param(name) == {"adamw": 8.0, "adamw8bit": 2.03125}[name]


def test_unknown_optimizer_names_the_choices():
    for call in (lambda: check_optimizer_name("sgd"), lambda: build_optimizer(_model().parameters(), "sgd"),
                 lambda: optimizer_state_bytes_per_param("sgd")):
        with pytest.raises(OptimizerConfigError, match="adamw, adamw8bit") as info:
            call()
        assert isinstance(info.value, ConfigError) and "optim.name='sgd'" in str(info.value)


def test_adamw8bit_without_bitsandbytes_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(OptimizerConfigError, match=r"pip install 'ccp\[memory\]'.*optim.name=adamw"):
        check_optimizer_name("adamw8bit")
    assert optimizer_state_bytes_per_param("adamw8bit") > 2  # estimates need no bitsandbytes


def _fit_8bit(prior, ckpt_dir, max_steps, ckpt_path=None):
    import lightning as L
    from diffusers import DDPMScheduler
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ccp.methods import PromptTemplate
    from ccp.methods.ours import NullTextConcept
    from ccp.training.module import OptimConfig, PersonalizationModule, TrainingConfig

    class Latents(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"latents": torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(i))}

    method = NullTextConcept(prior, PromptTemplate(), definition="value_mean")
    module = PersonalizationModule(method, DDPMScheduler.from_config(prior.scheduler.config),
                                   config=TrainingConfig(optim=OptimConfig(lr=1e-3, name="adamw8bit"), seed=1))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=1.0,
                        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_last=True)])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(Latents(), batch_size=2), ckpt_path=ckpt_path)
    assert isinstance(trainer.optimizers[0], bitsandbytes.optim.AdamW8bit)
    return {k: v.detach().clone() for k, v in method.trainable_state_dict().items()}


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_adamw8bit_training_resumes_exactly(tiny_prior, tmp_path):
    """ccp-train with optim.name=adamw8bit: the 8-bit state goes through a Lightning checkpoint."""
    full = _fit_8bit(tiny_prior, tmp_path / "full", 4)
    _fit_8bit(tiny_prior, tmp_path / "part", 2)
    resumed = _fit_8bit(tiny_prior, tmp_path / "part", 4, ckpt_path=str(tmp_path / "part" / "last.ckpt"))
    start = {k: v.detach().clone() for k, v in build_method("ours", tiny_prior, definition="value_mean")
             .trainable_state_dict().items()}
    assert any(not torch.equal(full[k], start[k]) for k in full)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=0, msg=k)


# --- the estimate -------------------------------------------------------------------------------
def _bytes(tensors, dtype=None) -> int:
    return sum(t.numel() * (dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size())
               for t in tensors)


def _prior_tensors(prior):
    return [t for name in ("unet", "vae", "text_encoder") for m in [getattr(prior, name)] for t in (*m.parameters(), *m.buffers())]


@pytest.mark.parametrize("name", ["textual_inversion", "dreambooth", "ours"])
def test_memory_estimate_counts_what_is_resident_once(tiny_prior, name):
    method = build_method(name, tiny_prior, **({"definition": "value_mean"} if name == "ours" else {}))
    trainable = list(method.trainable_parameters())
    n = sum(p.numel() for p in trainable)
    prior, vae = _prior_tensors(tiny_prior), _bytes([*tiny_prior.vae.parameters(), *tiny_prior.vae.buffers()])
    own = list(method.buffers())  # prompt ids/embeddings, null-text features: the method's own storage
    est = memory_estimate(method, tiny_prior)
    assert est["trainable_parameters"] == n and est["weights"] == est["gradients"] == 4 * n
    assert est["optimizer_state"] == optimizer_state_bytes([p.shape for p in trainable], "adamw")
    assert est["ema"] == est["ema_host"] == 0
    assert est["total"] == est["weights"] + est["gradients"] + est["optimizer_state"] + est["frozen"]
    # in one process the prior stays resident; what a method shares with it (frozen copies) counts once
    assert est["frozen"] + est["frozen_host"] == _bytes(prior) + _bytes(own)
    assert est["process"] == est["total"] + est["frozen_host"]
    runs_prior = {"textual_inversion": _bytes(prior), "dreambooth": vae, "ours": vae}[name]  # all, or the VAE only
    assert est["frozen"] == runs_prior + _bytes(own)
    # on a GPU the prior keeps its own tensors in host memory, except the VAE (moved in place)
    gpu = memory_estimate(method, tiny_prior, device="cuda")
    assert gpu["frozen"] == est["frozen"] and gpu["frozen_host"] == _bytes(prior) - vae and gpu["process"] is None

    small = memory_estimate(method, tiny_prior, optimizer="adamw8bit", ema=True, ema_on_cpu=True, frozen_dtype=torch.bfloat16)
    assert small["frozen"] + small["frozen_host"] == _bytes(prior, torch.bfloat16) + _bytes(own, torch.bfloat16)
    assert small["ema"] == 0 and small["ema_host"] == 4 * n
    assert small["optimizer_state"] < est["optimizer_state"] or n < 4096
    on_device = memory_estimate(method, tiny_prior, ema=True)
    assert on_device["ema"] == 4 * n and on_device["total"] == est["total"] + 4 * n


# One training step in a fresh process, its peak RSS against the estimate. The UNet is widened to
# ~105M parameters on 8x8 latents, so the weights, gradients and optimizer state (what the estimate
# states) dominate activations. The baseline is the process after imports and the tokenizer (Python
# objects, no tensors). glibc's malloc keeps freed per-tensor optimizer temporaries in its heap once
# its mmap threshold has adapted (bitsandbytes' CPU path makes fp32 copies of each tensor's state):
# a fixed threshold makes RSS follow the tensors; docs/memory.md has the numbers with and without.
MEASURE_STEP = textwrap.dedent("""
    import gc, json, sys
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from ccp.methods import build_method
    from ccp.methods.params import memory_estimate
    from ccp.priors.tiny import SD15_SCHEDULER_CONFIG, TINY_TEXT_ENCODER_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG
    from ccp.priors.tokenizer import build_clip_tokenizer
    from ccp.training.module import PersonalizationModule
    from ccp.training.optim import build_optimizer

    from rss import reset_peak, status

    name, optimizer = sys.argv[1:3]
    torch.set_num_threads(1)
    tokenizer = build_clip_tokenizer()
    gc.collect()
    reset_peak()
    baseline = status("VmRSS")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "block_out_channels": (320, 640), "layers_per_block": 2,
                                   "norm_num_groups": 32, "attention_head_dim": 8})
    prior = StableDiffusionPipeline(
        vae=AutoencoderKL(**TINY_VAE_CONFIG).eval(), text_encoder=CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER_CONFIG)).eval(),
        tokenizer=tokenizer, unet=unet.eval(), scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    method = build_method(name, prior, **({"definition": "value_mean"} if name == "ours" else {}))
    module = PersonalizationModule(method, DDPMScheduler.from_config(prior.scheduler.config), vae=prior.vae, prior=prior)
    opt = build_optimizer(method.trainable_parameters(), optimizer, lr=1e-4)
    estimate = memory_estimate(method, prior, optimizer=optimizer)
    gc.collect()
    before_step = status("VmRSS")
    build_peak = status("VmHWM")
    reset_peak()
    loss = module.training_step({"latents": torch.randn(1, 4, 8, 8)}, 0)
    loss.backward()
    backward_peak = status("VmHWM")
    reset_peak()
    opt.step()
    print(json.dumps({"baseline": baseline, "before_step": before_step, "backward_peak": backward_peak,
                      "peak": max(build_peak, backward_peak, status("VmHWM")), "estimate": estimate,
                      "loss": loss.item()}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("name,optimizer", [("ours", "adamw"), ("dreambooth", "adamw"), ("ours", "adamw8bit")])
def test_estimate_matches_a_measured_training_step(name, optimizer):
    env = measuring_env()
    out = subprocess.run([sys.executable, "-c", MEASURE_STEP, name, optimizer], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    est = m["estimate"]
    assert est["trainable_parameters"] > 90e6  # the parameters dominate
    # activations: the first forward+backward's peak over the resident state, less the gradients it allocates
    activations = max(0, m["backward_peak"] - m["before_step"] - est["gradients"])
    measured, estimate = m["peak"] - m["baseline"], est["process"]  # one CPU process holds it all
    assert activations < 0.1 * estimate
    assert measured <= 1.1 * (estimate + activations), (measured, est, activations)
    assert measured >= 0.9 * estimate, (measured, est)


# --- ccp-params --memory ------------------------------------------------------------------------
def test_ccp_params_memory_tiny(tmp_path, capsys):
    from ccp.cli.params import main

    out = tmp_path / "memory.json"
    main(["--tiny", "--memory", "--optimizer", "adamw8bit", "--ema", "--ema-on-cpu", "--frozen-dtype", "bfloat16",
          "--device", "cpu", "--methods", "ours", "dreambooth", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "optimizer_state" in printed and "GiB" in printed
    report = json.loads(out.read_text())
    assert report["options"] == {"optimizer": "adamw8bit", "ema": True, "ema_on_cpu": True, "frozen_dtype": "bfloat16",
                                 "device": "cpu"}
    rows = {r["label"]: r for r in report["rows"]}
    assert set(rows) == {"ours", "dreambooth"}
    for row in rows.values():
        assert row["ema"] == 0 and row["ema_host"] == row["weights"] > 0
        assert row["total"] == row["weights"] + row["gradients"] + row["optimizer_state"] + row["frozen"]
        assert row["process"] == row["total"] + row["ema_host"] + row["frozen_host"]
    assert report["machine"]["cpu"]["model_name"] and "avx512_bf16" in report["machine"]["cpu"]


# --- what a result was measured on --------------------------------------------------------------
def test_hardware_record_names_the_cpu_and_its_bf16_flags():
    from ccp.hardware import CPU_FLAGS, cpu_info, device_info, machine

    cpu = cpu_info()
    assert cpu["model_name"] and cpu["cores"] == os.cpu_count()
    assert set(CPU_FLAGS) <= set(cpu) and all(isinstance(cpu[f], bool) for f in CPU_FLAGS)
    assert device_info("cpu") == {"device": "cpu", "cpu": cpu}  # no GPU entry for a CPU
    assert machine()["torch"] == torch.__version__ and machine()["cpu"] == cpu


def _calls(tree, names: set[str]) -> set[str]:
    import ast

    return {node.func.id if isinstance(node.func, ast.Name) else node.func.attr for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in names}


def test_every_benchmark_json_records_the_machine():
    """Each script in benchmarks/ that writes JSON calls ccp.hardware's record (through benchmarks/common.py)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    writers, missing = [], []
    for path in sorted(root.glob("*.py")):
        if path.name == "common.py":  # defines write_json and re-exports ccp.hardware
            continue
        tree = ast.parse(path.read_text())
        if _calls(tree, {"write_json", "dumps"}):
            writers.append(path.name)
            if not _calls(tree, {"machine", "device_info"}):
                missing.append(path.name)
    assert len(writers) >= 10, writers  # the check sees the scripts
    assert not missing, f"benchmark scripts writing JSON without the machine record: {missing}"
    common = (root / "common.py").read_text()
    assert "from ccp.hardware import" in common and "def cpu_info" not in common  # one definition, in the library


# --- the 24 GB preset ---------------------------------------------------------------------------
def test_gpu_24gb_preset_applies_last():
    from ccp.config import compose

    cfg = compose("train", ["experiment=table1/face_ours", "preset=gpu_24gb"])
    assert cfg.prior.dtype == "bfloat16" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.optim.name == "adamw8bit" and cfg.ema.device == "cpu" and cfg.speed.gradient_checkpointing
    assert cfg.data.batch_size == 2 and cfg.trainer.global_batch_size == 32  # the global batch is kept
    check_optimizer_name(cfg.optim.name)
