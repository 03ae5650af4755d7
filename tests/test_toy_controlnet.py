"""The toy ControlNet (`ccp.toy.controlnet`): trained by ccp's loop on the prior's train split, reused
only for the same settings and prior, its held-out edge-F1 check, and where make demo and the toy
reproduction build it. A CI-sized toy prior and ControlNet (2 steps each)."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import ControlNetModel

import ccp.toy.controlnet as toy_controlnet
from ccp.evaluation.canny import canny_edges, edge_f1, to_edge_mask
from ccp.io import COMPLETE_RECORD, file_sizes, write_json_atomic
from ccp.toy import prior as toy_prior
from ccp.toy.digits import render_set, split_indices

TINY_PRIOR = dict(copies=1, vae_steps=2, vae_batch_size=8, steps=2, batch_size=8, warmup_steps=0)
TINY = dict(steps=2, batch_size=8, check_maps=3, check_samples=2, check_steps=2)


class Trained(Exception):
    """Raised by a stand-in run_training: training was asked for."""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny toy prior and its ControlNet, every run_training config recorded."""
    root = tmp_path_factory.mktemp("toy-controlnet")
    prior_dir = toy_prior.ensure_toy_prior(root / "prior", progress=False, **TINY_PRIOR)
    configs = []

    def recording(cfg, run_dir):
        configs.append(cfg)
        return run_training(cfg, run_dir)

    run_training = toy_controlnet.run_training
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(toy_controlnet, "run_training", recording)
        out = toy_controlnet.ensure_toy_controlnet(prior_dir, progress=False, **TINY)
    return {"root": root, "prior": prior_dir, "out": out, "configs": configs, "info": toy_controlnet.read_info(out)}


def _no_training(*args, **kwargs):
    raise Trained


def _republish(folder, edit):
    """Rewrite the toy prior's marker with `edit`, published again as a retrained prior would be."""
    marker = folder / toy_prior.DONE
    marker.write_text(json.dumps(edit(json.loads(marker.read_text())), indent=2) + "\n")
    write_json_atomic(folder / COMPLETE_RECORD, {"files": file_sizes(folder)})


# --- (a) trained through run_training, reused, retrained for another prior --------------------------
def test_trains_through_ccp_train_and_exports_a_diffusers_controlnet(built):
    out, prior = built["out"], built["prior"]
    assert out == prior.with_name("prior-controlnet") and out.parent == prior.parent  # beside, not inside
    assert not list(prior.glob("*controlnet*"))
    [cfg] = built["configs"]
    assert cfg.method.name == "controlnet" and cfg.run_name == "toy_controlnet"
    assert cfg.data.condition == "canny" and cfg.data.captions == "captions.jsonl"
    assert cfg.trainer.max_steps == 2 and cfg.trainer.accelerator == "cpu" and cfg.prior.path == str(prior)
    work = out.with_name(out.name + ".work") / built["info"]["key"]
    state = torch.load(work / "train" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 2
    controlnet = ControlNetModel.from_pretrained(out)
    for key, value in controlnet.state_dict().items():
        assert torch.equal(value, state["state_dict"][f"method.controlnet.{key}"]), key
    # the condition embedding brings a 32 px edge map down to the toy VAE's 8x8 latents (the stock 8x would give 4x4)
    embedded = controlnet.controlnet_cond_embedding(torch.zeros(1, 3, 32, 32))
    assert embedded.shape[-2:] == (8, 8)
    info = built["info"]
    prior_marker = (prior / toy_prior.DONE).read_bytes()
    assert info["prior"]["key"] == json.loads(prior_marker)["key"]
    assert info["prior"]["marker_sha256"] == hashlib.sha256(prior_marker).hexdigest()
    assert info["settings"]["steps"] == 2 and set(info["seconds"]) == {"data_s", "train_s", "check_s"}


def test_a_finished_controlnet_is_reused_and_another_prior_or_setting_retrains(built, tmp_path, monkeypatch):
    monkeypatch.setattr(toy_controlnet, "run_training", _no_training)
    assert toy_controlnet.ensure_toy_controlnet(built["prior"], progress=False, **TINY) == built["out"]
    # the same prior copied elsewhere is the same prior: reused
    copy = tmp_path / "prior"
    shutil.copytree(built["prior"], copy)
    assert toy_controlnet.ensure_toy_controlnet(copy, built["out"], progress=False, **TINY) == built["out"]
    with pytest.raises(Trained):  # other settings
        toy_controlnet.ensure_toy_controlnet(copy, built["out"], progress=False, **{**TINY, "steps": 3})
    with pytest.raises(Trained):  # another training recipe
        toy_controlnet.ensure_toy_controlnet(copy, built["out"], progress=False, train_overrides=["optim.weight_decay=0.0"],
                                             **TINY)
    _republish(copy, lambda info: {**info, "seconds": {**info["seconds"], "unet_s": 1.0}})
    with pytest.raises(Trained):  # retrained at the same path with the same key: another prior all the same
        toy_controlnet.ensure_toy_controlnet(copy, built["out"], progress=False, **TINY)
    _republish(copy, lambda info: {**info, "key": "0123456789ab"})
    with pytest.raises(Trained):
        toy_controlnet.ensure_toy_controlnet(copy, built["out"], progress=False, **TINY)
    assert toy_controlnet.read_info(built["out"]) == built["info"]  # the finished one untouched meanwhile


def test_refuses_a_folder_inside_the_prior_a_non_toy_prior_and_unknown_settings(built, tiny_prior_dir, tmp_path):
    with pytest.raises(ValueError, match="inside the prior folder"):
        toy_controlnet.ensure_toy_controlnet(built["prior"], built["prior"] / "controlnet", **TINY)
    with pytest.raises(FileNotFoundError, match="not a finished toy prior"):
        toy_controlnet.ensure_toy_controlnet(tiny_prior_dir, tmp_path / "cn", **TINY)
    with pytest.raises(ValueError, match="unknown toy ControlNet setting"):
        toy_controlnet.ensure_toy_controlnet(built["prior"], tmp_path / "cn", stepz=3)


# --- (b) the quality check ------------------------------------------------------------------------
def test_check_scores_are_edge_f1_of_the_saved_samples_against_held_out_edges(built):
    info, check = built["info"], built["out"] / toy_controlnet.CHECK_DIR
    quality = info["quality"]
    assert quality["tolerance"] == 2 and quality["steps"] == 2 and quality["cfg_weight"] == 5.0
    held_out = render_set("held_out", "plain", 0, 32)
    row = {int(s): i for i, s in enumerate(held_out.sources)}
    assert len(quality["sources"]) == 3 and set(quality["sources"]) <= set(split_indices("held_out", 0).tolist())
    for name in ("prior", "controlnet"):
        scores = []
        for m, source in enumerate(quality["sources"]):
            condition = to_edge_mask(np.asarray(PIL.Image.open(check / "conditions" / f"{m:02d}.png")))
            # the saved condition is the Canny map of that held-out digit, and its caption is that digit's
            assert np.array_equal(condition, canny_edges(held_out.images[row[source]]) != 0)
            assert quality["captions"][m] == held_out.captions()[row[source]]
            for k in range(2):
                sample = PIL.Image.open(check / name / f"{m:02d}_{k}.png")
                scores.append(edge_f1(condition, canny_edges(sample), tolerance=2).f1)
        assert quality[name]["images"] == 6
        assert quality[name]["f1"] == pytest.approx(float(np.mean(scores)), abs=1e-12)


def test_edge_scores_one_for_the_digits_themselves_zero_for_blank_images():
    conditions = toy_controlnet.check_conditions(data_seed=0, resolution=32, count=4)
    edges = [c["edges"] for c in conditions]
    assert all(e.any() for e in edges)
    assert toy_controlnet.edge_scores(edges, [[PIL.Image.fromarray(c["image"])] * 2 for c in conditions])["f1"] == 1.0
    blank = PIL.Image.new("RGB", (32, 32))
    assert toy_controlnet.edge_scores(edges, [[blank]] * 4) == {"f1": 0.0, "precision": 0.0, "recall": 0.0, "images": 4}
    # a digit scored against another digit's edges: neither 0 nor 1
    shifted = [[PIL.Image.fromarray(c["image"])] for c in conditions[1:] + conditions[:1]]
    assert 0.0 < toy_controlnet.edge_scores(edges, shifted)["f1"] < 1.0


# --- (c) the training data: the prior's train split only ------------------------------------------
def _folder_images(folder):
    rows = [json.loads(line) for line in (folder / "captions.jsonl").read_text().splitlines()]
    return np.stack([np.asarray(PIL.Image.open(folder / r["file"]).convert("RGB")) for r in rows]), rows


@pytest.mark.parametrize("data_seed", [0, 1])
def test_training_data_is_the_priors_train_split_never_the_held_out_one(built, tmp_path, monkeypatch, data_seed):
    prior = built["prior"]
    if data_seed != 0:  # a prior trained on another data seed: its split, not seed 0's
        prior = tmp_path / "prior"
        shutil.copytree(built["prior"], prior)
        _republish(prior, lambda info: {**info, "settings": {**info["settings"], "data_seed": data_seed}})
    seen = []
    monkeypatch.setattr(toy_controlnet, "run_training", lambda cfg, run_dir: (seen.append(cfg), _no_training())[1])
    with pytest.raises(Trained):
        toy_controlnet.ensure_toy_controlnet(prior, tmp_path / "cn", progress=False, **{**TINY, "copies": 2})
    [cfg] = seen
    images, rows = _folder_images(Path(cfg.data.path))
    train = render_set("train", "plain", data_seed, 32, copies=2)
    assert np.array_equal(images, train.images) and [r["caption"] for r in rows] == train.captions()
    held_out = set(split_indices("held_out", data_seed).tolist())
    assert held_out and not held_out & set(train.sources.tolist())
    # the check's maps come from that seed's held-out split
    picked = toy_controlnet.check_conditions(data_seed, 32, 8)
    assert {c["source"] for c in picked} <= held_out


# --- where it is built: make demo, the toy reproduction ---------------------------------------------
def test_demo_builds_the_controlnet_right_after_the_prior(tmp_path, monkeypatch):
    from ccp.toy import demo

    calls = []
    monkeypatch.setattr(demo, "ensure_toy_prior", lambda path, **kw: calls.append(("prior", path, kw)) or path)
    monkeypatch.setattr(demo, "ensure_toy_controlnet", lambda path, **kw: calls.append(("controlnet", path, kw)) or tmp_path / "cn")
    monkeypatch.setattr(demo, "read_info", lambda path: {"quality": {"prior": {"f1": 0.1}, "controlnet": {"f1": 0.9}}})
    monkeypatch.setattr(demo, "ensure_concept_data", lambda *a, **kw: calls.append(("data",)) or tmp_path / "data")
    monkeypatch.setattr(demo, "train_concept", lambda *a, **kw: calls.append(("concept",)) or tmp_path / "export")
    monkeypatch.setattr(demo, "demo_grid", lambda *a, **kw: type("Grid", (), {"path": tmp_path / "grid.png"}))
    demo.run_demo(tmp_path / "demo", tmp_path / "toy" / "prior", prior_settings={"steps": 2},
                  controlnet_settings={"steps": 3})
    assert [c[0] for c in calls] == ["prior", "controlnet", "data", "concept"]
    assert calls[0][2] == {"steps": 2} and calls[1][1:] == (tmp_path / "toy" / "prior", {"steps": 3})


@pytest.mark.parametrize("train_toy", [True, False])
def test_toy_reproduction_builds_it_where_the_prior_is_built(tmp_path, monkeypatch, train_toy):
    from ccp.reproduce import compose_reproduce
    from ccp.reproduce.inputs import prepare_inputs

    calls = []
    monkeypatch.setitem(sys.modules, "ccp.toy.prior", types.SimpleNamespace(
        ensure_toy_prior=lambda path, seed=0, progress=True, **kw: path))
    monkeypatch.setattr(toy_controlnet, "ensure_toy_controlnet", lambda prior, path=None, seed=0, progress=True, **kw:
                        calls.append((prior, path, seed, kw)) or tmp_path / "toy" / "prior-controlnet")
    monkeypatch.setattr(toy_controlnet, "prior_identity", lambda prior: {"settings": {"data_seed": 0, "resolution": 32}})
    cfg = compose_reproduce(["scale=toy", f"out_dir={tmp_path}/out", f"prior.path={tmp_path}/toy/prior", "datasets=[]",
                             "seed=3", f"toy_controlnet.train_toy={str(train_toy).lower()}",
                             "++toy_controlnet.settings={steps: 7}"])
    assert cfg.controlnet is None
    prepare_inputs(cfg)
    if train_toy:
        assert calls == [(f"{tmp_path}/toy/prior", None, 3, {"steps": 7})]
        assert cfg.controlnet == str(tmp_path / "toy" / "prior-controlnet")
        # the spatial column's conditions: held-out plain digits of the prior's data seed, never trained on
        conditions = tmp_path / "out" / "data" / "conditions"
        captions = [json.loads(line) for line in (conditions / "captions.jsonl").read_text().splitlines()]
        assert len(captions) == len(list(conditions.glob("*.png"))) == cfg.spatial_alignment.num_conditions == 32
        assert {c["source"] for c in captions} <= set(split_indices("held_out", 0).tolist())
        first = render_set("held_out", "plain", 0, 32).images[0]
        assert np.array_equal(np.asarray(PIL.Image.open(conditions / "000.png")), first)
    else:
        assert calls == [] and cfg.controlnet is None
