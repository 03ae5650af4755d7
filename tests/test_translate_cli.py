"""ccp-sample's image translation and stylization: the translate and stylize presets end to end on
the tiny prior, and every bad input refused before any denoising."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import UNet2DConditionModel

from ccp.config import ConfigError, compose
from ccp.guidance import GuidanceSpec, GuidanceTerm, Source
from ccp.pipelines import run as sample_cli
from ccp.pipelines.gcfg import GCFGPipeline
from ccp.pipelines.sampling import sample_images
from ccp.priors.single_file import save_unet_single_file
from ccp.priors.tiny import TINY_UNET_CONFIG

SMALL = ["sampling.height=64", "sampling.width=64", "sampling.steps=4"]


def config(prior_dir, *overrides):
    return compose("sample", overrides=[f"prior.path={prior_dir}", *SMALL, *overrides])


def read_images(folder: Path) -> list[np.ndarray]:
    return [np.asarray(PIL.Image.open(p)) for p in sorted((folder / "images").glob("*.png"))]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_prior):
    from ccp.models.null_text_unet import NullTextUNet2DConditionModel

    root = tmp_path_factory.mktemp("translate")
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "photo.png")
    PIL.Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(root / "wide.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG broken")
    NullTextUNet2DConditionModel.from_prior(tiny_prior.unet, tiny_prior.text_encoder, tiny_prior.tokenizer).save_pretrained(
        root / "concept")
    other = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "block_out_channels": (16, 32), "norm_num_groups": 8})
    save_unet_single_file(other, root / "other_arch.safetensors")
    return root


def test_translate_preset_equals_the_pipeline(tiny_prior_dir, tiny_prior, files, tmp_path):
    from ccp.models.null_text_unet import NullTextUNet2DConditionModel

    cfg = config(tiny_prior_dir, "guidance=translate", f"concept.path={files / 'concept'}",
                 f"init.image={files / 'photo.png'}", "init.strength=0.5", "sampling.num_images=2")
    assert cfg.init.strength == 0.5 and cfg.guidance.terms.concept.weight == 2.0
    out = sample_cli.run_sampling(cfg, tmp_path / "out")

    pipe = GCFGPipeline.from_prior(tiny_prior, concept_unet=NullTextUNet2DConditionModel.from_pretrained(files / "concept"))
    pipe.set_progress_bar_config(disable=True)
    spec = GuidanceSpec(terms=(GuidanceTerm("concept", Source("concept"), 2.0),))
    photo = PIL.Image.open(files / "photo.png").convert("RGB")
    direct = sample_images(pipe, spec, range(2), seed=0, num_inference_steps=4, height=64, width=64,
                           image=photo, strength=0.5)
    for a, b in zip(read_images(out), direct, strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_stylize_preset_with_a_lora_and_with_a_single_file_checkpoint(tiny_prior_dir, tiny_prior, files, tmp_path):
    from test_lora_denoiser import write_lora

    lora_file, _ = write_lora(tiny_prior.unet, tmp_path)
    cfg = config(tiny_prior_dir, "guidance=stylize", f"concept.path={files / 'concept'}", f"+loras.style={lora_file}",
                 "guidance.terms.control.prompt=a red digit", "sampling.num_images=1")
    assert compose("sample", overrides=[f"prior.path={tiny_prior_dir}", "guidance=stylize"]).sampling.steps == 25
    spec = sample_cli.build_guidance(cfg)
    assert {t.name: (t.source.denoiser, t.source.condition.prompt, t.weight) for t in spec.terms} == {
        "concept": ("concept", None, 1.5), "style": ("style", "a red digit", 2.0), "control": ("prior", "a red digit", 3.0)}
    out = sample_cli.run_sampling(cfg, tmp_path / "lora")
    assert len(read_images(out)) == 1
    single = save_unet_single_file(tiny_prior.unet, tmp_path / "style.safetensors")
    cfg = config(tiny_prior_dir, "guidance=stylize", f"concept.path={files / 'concept'}",
                 f"+denoiser_checkpoints.style={single}", "sampling.num_images=1")
    assert len(read_images(sample_cli.run_sampling(cfg, tmp_path / "single"))) == 1


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(sample_cli, "load_prior", refuse)
    monkeypatch.setattr(sample_cli, "load_controlnet", refuse)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["init.image=/missing/photo.png"], "init.image: file /missing/photo.png does not exist"),
        (["init.image={files}/corrupt.png"], "cannot read {files}/corrupt.png as an image"),
        (["init.image={files}/wide.png", "init.size=strict"], "an image of 64x48 under init.size=strict"),
        (["init.image={files}/photo.png", "init.size=stretch"], "init.size='stretch': use resize"),
        (["init.image={files}/photo.png", "init.strength=0"], r"strength must be in (0, 1]"),
        (["init.image={files}/photo.png", "init.strength=1.5"], r"strength must be in (0, 1]"),
        (["init.image=[{files}/photo.png,{files}/photo.png,{files}/photo.png]", "sampling.num_images=2"],
         "init.image: 3 images for sampling.num_images=2"),
        (["init.mask={files}/photo.png"], "init.mask is set but init.image is not"),
        (["+denoiser_checkpoints.style={files}/corrupt.png"], "is not a .safetensors file"),
        (["+controlnets.pair=[/n1,/n2]", "sampling.num_images=2",
          "+guidance.terms.edges={denoiser: pair, weight: 2.0, control_image: [[{files}/photo.png,{files}/photo.png,"
          "{files}/photo.png], {files}/photo.png]}"], "a list of 3 images for 2 output images"),
        (["+controlnets.pair=[/n1,/n2]",
          "+guidance.terms.edges={denoiser: pair, weight: 2.0, control_image: [{files}/photo.png]}"],
         "has 2 ControlNets but got 1 control image entries"),
    ],
)
def test_bad_input_fails_before_loading_models(tiny_prior_dir, files, tmp_path, no_model_loading, overrides, fragment):
    overrides = [o.replace("{files}", str(files)) for o in overrides]
    with pytest.raises(ConfigError) as caught:
        sample_cli.run_sampling(config(tiny_prior_dir, *overrides), tmp_path)
    assert fragment.replace("{files}", str(files)) in str(caught.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["single_file", "lora"])
def test_misfit_checkpoint_or_lora_fails_before_any_denoising(tiny_prior_dir, files, tmp_path, monkeypatch, kind):
    from test_lora_denoiser import write_lora

    monkeypatch.setattr(GCFGPipeline, "predict_noise", lambda *a, **k: pytest.fail("denoised despite bad input"))
    if kind == "single_file":
        override = f"+denoiser_checkpoints.style={files / 'other_arch.safetensors'}"
        fragment = "other_arch.safetensors is not a checkpoint of the prior's architecture"
    else:
        other = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "block_out_channels": (16, 32), "norm_num_groups": 8})
        override = f"+loras.style={write_lora(other, tmp_path)[0]}"
        fragment = "loras.style: LoRA denoiser 'style' does not fit the prior UNet"
    cfg = config(tiny_prior_dir, override, "guidance.terms.text.denoiser=style")
    with pytest.raises(sample_cli.SampleConfigError) as caught:
        sample_cli.run_sampling(cfg, tmp_path / "out")
    assert fragment in str(caught.value)
    assert not (tmp_path / "out" / "images").exists()
