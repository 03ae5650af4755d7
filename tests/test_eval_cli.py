"""ccp-eval on the tiny prior: FID (test extractor) and text alignment (tiny CLIP from a local
file) of a 2-step `ours` export, the untrained prior, a Hydra multirun over a weight, and bad
inputs failing before any model is loaded."""

from __future__ import annotations

import csv
import json
import math
import sys

import numpy as np
import PIL.Image
import pytest
import torch
import ccp.cli.eval as eval_cli
import ccp.evaluation.run as eval_run
from ccp.config import compose
from ccp.evaluation.fid import InceptionWeightsError, RandomConvFeatures
from ccp.evaluation.run import EvalConfigError, check_eval_config, run_eval


def _images(folder, n, seed):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        PIL.Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ccp.priors.tiny import save_tiny_prior
    from ccp.training.run import run_training

    root = tmp_path_factory.mktemp("eval")
    prior = save_tiny_prior(root / "prior", seed=0, with_controlnet=True)
    images = _images(root / "images", 6, seed=0)
    cfg = compose("train", overrides=["experiment=tiny/ours", f"prior.path={prior}", f"data.path={images}",
                                      f"data.cache_dir={root / 'cache'}", "validation.every_n_steps=0"])
    export = run_training(cfg, root / "train" / "tiny_ours")

    from clip.model import CLIP

    torch.manual_seed(0)
    clip = CLIP(embed_dim=16, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
                context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)
    torch.save(clip.state_dict(), root / "tiny-clip.pt")
    return {"root": root, "prior": prior, "export": export, "real": images, "clip": root / "tiny-clip.pt"}


def _cfg(setup, *overrides):
    return compose("eval", overrides=_cfg_overrides(setup) + list(overrides))


def _fid(setup):
    return ["metric=fid", f"fid.real_path={setup['real']}", "fid.num_samples=4", "fid.shard_size=4",
            "fid.feature_extractor=random_conv", f"fid.stats_cache_dir={setup['root'] / 'stats'}", "fid.num_workers=0"]


def _text(setup):
    return ["metric=text", f"text.clip_weights={setup['clip']}", "text.prompts=[wearing hat,smiling]",
            "text.images_per_prompt=2"]


def test_fid_of_an_export(setup, tmp_path, monkeypatch):
    result = run_eval(_cfg(setup, *_fid(setup), "guidance.concept_weight=1.5"), tmp_path)
    on_disk = json.loads((tmp_path / "result.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert result["metric"] == "fid" and result["better"] == "lower" and result["method"] == "ours"
    assert result["run"] == "tiny_ours" and math.isfinite(result["value"]) and result["value"] > 0
    assert (result["concept_weight"], result["control_weight"]) == (1.5, 5.0)
    assert result["default_weights"] == {"concept_weight": 1.0, "control_weight": 5.0}
    assert result["num_images"] == 4 and result["config"]["fid"]["feature_extractor"] == "random_conv"
    assert (tmp_path / "fid_shards" / "meta.json").is_file()
    assert RandomConvFeatures.num_features == 8

    # the same command again (a resumed sweep) reads the result instead of loading anything
    def refuse(*args, **kwargs):
        raise AssertionError("loaded a model for a finished point")

    monkeypatch.setattr(eval_run, "load_prior", refuse)
    assert run_eval(_cfg(setup, *_fid(setup), "guidance.concept_weight=1.5"), tmp_path) == on_disk
    with pytest.raises(AssertionError, match="finished point"):  # another setting in that folder is recomputed
        run_eval(_cfg(setup, *_fid(setup), "guidance.concept_weight=2.0"), tmp_path)


def test_spatial_alignment_of_an_export(setup, tmp_path):
    cfg = _cfg(setup, "metric=spatial", f"spatial.condition_path={setup['real']}", "spatial.num_conditions=2",
               "spatial.samples_per_condition=2", f"spatial.controlnet_path={setup['prior'] / 'controlnet'}",
               "guidance.control_weight=2.0")
    result = run_eval(cfg, tmp_path)
    assert result["metric"] == "spatial" and result["condition"] == "spatial" and result["better"] == "higher"
    assert 0.0 <= result["value"] <= 1.0 and result["value"] == result["details"]["mean_f1"]
    assert result["num_images"] == 4 and len(result["details"]["per_condition"]) == 2
    assert result["details"]["config"]["control_weight"] == 2.0


def test_text_alignment_of_the_untrained_prior(setup, tmp_path):
    cfg = _cfg(setup, *_text(setup), "model=prior", f"prior.path={setup['prior']}", "export.path=null",
               "output.save_images=true")
    result = run_eval(cfg, tmp_path)
    assert result["method"] == "prior" and result["run"] == "prior" and result["better"] == "higher"
    assert 0.0 <= result["value"] <= 1.0 and result["num_images"] == 4
    assert set(result["details"]["per_prompt"]) == {"wearing hat", "smiling"}
    assert result["details"]["template"] == "a photo of face"
    assert len(list((tmp_path / "images").rglob("*.png"))) == 4


def test_multirun_over_a_weight_writes_one_folder_per_point(setup, tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    argv = ["ccp-eval", "-m", *_cfg_overrides(setup), *_text(setup),
            "text.prompts=[smiling]", "text.images_per_prompt=1", "guidance.control_weight=range(4.75,5.25,0.25)",
            f"hydra.sweep.dir={sweep}"]
    monkeypatch.setattr(sys, "argv", argv)
    eval_cli.main()
    points = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert [p.split(",")[0] for p in points] == ["0_guidance.control_weight=4.75", "1_guidance.control_weight=5.0"]
    assert all("metric=text" in p and "export.path" not in p for p in points)  # paths stay out of the names
    selection = json.loads((sweep / "selection.json").read_text())
    assert len(selection) == 1 and selection[0]["num_points"] == 2
    assert [p["control_weight"] for p in selection[0]["curve"]] == [4.75, 5.0]
    if selection[0]["curve"][0]["value"] == selection[0]["curve"][1]["value"]:
        assert selection[0]["control_weight"] == 5.0  # a tie goes to the default weight
    assert (sweep / "sweep.csv").read_text().count("\n") == 3


def _cfg_overrides(setup):
    return [f"export.path={setup['export']}", "sampling.steps=2", "sampling.height=64", "sampling.width=64",
            "sampling.batch_size=4", "device=cpu"]


@pytest.fixture
def no_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the checks failed")

    monkeypatch.setattr(eval_run, "load_prior", fail)
    monkeypatch.setattr(eval_run, "load_trained", fail)


def test_bad_inputs_fail_before_loading(setup, tmp_path, no_loading, monkeypatch):
    with pytest.raises(EvalConfigError, match=r"export.path=.*missing: the folder does not exist; set export.path="):
        run_eval(_cfg(setup, *_fid(setup), f"export.path={tmp_path / 'missing'}"), tmp_path)
    with pytest.raises(EvalConfigError, match="export.path is not set"):
        run_eval(_cfg(setup, *_fid(setup), "export.path=null"), tmp_path)
    with pytest.raises(EvalConfigError, match=r"text.clip_weights=.*nope.pt: CLIP ViT-L/14 weights file not found"):
        run_eval(_cfg(setup, *_text(setup), f"text.clip_weights={tmp_path / 'nope.pt'}"), tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty hub cache
    with pytest.raises(InceptionWeightsError, match="fid.inception_weights=.*does not exist"):
        run_eval(_cfg(setup, *_fid(setup), "fid.feature_extractor=inception",
                      f"fid.inception_weights={tmp_path / 'inception.pth'}"), tmp_path)
    with pytest.raises(InceptionWeightsError, match="fid.inception_weights is not set"):
        run_eval(_cfg(setup, *_fid(setup), "fid.feature_extractor=inception"), tmp_path)
    with pytest.raises(EvalConfigError, match="fid.real_path=.*is not a folder"):
        run_eval(_cfg(setup, *_fid(setup), f"fid.real_path={tmp_path / 'none'}"), tmp_path)
    with pytest.raises(EvalConfigError, match="spatial.condition_path=None: not a folder"):
        run_eval(_cfg(setup, "metric=spatial"), tmp_path)
    with pytest.raises(EvalConfigError, match="holds 6 images, fewer than spatial.num_conditions=200"):
        check_eval_config(_cfg(setup, "metric=spatial", f"spatial.condition_path={setup['real']}"))
    with pytest.raises(EvalConfigError, match="spatial.controlnet_path is not set"):
        check_eval_config(_cfg(setup, "metric=spatial", f"spatial.condition_path={setup['real']}",
                               "spatial.num_conditions=2"))
    with pytest.raises(EvalConfigError, match="model=prior needs prior.path"):
        check_eval_config(_cfg(setup, *_fid(setup), "model=prior"))
    with pytest.raises(EvalConfigError, match="metric='lpips' is unknown"):
        check_eval_config(_cfg(setup, "metric=lpips"))
    with pytest.raises(EvalConfigError, match="random_conv is for tests only"):
        check_eval_config(_cfg(setup, *_fid(setup), "fid.feature_extractor=clip"))
    with pytest.raises(EvalConfigError, match="text.prompts: no attribute question for \\['wearing a cape'\\]"):
        check_eval_config(_cfg(setup, *_text(setup), "text.prompts=[wearing a cape]"))
    with pytest.raises(EvalConfigError, match="template: .*unexpected keyword"):
        check_eval_config(_cfg(setup, *_fid(setup), "template={prompt: x}"))
    assert eval_run.text_prompts(_cfg(setup, *_text(setup), "text.prompts=smiling")) == ("smiling",)
    plan = check_eval_config(_cfg(setup, "metric=spatial", f"spatial.condition_path={setup['real']}",
                                  "spatial.num_conditions=2", f"spatial.controlnet_path={setup['prior'] / 'controlnet'}"))
    assert plan.method == "ours" and plan.prior_path == str(setup["prior"])


def test_cli_error_is_a_clean_exit(setup, tmp_path, monkeypatch, no_loading):
    monkeypatch.setattr(sys, "argv", ["ccp-eval", *_fid(setup), f"export.path={tmp_path / 'missing'}",
                                      f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit, match="ccp-eval: error: export.path="):
        eval_cli.main()


class _Pixels(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"pixel_values": torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) * 2 - 1}


def test_sample_metrics_callback_logs_fid_and_alignment_with_the_ema_weights(setup, tiny_prior, tmp_path):
    import lightning as L
    from diffusers import DDPMScheduler

    from ccp.evaluation.attributes import CLIPAttributePredictor
    from ccp.evaluation.callbacks import SampleMetrics
    from ccp.evaluation.fid import FeatureStats
    from ccp.methods.base import PromptTemplate
    from ccp.methods.ours import NullTextConcept
    from ccp.training.callbacks import EMACallback
    from ccp.training.module import OptimConfig, PersonalizationModule, TrainingConfig

    class Spy(SampleMetrics):
        seen = []  # (weights measured, eval mode) per measurement

        def measure(self, pl_module, *args):
            weights = [p.detach().clone() for p in pl_module.method.trainable_parameters()]
            self.seen.append((weights, not pl_module.training))
            return super().measure(pl_module, *args)

        def on_train_batch_end(self, trainer, *args):
            self._trainer = trainer
            super().on_train_batch_end(trainer, *args)

    extractor = RandomConvFeatures()
    real = FeatureStats.from_features(extractor(torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8)))
    template = PromptTemplate()
    metrics = Spy(every_n_steps=1, num_samples=4, real_stats=real, feature_extractor=extractor, steps=2, batch_size=4,
                  predictor=CLIPAttributePredictor(setup["clip"], device="cpu"), prompts=("smiling",), images_per_prompt=2)
    method = NullTextConcept(tiny_prior, template, definition="value_mean")
    module = PersonalizationModule(method, DDPMScheduler.from_config(tiny_prior.scheduler.config), vae=tiny_prior.vae,
                                   prior=tiny_prior, config=TrainingConfig(optim=OptimConfig(lr=1e-3), seed=0))
    loader = torch.utils.data.DataLoader(_Pixels(), batch_size=2)
    logger = L.pytorch.loggers.CSVLogger(str(tmp_path), name="csv")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=logger, log_every_n_steps=1, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[EMACallback(decay=0.5), metrics])
    trainer.fit(module, train_dataloaders=loader)
    ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMACallback)).ema
    assert [eval_mode for _, eval_mode in Spy.seen] == [True, True]  # at steps 1 and 2, in eval mode
    # the last measurement saw the EMA weights (no EMA update came after it), not the live ones
    measured, live = Spy.seen[-1][0], list(module.method.trainable_parameters())
    assert all(torch.equal(m, s) for m, s in zip(measured, ema.shadow_params))
    assert not all(torch.equal(m, p) for m, p in zip(measured, live))
    assert module.training  # restored
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("eval/fid")]
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r["eval/fid"])) and 0 <= float(r["eval/text_alignment"]) <= 1 for r in rows)
    assert set(metrics.last) == {"eval/fid", "eval/text_alignment"}
