"""ccp-train end to end on the tiny prior: every method trains, exports and samples through GCFG;
the same command resumes exactly; bad configs fail before loading anything."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from pixels import write_random_pngs

from ccp.config import compose
from ccp.methods import METHODS
from ccp.methods.export import load_trained
from ccp.training.run import TrainConfigError, check_config, run_training


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    return write_random_pngs(tmp_path_factory.mktemp("images"))


def _cfg(method, prior_dir, image_dir, *extra):
    return compose("train", overrides=[f"experiment=tiny/{method}", f"prior.path={prior_dir}", f"data.path={image_dir}",
                                       f"data.cache_dir={image_dir.parent / 'cache'}", *extra])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_trains_exports_and_samples(method, tiny_prior_dir, image_dir, tmp_path):
    cfg = _cfg(method, tiny_prior_dir, image_dir)
    export = run_training(cfg, tmp_path)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == cfg.trainer.max_steps
    assert (tmp_path / "validation" / f"step_{cfg.trainer.max_steps:07d}.png").is_file()
    assert (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().count("train/loss") == 1
    model = load_trained(export)
    assert model.method is METHODS[method] and model.export_dir == export
    assert model.template.placeholder == cfg.template.placeholder  # the export names its template
    model.pipe.set_progress_bar_config(disable=True)
    spec = model.guidance("wearing glasses")
    images = model.pipe(spec, num_images=2, height=64, width=64, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 64, 64, 3) and np.isfinite(images).all()


def test_ours_exports_the_ema_weights(tiny_prior_dir, image_dir, tmp_path):
    cfg = _cfg("ours", tiny_prior_dir, image_dir, "ema.decay=0.5", "ema.use_ema_warmup=false", "trainer.max_steps=3")
    export = run_training(cfg, tmp_path)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    ema_state = next(v for k, v in ckpt["callbacks"].items() if "EMACallback" in k)
    exported = load_file(export / "concept_unet" / "diffusion_pytorch_model.safetensors")
    trained_names = [k[len("method.unet."):] for k in ckpt["state_dict"] if not k.endswith(".attn2.feature")]
    assert len(trained_names) == len(ema_state["shadow_params"])
    raw_differs = False
    for name, shadow in zip(trained_names, ema_state["shadow_params"]):
        torch.testing.assert_close(exported[name], shadow, rtol=0, atol=0)
        raw_differs |= not torch.equal(exported[name], ckpt["state_dict"][f"method.unet.{name}"])
    assert raw_differs  # the export is the EMA, not the raw weights


def test_rerunning_the_command_resumes_exactly(tiny_prior_dir, image_dir, tmp_path):
    full = tmp_path / "full"
    run_training(_cfg("dreambooth", tiny_prior_dir, image_dir, "trainer.max_steps=4", "validation.every_n_steps=0"), full)
    split = tmp_path / "split"
    run_training(_cfg("dreambooth", tiny_prior_dir, image_dir, "trainer.max_steps=2", "validation.every_n_steps=0"), split)
    run_training(_cfg("dreambooth", tiny_prior_dir, image_dir, "trainer.max_steps=4", "validation.every_n_steps=0"), split)
    a = load_file(full / "export" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(split / "export" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_bad_configs_fail_before_loading(tiny_prior_dir, image_dir, tmp_path):
    with pytest.raises(TrainConfigError, match="data.path .*missing.* is not a folder"):
        check_config(_cfg("ours", tiny_prior_dir, tmp_path / "missing"))
    with pytest.raises(TrainConfigError, match="global batch 5 is not a multiple of per-device batch 2"):
        check_config(_cfg("ours", tiny_prior_dir, image_dir, "trainer.global_batch_size=5"))
    with pytest.raises(TrainConfigError, match="method='loha' is unknown"):
        check_config(_cfg("ours", tiny_prior_dir, image_dir, "method.name=loha"))
    with pytest.raises(TrainConfigError, match="does not build method 'ours'.*NullTextConcept"):
        check_config(_cfg("ours", tiny_prior_dir, image_dir, "method.module._target_=ccp.methods.oft.OFT"))
    with pytest.raises(TrainConfigError, match="method.module._target_=ccp.methods.loha.LoHa: cannot be imported"):
        check_config(_cfg("ours", tiny_prior_dir, image_dir, "method.module._target_=ccp.methods.loha.LoHa"))
    plan = check_config(_cfg("ours", tiny_prior_dir, image_dir, "trainer.global_batch_size=8"))
    assert plan.accumulate == 4
    assert [type(cb).__name__ for cb in plan.callbacks] == [  # callbacks/default.yaml; EMA on for ours
        "ModelCheckpoint", "SaveLastOnInterrupt", "StepProgressBar", "EMACallback", "ValidationGrid", "SampleMetrics"]
    no_ema = check_config(_cfg("dreambooth", tiny_prior_dir, image_dir, "callbacks.progress_bar=null"))
    assert [type(cb).__name__ for cb in no_ema.callbacks] == [
        "ModelCheckpoint", "SaveLastOnInterrupt", "ValidationGrid", "SampleMetrics"]


def test_wandb_logs_offline_into_the_run_folder(tiny_prior_dir, image_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg("ours", tiny_prior_dir, image_dir, "logger=default", "trainer.max_steps=1", "validation.every_n_steps=1")
    assert cfg.logger.wandb.enabled and cfg.logger.wandb.mode == "offline"
    run_training(cfg, tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))  # the offline log `wandb sync` uploads
    assert list(runs[0].glob("files/media/images/validation/grid_*.png"))  # the validation grid went to wandb
    # a second training in the same process gets its own wandb run (the first one was finished)
    run_training(cfg, tmp_path / "second")
    assert len(list((tmp_path / "second" / "wandb").glob("offline-run-*"))) == 1


def test_periodic_sample_fid_is_logged_and_missing_inception_weights_fail_early(tiny_prior_dir, image_dir, tmp_path, monkeypatch):
    from ccp.evaluation.fid import InceptionWeightsError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-torch-home"))
    with pytest.raises(InceptionWeightsError, match=r"eval.inception_weights is not set.*set eval.inception_weights=/path/to/weights-inception-2015-12-05"):
        check_config(_cfg("ours", tiny_prior_dir, image_dir, "eval.every_n_steps=1"))
    cfg = _cfg("ours", tiny_prior_dir, image_dir, "eval.every_n_steps=1", "eval.feature_extractor=random_conv",
               "eval.num_samples=4", "eval.steps=2", "eval.batch_size=4", "validation.every_n_steps=0")
    run_training(cfg, tmp_path / "run")
    import csv

    rows = list(csv.DictReader((tmp_path / "run" / "csv" / "version_0" / "metrics.csv").open()))
    fids = [float(r["eval/fid"]) for r in rows if r.get("eval/fid")]
    assert len(fids) == cfg.trainer.max_steps and all(np.isfinite(fids))
