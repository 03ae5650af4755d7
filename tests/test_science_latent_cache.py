"""The latent cache key changes with everything that changes the cached latents (VAE encoder
weights and config, the images, resolution, crop, dtypes) and with nothing else (the decoder, the
flip setting: the cache holds both flips)."""

from __future__ import annotations

import copy
import os

import numpy as np
import PIL.Image
import pytest
import torch

from ccp.training.data import ImageFolderDataset
from ccp.training.latent_cache import latent_cache_key


def write_images(folder, n=3, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        PIL.Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def dataset(folder, resolution=16, center_crop=False, random_flip=True, max_images=None):
    return ImageFolderDataset(folder, resolution, center_crop=center_crop, random_flip=random_flip,
                              max_images=max_images, progress=False)


@pytest.fixture
def images(tmp_path):
    return write_images(tmp_path / "images")


@pytest.fixture
def vae(tiny_prior):
    return copy.deepcopy(tiny_prior.vae)


def key(data, vae, **kwargs):
    return latent_cache_key(data, vae, **kwargs)


def test_key_is_stable_for_the_same_inputs(images, vae):
    assert key(dataset(images), vae) == key(dataset(images), copy.deepcopy(vae))


def test_encoder_weights_change_the_key_decoder_weights_do_not(images, vae):
    base = key(dataset(images), vae)
    decoder_tuned = copy.deepcopy(vae)
    with torch.no_grad():
        next(decoder_tuned.decoder.parameters()).add_(0.01)
    assert key(dataset(images), decoder_tuned) == base  # encodes identically (e.g. sd-vae-ft-mse)
    for part in ("encoder", "quant_conv"):
        changed = copy.deepcopy(vae)
        with torch.no_grad():
            next(getattr(changed, part).parameters()).add_(0.01)
        assert key(dataset(images), changed) != base, part


def test_vae_config_changes_the_key(images, vae):
    base = key(dataset(images), vae)
    rescaled = copy.deepcopy(vae)
    rescaled.register_to_config(scaling_factor=float(vae.config.scaling_factor) * 2)
    assert key(dataset(images), rescaled) != base


def test_preprocessing_and_dtypes_change_the_key(images, vae):
    base = key(dataset(images), vae)
    assert key(dataset(images, resolution=8), vae) != base
    assert key(dataset(images, center_crop=True), vae) != base
    assert key(dataset(images), vae, storage_dtype="float32") != base
    assert key(dataset(images), vae, encode_dtype="bfloat16") != base
    # the same dtype spelled another way is the same key
    assert key(dataset(images), vae, storage_dtype="fp16") == base
    assert key(dataset(images), vae, encode_dtype=next(vae.parameters()).dtype) == base


def test_flip_setting_does_not_change_the_key(images, vae):
    # every image is cached as is and mirrored, whatever random_flip says
    assert key(dataset(images, random_flip=False), vae) == key(dataset(images, random_flip=True), vae)


def test_image_set_and_bytes_change_the_key(images, vae, tmp_path):
    base = key(dataset(images), vae)
    assert key(dataset(images, max_images=2), vae) != base  # fewer images
    write_images(images, n=4)
    four = key(dataset(images), vae)
    assert four != base  # one more image
    (images / "3.png").rename(images / "renamed.png")
    assert key(dataset(images), vae) != four  # a renamed file
    (images / "renamed.png").unlink()
    # rewritten pixels of an existing file (as an editor saves it: new bytes, new mtime)
    before = key(dataset(images), vae)
    path = images / "1.png"
    stat = path.stat()
    PIL.Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert key(dataset(images), vae) != before


def test_same_images_in_another_folder_share_the_key(images, vae, tmp_path):
    # the key does not depend on where the folder is (a copy with the same files reuses the cache)
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    for p in images.iterdir():
        (copy_dir / p.name).write_bytes(p.read_bytes())
        st = p.stat()
        os.utime(copy_dir / p.name, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert key(dataset(copy_dir), vae) == key(dataset(images), vae)
