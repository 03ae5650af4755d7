"""LoRA (LoRA-DreamBooth) against diffusers and peft: the trainable set is rank x (in + out) per
attention projection, the one training loop moves only the LoRA factors, the export is the file
diffusers' `load_lora_weights` reads (rank and alpha included), and GCFG sampling with the loaded
LoRA equals diffusers' own pipeline with the same LoRA."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors import safe_open

from ccp.config import ConfigError, compose
from ccp.guidance import GuidanceSpec
from ccp.methods import METHODS, LoRA, PromptTemplate, build_method
from ccp.methods.lora import WEIGHTS_FILE, LoRAConfigError
from ccp.methods.params import report
from ccp.models.denoisers import BatchedCondition
from ccp.pipelines.gcfg import GCFGPipeline
from ccp.priors.tiny import SD15_SCHEDULER_CONFIG, SD15_UNET_CONFIG
from ccp.training.module import OptimConfig, PersonalizationModule, TrainingConfig
from ccp.training.run import run_training
from pixels import PixelData

STEPS = 3
SIZE = 64


def projections(unet):
    """Every to_q, to_k, to_v, to_out[0] linear of every attention layer (self and cross)."""
    return [layer for name, attn in unet.named_modules() if name.endswith(("attn1", "attn2"))
            for layer in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0])]


def hand_count(unet, rank: int) -> int:
    return sum(rank * (layer.in_features + layer.out_features) for layer in projections(unet))


def noisy_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    timesteps = torch.tensor([150, 650])
    return DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG).add_noise(latents, noise, timesteps), timesteps


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def diffusers_pipeline(prior_dir, lora_dir=None) -> StableDiffusionPipeline:
    """Plain diffusers: the prior folder loaded afresh, its LoRA loaded by `load_lora_weights`."""
    pipe = StableDiffusionPipeline.from_pretrained(prior_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    return pipe




# --- one LoRA trained through the one training loop, shared below ---------------------------------
@pytest.fixture(scope="module")
def trained(tiny_prior, tmp_path_factory):
    prior_before = state(tiny_prior.unet)
    method = build_method("lora", tiny_prior)
    initial = state(method)
    unet_before = state(method.unet)
    module = PersonalizationModule(method, DDPMScheduler.from_config(tiny_prior.scheduler.config), vae=tiny_prior.vae,
                                   config=TrainingConfig(optim=OptimConfig(lr=1e-2), seed=7))
    ckpt_dir = tmp_path_factory.mktemp("lora-ckpt")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=STEPS)])
    trainer.fit(module, datamodule=PixelData(4, SIZE))
    assert trainer.global_step == STEPS
    method.eval()
    export_dir = tmp_path_factory.mktemp("lora-export")
    method.export(export_dir)
    return SimpleNamespace(method=method, initial=initial, unet_before=unet_before, prior_before=prior_before,
                           ckpt=torch.load(ckpt_dir / "last.ckpt", weights_only=False), export_dir=export_dir)


def test_trainable_parameters_are_rank_times_in_plus_out_per_projection(tiny_prior):
    for rank in (4, 2):
        method = LoRA(tiny_prior, PromptTemplate(), rank=rank)
        assert method.num_trainable_parameters() == hand_count(tiny_prior.unet, rank)
        names = [n for n, p in method.named_parameters() if p.requires_grad]
        assert len(names) == 2 * len(projections(tiny_prior.unet))
        assert all(n.endswith((".lora_A.weight", ".lora_B.weight")) for n in names)
        assert all(p.dtype == torch.float32 for p in method.trainable_parameters())
    # the untrained adapter is the prior: B starts at zero (peft's "gaussian" init), A does not
    method = LoRA(tiny_prior, PromptTemplate())
    assert all(not layer["lora_B"].weight.any() and layer["lora_A"].weight.any() for layer in method.lora.values())
    noisy, t = noisy_batch()
    embeds = method.condition(2, torch.float32)
    with torch.no_grad():
        expected = tiny_prior.unet(noisy, t, encoder_hidden_states=embeds).sample
        torch.testing.assert_close(method.predict_noise(noisy, t), expected, rtol=0, atol=1e-6)


def test_sd15_count_is_diffusers_dreambooth_lora_rank_4(tiny_prior):
    with torch.device("meta"):  # SD v1.5's shapes without its memory
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    prior = SimpleNamespace(unet=unet, text_encoder=tiny_prior.text_encoder, tokenizer=tiny_prior.tokenizer)
    method = LoRA(prior, PromptTemplate(), rank=4)
    assert method.num_trainable_parameters() == hand_count(unet, 4) == 797_184


def test_ccp_params_lists_lora(tiny_prior):
    out, text = report("tiny", methods=["lora"])
    (row,) = out["rows"]
    assert row["label"] == "lora" and row["trainable"] == hand_count(tiny_prior.unet, 4)
    assert "lora" in text and f"{row['trainable']:,}" in text


def test_the_loop_trains_only_the_lora_factors_and_checkpoints_only_them(trained, tiny_prior):
    after = state(trained.method)
    assert after.keys() == trained.initial.keys()
    unmoved = [k for k in after if torch.equal(after[k], trained.initial[k])]
    assert not unmoved, f"LoRA tensors that did not train: {unmoved[:3]}"
    own = {p.data_ptr() for p in trained.method.trainable_parameters()}
    unet_after = trained.method.unet.state_dict()
    base = [k for k in trained.unet_before if unet_after[k].data_ptr() not in own]
    assert len(base) == len(tiny_prior.unet.state_dict())  # every prior weight, nothing else
    changed = [k for k in base if not torch.equal(unet_after[k], trained.unet_before[k])]
    assert not changed, f"non-LoRA weights changed: {changed[:3]}"
    prior_now = tiny_prior.unet.state_dict()
    assert prior_now.keys() == trained.prior_before.keys()
    assert all(torch.equal(prior_now[k], v) for k, v in trained.prior_before.items()), "the prior's UNet changed"
    assert not any("lora" in n for n, _ in tiny_prior.unet.named_modules()), "the prior's UNet got LoRA layers"
    keys = set(trained.ckpt["state_dict"])
    assert keys == {f"method.{k}" for k in trained.method.trainable_state_dict()}
    assert all(".lora_A." in k or ".lora_B." in k for k in keys)


def test_export_is_what_diffusers_load_lora_weights_reads(trained, tiny_prior, tiny_prior_dir):
    with safe_open(str(trained.export_dir / WEIGHTS_FILE), "pt") as f:
        keys = list(f.keys())
    # diffusers' LoRA layout, as train_dreambooth_lora.py writes it
    assert keys and all(k.startswith("unet.") and k.endswith((".lora.down.weight", ".lora.up.weight")) for k in keys)
    assert len(keys) == len(trained.initial)
    reference = diffusers_pipeline(tiny_prior_dir, trained.export_dir)
    pipe, denoiser = LoRA.load_export(tiny_prior, trained.export_dir)
    noisy, t = noisy_batch(seed=1)
    embeds = pipe.encode_prompt("a photo of face").repeat(2, 1, 1)
    with torch.no_grad():
        theirs = reference.unet(noisy, t, encoder_hidden_states=embeds).sample
        ours = pipe.denoisers[denoiser](noisy, t, BatchedCondition(prompt_embeds=embeds))
        prior = pipe.denoisers["prior"](noisy, t, BatchedCondition(prompt_embeds=embeds))
        trained_now = trained.method.predict_noise(noisy, t)
        plain = diffusers_pipeline(tiny_prior_dir).unet(noisy, t, encoder_hidden_states=embeds).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, trained_now, rtol=1e-5, atol=1e-6)
    assert (ours - prior).abs().max() > 1e-4, "the loaded LoRA predicts as the prior"
    # the prior's own denoiser in the same pipeline is untouched by the adapter next to it
    torch.testing.assert_close(prior, plain, rtol=0, atol=1e-6)
    # the loaded denoiser shares the prior's base weights instead of copying them
    shared = {p.data_ptr() for p in tiny_prior.unet.parameters()}
    assert all(p.data_ptr() in shared for n, p in pipe.components[denoiser].named_parameters() if "lora_" not in n)


def test_alpha_travels_with_the_export(tiny_prior, tiny_prior_dir, tmp_path):
    method = LoRA(tiny_prior, PromptTemplate(), rank=2, alpha=8)  # update scale 4, not 1
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in method.lora.values():
            layer["lora_B"].weight.copy_(torch.randn(layer["lora_B"].weight.shape, generator=g) * 0.05)
    method.export(tmp_path)
    reference = diffusers_pipeline(tiny_prior_dir, tmp_path)
    noisy, t = noisy_batch(seed=2)
    with torch.no_grad():
        expected = method.predict_noise(noisy, t)
        got = reference.unet(noisy, t, encoder_hidden_states=method.condition(2, torch.float32)).sample
        pipe, denoiser = LoRA.load_export(tiny_prior, tmp_path)
        ours = pipe.denoisers[denoiser](noisy, t, BatchedCondition(prompt_embeds=method.condition(2, torch.float32)))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert reference.unet.peft_config["default_0"].lora_alpha == 8


def test_gcfg_with_one_text_term_equals_diffusers_pipeline_with_the_lora(trained, tiny_prior, tiny_prior_dir):
    pipe, denoiser = LoRA.load_export(tiny_prior, trained.export_dir)
    pipe.set_progress_bar_config(disable=True)
    spec = LoRA.default_guidance(denoiser, PromptTemplate(), control_prompt="wearing glasses", control_weight=3.0)
    assert [t.source.condition.prompt for t in spec.terms] == ["a photo of face, wearing glasses"]
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=4, output_type="np")
    ours = pipe(guidance=spec, num_images=2, generator=torch.Generator().manual_seed(0), **kw).images
    reference = diffusers_pipeline(tiny_prior_dir, trained.export_dir)
    theirs = reference("a photo of face, wearing glasses", guidance_scale=3.0, num_images_per_prompt=2,
                       generator=torch.Generator().manual_seed(0), **kw).images
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=0, atol=1e-5)
    # the comparison can fail: the prior's own CFG samples differ
    prior = pipe(guidance=GuidanceSpec.cfg("a photo of face, wearing glasses", 3.0), num_images=2,
                 generator=torch.Generator().manual_seed(0), **kw).images
    assert np.abs(np.asarray(prior) - np.asarray(theirs)).max() > 1e-4
    assert isinstance(pipe, GCFGPipeline)


@pytest.mark.parametrize("kwargs, key", [({"rank": 0}, "rank"), ({"rank": -2}, "rank"), ({"rank": 2.5}, "rank"),
                                         ({"rank": True}, "rank"), ({"alpha": 0}, "alpha")])
def test_bad_rank_or_alpha_is_refused(tiny_prior, kwargs, key):
    with pytest.raises(LoRAConfigError, match=rf"method\.module\.{key}=.*positive.*method\.module\.{key}=4") as err:
        build_method("lora", tiny_prior, **kwargs)
    assert isinstance(err.value, ConfigError)


def test_train_config_with_bad_rank_fails_with_the_key_before_loading(tiny_prior_dir, tmp_path, monkeypatch):
    import ccp.training.run as train_run

    def no_loading(*args, **kwargs):
        raise AssertionError("the prior was loaded before the settings were checked")

    monkeypatch.setattr(train_run, "load_prior", no_loading)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        PIL.Image.fromarray(np.full((SIZE, SIZE, 3), 60 * i, dtype=np.uint8)).save(images / f"{i}.png")
    cfg = compose("train", overrides=["experiment=tiny/lora", f"prior.path={tiny_prior_dir}", f"data.path={images}",
                                      "method.module.rank=0"])
    with pytest.raises(LoRAConfigError, match=r"method\.module\.rank=0"):
        run_training(cfg, tmp_path / "run")


def test_registry_and_missing_export(tmp_path, tiny_prior):
    assert METHODS["lora"] is LoRA and LoRA.name == "lora" and not LoRA.trains_token
    with pytest.raises(LoRAConfigError, match=WEIGHTS_FILE):
        LoRA.load_export(tiny_prior, tmp_path)


def test_toy_reproduction_has_a_lora_row_trained_like_the_other_baselines(tmp_path):
    from omegaconf import OmegaConf

    from ccp.evaluation.tables import table1_rows
    from ccp.reproduce.config import check_inputs, compose_reproduce, export_dir, method_of
    from ccp.reproduce.exports import train_config

    cfg = compose_reproduce(["scale=toy", f"out_dir={tmp_path}"])
    check_inputs(cfg)
    assert "lora" in cfg.methods and method_of(cfg, "lora") == "lora"
    assert export_dir(cfg, "bold", "lora") == tmp_path / "train" / "bold_lora" / "export"
    lora, oft = (OmegaConf.to_container(train_config(cfg, "bold", m)) for m in ("lora", "oft"))
    assert lora.pop("method")["name"] == "lora" and oft.pop("method")["name"] == "oft"
    assert lora == oft  # same data, steps, batch, lr, template: only the method differs
    # the row is labelled LoRA and sits with the baselines, before ours
    records = [{"method": m, "dataset": "bold", "params": 1, "fid": 1.0} for m in ("ours", "lora", "oft")]
    assert [r["label"] for r in table1_rows(records, datasets=["bold"])] == ["OFT", "LoRA", "Ours"]
