"""ControlNet training through ccp-train (`method=controlnet data.condition=canny`): only the
ControlNet trains and is checkpointed, the export is a diffusers ControlNet folder, sampling it
through GCFG equals diffusers' StableDiffusionControlNetPipeline, and every item's condition is
the Canny edge map of the image it is trained on."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import ControlNetModel, DPMSolverMultistepScheduler, StableDiffusionControlNetPipeline

import ccp.training.run as train_run
from ccp.config import ConfigError, compose
from ccp.evaluation.canny import canny_edges, edge_map_image
from ccp.methods import TRAINABLE, build_method
from ccp.methods.controlnet import ControlNetConfigError, ControlNetTraining
from ccp.methods.export import load_trained
from ccp.training.data import ConceptDataModule

SIZE = 32  # training and sampling resolution: 4x4 latents on the tiny prior
CAPTIONS = ["a red square", "a blue bar", "a green corner", "a yellow block"]


def _images(folder):
    """Four 48x48 images of coloured rectangles on grey, placed off-centre so their edges are not
    mirror-symmetric (a flip then changes the edge map)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, caption in enumerate(CAPTIONS):
        image = np.full((48, 48, 3), 90, np.uint8)
        for _ in range(3):
            y, x = rng.integers(2, 30, size=2)
            h, w = rng.integers(6, 16, size=2)
            image[y:y + h, x:x + w] = rng.integers(0, 256, size=3)
        PIL.Image.fromarray(image).save(folder / f"{i}.png")
        rows.append(json.dumps({"file": f"{i}.png", "caption": caption}))
    (folder / "captions.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def _overrides(prior_dir, images, root, *extra):
    return ["experiment=tiny", "method=controlnet", f"prior.path={prior_dir}", f"data.path={images}",
            "data.condition=canny", "data.captions=captions.jsonl", f"data.resolution={SIZE}",
            f"data.cache_dir={root / 'cache'}", "trainer.global_batch_size=2", *extra]


@pytest.fixture(scope="module")
def trained(tiny_prior_dir, tmp_path_factory):
    """A 3-step ccp-train run; the prior and the method it built are kept for inspection."""
    root = tmp_path_factory.mktemp("controlnet")
    images = _images(root / "images")
    seen = {}
    load_prior, build_method_on = train_run.load_prior, train_run.build_method_on

    def keep_prior(*args, **kwargs):
        seen["prior"] = load_prior(*args, **kwargs)
        seen["unet_before"] = {k: v.clone() for k, v in seen["prior"].unet.state_dict().items()}
        return seen["prior"]

    def keep_method(*args, **kwargs):
        seen["method"] = build_method_on(*args, **kwargs)
        return seen["method"]

    # lr 3e-2: the condition reaches the output through two zero-initialised convolutions in a row (the
    # conditioning embedding's last one and each residual's), so its effect grows as lr^2; at this lr 3 AdamW
    # steps make it far larger than float noise, so the ControlNet visibly steers the samples compared
    # below. The validation grid (step 3) samples with the method's default guidance (no control image).
    cfg = compose("train", overrides=_overrides(tiny_prior_dir, images, root, "trainer.max_steps=3", "optim.lr=3e-2",
                                                "validation.every_n_steps=3"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_run, "load_prior", keep_prior)
        mp.setattr(train_run, "build_method_on", keep_method)
        export = train_run.run_training(cfg, root / "run")
    return {"root": root, "images": images, "export": export, "run": root / "run", **seen}


# --- (a) what trains, what is checkpointed ----------------------------------------------------------
def test_only_the_controlnet_trains_and_is_checkpointed(trained, tiny_prior):
    assert TRAINABLE["controlnet"] is ControlNetTraining
    state = torch.load(trained["run"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 3
    keys = set(state["state_dict"])
    fresh = ControlNetModel.from_unet(tiny_prior.unet)  # what diffusers' train_controlnet.py starts from
    assert keys == {f"method.controlnet.{k}" for k in fresh.state_dict()}  # no UNet / text-encoder tensors
    # the prior's UNet (and the frozen copy the method ran) are untouched
    prior_unet = trained["prior"].unet.state_dict()
    assert all(torch.equal(prior_unet[k], v) for k, v in trained["unet_before"].items())
    assert all(torch.equal(v, tiny_prior.unet.state_dict()[k]) for k, v in prior_unet.items())
    frozen = trained["method"].unet.state_dict()
    assert all(torch.equal(frozen[k], v) for k, v in trained["unet_before"].items())
    # the ControlNet did train: its zero convolutions are no longer zero
    ckpt = {k.removeprefix("method.controlnet."): v for k, v in state["state_dict"].items()}
    changed = [k for k, v in fresh.state_dict().items() if not torch.equal(v, ckpt[k])]
    assert any(k.startswith("controlnet_down_blocks.") for k in changed)
    assert ckpt["controlnet_mid_block.weight"].abs().max() > 1e-4
    assert list((trained["run"] / "validation").glob("step_*.png"))  # the grid sampled with the default guidance


# --- (b) the export -----------------------------------------------------------------------------------
def test_export_is_a_diffusers_controlnet_of_the_trained_weights(trained):
    reloaded = ControlNetModel.from_pretrained(trained["export"]).state_dict()
    ckpt = torch.load(trained["run"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    trained_now = trained["method"].controlnet.state_dict()
    assert set(reloaded) == set(trained_now)
    for key, value in reloaded.items():
        assert torch.equal(value, trained_now[key].cpu()), key
        assert torch.equal(value, ckpt[f"method.controlnet.{key}"]), key


# --- (c) sampling the export equals diffusers' ControlNet pipeline -----------------------------------
def test_gcfg_sample_of_the_export_equals_diffusers_controlnet_pipeline(trained, tiny_prior):
    model = load_trained(trained["export"], prior=tiny_prior)  # as ccp-eval and ccp-reproduce load exports
    assert model.method is ControlNetTraining and model.denoiser == "controlnet"
    model.pipe.set_progress_bar_config(disable=True)
    first = PIL.Image.open(trained["images"] / "0.png").convert("RGB").resize((SIZE, SIZE))
    edges = edge_map_image(canny_edges(first))
    parts = {k: v for k, v in tiny_prior.components.items() if k != "image_encoder"}
    reference = StableDiffusionControlNetPipeline(**{
        **parts, "controlnet": ControlNetModel.from_pretrained(trained["export"]),
        "scheduler": DPMSolverMultistepScheduler.from_config(tiny_prior.scheduler.config)})
    reference.set_progress_bar_config(disable=True)
    w, prompt = 4.5, "a red square"
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=4, output_type="latent")

    def ours(image):
        spec = ControlNetTraining.default_guidance(model.denoiser, model.template, prompt, control_weight=w,
                                                   control_image=image)
        return model.pipe(spec, num_images=2, generator=torch.Generator().manual_seed(3), **kw).images

    got = ours(edges)
    want = reference(prompt, image=edges, guidance_scale=w, num_images_per_prompt=2,
                     generator=torch.Generator().manual_seed(3), **kw).images
    # Same modules, same batched calls (unconditional and prompt halves through the ControlNet in one
    # call, as diffusers makes them), same scheduler and noise: bit-identical here; 1e-6 leaves room for
    # another BLAS kernel's summation order (~1e-7 in fp32), 4 orders below what a control image changes.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # the comparison can fail: another control image moves the result far beyond that tolerance
    blank = PIL.Image.new("RGB", (SIZE, SIZE))
    assert (ours(blank) - want).abs().max() > 1e-4


def test_ccp_sample_with_the_export_as_docs_write_it_equals_diffusers(trained, tiny_prior, tiny_prior_dir, tmp_path):
    """docs/training.md's second ccp-sample command: CFG through the ControlNet as Eq. 3 terms
    (prompt at w, empty prompt at 1 - w), the export given as controlnet.path. The command runs as
    written; its guidance and pipeline, as ccp-sample builds them, give diffusers' latents."""
    from ccp.pipelines.run import build_guidance, load_pipeline, report_unused, run_sampling
    from ccp.pipelines.sampling import noise_generators

    edges = tmp_path / "edges.png"
    edge_map_image(canny_edges(PIL.Image.open(trained["images"] / "1.png").convert("RGB").resize((SIZE, SIZE)))).save(edges)
    w, prompt = 5.0, "a blue bar"
    cfg = compose("sample", overrides=[
        f"prior.path={tiny_prior_dir}", f"controlnet.path={trained['export']}", "guidance=controlnet",
        "~guidance.terms.concept", f"+control_images.edges={edges}", "guidance.terms.controlnet.control_image=edges",
        f"guidance.terms.controlnet.prompt={prompt}", f"guidance.terms.controlnet.weight={w}",
        f"+guidance.terms.empty={{denoiser: controlnet, prompt: '', control_image: edges, weight: {1 - w}}}",
        f"sampling.height={SIZE}", f"sampling.width={SIZE}", "sampling.steps=4", "sampling.num_images=2",
        "sampling.batch_size=2", "sampling.seed=7", "device=cpu", "prior.dtype=float32"])
    out = run_sampling(cfg, tmp_path / "sample")
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.png", "00001.png"]

    spec = build_guidance(cfg)
    assert not spec.needs_unconditional  # weights w and 1 - w: the prior's unconditional is never run
    pipe = load_pipeline(cfg, "dpmsolver++", torch.float32, torch.device("cpu"), report_unused(spec, cfg))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=4, output_type="latent")
    got = pipe(spec, num_images=2, generator=noise_generators(7, range(2)), **kw).images
    parts = {k: v for k, v in tiny_prior.components.items() if k != "image_encoder"}
    reference = StableDiffusionControlNetPipeline(**{
        **parts, "controlnet": ControlNetModel.from_pretrained(trained["export"]),
        "scheduler": DPMSolverMultistepScheduler.from_config(tiny_prior.scheduler.config)})
    reference.set_progress_bar_config(disable=True)

    def theirs(image):
        return reference(prompt, image=image, guidance_scale=w, num_images_per_prompt=2,
                         generator=noise_generators(7, range(2)), **kw).images

    want = theirs(PIL.Image.open(edges).convert("RGB"))
    # w * eps_prompt + (1 - w) * eps_empty is diffusers' eps_empty + w * (eps_prompt - eps_empty) summed
    # in another order: fp32 rounding (3e-6 seen, on latents up to ~13 after 4 steps), far below the 5e-2
    # that another control image moves them
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (theirs(PIL.Image.new("RGB", (SIZE, SIZE))) - want).abs().max() > 1e-3  # the edges count


# --- (d) the data: conditions, and a wrong data.condition ---------------------------------------------
def _uint8(pixels: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] back to the 8-bit [H, W, 3] image it was made from."""
    return ((pixels + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def test_every_item_carries_the_canny_edges_of_its_image_as_trained(trained, tiny_prior, tmp_path):
    kwargs = dict(path=trained["images"], resolution=SIZE, num_workers=0, persistent_workers=False, scan_cache=False,
                  captions="captions.jsonl", condition="canny", cache_dir=tmp_path)
    plain = ConceptDataModule(**kwargs)
    plain.setup("fit")
    cached = ConceptDataModule(**kwargs, latent_cache={"enabled": True, "dir": str(tmp_path / "latents")})
    cached.attach_vae(tiny_prior.vae).setup("fit")
    n = len(plain.train_dataset)
    assert n == len(CAPTIONS)
    flip_mattered = False
    for i in range(n):
        for flipped in (False, True):
            item = plain.train_dataset.item(i, flipped)
            condition = item["condition"]
            assert condition.shape == (3, SIZE, SIZE) and condition.dtype == torch.float32
            assert torch.equal(condition[0], condition[1]) and torch.equal(condition[0], condition[2])
            # the edges of the very pixels this item trains on (flipped ones when it is flipped)
            expected = canny_edges(_uint8(item["pixel_values"]))
            assert expected.any()
            np.testing.assert_array_equal((condition[0] * 255).round().to(torch.uint8).numpy(), expected)
            if flipped:
                unflipped = canny_edges(_uint8(item["pixel_values"].flip(-1)))
                flip_mattered |= not np.array_equal(unflipped, expected)
            assert item["caption"] == CAPTIONS[i]
            # with the latent cache the item holds latents, and still the same condition
            latent_item = cached.train_dataset.item(i, flipped)
            assert "pixel_values" not in latent_item and "latents" in latent_item
            assert torch.equal(latent_item["condition"], condition)
    assert flip_mattered
    # what the loader gives: a mirrored half of the epoch, conditions batched as [B, 3, H, W]
    batch = next(iter(plain.train_dataloader()))
    assert batch["condition"].shape == (plain.batch_size, 3, SIZE, SIZE)


@pytest.mark.parametrize("value", ["sobel", "Canny"])
def test_wrong_condition_is_refused_before_any_model_loads(trained, tiny_prior_dir, tmp_path, value):
    def no_loading(*args, **kwargs):
        raise AssertionError("the prior was loaded before data.condition was checked")

    cfg = compose("train", overrides=_overrides(tiny_prior_dir, trained["images"], tmp_path, f"data.condition={value}"))
    with pytest.MonkeyPatch.context() as mp, \
            pytest.raises(ConfigError, match=rf"data\.condition='{value}' is not one of: null, canny"):
        mp.setattr(train_run, "load_prior", no_loading)
        train_run.run_training(cfg, tmp_path / "run")


def test_settings_and_priors_it_refuses(tiny_prior):
    with pytest.raises(ControlNetConfigError, match=r"method\.module\.caption_dropout=1\.0"):
        build_method("controlnet", tiny_prior, caption_dropout=1.0)
    with pytest.raises(ControlNetConfigError, match="SD v1.x/2.x priors only"):
        ControlNetTraining.check_prior("sdxl")
    ControlNetTraining.check_prior("sd2")


@pytest.mark.parametrize("unset, named", [("data.condition=null", "data.condition=canny"),
                                          ("data.captions=null", "data.captions=captions.jsonl")])
def test_a_run_without_conditions_or_captions_is_refused_before_any_model_loads(trained, tiny_prior_dir, tmp_path,
                                                                                unset, named):
    def no_loading(*args, **kwargs):
        raise AssertionError("the prior was loaded before the method's data needs were checked")

    cfg = compose("train", overrides=_overrides(tiny_prior_dir, trained["images"], tmp_path, unset))
    with pytest.MonkeyPatch.context() as mp, pytest.raises(ConfigError, match=rf"method=controlnet .*set {named}"):
        mp.setattr(train_run, "load_prior", no_loading)
        train_run.run_training(cfg, tmp_path / "run")
