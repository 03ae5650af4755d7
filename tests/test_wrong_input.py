"""Wrong input as a new user gives it to ccp-train, ccp-sample and ccp-eval: a `ConfigError` that
names the problem and the fix before any model is constructed, and nothing silently meaningless
(weight-0 terms not loaded and said so, negative concept weights refused, repeated batches warned).

Each test makes loading the prior (or the concept model) fail loudly, so an error that only comes
after loading, or a run that loads what it does not use, fails the test."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from pixels import write_random_pngs

from ccp.config import ConfigError, compose
from ccp.guidance import GuidanceSpec

REPO = Path(__file__).resolve().parents[1]


class ModelLoaded(AssertionError):
    pass


def refuse(*args, **kwargs):
    raise ModelLoaded("a model was loaded before the input was checked")




def train_cfg(prior_dir, data_dir, tmp_path, *extra):
    return compose("train", overrides=["experiment=tiny/ours", f"prior.path={prior_dir}", f"data.path={data_dir}",
                                       f"data.cache_dir={tmp_path / 'cache'}", *extra])


@pytest.fixture
def no_prior(monkeypatch):
    import ccp.training.run as train_run

    monkeypatch.setattr(train_run, "load_prior", refuse)


# --- ccp-train: data, batch, hardware -----------------------------------------------------------------
def test_an_image_folder_without_images_is_refused_before_the_prior_loads(tiny_prior_dir, tmp_path, no_prior):
    from ccp.training.run import run_training

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(ConfigError, match=r"no images found in .*empty.*\.png"):
        run_training(train_cfg(tiny_prior_dir, empty, tmp_path), tmp_path / "run")


def test_a_folder_of_unreadable_images_lists_each_file_and_why(tiny_prior_dir, tmp_path, no_prior):
    from ccp.training.run import run_training

    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG signature and nothing after it
    (folder / "b.jpg").write_text("hello")
    with pytest.raises(ConfigError) as err:
        run_training(train_cfg(tiny_prior_dir, folder, tmp_path), tmp_path / "run")
    message = str(err.value)
    assert "all 2 image files are unreadable" in message
    for name in ("a.png", "b.jpg"):
        line = next(line for line in message.splitlines() if line.strip().startswith(str(folder / name)))
        assert len(line.split(": ", 1)[1]) > 5  # the reason, not just the name
    assert "data.path" in message


def test_on_bad_image_fail_is_a_one_line_cli_error_without_traceback(tiny_prior_dir, tmp_path):
    folder = write_random_pngs(tmp_path / "images", 3)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    proc = subprocess.run(
        [sys.executable, "-m", "ccp.cli.train", "experiment=tiny/ours", f"prior.path={tiny_prior_dir}",
         f"data.path={folder}", f"data.cache_dir={tmp_path / 'cache'}", "data.on_bad_image=fail",
         f"paths.log_dir={tmp_path / 'logs'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert "ccp-train: error: 1 of 4 files" in proc.stderr
    assert str(folder / "corrupt.png") in proc.stderr and "data.on_bad_image=skip" in proc.stderr
    assert not list((tmp_path / "logs").rglob("*.ckpt"))


@pytest.mark.parametrize("override, key", [("data.batch_size=0", "data.batch_size"),
                                           ("trainer.global_batch_size=0", "trainer.global_batch_size"),
                                           ("data.batch_size=-2", "data.batch_size")])
def test_a_batch_size_below_one_is_refused(tiny_prior_dir, tmp_path, no_prior, override, key):
    from ccp.training.run import run_training

    images = write_random_pngs(tmp_path / "images", 2)
    with pytest.raises(ConfigError, match=rf"{key}=-?\d+ must be a positive integer"):
        run_training(train_cfg(tiny_prior_dir, images, tmp_path, override), tmp_path / "run")


def test_a_batch_larger_than_the_dataset_warns_with_the_repetition_factor(tiny_prior_dir, tmp_path, no_prior):
    from ccp.training.run import SmallDatasetWarning, run_training

    images = write_random_pngs(tmp_path / "images", 2)
    with pytest.warns(SmallDatasetWarning) as warned, pytest.raises(ModelLoaded):
        run_training(train_cfg(tiny_prior_dir, images, tmp_path, "data.batch_size=16", "trainer.global_batch_size=16"),
                     tmp_path / "run")
    message = str(warned[0].message)
    assert "4 training items (2 image(s) x 2 flips" in message and "about 4 times" in message
    assert "at most 4" in message


def test_a_batch_within_the_dataset_does_not_warn(tiny_prior_dir, tmp_path, no_prior, recwarn):
    from ccp.training.run import SmallDatasetWarning, run_training

    images = write_random_pngs(tmp_path / "images", 2)
    with pytest.raises(ModelLoaded):
        run_training(train_cfg(tiny_prior_dir, images, tmp_path, "data.batch_size=4", "trainer.global_batch_size=4"),
                     tmp_path / "run")
    assert not [w for w in recwarn if issubclass(w.category, SmallDatasetWarning)]


@pytest.mark.parametrize("overrides", [["experiment=table1/face_ours"], ["experiment=tiny/ours", "trainer=gpu"]])
def test_a_gpu_trainer_on_a_machine_without_cuda_names_trainer_cpu(tiny_prior_dir, tmp_path, no_prior, monkeypatch,
                                                                   overrides):
    import ccp.config
    from ccp.training.run import run_training

    monkeypatch.setattr(ccp.config, "cuda_device_count", lambda: 0)
    monkeypatch.setattr("ccp.training.run.cuda_device_count", lambda: 0)
    images = write_random_pngs(tmp_path / "images", 2)
    cfg = compose("train", overrides=[*overrides, f"prior.path={tiny_prior_dir}", f"data.path={images}",
                                      f"data.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(ConfigError, match="no CUDA device.*add trainer=cpu"):
        run_training(cfg, tmp_path / "run")


def test_more_gpus_than_the_machine_has_is_refused(tiny_prior_dir, tmp_path, no_prior, monkeypatch):
    from ccp.training.run import run_training

    monkeypatch.setattr("ccp.training.run.cuda_device_count", lambda: 2)
    images = write_random_pngs(tmp_path / "images", 2)
    with pytest.raises(ConfigError, match=r"trainer.devices=8 but 2 CUDA device\(s\) found; set trainer.devices=2"):
        run_training(train_cfg(tiny_prior_dir, images, tmp_path, "trainer=ddp", "trainer.devices=8"), tmp_path / "run")


def test_a_misspelt_method_setting_names_the_nearest_before_the_prior_loads(tiny_prior_dir, tmp_path, no_prior):
    from ccp.training.run import run_training

    images = write_random_pngs(tmp_path / "images", 2)
    with pytest.raises(ConfigError, match=r"method.module.defintion: NullTextConcept \(ours\) takes no setting "
                                          r"'defintion'; did you mean method.module.definition\?"):
        run_training(train_cfg(tiny_prior_dir, images, tmp_path, "+method.module.defintion=value_mean"), tmp_path / "run")


# --- ccp-sample: the concept folder, weight-0 terms -----------------------------------------------------
@pytest.fixture(scope="module")
def concept_export(tiny_prior, tmp_path_factory) -> Path:
    """A folder laid out as ccp-train exports ours: ccp_export.json beside concept_unet/."""
    from ccp.models.null_text_unet import NullTextUNet2DConditionModel

    export = tmp_path_factory.mktemp("run") / "export"
    NullTextUNet2DConditionModel.from_prior(tiny_prior.unet, tiny_prior.text_encoder, tiny_prior.tokenizer,
                                            definition="value_mean").save_pretrained(export / "concept_unet")
    (export / "ccp_export.json").write_text(json.dumps({"method": "ours", "prior": "tiny", "template": {}, "step": 0,
                                                        "ema": False}))
    return export


SMALL = ["sampling.height=64", "sampling.width=64", "sampling.steps=2", "sampling.num_images=2"]


def sample_cfg(prior_dir, *overrides):
    return compose("sample", overrides=[f"prior.path={prior_dir}", *SMALL, *overrides])


def images_of(folder: Path) -> list[np.ndarray]:
    return [np.asarray(PIL.Image.open(p)) for p in sorted((folder / "images").glob("*.png"))]


def test_sample_takes_the_export_folder_that_eval_takes(tiny_prior_dir, concept_export, tmp_path):
    from ccp.pipelines.run import run_sampling

    via_export = run_sampling(sample_cfg(tiny_prior_dir, "guidance=concept", f"concept.path={concept_export}"), tmp_path / "a")
    via_unet = run_sampling(sample_cfg(tiny_prior_dir, "guidance=concept",
                                       f"concept.path={concept_export / 'concept_unet'}"), tmp_path / "b")
    for a, b in zip(images_of(via_export), images_of(via_unet), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_plain_unet_as_concept_model_names_ccp_null_text_before_loading(tiny_prior_dir, tmp_path, monkeypatch):
    import ccp.pipelines.run as sample_run
    from diffusers import UNet2DConditionModel

    monkeypatch.setattr(sample_run, "load_prior", refuse)
    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", refuse)
    cfg = sample_cfg(tiny_prior_dir, "guidance=concept", f"concept.path={tiny_prior_dir}/unet")
    with pytest.raises(ConfigError, match=r"holds a UNet2DConditionModel .*not a null-text concept UNet.*ccp-null-text"):
        sample_run.run_sampling(cfg, tmp_path / "out")


def test_an_export_of_another_method_as_concept_model_points_to_ccp_eval(tiny_prior_dir, tmp_path, monkeypatch):
    import shutil

    import ccp.pipelines.run as sample_run

    monkeypatch.setattr(sample_run, "load_prior", refuse)
    export = tmp_path / "export"
    shutil.copytree(Path(tiny_prior_dir) / "unet", export / "unet")
    (export / "ccp_export.json").write_text(json.dumps({"method": "dreambooth"}))
    with pytest.raises(ConfigError, match=r"holds no null-text concept UNet .*it has unet/.*ccp-eval export.path"):
        sample_run.run_sampling(sample_cfg(tiny_prior_dir, "guidance=concept", f"concept.path={export}"), tmp_path / "out")


def test_a_concept_term_of_weight_zero_is_not_loaded_and_the_run_says_so(tiny_prior_dir, tiny_prior, concept_export,
                                                                           tmp_path, monkeypatch, caplog):
    from ccp.models.null_text_unet import NullTextUNet2DConditionModel
    from ccp.pipelines.gcfg import GCFGPipeline
    from ccp.pipelines.run import run_sampling

    monkeypatch.setattr(NullTextUNet2DConditionModel, "from_pretrained", refuse)
    with caplog.at_level(logging.WARNING, logger="ccp.pipelines.run"):
        out = run_sampling(sample_cfg(tiny_prior_dir, "guidance=concept", f"concept.path={concept_export}",
                                      "guidance.terms.concept.weight=0"), tmp_path / "out")
    text = caplog.text
    assert "concept have weight 0" in text and "not loaded: concept" in text
    assert "every guidance term has weight 0: the images are the unconditional prediction alone" in text

    pipe = GCFGPipeline.from_prior(tiny_prior)
    pipe.set_progress_bar_config(disable=True)
    unconditional = GuidanceSpec(terms=())
    expected = [np.asarray(pipe(unconditional, num_images=1, height=64, width=64, num_inference_steps=2,
                                generator=[torch.Generator().manual_seed(i)]).images[0]) for i in range(2)]
    for got, want in zip(images_of(out), expected, strict=True):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_a_zero_weight_term_equals_leaving_the_term_out(tiny_prior):
    from ccp.guidance import Condition, GuidanceTerm, Source
    from ccp.pipelines.gcfg import GCFGPipeline

    pipe = GCFGPipeline.from_prior(tiny_prior)
    pipe.set_progress_bar_config(disable=True)
    text = GuidanceTerm("text", Source("prior", Condition(prompt="a face")), 3.0)
    ghost = GuidanceTerm("ghost", Source("not-loaded", Condition()), 0.0)  # its denoiser does not even exist
    run = lambda spec: pipe(spec, num_images=1, height=64, width=64, num_inference_steps=2,  # noqa: E731
                            generator=[torch.Generator().manual_seed(3)], output_type="pt").images
    torch.testing.assert_close(run(GuidanceSpec(terms=(text, ghost))), run(GuidanceSpec(terms=(text,))), rtol=0, atol=0)


# --- ccp-eval: concept weights that measure something else -----------------------------------------------
def eval_cfg(tiny_prior_dir, export, tmp_path, *overrides):
    real = write_random_pngs(tmp_path / "real", 4, seed=1)
    return compose("eval", overrides=[
        "metric=fid", f"export.path={export}", f"prior.path={tiny_prior_dir}", f"fid.real_path={real}",
        "fid.num_samples=2", "fid.shard_size=2", "fid.feature_extractor=random_conv", "fid.num_workers=0",
        f"fid.stats_cache_dir={tmp_path / 'stats'}", "sampling.steps=2", "sampling.height=64", "sampling.width=64",
        "sampling.batch_size=2", "logger=none", *overrides])


def test_a_negative_concept_weight_is_refused_before_loading(tiny_prior_dir, concept_export, tmp_path, monkeypatch):
    import ccp.evaluation.run as eval_run

    monkeypatch.setattr(eval_run, "load_prior", refuse)
    with pytest.raises(ConfigError, match=r"guidance.concept_weight=-1: a negative weight guides away from the concept"):
        eval_run.run_eval(eval_cfg(tiny_prior_dir, concept_export, tmp_path, "guidance.concept_weight=-1"), tmp_path / "o")


def test_a_zero_concept_weight_does_not_load_the_concept_model_and_the_result_says_so(tiny_prior_dir, concept_export,
                                                                                      tmp_path, monkeypatch):
    import ccp.evaluation.run as eval_run
    from ccp.models.null_text_unet import NullTextUNet2DConditionModel

    monkeypatch.setattr(NullTextUNet2DConditionModel, "from_pretrained", refuse)
    result = eval_run.run_eval(eval_cfg(tiny_prior_dir, concept_export, tmp_path, "guidance.concept_weight=0"),
                               tmp_path / "o")
    assert result["details"]["concept_model_used"] is False
    assert set(result["machine"]["cpu"]) >= {"model_name", "avx512_bf16", "amx_tile"}  # every result names its machine
    assert json.loads((tmp_path / "o" / "result.json").read_text())["details"]["concept_model_used"] is False


def test_ccp_null_text_with_a_missing_prior_is_a_clean_usage_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ccp.cli.null_text", str(tmp_path / "nope"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"ccp-null-text: error: prior folder {tmp_path / 'nope'} does not exist")
    assert not (tmp_path / "out").exists()


def test_a_full_disk_reaches_the_user_as_one_line_not_a_traceback(capsys):
    import errno

    from ccp.config import exit_on_config_error
    from ccp.training.callbacks import CheckpointSpaceError

    with pytest.raises(SystemExit) as stop, exit_on_config_error("ccp-train"):
        raise CheckpointSpaceError(errno.ENOSPC, "no space left on device for checkpoint last.ckpt in /runs/x: ...")
    assert stop.value.code == 1
    assert capsys.readouterr().err == "ccp-train: error: no space left on device for checkpoint last.ckpt in /runs/x: ...\n"
    with pytest.raises(PermissionError), exit_on_config_error("ccp-train"):  # other OS errors keep their traceback
        raise PermissionError(errno.EACCES, "denied")


@pytest.mark.parametrize("where", ["concept_unet", ".."])
def test_eval_given_the_concept_unet_or_the_run_folder_names_the_export_folder(tiny_prior_dir, concept_export, tmp_path,
                                                                                 monkeypatch, where):
    import ccp.evaluation.run as eval_run

    monkeypatch.setattr(eval_run, "load_prior", refuse)
    given = concept_export / where if where != ".." else concept_export.parent
    with pytest.raises(ConfigError, match=rf"export.path={given}: no ccp_export.json there.*; set export.path={concept_export}$"):
        eval_run.run_eval(eval_cfg(tiny_prior_dir, given, tmp_path), tmp_path / "o")
