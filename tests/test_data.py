"""Image folder data, bad-file handling, the latent cache and the datamodule (paper App. D.1)."""

from __future__ import annotations

import itertools

import copy
import io
import logging
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from ccp.priors.tiny import TINY_VAE_CONFIG
from ccp.training import data as data_module
from ccp.training.data import (
    BadImageError,
    BadImageWarning,
    ConceptDataModule,
    ImageFolderDataset,
    scan_image_folder,
)
from ccp.training.latent_cache import (
    MANIFEST,
    CachedLatentDataset,
    LatentCache,
    build_latent_cache,
    latent_cache_key,
    shard_name,
)

RED, GREEN, GRAY, WHITE = (255, 0, 0), (0, 255, 0), (128, 128, 128), (255, 255, 255)


def bordered(width: int, height: int, border: int) -> Image.Image:
    """Gray with a red left border and a green right border: mirror-asymmetric, and a crop loses them."""
    array = np.full((height, width, 3), GRAY, dtype=np.uint8)
    array[:, :border] = RED
    array[:, width - border :] = GREEN
    return Image.fromarray(array)


def levels(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] back to 0..255, for exact comparisons."""
    return ((x + 1) * 127.5).round().to(torch.int64)


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


@pytest.fixture
def image_folder(tmp_path) -> Path:
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    save(bordered(1024, 1024, 64), root / "a" / "big.png")
    save(bordered(200, 100, 20), root / "a" / "b" / "wide.PNG")
    save(Image.fromarray(rng.integers(0, 256, (80, 48, 3), dtype=np.uint8)), root / "c" / "tall.webp", lossless=True)
    save(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), root / "d.JPEG", quality=95)
    save(Image.fromarray(rng.integers(0, 256, (70, 70, 3), dtype=np.uint8)), root / "e.jpg")
    (root / "notes.txt").write_text("not an image, and not an image extension either")
    save(Image.new("RGB", (8, 8)), root / ".hidden" / "skipped.png")
    return root


# --- the image folder ------------------------------------------------------------------------
def test_finds_images_recursively_in_sorted_order_with_any_case_extension(image_folder):
    ds = ImageFolderDataset(image_folder, 64, progress=False)
    rel = [p.relative_to(image_folder).as_posix() for p in ds.files]
    assert rel == ["a/b/wide.PNG", "a/big.png", "c/tall.webp", "d.JPEG", "e.jpg"]
    for i in range(len(ds)):
        x = ds[i]["pixel_values"]
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32
        assert x.min() >= -1.0 and x.max() <= 1.0
    exact = ds.pixels(1)  # the 1024x1024 bordered image: flat areas keep their exact values
    assert levels(exact[:, 32, 32]).tolist() == list(GRAY) and levels(exact[:, 32, 0]).tolist() == list(RED)


@pytest.mark.parametrize("size", [(1024, 1024), (200, 100)])
def test_resize_keeps_the_whole_image_and_center_crop_cuts_the_sides(tmp_path, size):
    save(bordered(*size, border=size[0] // 10), tmp_path / "x.png")
    whole = ImageFolderDataset(tmp_path, 64, random_flip=False, progress=False).pixels(0)
    assert torch.allclose(whole[:, 32, 0], torch.tensor([1.0, -1.0, -1.0]), atol=0.02)  # red left border kept
    assert torch.allclose(whole[:, 32, 63], torch.tensor([-1.0, 1.0, -1.0]), atol=0.02)  # green right border kept
    cropped = ImageFolderDataset(tmp_path, 64, center_crop=True, random_flip=False, progress=False).pixels(0)
    if size[0] == size[1]:
        assert torch.equal(cropped, whole)
    else:  # the central 100x100 of 200x100 has no border left
        assert torch.allclose(cropped[:, 32, 0], torch.full((3,), 128 / 127.5 - 1), atol=0.02)


def test_random_flip_gives_both_variants_and_none_when_off(image_folder):
    flipping = ImageFolderDataset(image_folder, 64, random_flip=True, progress=False)
    original = flipping.pixels(0)
    mirrored = original.flip(-1)
    assert not torch.equal(original, mirrored)
    torch.manual_seed(0)
    seen = [flipping[0]["pixel_values"] for _ in range(40)]
    n_orig = sum(torch.equal(x, original) for x in seen)
    n_flip = sum(torch.equal(x, mirrored) for x in seen)
    assert n_orig + n_flip == 40 and 8 <= n_flip <= 32
    fixed = ImageFolderDataset(image_folder, 64, random_flip=False, progress=False)
    assert all(torch.equal(fixed[0]["pixel_values"], original) for _ in range(20))


def test_max_images_takes_the_first_usable_files(image_folder):
    (image_folder / "a" / "b" / "aa.png").write_bytes(b"junk")  # sorts first, unusable
    with pytest.warns(BadImageWarning):
        ds = ImageFolderDataset(image_folder, 64, max_images=2, progress=False)
    assert [p.name for p in ds.files] == ["wide.PNG", "big.png"]


# --- bad files -------------------------------------------------------------------------------
def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def messy_folder(tmp_path) -> Path:
    root = tmp_path / "messy"
    root.mkdir()
    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    save(photo, root / "ok.png")
    save(Image.new("L", (16, 16), 77), root / "gray.png")
    save(photo.convert("P"), root / "palette.png")
    save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), root / "cmyk.jpg")
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:, :8] = (255, 0, 0, 255)  # left half opaque red, right half fully transparent black
    save(Image.fromarray(rgba, "RGBA"), root / "rgba.png")
    gray16 = np.zeros((16, 16), dtype=np.uint16)
    gray16[:, 8:] = 65535
    save(Image.fromarray(gray16), root / "gray16.png")
    good = _png_bytes(photo)
    corrupt = bytearray(good)
    idat = corrupt.index(b"IDAT")
    corrupt[idat + 20] ^= 0xFF
    (root / "corrupt.png").write_bytes(bytes(corrupt))
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    jpeg = io.BytesIO()
    photo.save(jpeg, format="JPEG")
    (root / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "text.png").write_text("this is not a PNG")
    return root


BAD = ["corrupt.png", "text.png", "truncated.jpg", "truncated.png"]


def test_convertible_images_are_kept_and_bad_ones_skipped_with_one_warning_each(messy_folder, caplog):
    assert Image.open(messy_folder / "gray16.png").mode == "I;16"
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO, logger=data_module.__name__):
        warnings.simplefilter("always")
        ds = ImageFolderDataset(messy_folder, 16, random_flip=False, progress=False)
    bad_warnings = [w for w in caught if issubclass(w.category, BadImageWarning)]
    assert len(bad_warnings) == len(BAD)
    assert sorted(Path(str(w.message).split(": ")[0].removeprefix("skipping ")).name for w in bad_warnings) == BAD
    assert "skipped 4 of 10 files" in caplog.text
    assert sorted(p.name for p in ds.files) == ["cmyk.jpg", "gray.png", "gray16.png", "ok.png", "palette.png", "rgba.png"]

    by_name = {p.name: ds.pixels(i) for i, p in enumerate(ds.files)}
    gray = by_name["gray.png"]
    assert (levels(gray) == 77).all()
    rgba = by_name["rgba.png"]  # transparent pixels composite onto white
    assert levels(rgba[:, 0, 0]).tolist() == list(RED) and levels(rgba[:, 0, 15]).tolist() == list(WHITE)
    g16 = by_name["gray16.png"]  # 16-bit range mapped onto 8 bits, not clipped
    assert levels(g16[:, 0, 0]).tolist() == [0] * 3 and levels(g16[:, 0, 15]).tolist() == [255] * 3
    cmyk = by_name["cmyk.jpg"]  # C=0 M=255 Y=255 K=0 is red
    assert cmyk[0].mean() > 0.9 and cmyk[1:].mean() < -0.9
    assert by_name["palette.png"].shape == (3, 16, 16)


def test_on_bad_image_fail_lists_every_bad_file(messy_folder):
    with pytest.raises(BadImageError) as err:
        ImageFolderDataset(messy_folder, 16, on_bad_image="fail", progress=False)
    message = str(err.value)
    assert all(name in message for name in BAD)
    assert "ok.png" not in message and "data.on_bad_image=skip" in message


def test_missing_empty_and_all_bad_folders_are_errors_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(missing, 64)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError) as err:
        ImageFolderDataset(empty, 64)
    assert str(empty) in str(err.value) and ".webp" in str(err.value)
    (empty / "sub" / "x.png").write_text("not really")
    with pytest.raises(FileNotFoundError, match="no usable images"), pytest.warns(BadImageWarning):
        ImageFolderDataset(empty, 64, progress=False)


def test_scan_cache_is_reused_until_a_file_changes(messy_folder, tmp_path, monkeypatch):
    cache = tmp_path / "scans"
    first = scan_image_folder(messy_folder, progress=False, cache_dir=cache)

    def no_decoding(path):
        raise AssertionError(f"rescanned {path}")

    monkeypatch.setattr(data_module, "check_image", no_decoding)
    assert scan_image_folder(messy_folder, progress=False, cache_dir=cache) == first
    save(Image.new("RGB", (8, 8)), messy_folder / "text.png")  # fixed: the listing changes
    monkeypatch.undo()
    again = scan_image_folder(messy_folder, progress=False, cache_dir=cache)
    assert len(again.images) == len(first.images) + 1 and len(again.bad) == len(first.bad) - 1


# --- latent cache ----------------------------------------------------------------------------
def make_vae(seed: int) -> AutoencoderKL:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**TINY_VAE_CONFIG).eval()


@pytest.fixture(scope="module")
def vae():
    from ccp.priors.tiny import build_tiny_prior

    return build_tiny_prior(0).vae


class EncoderCalls:
    """Counts VAE encoder forwards; optionally raises on call number `fail_on`."""

    def __init__(self, vae, fail_on: int | None = None):
        self.count, self.fail_on = 0, fail_on
        self.handle = vae.encoder.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.count += 1
        if self.count == self.fail_on:
            raise KeyboardInterrupt("simulated interruption")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def build(dataset, vae, cache_dir, **kwargs):
    kwargs = {"shard_size": 2, "batch_size": 2, "storage_dtype": torch.float32, "progress": False, **kwargs}
    return build_latent_cache(dataset, vae, cache_dir, **kwargs)


def shard_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{p.name}/{k}": v for p in sorted(folder.glob("shard-*.safetensors")) for k, v in load_file(p).items()}


@pytest.fixture
def dataset(image_folder):
    return ImageFolderDataset(image_folder, 32, progress=False)  # 4x4 latents: cheap to encode


@pytest.mark.parametrize("storage, atol", [(torch.float32, 1e-5), (torch.float16, 2e-2)])
def test_cached_posterior_equals_fresh_encoding_for_both_flips(dataset, vae, tmp_path, storage, atol):
    cache = LatentCache(build(dataset, vae, tmp_path, storage_dtype=storage))
    assert len(cache) == 5 and cache.scaling_factor == vae.config.scaling_factor
    for i in (0, 4):
        for flipped in (False, True):
            x = dataset.pixels(i)[None]
            with torch.no_grad():
                fresh = vae.encode(x.flip(-1) if flipped else x).latent_dist
            mean, logvar = cache.posterior(i, flipped)
            assert mean.shape == (4, 4, 4)
            assert torch.allclose(mean, fresh.mean[0], atol=atol, rtol=atol)
            assert torch.allclose(logvar, fresh.logvar[0], atol=atol, rtol=atol)
        assert not torch.allclose(cache.posterior(i, False)[0], cache.posterior(i, True)[0], atol=1e-3)


def test_samples_follow_the_cached_posterior_and_flip_variants_alternate(dataset, vae, tmp_path):
    cache = LatentCache(build(dataset, vae, tmp_path))
    mean, logvar = cache.posterior(1)
    scale, std = cache.scaling_factor, torch.exp(0.5 * logvar)
    torch.manual_seed(0)
    n = 400
    samples = torch.stack([cache.sample(1) for _ in range(n)])
    z = (samples / scale - mean) / std  # standard normal if sampling is mean + std * eps
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02
    assert (z.mean(0).abs() < 5 / n**0.5).all()  # every element centred on its own mean

    batches = CachedLatentDataset(cache, random_flip=True)
    assert batches[1]["latents"].shape == (4, 4, 4)
    posterior = CachedLatentDataset(cache, random_flip=True, output="posterior")
    flipped_mean = cache.posterior(1, True)[0]
    means = [posterior[1]["latent_mean"] for _ in range(40)]
    n_flip = sum(torch.equal(m, flipped_mean) for m in means)
    assert sum(torch.equal(m, mean) for m in means) + n_flip == 40 and 8 <= n_flip <= 32
    fixed = CachedLatentDataset(cache, random_flip=False, output="posterior")
    assert all(torch.equal(fixed[1]["latent_mean"], mean) for _ in range(20))
    assert torch.allclose(fixed[1]["latent_std"], std)
    pickle.loads(pickle.dumps(batches))  # DataLoader workers get it without open shard handles


def test_complete_cache_is_reused_without_running_the_vae(dataset, vae, tmp_path):
    with EncoderCalls(vae) as calls:
        folder = build(dataset, vae, tmp_path)
    assert calls.count == 3  # 5 images, shards of 2, one VAE call per shard
    before = shard_tensors(folder)
    with EncoderCalls(vae) as calls:
        assert build(dataset, vae, tmp_path) == folder
    assert calls.count == 0
    assert shard_tensors(folder).keys() == before.keys()


def test_interrupted_build_resumes_with_only_the_missing_shards(dataset, vae, tmp_path):
    with EncoderCalls(vae, fail_on=2), pytest.raises(KeyboardInterrupt):
        build(dataset, vae, tmp_path / "a")
    (folder,) = (tmp_path / "a").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", shard_name(0)]  # no manifest, no temp files
    with pytest.raises(FileNotFoundError, match="incomplete"):
        LatentCache(folder)
    with EncoderCalls(vae) as calls:
        assert build(dataset, vae, tmp_path / "a") == folder
    assert calls.count == 2
    reference = build(dataset, vae, tmp_path / "b")
    assert _equal_tensors(shard_tensors(folder), shard_tensors(reference))


def _equal_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cache_key_follows_vae_encoder_resolution_and_files_but_not_flip(image_folder, vae):
    ds = ImageFolderDataset(image_folder, 64, progress=False)
    key = latent_cache_key(ds, vae)
    assert latent_cache_key(ImageFolderDataset(image_folder, 64, random_flip=False, progress=False), vae) == key
    assert latent_cache_key(ImageFolderDataset(image_folder, 32, progress=False), vae) != key
    assert latent_cache_key(ImageFolderDataset(image_folder, 64, center_crop=True, progress=False), vae) != key
    assert latent_cache_key(ds, make_vae(7)) != key
    assert latent_cache_key(ds, vae, storage_dtype="float32") != key
    decoder_tuned, encoder_tuned = copy.deepcopy(vae), copy.deepcopy(vae)
    with torch.no_grad():
        decoder_tuned.decoder.conv_out.bias.add_(0.1)
        encoder_tuned.encoder.conv_in.bias.add_(0.1)
    assert latent_cache_key(ds, decoder_tuned) == key  # the decoder does not change latents
    assert latent_cache_key(ds, encoder_tuned) != key
    os.utime(image_folder / "e.jpg", ns=(1, 1))
    assert latent_cache_key(ImageFolderDataset(image_folder, 64, progress=False), vae) != key


def test_ranks_build_disjoint_shards_that_make_the_same_cache(dataset, vae, tmp_path):
    with EncoderCalls(vae) as calls:
        folder = build(dataset, vae, tmp_path / "ddp", rank=0, world_size=2)
    assert calls.count == 2 and not (folder / MANIFEST).exists()
    assert sorted(p.name for p in folder.glob("shard-*")) == [shard_name(0), shard_name(2)]
    with EncoderCalls(vae) as calls:
        assert build(dataset, vae, tmp_path / "ddp", rank=1, world_size=2) == folder
    assert calls.count == 1 and (folder / MANIFEST).exists()
    single = build(dataset, vae, tmp_path / "single")
    assert folder.name == single.name
    assert _equal_tensors(shard_tensors(folder), shard_tensors(single))


def test_barrier_waits_for_the_other_ranks_and_fails_if_a_shard_is_missing(dataset, vae, tmp_path):
    def other_rank_finishes():
        build(dataset, vae, tmp_path / "ok", rank=1, world_size=2)

    folder = build(dataset, vae, tmp_path / "ok", rank=0, world_size=2, barrier=other_rank_finishes)
    assert len(LatentCache(folder)) == 5
    with pytest.raises(RuntimeError, match=shard_name(1)):
        build(dataset, vae, tmp_path / "lost", rank=0, world_size=2, barrier=lambda: None)


# --- the datamodule --------------------------------------------------------------------------
def datamodule(folder, tmp_path, **kwargs) -> ConceptDataModule:
    kwargs = {"resolution": 64, "batch_size": 2, "num_workers": 0, "cache_dir": tmp_path / "cache", **kwargs}
    return ConceptDataModule(folder, **kwargs)


def test_datamodule_batches_pixels_without_cache_and_latents_with_it(image_folder, vae, tmp_path):
    plain = datamodule(image_folder, tmp_path)
    plain.prepare_data()
    plain.setup("fit")
    batch = next(iter(plain.train_dataloader()))
    assert batch.keys() == {"pixel_values", "original_size", "crop_top_left"} and batch["pixel_values"].shape == (2, 3, 64, 64)

    cached = datamodule(image_folder, tmp_path, latent_cache={"enabled": True, "shard_size": 2, "dtype": "float32"})
    with pytest.raises(ValueError, match="attach_vae"):
        cached.setup("fit")
    cached.attach_vae(vae).setup("fit")
    assert cached.latent_cache_dir.parent == tmp_path / "cache" / "latents"
    with EncoderCalls(vae) as calls:
        batches = list(itertools.islice(cached.train_dataloader(), 4))  # the training stream is endless
    assert calls.count == 0
    assert [b.keys() for b in batches] == [{"latents", "original_size", "crop_top_left"}] * 4
    assert [b["latents"].shape[0] for b in batches] == [2] * 4 and batches[0]["latents"].shape[1:] == (4, 8, 8)


def test_training_order_is_reproducible_and_covers_both_flips(image_folder, tmp_path):
    dm = datamodule(image_folder, tmp_path, batch_size=1)
    dm.setup("fit")
    n = len(dm.train_dataset)
    first = [b["pixel_values"][0] for b in itertools.islice(dm.train_dataloader(), 2 * n)]
    again = [b["pixel_values"][0] for b in itertools.islice(dm.train_dataloader(), 2 * n)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # no worker randomness
    plain = [dm.image_dataset.pixels(i) for i in range(n)]
    # one pass over 2n items shows every image once as is and once mirrored
    for image in plain:
        assert sum(torch.equal(x, image) for x in first) == 1
        assert sum(torch.equal(x, image.flip(-1)) for x in first) == 1


def test_lightning_fit_takes_the_vae_from_the_module_and_sees_only_latents(image_folder, vae, tmp_path):
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self._frozen = [vae]  # outside the module tree, as the training module holds it
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.keys = []

        @property
        def vae(self):
            return self._frozen[0]

        def training_step(self, batch, batch_idx):
            self.keys.append(set(batch))
            return (batch["latents"].mean() - self.weight) ** 2

        def configure_optimizers(self):
            return torch.optim.SGD([self.weight], lr=0.1)

    dm = datamodule(image_folder, tmp_path, latent_cache={"enabled": True, "shard_size": 4})
    probe = Probe()
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(probe, datamodule=dm)
    assert probe.keys == [{"latents", "original_size", "crop_top_left"}] * 2
    assert (dm.latent_cache_dir / MANIFEST).is_file()


@pytest.mark.parametrize("name, resolution, cached", [("folder", 512, False), ("ffhq", 512, True), ("afhqv2", 512, True), ("tiny", 64, False)])
def test_data_configs_instantiate_the_datamodule(name, resolution, cached, tmp_path):
    from hydra.utils import instantiate

    from ccp.config import compose

    cfg = compose(None, overrides=[f"+data={name}", f"data.path={tmp_path}"])
    dm = instantiate(cfg.data)
    assert isinstance(dm, ConceptDataModule) and dm.path == tmp_path
    assert dm.resolution == resolution and dm.latent_cache.enabled is cached and dm.center_crop is False


def test_encoding_in_another_dtype_leaves_the_callers_vae_untouched(dataset, vae, tmp_path):
    float32 = LatentCache(build(dataset, vae, tmp_path))
    float64 = LatentCache(build(dataset, vae, tmp_path, dtype=torch.float64))
    assert float64.folder != float32.folder  # the encoding dtype is part of the key
    assert {p.dtype for p in vae.parameters()} == {torch.float32} and not vae.training
    assert torch.allclose(float64.posterior(2)[0], float32.posterior(2)[0], atol=1e-4)
