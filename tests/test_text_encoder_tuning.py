"""DreamBooth with text-encoder tuning (diffusers' train_dreambooth.py --train_text_encoder): only
the UNet and a copy of the text encoder train, the copy has its own learning rate, the export holds
it as a diffusers folder, and GCFG encodes that denoiser's prompts only with it."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from ccp.config import ConfigError, compose
from ccp.guidance import Condition, GuidancePlan, GuidanceSpec, GuidanceTerm, Source
from ccp.io import dir_complete
from ccp.methods import DreamBooth, PromptTemplate
from ccp.methods.export import load_trained
from ccp.training.class_images import ClassImagesConfig
from ccp.training.module import OptimConfig, PersonalizationModule, TrainingConfig
from ccp.training.run import check_config, run_training

PROMPT = "a photo of face"


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _diffusers_pipe(prior, unet, text_encoder) -> StableDiffusionPipeline:
    """diffusers' own pipeline on the given parts (the reference)."""
    scheduler = DPMSolverMultistepScheduler.from_config(prior.scheduler.config)
    pipe = StableDiffusionPipeline(**{**prior.components, "unet": unet, "text_encoder": text_encoder, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tuned(tiny_prior):
    """A DreamBooth with a trained text encoder: one optimizer step at a large rate."""
    prior_unet, prior_encoder = _state(tiny_prior.unet), _state(tiny_prior.text_encoder)
    torch.manual_seed(0)
    method = DreamBooth(tiny_prior, PromptTemplate(), train_text_encoder=True, text_encoder_lr=1e-2)
    config = TrainingConfig(optim=OptimConfig(lr=1e-3),
                            prior_preservation=ClassImagesConfig(enabled=True, class_prompt="a photo of dog"))
    module = PersonalizationModule(method, DDPMScheduler.from_config(tiny_prior.scheduler.config), config=config)
    optimizer = module.configure_optimizers()["optimizer"]
    loss = module.training_step({"latents": torch.randn(2, 4, 8, 8), "class_latents": torch.randn(2, 4, 8, 8)}, 0)
    loss.backward()
    optimizer.step()
    return method, optimizer, prior_unet, prior_encoder


def test_only_the_unet_and_the_text_encoder_copy_train(tiny_prior, tuned):
    method, optimizer, prior_unet, prior_encoder = tuned
    # the prior's modules are bit-unchanged; the method's copies moved away from them
    for module, before in ((tiny_prior.unet, prior_unet), (tiny_prior.text_encoder, prior_encoder)):
        for key, value in module.state_dict().items():
            assert torch.equal(value, before[key]), key
    for module, before in ((method.unet, prior_unet), (method.text_encoder, prior_encoder)):
        assert any(not torch.equal(v, before[k]) for k, v in module.state_dict().items())
    assert method.text_encoder is not tiny_prior.text_encoder
    trainable = {id(p) for p in method.trainable_parameters()}
    assert trainable == {id(p) for p in (*method.unet.parameters(), *method.text_encoder.parameters())}
    # two groups: the UNet at optim.lr, the text encoder at its own rate
    groups = optimizer.param_groups
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in method.unet.parameters()}
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in method.text_encoder.parameters()}
    assert all(p.dtype == torch.float32 for p in method.trainable_parameters())


def test_the_prompt_is_encoded_by_the_tuned_copy(tiny_prior, tuned):
    method = tuned[0]
    ids = tiny_prior.tokenizer(PROMPT, padding="max_length", max_length=tiny_prior.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids
    noisy, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    with torch.no_grad():
        expected = method.unet(noisy, t, encoder_hidden_states=method.text_encoder(ids)[0]).sample
        torch.testing.assert_close(method.predict_noise(noisy, t), expected, rtol=1e-5, atol=1e-6)


def test_export_round_trips_and_gcfg_encodes_only_the_dreambooth_prompts_with_it(tiny_prior, tuned, tmp_path):
    method = tuned[0]
    method.export(tmp_path)
    encoder = CLIPTextModel.from_pretrained(tmp_path / "text_encoder")  # a plain diffusers/transformers folder
    for key, value in method.text_encoder.state_dict().items():
        assert torch.equal(encoder.state_dict()[key], value), key
    pipe, name = DreamBooth.load_export(tiny_prior, tmp_path)
    pipe.set_progress_bar_config(disable=True)

    # both terms on one prompt: the DreamBooth denoiser's embedding is the tuned encoder's, the prior's the prior's
    spec = GuidanceSpec(terms=(GuidanceTerm("own", Source(name, Condition(prompt=PROMPT)), 2.0),
                               GuidanceTerm("prior", Source("prior", Condition(prompt=PROMPT)), 1.0)),
                        unconditional=Source(name, Condition(prompt="")))
    batched = pipe.batch_conditions(GuidancePlan.from_spec(spec), 1, 64, 64, torch.float32)
    tuned_ref = _diffusers_pipe(tiny_prior, tiny_prior.unet, encoder)
    prior_ref = _diffusers_pipe(tiny_prior, tiny_prior.unet, tiny_prior.text_encoder)
    own = [tuned_ref.encode_prompt(p, torch.device("cpu"), 1, False)[0] for p in (PROMPT, "")]
    order = [c.prompt for c in next(c for c in GuidancePlan.from_spec(spec).calls if c.denoiser == name).conditions]
    expected = torch.cat([own[0] if p == PROMPT else own[1] for p in order])
    torch.testing.assert_close(batched[name].prompt_embeds, expected, rtol=0, atol=0)
    torch.testing.assert_close(batched["prior"].prompt_embeds,
                               prior_ref.encode_prompt(PROMPT, torch.device("cpu"), 1, False)[0], rtol=0, atol=0)
    assert not torch.allclose(own[0], batched["prior"].prompt_embeds)
    assert pipe.text_encoder is tiny_prior.text_encoder

    # a CFG sample on the DreamBooth denoiser = diffusers' pipeline with the tuned UNet and text encoder
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    kw = dict(height=64, width=64, num_inference_steps=2, output_type="latent")
    ours = pipe(GuidanceSpec.cfg(PROMPT, 5.0, denoiser=name), generator=torch.Generator().manual_seed(1), **kw).images
    ref = _diffusers_pipe(tiny_prior, unet, encoder)(PROMPT, guidance_scale=5.0, generator=torch.Generator().manual_seed(1),
                                                     **kw).images
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_in_memory_pipeline_follows_the_trained_encoder(tiny_prior):
    method = DreamBooth(tiny_prior, PromptTemplate(), train_text_encoder=True)
    pipe, name = method.sampling_pipeline(tiny_prior)
    assert pipe.denoisers[name].modules() == [method.unet, method.text_encoder]  # moved along for a sample
    with torch.no_grad():
        method.text_encoder.get_input_embeddings().weight.mul_(1.5)  # an update after the pipeline was built
    embeds = pipe.encode_prompt_with(pipe.denoisers[name].text_encoder, PROMPT)
    ids = tiny_prior.tokenizer(PROMPT, padding="max_length", max_length=tiny_prior.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(embeds, method.text_encoder(ids)[0])
        assert not torch.allclose(embeds, tiny_prior.text_encoder(ids)[0])


def test_without_it_nothing_changes(tiny_prior):
    method = DreamBooth(tiny_prior, PromptTemplate())
    assert not hasattr(method, "text_encoder") and method.extra_param_groups() == []
    pipe, _ = method.sampling_pipeline(tiny_prior)
    assert type(pipe).__name__ == "GCFGPipeline"


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        PIL.Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize(("overrides", "match"), [
    (["method.module.train_text_encoder=true", "method.module.text_encoder_lr=-1"], "text_encoder_lr=-1"),
    (["method.module.text_encoder_lr=1e-5"], "train_text_encoder=false"),
])
def test_bad_text_encoder_settings_are_refused(overrides, match, tiny_prior_dir, image_dir, tmp_path):
    cfg = compose("train", ["experiment=tiny/dreambooth", f"prior.path={tiny_prior_dir}", f"data.path={image_dir}", *overrides])
    with pytest.raises(ConfigError, match=match):
        check_config(cfg, tmp_path)


def test_ccp_train_with_prior_preservation_and_text_encoder_exports_both(tiny_prior_dir, image_dir, tmp_path):
    cfg = compose("train", ["experiment=tiny/dreambooth_prior", f"prior.path={tiny_prior_dir}", f"data.path={image_dir}",
                            f"data.cache_dir={tmp_path / 'cache'}", "validation.every_n_steps=0"])
    export = run_training(cfg, tmp_path / "run")
    assert (export / "unet").is_dir() and (export / "text_encoder").is_dir()
    (folder,) = (tmp_path / "cache" / "class_images").iterdir()
    assert dir_complete(folder) and len(list(folder.glob("*.png"))) == cfg.prior_preservation.num_class_images
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert any(k.startswith("method.text_encoder.") for k in ckpt["state_dict"])
    model = load_trained(export)
    assert model.pipe.denoisers["dreambooth"].text_encoder is not model.pipe.text_encoder
