"""Prior preservation (diffusers' train_dreambooth.py --with_prior_preservation): the loss split on
constructed inputs, the class batch, the class images (drawn once, resumable, sharded over ranks)
and the settings refused before any model loads."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline

import ccp.pipelines.sampling as sampling
from ccp.config import ConfigError, compose
from ccp.io import dir_complete
from ccp.methods import CustomDiffusion, DreamBooth, PromptTemplate
from ccp.training.class_images import ClassImagesConfig, generate_class_images, image_name
from ccp.training.data import ConceptDataModule
from ccp.training.module import PersonalizationModule, TrainingConfig
from ccp.training.run import check_config

CLASS_PROMPT = "a photo of dog"


def diffusers_embeds(prior, prompt: str) -> torch.Tensor:
    """[1, 77, D] as diffusers' own pipeline encodes a prompt (the reference encoder)."""
    pipe = StableDiffusionPipeline(**prior.components)
    return pipe.encode_prompt(prompt, torch.device("cpu"), 1, False)[0]


def test_loss_is_instance_mse_plus_weighted_class_mse(tiny_prior):
    """train_dreambooth.py: the class rows follow the instance rows, model_pred and target are
    chunked in two, loss = mse(instance) + prior_loss_weight * mse(class)."""
    torch.manual_seed(0)
    method = DreamBooth(tiny_prior, PromptTemplate())
    scheduler = DDPMScheduler.from_config(tiny_prior.scheduler.config)
    preservation = ClassImagesConfig(enabled=True, class_prompt=CLASS_PROMPT, prior_loss_weight=0.5)
    module = PersonalizationModule(method, scheduler, config=TrainingConfig(prior_preservation=preservation, seed=3))
    instance, klass = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    loss = module.training_step({"latents": instance, "class_latents": klass}, 0)

    # by hand: the step's generator draws noise and timesteps for the concatenated batch
    generator = module._generator(0)
    latents = torch.cat([instance, klass])
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (4,), generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prompts = torch.cat([diffusers_embeds(tiny_prior, "a photo of face").expand(2, -1, -1),
                         diffusers_embeds(tiny_prior, CLASS_PROMPT).expand(2, -1, -1)])
    with torch.no_grad():
        pred = tiny_prior.unet(noisy, timesteps, encoder_hidden_states=prompts).sample
    pred_instance, pred_prior = torch.chunk(pred, 2, dim=0)
    target, target_prior = torch.chunk(noise, 2, dim=0)
    expected = F.mse_loss(pred_instance, target) + 0.5 * F.mse_loss(pred_prior, target_prior)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(loss.detach(), F.mse_loss(pred, noise))  # the split matters here


def test_custom_diffusion_class_rows_use_the_class_prompt(tiny_prior):
    method = CustomDiffusion(tiny_prior, PromptTemplate())
    method.use_class_prompt(CLASS_PROMPT)
    noisy, t = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 900])
    with torch.no_grad():
        pred = method.predict_noise(noisy, t, num_class=1)
        instance = method.predict_noise(noisy[:2], t[:2])
        # the class prompt has no modifier token: the prior's encoder gives its embedding
        klass = method.unet(noisy[2:], t[2:], encoder_hidden_states=diffusers_embeds(tiny_prior, CLASS_PROMPT)).sample
    torch.testing.assert_close(pred[:2], instance, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred[2:], klass, rtol=1e-5, atol=1e-6)


SETTINGS = dict(enabled=True, class_prompt=CLASS_PROMPT, num_class_images=3, sample_batch_size=2, steps=2)


def _pixels(folder, n):
    return [np.asarray(PIL.Image.open(folder / image_name(i))) for i in range(n)]


class Interrupted(Exception):
    pass


def test_class_images_resume_after_a_kill_and_match_an_uninterrupted_run(tiny_prior, tmp_path, monkeypatch):
    cfg = ClassImagesConfig(**SETTINGS, class_data_dir=str(tmp_path / "resumed"))
    straight = generate_class_images(tiny_prior, ClassImagesConfig(**SETTINGS, class_data_dir=str(tmp_path / "straight")),
                                     32, tmp_path)
    assert dir_complete(straight)

    real = sampling.sample_batches
    drawn: list[int] = []

    def killed_after_first_batch(*args, **kwargs):
        for batch, images in real(*args, **kwargs):
            yield batch, images
            raise Interrupted

    monkeypatch.setattr(sampling, "sample_batches", killed_after_first_batch)
    with pytest.raises(Interrupted):
        generate_class_images(tiny_prior, cfg, 32, tmp_path)
    folder = tmp_path / "resumed"
    assert sorted(p.name for p in folder.glob("*.png")) == [image_name(0), image_name(1)] and not dir_complete(folder)

    def counting(pipe, guidance, indices, **kwargs):
        drawn.extend(indices)
        return real(pipe, guidance, indices, **kwargs)

    monkeypatch.setattr(sampling, "sample_batches", counting)
    assert generate_class_images(tiny_prior, cfg, 32, tmp_path) == folder
    assert drawn == [2] and dir_complete(folder)  # only the missing image
    for a, b in zip(_pixels(folder, 3), _pixels(straight, 3)):
        np.testing.assert_array_equal(a, b)
    generate_class_images(tiny_prior, cfg, 32, tmp_path)
    assert drawn == [2]  # complete: nothing drawn again


def test_class_images_are_sharded_over_ranks(tiny_prior, tmp_path):
    """Rank r draws the blocks of sample_batch_size images r, r + W, ...; the folder completes
    when the last rank finishes, with the images one process draws."""
    one = generate_class_images(tiny_prior, ClassImagesConfig(**SETTINGS, class_data_dir=str(tmp_path / "one")), 32, tmp_path)
    cfg = ClassImagesConfig(**SETTINGS, class_data_dir=str(tmp_path / "two"))
    folder = generate_class_images(tiny_prior, cfg, 32, tmp_path, rank=1, world_size=2)
    assert sorted(p.name for p in folder.glob("*.png")) == [image_name(2)] and not dir_complete(folder)
    generate_class_images(tiny_prior, cfg, 32, tmp_path, rank=0, world_size=2)
    assert dir_complete(folder)
    for a, b in zip(_pixels(folder, 3), _pixels(one, 3)):
        np.testing.assert_array_equal(a, b)


def test_class_images_in_a_folder_of_other_settings_are_refused(tiny_prior, tmp_path):
    generate_class_images(tiny_prior, ClassImagesConfig(**{**SETTINGS, "num_class_images": 1},
                                                        class_data_dir=str(tmp_path / "c")), 32, tmp_path)
    with pytest.raises(ConfigError, match="class_prompt differ.*class_data_dir"):
        generate_class_images(tiny_prior, ClassImagesConfig(**{**SETTINGS, "num_class_images": 1, "class_prompt": "a cat"},
                                                            class_data_dir=str(tmp_path / "c")), 32, tmp_path)


def test_batches_pair_instance_i_with_class_image_i_mod_n(tiny_prior, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        PIL.Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(images / f"{i}.png")
    dm = ConceptDataModule(images, resolution=32, batch_size=2, num_workers=0, random_flip=True, cache_dir=tmp_path / "cache",
                           class_images=ClassImagesConfig(**SETTINGS), prior=tiny_prior)
    dm.setup("fit")
    assert dm.class_images_dir.parent == tmp_path / "cache" / "class_images"  # default: under the data cache
    item = dm.train_dataset.item(3, flipped=True)
    klass = np.asarray(PIL.Image.open(dm.class_images_dir / image_name(0))).astype(np.float32) / 127.5 - 1
    torch.testing.assert_close(item["class_pixel_values"], torch.from_numpy(klass).permute(2, 0, 1).flip(-1))
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == batch["class_pixel_values"].shape == (2, 3, 32, 32)


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    PIL.Image.new("RGB", (64, 64)).save(folder / "0.png")
    return folder


def _train_cfg(method, prior_dir, image_dir, *extra):
    return compose("train", [f"experiment=tiny/{method}", f"prior.path={prior_dir}", f"data.path={image_dir}", *extra])


@pytest.mark.parametrize("method", ["ours", "textual_inversion", "oft"])
def test_methods_without_prior_preservation_are_refused(method, tiny_prior_dir, image_dir, tmp_path):
    cfg = _train_cfg(method, tiny_prior_dir, image_dir, "prior_preservation.enabled=true",
                     f"prior_preservation.class_prompt='{CLASS_PROMPT}'")
    with pytest.raises(ConfigError, match=f"method '{method}' does not support prior preservation.*dreambooth"):
        check_config(cfg, tmp_path)


@pytest.mark.parametrize(("override", "match"), [
    ("prior_preservation.class_prompt=null", "needs a class prompt.*prior_preservation.class_prompt="),
    ("prior_preservation.num_class_images=0", "num_class_images=0"),
    ("prior_preservation.prior_loss_weight=-1", "prior_loss_weight=-1"),
])
def test_bad_prior_preservation_values_are_refused(override, match, tiny_prior_dir, image_dir, tmp_path):
    cfg = _train_cfg("dreambooth", tiny_prior_dir, image_dir, "prior_preservation.enabled=true",
                     f"prior_preservation.class_prompt='{CLASS_PROMPT}'", override)
    with pytest.raises(ConfigError, match=match):
        check_config(cfg, tmp_path)


def test_supported_methods_pass_the_checks(tiny_prior_dir, image_dir, tmp_path):
    for method in ("dreambooth", "custom_diffusion"):
        check_config(_train_cfg(method, tiny_prior_dir, image_dir, "prior_preservation.enabled=true",
                                f"prior_preservation.class_prompt='{CLASS_PROMPT}'"), tmp_path)
