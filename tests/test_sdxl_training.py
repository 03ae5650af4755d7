"""Ours, DreamBooth, Custom Diffusion and OFT on a tiny SDXL prior through the one training loop:
each trains, exports, reloads and samples through GCFG exactly as in memory; the training condition
(prompt embeddings, pooled text, size/crop time ids) is what GCFG feeds the denoiser; data items carry
their real sizes and crops; an fp16 SDXL VAE caches fp32 latents; SD v1.5 losses are unchanged."""

from __future__ import annotations

import copy

import lightning as L
import numpy as np
import PIL.Image
import pytest
import torch
import torchvision.transforms as T
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from ccp.config import ConfigError, compose
from ccp.methods import build_method
from ccp.methods.export import load_trained
from ccp.models.denoisers import BatchedCondition
from ccp.priors.loading import load_prior
from ccp.priors.tiny import save_tiny_prior
from ccp.training.data import ConceptDataModule, ImageFolderDataset
from ccp.training.latent_cache import CachedLatentDataset, LatentCache, build_latent_cache
from ccp.training.module import OptimConfig, PersonalizationModule, TrainingConfig
from ccp.training.run import check_config, run_training

METHODS = ["ours", "dreambooth", "textual_inversion", "custom_diffusion", "oft", "lora"]
LR = {"ours": 1e-3, "dreambooth": 1e-3, "textual_inversion": 5e-2, "custom_diffusion": 1e-2, "oft": 1e-2, "lora": 1e-2}
SETTINGS = {"ours": {"definition": "value_mean"}}  # the calibrated features take long on a CPU
RES = 32
SIZES = [(40, 48), (48, 40), (32, 32), (64, 48)]  # (h, w) of the files


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return save_tiny_prior(tmp_path_factory.mktemp("sdxl-prior"), family="sdxl")


@pytest.fixture(scope="module")
def sdxl(sdxl_dir):
    return load_prior(sdxl_dir)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl-images")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        PIL.Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def sample(pipe, denoiser, method_cls, template, seed=0):
    pipe.set_progress_bar_config(disable=True)
    spec = method_cls.default_guidance(denoiser, template, "wearing glasses")
    return pipe(spec, num_images=1, height=RES, width=RES, num_inference_steps=2, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).images


class RecordInputs(L.Callback):
    """What `batch_inputs` gave the prediction during training."""

    def __init__(self, method):
        self.seen = []
        inner = method.batch_inputs

        def spy(batch, generator):
            out = inner(batch, generator)
            self.seen.append(out)
            return out

        method.batch_inputs = spy


@pytest.fixture(scope="module", params=METHODS)
def trained(request, sdxl, images, tmp_path_factory):
    name = request.param
    method = build_method(name, sdxl, **SETTINGS.get(name, {}))
    before = {k: v.detach().clone() for k, v in method.trainable_state_dict().items()}
    module = PersonalizationModule(method, DDPMScheduler.from_config(sdxl.scheduler.config), vae=sdxl.vae, prior=sdxl,
                                   config=TrainingConfig(optim=OptimConfig(lr=LR[name]), seed=0))
    cache = tmp_path_factory.mktemp(f"cache-{name}")
    data = ConceptDataModule(images, resolution=RES, batch_size=2, num_workers=0, persistent_workers=False,
                             latent_cache={"enabled": True, "dtype": "float32", "output": "posterior"},
                             cache_dir=cache).attach_vae(sdxl.vae, upcast=True)
    record = RecordInputs(method)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, use_distributed_sampler=False)
    trainer.fit(module, datamodule=data)
    method.eval()
    out = tmp_path_factory.mktemp(f"export-{name}")
    method.export(out)
    pipe, denoiser = type(method).load_export(sdxl, out)
    return dict(name=name, method=method, before=before, out=out, pipe=pipe, denoiser=denoiser, seen=record.seen)


def test_training_runs_with_the_images_real_sizes(trained):
    seen = trained["seen"]
    assert len(seen) == 2
    for inputs in seen:
        ids = inputs["time_ids"]
        assert ids.shape == (2, 6) and ids.dtype == torch.float32
        assert {tuple(map(int, row[:2])) for row in ids} <= set(SIZES)
        assert (ids[:, 2:4] == 0).all() and (ids[:, 4:] == RES).all()  # no crop; target = the resolution


def test_trained_weights_change_and_the_export_reloads_bit_identical(trained, sdxl):
    name, method, pipe, den = trained["name"], trained["method"], trained["pipe"], trained["denoiser"]
    after = method.trainable_state_dict()
    changed = [k for k, v in trained["before"].items() if not torch.equal(after[k], v)]
    assert changed, f"{name}: no trained tensor changed in 2 steps"
    if name in ("ours", "dreambooth"):
        loaded = (pipe.concept_unet if name == "ours" else pipe.denoisers[den].unet).state_dict()
        mine = method.unet.state_dict()
        assert loaded.keys() == mine.keys()
        assert all(torch.equal(loaded[k], mine[k]) for k in mine)
    elif name in ("custom_diffusion", "textual_inversion"):
        if name == "custom_diffusion":
            loaded = {k: p for k, p in pipe.denoisers[den].unet.attn_processors.items()
                      if any(True for _ in p.parameters())}
            mine = {k.replace("__", "."): p for k, p in method.processors.items()}
            assert loaded.keys() == mine.keys()
            for k, p in mine.items():
                assert all(torch.equal(a, b) for a, b in zip(loaded[k].state_dict().values(), p.state_dict().values())), k
        for tokenizer, encoder, row in ((pipe.tokenizer, pipe.text_encoder, method.token_embeds),
                                        (pipe.tokenizer_2, pipe.text_encoder_2, method.token_embeds_2)):
            token = tokenizer.convert_tokens_to_ids(method.template.placeholder)
            assert torch.equal(encoder.get_input_embeddings().weight[token], row.weight[0])
    elif name == "lora":  # diffusers' LoRA file: the method's factors under "unet."
        from ccp.methods.lora import WEIGHTS_FILE

        saved = load_file(trained["out"] / WEIGHTS_FILE)
        mine = {f"unet.{k}": v for k, v in method.lora_state_dict().items()}
        assert saved.keys() == mine.keys() and all(torch.equal(saved[k], mine[k].float()) for k in mine)
        loaded = pipe.denoisers[den].unet.state_dict()
        assert any("lora" in k for k in loaded)
    else:  # oft: the adapter file is the method's rotations
        from peft.utils import get_peft_model_state_dict

        saved = load_file(trained["out"] / "oft" / "adapter_model.safetensors")
        mine = get_peft_model_state_dict(method.peft_unet)
        assert saved.keys() == mine.keys() and all(torch.equal(saved[k], mine[k]) for k in mine)


def test_gcfg_sampling_of_the_export_equals_the_in_memory_method(trained, sdxl):
    method = trained["method"]
    memory_pipe, memory_den = method.sampling_pipeline(sdxl)
    assert memory_den == trained["denoiser"]
    expected = sample(memory_pipe, memory_den, type(method), method.template)
    got = sample(trained["pipe"], trained["denoiser"], type(method), method.template)
    # OFT's export is merged into the weights, in memory its rotations run unmerged: rounding apart
    tol = dict(rtol=1e-4, atol=1e-5) if trained["name"] == "oft" else dict(rtol=0, atol=0)
    torch.testing.assert_close(got, expected, **tol)


def test_training_condition_equals_what_gcfg_feeds_the_denoiser(trained, sdxl):
    method = trained["method"]
    pipe, den = method.sampling_pipeline(sdxl)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([999, 400])
    ids = torch.tensor([[40.0, 48, 0, 0, 32, 32], [64, 48, 0, 3, 32, 32]])
    fields = {} if den == "concept" else pipe.encode_text(method.training_prompt)
    cond = BatchedCondition(**{k: v.repeat(2, *[1] * (v.ndim - 1)) for k, v in fields.items()}, time_ids=ids)
    with torch.no_grad():
        expected = pipe.denoisers[den](x, t, cond)
        got = method.predict_noise(x, t, time_ids=ids)
        other = method.predict_noise(x, t, time_ids=ids.flip(0))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.allclose(got, other[[1, 0]]), "the time ids must change the prediction"


def test_prior_preservation_class_rows_get_their_prompt_and_their_sizes(sdxl):
    method = build_method("dreambooth", sdxl)
    method.use_class_prompt("a photo of a person")
    module = PersonalizationModule(method, DDPMScheduler.from_config(sdxl.scheduler.config), vae=sdxl.vae,
                                   config=TrainingConfig(seed=0))
    batch = {"pixel_values": torch.rand(1, 3, RES, RES) * 2 - 1, "original_size": torch.tensor([[40, 48]]),
             "crop_top_left": torch.tensor([[0, 0]]), "class_pixel_values": torch.rand(1, 3, RES, RES) * 2 - 1,
             "class_original_size": torch.tensor([[64, 48]]), "class_crop_top_left": torch.tensor([[8, 0]])}
    calls = []
    inner = method.predict_noise
    method.predict_noise = lambda *a, **k: calls.append((a, k)) or inner(*a, **k)
    module.training_step(batch, 0)
    (x, t), kwargs = calls[0]
    assert kwargs["num_class"] == 1
    torch.testing.assert_close(kwargs["time_ids"], torch.tensor([[40.0, 48, 0, 0, 32, 32], [64, 48, 8, 0, 32, 32]]))
    pipe, den = method.sampling_pipeline(sdxl)
    rows = [pipe.encode_text(method.training_prompt), pipe.encode_text("a photo of a person")]
    cond = BatchedCondition(**{k: torch.cat([r[k] for r in rows]) for k in rows[0]}, time_ids=kwargs["time_ids"])
    with torch.no_grad():  # instance row: the training prompt; class row: the class prompt
        torch.testing.assert_close(inner(x, t, **kwargs), pipe.denoisers[den](x, t, cond), rtol=0, atol=0)


# --- data: sizes and crops -----------------------------------------------------------------------
def diffusers_crop(path, resolution):
    """train_text_to_image_sdxl.py's centre-crop offsets, with torchvision's Resize."""
    image = T.Resize(resolution)(PIL.Image.open(path).convert("RGB"))
    return (max(0, int(round((image.height - resolution) / 2.0))), max(0, int(round((image.width - resolution) / 2.0))))


def test_items_carry_the_files_size_and_crop(images, sdxl, tmp_path):
    plain = ImageFolderDataset(images, RES, random_flip=False, progress=False)
    cropped = ImageFolderDataset(images, RES, center_crop=True, random_flip=False, progress=False)
    for i, (h, w) in enumerate(SIZES):
        item = plain[i]
        assert item["original_size"].tolist() == [h, w] and item["original_size"].dtype == torch.long
        assert item["crop_top_left"].tolist() == [0, 0]
        assert cropped[i]["crop_top_left"].tolist() == list(diffusers_crop(plain.files[i], RES))
    assert cropped[0]["crop_top_left"].tolist() == [0, 3]  # 40x48 -> 32x38, centre crop starts at x = 3
    assert cropped[1]["crop_top_left"].tolist() == [3, 0]
    # the latent cache carries them too
    folder = build_latent_cache(cropped, sdxl.vae, cache_dir=tmp_path, storage_dtype="float32", progress=False)
    cached = CachedLatentDataset(LatentCache(folder), random_flip=False, output="posterior")
    for i in range(len(SIZES)):
        for key in ("original_size", "crop_top_left"):
            assert torch.equal(cached[i][key], cropped[i][key])


def test_fp16_sdxl_vae_caches_fp32_latents(images, sdxl_dir, tmp_path):
    fp16 = load_prior(sdxl_dir, dtype=torch.float16)
    assert fp16.vae.dtype == torch.float16 and fp16.vae.config.scaling_factor == 0.13025
    data = ImageFolderDataset(images, RES, random_flip=False, progress=False)
    folder = build_latent_cache(data, fp16.vae, cache_dir=tmp_path, storage_dtype="float32", progress=False, upcast=True)
    cache = LatentCache(folder)
    assert cache.meta["encode_dtype"] == "float32" and cache.scaling_factor == 0.13025  # read from the VAE config
    assert fp16.vae.dtype == torch.float16  # the prior's VAE is left as it was
    pixels = torch.stack([data.pixels(i) for i in range(len(data))])
    with torch.no_grad():
        ref32 = copy.deepcopy(fp16.vae).float().encode(pixels).latent_dist.mean
        ref16 = fp16.vae.encode(pixels.half()).latent_dist.mean.float()
    got = torch.stack([cache.posterior(i)[0] for i in range(len(data))])
    torch.testing.assert_close(got, ref32, rtol=1e-5, atol=1e-5)
    assert (got - ref32).abs().max() < (ref16 - ref32).abs().max()  # not what fp16 encoding gives


# --- SD v1.5 is unchanged --------------------------------------------------------------------------
def test_sd15_loss_is_bit_identical_with_the_new_batch_keys(tiny_prior):
    method = build_method("dreambooth", tiny_prior)
    module = PersonalizationModule(method, DDPMScheduler.from_config(tiny_prior.scheduler.config), vae=tiny_prior.vae,
                                   config=TrainingConfig(seed=3))
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    plain = module.training_step({"pixel_values": pixels}, 0)
    extra = module.training_step({"pixel_values": pixels, "original_size": torch.tensor([[40, 48], [64, 64]]),
                                  "crop_top_left": torch.tensor([[0, 3], [0, 0]])}, 0)
    assert method.batch_inputs({"pixel_values": pixels}, torch.Generator()) == {}
    assert torch.equal(plain, extra)


# --- ccp-train ---------------------------------------------------------------------------------
def cli_cfg(method, prior_dir, image_dir, *extra):
    return compose("train", overrides=[f"experiment=tiny/{method}", f"prior.path={prior_dir}", f"data.path={image_dir}",
                                       f"data.cache_dir={image_dir.parent / 'cache'}", "data.resolution=32", *extra])


def test_ccp_train_on_an_sdxl_prior_folder(sdxl_dir, images, tmp_path):
    cfg = cli_cfg("oft", sdxl_dir, images, "trainer.max_steps=1", "trainer.global_batch_size=2",
                  "validation.every_n_steps=1", "data.latent_cache.enabled=true")
    assert cfg.prior.family == "auto"
    export = run_training(cfg, tmp_path)
    assert (tmp_path / "validation" / "step_0000001.png").is_file()
    model = load_trained(export)
    model.pipe.set_progress_bar_config(disable=True)
    images_out = model.pipe(model.guidance("wearing glasses"), num_images=1, height=RES, width=RES,
                            num_inference_steps=2, output_type="np").images
    assert images_out.shape == (1, RES, RES, 3) and np.isfinite(images_out).all()
    # ccp-eval takes the SDXL export unchanged; image i of the seed does not depend on the batch
    from ccp.evaluation.run import run_eval

    values = []
    for batch in (1, 4):
        eval_cfg = compose("eval", overrides=[
            f"export.path={export}", "metric=fid", f"fid.real_path={images}", "fid.num_samples=4", "fid.shard_size=4",
            "fid.feature_extractor=random_conv", f"fid.stats_cache_dir={tmp_path / 'stats'}", "fid.num_workers=0",
            "sampling.steps=2", f"sampling.height={RES}", f"sampling.width={RES}", f"sampling.batch_size={batch}",
            "logger=none"])
        result = run_eval(eval_cfg, tmp_path / f"eval-{batch}")
        assert result["method"] == "oft" and result["num_images"] == 4
        values.append(result["value"])
    assert values[0] == pytest.approx(values[1], rel=1e-4) and values[0] > 0  # batched convolutions round apart


def test_sdxl_settings_that_do_not_fit_fail_before_loading(sdxl_dir, images, tiny_prior_dir):
    with pytest.raises(ConfigError, match="train_text_encoder=true.*SDXL prior has two text encoders"):
        check_config(cli_cfg("dreambooth", sdxl_dir, images, "method.module.train_text_encoder=true"))
    from ccp.methods.text_to_image import TextToImage

    with pytest.raises(ConfigError, match="method 'text_to_image' does not train on SDXL priors"):
        TextToImage.check_prior("sdxl")  # trains priors from captions: SD v1.x-shaped ones only
    TextToImage.check_prior("sd2")
    with pytest.raises(ConfigError, match="prior.family=sd1"):
        check_config(cli_cfg("oft", sdxl_dir, images, "prior.family=sd1"))
    check_config(cli_cfg("dreambooth", tiny_prior_dir, images, "method.module.train_text_encoder=true"))  # SD v1.5: fine
