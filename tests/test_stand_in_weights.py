"""Stand-in weight files (tests/stand_ins.py): a random FID InceptionV3 and a random CLIP in the
exact format and under the file names users download go through the real loaders, checks and
ccp-eval arguments; what is measured with them is labelled; real-looking files without the
marker are not. The CLIP metric loads without pkg_resources, exactly as clip.load would."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from omegaconf import OmegaConf

from ccp.config import compose
from ccp.evaluation.attributes import QUESTIONS, TABLE3_PROMPTS, CLIPAttributePredictor, CLIPWeightsError, clip_tokenize, load_clip
from ccp.evaluation.fid import (
    INCEPTION_WEIGHTS_FILE,
    InceptionWeightsError,
    extract_features,
    extractor_fingerprint,
    inception_feature_extractor,
    resolve_inception_weights,
)
from ccp.evaluation.run import run_eval
from ccp.evaluation.stand_in import STAND_IN_KEY, STAND_IN_LABEL, stand_in_marker
from stand_ins import WITHOUT_PKG_RESOURCES, write_stand_in_clip, write_stand_in_inception

REPO = Path(__file__).resolve().parents[1]


def _uint8_images(n: int, seed: int, size: int = 64) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _pil_images() -> list[PIL.Image.Image]:
    """Non-square, differently sized, RGBA and grey images: clip.load's resize/crop/convert all matter."""
    rng = np.random.default_rng(0)
    rgb = PIL.Image.fromarray((rng.random((90, 130, 3)) * 255).astype(np.uint8))
    rgba = PIL.Image.fromarray((rng.random((300, 240, 4)) * 255).astype(np.uint8), mode="RGBA")
    grey = PIL.Image.fromarray((rng.random((64, 64)) * 255).astype(np.uint8), mode="L")
    return [rgb, rgba, grey]


def _warned(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and STAND_IN_LABEL in r.getMessage()]


# --- the FID Inception ------------------------------------------------------------------------------
def test_stand_in_inception_loads_through_the_real_loader(stand_in_inception, tmp_path, monkeypatch, caplog):
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    assert stand_in_inception.name == INCEPTION_WEIGHTS_FILE
    assert stand_in_marker(stand_in_inception)["network"] == "inception-v3-compat"
    # a plain state dict, the keys torch-fidelity loads strictly, the marker outside them
    state = torch.load(stand_in_inception, map_location="cpu", weights_only=True)
    assert STAND_IN_KEY not in state and STAND_IN_KEY in state._metadata
    with caplog.at_level(logging.WARNING):
        net = inception_feature_extractor(stand_in_inception)
    assert net.stand_in_weights is True and len(_warned(caplog)) == 1
    images = _uint8_images(3, seed=0)
    features = extract_features(net, images)
    assert features.shape == (3, 2048) and features.dtype == torch.float32 and torch.isfinite(features).all()
    assert features.abs().mean() > 1e-3  # not vanished: FID of them is a number, if a meaningless one
    assert (features[0] - features[1]).abs().max() > 1e-4 * features.abs().max()
    # torch-fidelity's own class loads it (strict load_state_dict) and gives the same features
    reference = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                feature_extractor_weights_path=str(stand_in_inception))
    torch.testing.assert_close(features, reference(images)[0].reshape(3, -1))

    # found in the torch hub cache, as a user puts the real file there
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    hub = tmp_path / "torch-home" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    hub.parent.mkdir(parents=True)
    hub.symlink_to(stand_in_inception)
    assert resolve_inception_weights(None) == hub
    assert inception_feature_extractor().stand_in_weights is True


@pytest.mark.filterwarnings("ignore:'torch.load' received a zip file that looks like a TorchScript archive")
def test_wrong_inception_files_are_refused(stand_in_inception, stand_in_clip, tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    state = torch.load(stand_in_inception, map_location="cpu", weights_only=True)
    del state["Mixed_7c.branch_pool.conv.weight"]
    missing_key = tmp_path / "missing-key.pth"
    torch.save(state, missing_key)
    for wrong, why in ((garbage, "could not be loaded"), (missing_key, "Missing key.*Mixed_7c.branch_pool.conv.weight"),
                       (stand_in_clip, "could not be loaded")):
        with pytest.raises(InceptionWeightsError, match=why):
            inception_feature_extractor(wrong)
    with pytest.raises(InceptionWeightsError, match=r"fid.inception_weights=.*nowhere.pth does not exist"):
        inception_feature_extractor(tmp_path / "nowhere.pth")


def test_unmarked_inception_is_not_labelled(stand_in_inception, tmp_path, caplog):
    plain = write_stand_in_inception(tmp_path, marker=False)
    assert plain.name == INCEPTION_WEIGHTS_FILE and stand_in_marker(plain) is None
    with caplog.at_level(logging.WARNING):
        net = inception_feature_extractor(plain)
    assert not hasattr(net, "stand_in_weights") and _warned(caplog) == []
    # the marker changes nothing else: the same network, the same features
    marked = inception_feature_extractor(stand_in_inception)
    assert extractor_fingerprint(net) == extractor_fingerprint(marked)
    images = _uint8_images(2, seed=1)
    torch.testing.assert_close(extract_features(net, images), extract_features(marked, images), rtol=0, atol=0)


def test_marker_is_only_read_from_marked_files(stand_in_clip, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 100)
    state = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(2)}, state)
    for path in (garbage, state, tmp_path / "nowhere.pt", write_stand_in_clip(tmp_path / "plain.pt", marker=False),
                 write_stand_in_clip(tmp_path / "plain-sd.pt", marker=False, torchscript=False)):
        assert stand_in_marker(path) is None, path
    assert stand_in_marker(stand_in_clip)["network"] == "CLIP small"
    assert stand_in_marker(write_stand_in_clip(tmp_path / "sd.pt", torchscript=False))["network"] == "CLIP small"


# --- CLIP -------------------------------------------------------------------------------------------
def _clip_features(model, preprocess, tokenize, images, texts):
    with torch.no_grad():
        pixels = torch.stack([preprocess(im) for im in images])
        return pixels, model.encode_image(pixels).float(), model.encode_text(tokenize(texts)).float()


ALL_PROMPTS = sorted({p for q in QUESTIONS.values() for prompts in q.classes.values() for p in prompts})


@pytest.mark.parametrize("torchscript", [True, False], ids=["torchscript", "state-dict"])
def test_clip_loader_is_exactly_clip_load(stand_in_clip, tmp_path, torchscript):
    import clip  # this process has pkg_resources: the reference

    path = stand_in_clip if torchscript else write_stand_in_clip(tmp_path, torchscript=False)
    assert path.name == "ViT-L-14.pt"
    ref_model, ref_preprocess = clip.load(str(path), device="cpu", jit=False)
    model, preprocess = load_clip(path, "cpu")
    assert type(model).__name__ == "CLIP" and model.visual.input_resolution == 224
    ref_state, state = ref_model.state_dict(), model.state_dict()
    assert list(state) == list(ref_state)
    assert all(state[k].dtype == ref_state[k].dtype and torch.equal(state[k], ref_state[k]) for k in state)
    assert torch.equal(clip_tokenize(ALL_PROMPTS), clip.tokenize(ALL_PROMPTS))
    images = _pil_images()
    ref = _clip_features(ref_model, ref_preprocess, clip.tokenize, images, ALL_PROMPTS)
    ours = _clip_features(model, preprocess, clip_tokenize, images, ALL_PROMPTS)
    assert ours[0].shape == (3, 3, 224, 224) and torch.equal(ours[0], ref[0])  # the preprocessing, bit for bit
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[2], ref[2], rtol=1e-5, atol=1e-6)


def test_wrong_clip_files_are_refused(stand_in_inception, tmp_path):
    garbage = tmp_path / "ViT-L-14.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    for wrong in (garbage, stand_in_inception):
        with pytest.raises(CLIPWeightsError, match="could not be loaded as CLIP weights"):
            CLIPAttributePredictor(wrong, device="cpu")
    with pytest.raises(FileNotFoundError, match="CLIP weights not found"):
        CLIPAttributePredictor(tmp_path / "nowhere" / "ViT-L-14.pt", device="cpu")


# Runs in a fresh interpreter: `import pkg_resources` raises ImportError there, as with setuptools >= 81.
CHILD = WITHOUT_PKG_RESOURCES + """
import PIL.Image
from ccp.evaluation.attributes import CLIPAttributePredictor
predictor = CLIPAttributePredictor(sys.argv[1], device="cpu")
images = [PIL.Image.open(path) for path in json.loads(sys.argv[2])]
texts = json.loads(sys.argv[3])
print(json.dumps({
    "image": predictor.encode_images(images).tolist(), "text": predictor.encode_texts(texts).tolist(),
    "stand_in": predictor.stand_in_weights, "hat": predictor.classify(images, "wearing hat"),
    "clip_modules": sorted(m for m in sys.modules if m == "clip" or m.startswith("clip.")),
}))
"""


def test_clip_predictor_builds_without_pkg_resources(stand_in_clip, tmp_path):
    import clip

    images = _pil_images()
    files = [tmp_path / f"{i}.png" for i in range(len(images))]
    for image, file in zip(images, files):
        image.save(file)  # lossless, modes kept
    prompts = ["a photo of a person wearing a hat", "a photo of a smiling person"]
    child = subprocess.run([sys.executable, "-c", CHILD, str(stand_in_clip), json.dumps([str(f) for f in files]),
                            json.dumps(prompts)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    got = json.loads(child.stdout.strip().splitlines()[-1])
    assert got["clip_modules"] == [] and got["stand_in"] is True
    model, preprocess = clip.load(str(stand_in_clip), device="cpu", jit=False)
    _, image, text = _clip_features(model, preprocess, clip.tokenize, images, prompts)
    torch.testing.assert_close(torch.tensor(got["image"]), image, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(got["text"]), text, rtol=1e-5, atol=1e-6)
    assert set(got["hat"]) <= {"hat", "no hat"} and len(got["hat"]) == 3


# --- ccp-eval with the real arguments: labelled results ------------------------------------------------
def _eval_cfg(prior_dir, *overrides):
    return compose("eval", overrides=["model=prior", f"prior.path={prior_dir}", "export.path=null", "sampling.steps=2",
                                      "sampling.height=64", "sampling.width=64", "sampling.batch_size=2", "device=cpu",
                                      *overrides])


def test_text_alignment_with_stand_in_clip_is_labelled(tiny_prior_dir, stand_in_clip, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        result = run_eval(_eval_cfg(tiny_prior_dir, "metric=text", f"text.clip_weights={stand_in_clip}",
                                    "text.images_per_prompt=1"), tmp_path / "stand-in")
    on_disk = json.loads((tmp_path / "stand-in" / "result.json").read_text())
    assert on_disk["details"]["stand_in_weights"] is True and result["details"]["stand_in_weights"] is True
    assert set(on_disk["details"]["per_prompt"]) == set(TABLE3_PROMPTS)  # every Table 3 question answered
    assert all(entry["total"] == 1 for entry in on_disk["details"]["per_prompt"].values())
    assert 0.0 <= on_disk["value"] <= 1.0 and on_disk["details"]["predictor"] == "CLIPAttributePredictor"
    assert len(_warned(caplog)) >= 1

    plain = write_stand_in_clip(tmp_path / "real-looking", marker=False)
    result = run_eval(_eval_cfg(tiny_prior_dir, "metric=text", f"text.clip_weights={plain}", "text.prompts=[smiling]",
                                "text.images_per_prompt=1"), tmp_path / "plain")
    assert "stand_in_weights" not in json.loads((tmp_path / "plain" / "result.json").read_text())["details"]
    assert "stand_in_weights" not in result["details"]


def test_fid_with_stand_in_inception_is_labelled(tiny_prior_dir, stand_in_inception, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        PIL.Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(real / f"{i}.png")

    def fid(weights, out):
        return run_eval(_eval_cfg(tiny_prior_dir, "metric=fid", "fid.feature_extractor=inception",
                                  f"fid.inception_weights={weights}", f"fid.real_path={real}", "fid.resolution=64",
                                  "fid.num_samples=2", "fid.shard_size=2", "fid.num_workers=0",
                                  f"fid.stats_cache_dir={tmp_path / 'stats'}"), tmp_path / out)

    result = fid(stand_in_inception, "stand-in")
    on_disk = json.loads((tmp_path / "stand-in" / "result.json").read_text())
    assert on_disk["details"]["stand_in_weights"] is True and np.isfinite(on_disk["value"])
    assert on_disk == json.loads(json.dumps(result))
    plain = write_stand_in_inception(tmp_path / "real-looking.pth", marker=False)
    assert "stand_in_weights" not in fid(plain, "plain")["details"]


# --- ccp-reproduce: records and tables --------------------------------------------------------------
def _reproduce_cfg(tmp_path, inception, clip):
    return OmegaConf.create({
        "eval_dir": str(tmp_path / "eval"), "sampling": {"steps": 2}, "guidance": {"concept_weight": 1.0, "control_weight": 5.0},
        "fid": {"feature_extractor": "inception", "inception_weights": str(inception)},
        "text_alignment": {"predictor": "clip", "clip_weights": str(clip)},
    })


def test_reproduce_records_and_tables_are_labelled(stand_in_inception, stand_in_clip, tmp_path):
    from ccp.evaluation.tables import write_tables
    from ccp.methods.export import EXPORT_INFO
    from ccp.reproduce.records import Cell

    export = tmp_path / "export"
    export.mkdir()
    (export / EXPORT_INFO).write_text("{}")
    cfg = _reproduce_cfg(tmp_path, stand_in_inception, stand_in_clip)
    cell = Cell(cfg, "face", "ours", export, prior_loader=None)
    assert cell.metric("fid", lambda: 12.5) == 12.5 and cell.metric("text_alignment", lambda: 0.5) == 0.5
    assert cell.metric("params", lambda: 7) == 7
    assert cell.stand_in == ["fid", "text_alignment"]
    record = json.loads(cell.record_path.read_text())
    assert record["fid"]["settings"]["stand_in_weights"] is True and "stand_in_weights" not in record["params"]["settings"]

    # the real file at the same place: measured again, not reused, and not labelled
    plain = write_stand_in_inception(tmp_path / "real" / INCEPTION_WEIGHTS_FILE, marker=False)
    cfg.fid.inception_weights = str(plain)
    cell = Cell(cfg, "face", "ours", export, prior_loader=None)
    assert cell.metric("fid", lambda: 30.0) == 30.0 and cell.computed == ["fid"] and "fid" not in cell.stand_in

    records = [{"method": "ours", "dataset": "face", "params": 7, "fid": 12.5, "text_alignment": 0.5,
                "spatial_alignment": None, "stand_in_weights": ["fid", "text_alignment"]},
               {"method": "lora", "dataset": "face", "params": 3, "fid": 20.0, "text_alignment": 0.4,
                "spatial_alignment": None}]
    labelled = write_tables(records, tmp_path / "labelled", datasets=["face"])
    for name in ("table1.md", "table2.md"):
        text = labelled[name].read_text()
        assert text.startswith(f"**{STAND_IN_LABEL}**") and "fid, text_alignment" in text.splitlines()[0]
    assert "stand_in_weights" in labelled["table1.csv"].read_text().splitlines()[0]
    assert all(row["stand_in_weights"] for row in json.loads(labelled["table2.json"].read_text())["rows"])
    clean = write_tables([{k: v for k, v in r.items() if k != "stand_in_weights"} for r in records],
                         tmp_path / "clean", datasets=["face"])
    assert all("STAND-IN" not in p.read_text() and "stand_in" not in p.read_text() for p in clean.values())
