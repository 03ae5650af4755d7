"""The toy prior: captioned data, text-to-image training with caption dropout, the VAE, and
`ensure_toy_prior` (a CI-sized run of every stage, then reuse)."""

from __future__ import annotations

import json

import pytest
import torch

from ccp.methods import PromptTemplate, TextToImage, method_class
from ccp.priors.loading import load_prior
from ccp.priors.tiny import build_tiny_prior
from ccp.toy import prior as toy_prior
from ccp.toy.digits import render_set, write_prior_dataset
from ccp.toy.vae import latent_std, to_model_range, train_toy_vae
from ccp.training.data import ConceptDataModule, read_captions, scan_image_folder

TINY_SETTINGS = dict(copies=1, vae_steps=2, vae_batch_size=8, steps=2, batch_size=8, warmup_steps=0)


@pytest.fixture(scope="module")
def prior_data(tmp_path_factory):
    return write_prior_dataset(tmp_path_factory.mktemp("plain") / "data", "held_out", seed=0, resolution=32)


def test_captions_follow_the_scan_order(prior_data):
    scan = scan_image_folder(prior_data, progress=False)
    rows = {json.loads(line)["file"]: json.loads(line)["caption"] for line in (prior_data / "captions.jsonl").read_text().splitlines()}
    captions = read_captions(prior_data, scan, "captions.jsonl")
    assert captions == [rows[rel] for rel, *_ in scan.images]
    assert len(set(captions)) > 10  # digits x colours, not one repeated string


def test_missing_captions_are_named(prior_data, tmp_path):
    scan = scan_image_folder(prior_data, progress=False)
    with pytest.raises(FileNotFoundError, match="data.captions=nope.jsonl"):
        read_captions(prior_data, scan, "nope.jsonl")
    lines = (prior_data / "captions.jsonl").read_text().splitlines()
    (prior_data / "partial.jsonl").write_text("\n".join(lines[:-2]) + "\n")
    with pytest.raises(ValueError, match=f"no caption for 2 of {len(lines)} images"):
        read_captions(prior_data, scan, "partial.jsonl")


@pytest.mark.parametrize("cached", [False, True])
def test_batches_carry_captions(prior_data, tmp_path, cached):
    dm = ConceptDataModule(prior_data, resolution=32, random_flip=False, batch_size=4, num_workers=0,
                           persistent_workers=False, captions="captions.jsonl", cache_dir=tmp_path,
                           latent_cache={"enabled": cached, "dtype": "float32", "batch_size": 16})
    dm.attach_vae(build_tiny_prior().vae)
    dm.setup("fit")
    scan_captions = read_captions(prior_data, dm._scan, "captions.jsonl")
    item = dm.train_dataset[5]
    assert item["caption"] == scan_captions[5]
    assert ("pixel_values" in item) != cached
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch["caption"], list) and len(batch["caption"]) == 4
    assert set(batch["caption"]) <= set(scan_captions)


def test_text_to_image_conditions_like_the_sampling_pipeline():
    from ccp.pipelines.gcfg import GCFGPipeline

    prior = build_tiny_prior()
    method = TextToImage(prior, PromptTemplate(), caption_dropout=0.0)
    captions = ["a red digit 3", "a blue digit 7", "a red digit 3"]
    inputs = method.batch_inputs({"caption": captions}, torch.Generator().manual_seed(0))
    pipe = GCFGPipeline.from_prior(prior)
    expected = torch.cat([pipe.encode_prompt(c) for c in captions])
    torch.testing.assert_close(inputs["encoder_hidden_states"], expected, rtol=0, atol=0)
    noisy, t = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 900])
    with torch.no_grad():
        got = method.predict_noise(noisy, t, **inputs)
        want = prior.unet(noisy, t, encoder_hidden_states=expected).sample
    torch.testing.assert_close(got, want)


def test_caption_dropout_rate_and_reproducibility():
    prior = build_tiny_prior()
    method = TextToImage(prior, PromptTemplate(), caption_dropout=0.3)
    empty = method._embed("", torch.float32)
    captions = ["a green digit 1"] * 1000
    first = method.batch_inputs({"caption": captions}, torch.Generator().manual_seed(7))["encoder_hidden_states"]
    again = method.batch_inputs({"caption": captions}, torch.Generator().manual_seed(7))["encoder_hidden_states"]
    assert torch.equal(first, again)
    dropped = sum(torch.equal(e, empty) for e in first) / len(first)
    assert 0.25 < dropped < 0.35  # 1000 draws at p=0.3: sd 0.0145
    with pytest.raises(ValueError, match="caption_dropout"):
        TextToImage.check_settings(caption_dropout=1.0)
    with pytest.raises(ValueError, match="data.captions"):
        method.batch_inputs({"latents": torch.zeros(1)}, torch.Generator())


def test_text_to_image_export_is_a_prior(tmp_path):
    prior = build_tiny_prior()
    method = method_class("text_to_image")(prior, PromptTemplate())
    with torch.no_grad():
        next(method.unet.parameters()).add_(1.0)
    method.export(tmp_path / "export")
    loaded = load_prior(str(tmp_path / "export"))
    for (name, a), b in zip(method.unet.state_dict().items(), loaded.unet.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(next(loaded.unet.parameters()), next(prior.unet.parameters()))
    assert torch.equal(loaded.text_encoder.get_input_embeddings().weight, prior.text_encoder.get_input_embeddings().weight)


def test_vae_scaling_gives_unit_latents(tmp_path):
    images = render_set("held_out", "plain", 0, 32).tensor()[:64]
    vae = train_toy_vae(images, tmp_path / "vae", steps=3, batch_size=8, progress=False)
    scaled = latent_std(vae, to_model_range(images)) * vae.config.scaling_factor
    assert abs(scaled - 1.0) < 1e-4
    assert (tmp_path / "vae" / "config.json").is_file() and not list(tmp_path.glob(".vae.tmp*"))


def test_ensure_toy_prior_trains_every_stage_then_reuses(tmp_path, monkeypatch):
    out = toy_prior.ensure_toy_prior(tmp_path / "prior", progress=False, **TINY_SETTINGS)
    info = json.loads((out / toy_prior.DONE).read_text())
    assert info["settings"]["steps"] == 2
    pipe = load_prior(str(out))
    assert pipe.vae.config.scaling_factor != 1.0  # the trained toy VAE, not a default
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 64
    trained = torch.load(sorted((tmp_path / "prior.work").glob("*/train/checkpoints/last.ckpt"))[0], weights_only=False)
    assert trained["global_step"] == 2

    def no_training(*args, **kwargs):
        raise AssertionError("a finished toy prior must be reused")

    monkeypatch.setattr(toy_prior, "run_training", no_training)
    monkeypatch.setattr(toy_prior, "train_toy_vae", no_training)
    assert toy_prior.ensure_toy_prior(tmp_path / "prior", progress=False, **TINY_SETTINGS) == out
    # another training recipe (here an override; an edited experiment yaml alike) is another prior,
    # trained in its own work folder; the VAE stage is keyed the same way
    with pytest.raises(AssertionError, match="must be reused"):
        toy_prior.ensure_toy_prior(tmp_path / "prior", progress=False, train_overrides=["optim.weight_decay=0.0"],
                                   **TINY_SETTINGS)
    assert len(list((tmp_path / "prior.work").iterdir())) == 2
    with pytest.raises(ValueError, match="unknown toy prior setting"):
        toy_prior.ensure_toy_prior(tmp_path / "prior", progress=False, stepz=3)


def test_the_vae_trains_on_every_styles_train_split_and_no_held_out_digit(tmp_path, monkeypatch):
    seen = {}

    def capture(images, out_dir, *args, **kwargs):
        seen["images"] = images
        raise RuntimeError("stop after the VAE's data")

    monkeypatch.setattr(toy_prior, "train_toy_vae", capture)
    with pytest.raises(RuntimeError, match="stop after"):
        toy_prior.ensure_toy_prior(tmp_path / "prior", progress=False, **TINY_SETTINGS)
    parts = [render_set("train", style, 0, 32, 1).tensor() for style in ("plain", "bold", "outlined")]
    assert torch.equal(seen["images"], torch.cat(parts))  # each style's train split, in STYLES order
    # the concept folders' held-out digits (FID's real side) are none of the VAE's digits
    trained = {int(i) for style in ("plain", "bold", "outlined") for i in render_set("train", style, 0, 32, 1).sources}
    assert trained.isdisjoint(render_set("held_out", "bold", 0, 32, 1).sources.tolist())
    with pytest.raises(ValueError, match="vae_styles: unknown style"):
        toy_prior.ensure_toy_prior(tmp_path / "prior", progress=False, vae_styles=["plain", "italic"])
    parser = toy_prior.argparse.ArgumentParser()
    assert toy_prior.parse_settings(parser, ["vae_styles=plain,bold", "steps=3"], toy_prior.ToyPriorSettings) == {
        "vae_styles": ("plain", "bold"), "steps": 3}


# the demo's toy ControlNet at test size (tests/test_toy_controlnet.py checks the ControlNet itself)
TINY_CONTROLNET = dict(steps=2, batch_size=8, check_maps=2, check_samples=1, check_steps=2)


def test_demo_runs_every_stage_and_reuses_them(tmp_path, monkeypatch):
    from ccp.toy import demo

    overrides = ["trainer.max_steps=2", "trainer.global_batch_size=4", "data.batch_size=4", "checkpoint.every_n_steps=1"]
    grid = demo.run_demo(tmp_path / "demo", tmp_path / "toy" / "prior", steps=2, train_overrides=overrides,
                         prior_settings=TINY_SETTINGS, controlnet_settings=TINY_CONTROLNET)
    import PIL.Image

    bare = PIL.Image.open(grid.with_name("grid_grid.png"))
    rows, cols = 4, len(demo.DEMO_PROMPTS)
    from ccp.evaluation.figures import GAP

    assert bare.size == (cols * 96 + (cols - 1) * GAP, rows * 96 + (rows - 1) * GAP)
    info = json.loads((tmp_path / "demo" / "ours_bold" / "export" / "ccp_export.json").read_text())
    assert info["method"] == "ours" and info["step"] == 2
    labels = (tmp_path / "toy" / "data" / "bold" / "train" / "labels.jsonl").read_text().splitlines()
    assert len(labels) == 1438 and '"style": "bold"' in labels[0]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished demo stage must be reused")

    monkeypatch.setattr(toy_prior, "run_training", no_training)
    monkeypatch.setattr(demo, "run_training", no_training)
    monkeypatch.setattr(toy_prior, "train_toy_vae", no_training)
    assert demo.run_demo(tmp_path / "demo", tmp_path / "toy" / "prior", steps=2, train_overrides=overrides,
                         prior_settings=TINY_SETTINGS, controlnet_settings=TINY_CONTROLNET) == grid
    # a retrained prior at the same path: the concept model is not reused
    marker = tmp_path / "toy" / "prior" / toy_prior.DONE
    marker.write_text(marker.read_text().replace('"seed": 0', '"seed": 0, "retrained": true'))
    from ccp.io import COMPLETE_RECORD, file_sizes, write_json_atomic

    write_json_atomic(marker.parent / COMPLETE_RECORD, {"files": file_sizes(marker.parent)})  # published again
    with pytest.raises(AssertionError, match="must be reused"):
        demo.run_demo(tmp_path / "demo", tmp_path / "toy" / "prior", steps=2, train_overrides=overrides,
                      prior_settings=TINY_SETTINGS, controlnet_settings=TINY_CONTROLNET)
    old = tmp_path / "demo" / "ours_bold.old"  # set aside, not deleted
    assert json.loads((old / "export" / "ccp_export.json").read_text()) == info
    assert not (tmp_path / "demo" / "ours_bold").exists()
    # other training settings: the finished concept model is not reused (training starts again)
    with pytest.raises(AssertionError, match="must be reused"):
        demo.run_demo(tmp_path / "demo", tmp_path / "toy" / "prior", steps=2, train_overrides=[*overrides, "optim.lr=1e-3"],
                      prior_settings=TINY_SETTINGS, controlnet_settings=TINY_CONTROLNET)


def test_caption_templates_place_each_caption_in_a_drawn_template():
    from ccp.pipelines.gcfg import GCFGPipeline

    prior = build_tiny_prior()
    method = TextToImage(prior, PromptTemplate(), caption_dropout=0.0, caption_templates=["a photo of {caption}", "{caption}, centered"])
    captions = ["a red digit 3"] * 40
    embeds = method.batch_inputs({"caption": captions}, torch.Generator().manual_seed(3))["encoder_hidden_states"]
    pipe = GCFGPipeline.from_prior(prior)
    forms = [pipe.encode_prompt("a photo of a red digit 3")[0], pipe.encode_prompt("a red digit 3, centered")[0]]
    which = [next(i for i, f in enumerate(forms) if torch.equal(e, f)) for e in embeds]  # each is one of the two
    assert set(which) == {0, 1}
    with pytest.raises(ValueError, match="caption_templates"):
        TextToImage.check_settings(caption_templates=["no placeholder"])
