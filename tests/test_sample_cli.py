"""ccp-sample end to end on the tiny prior: outputs, equality with the pipeline, sweeps, bad input."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from omegaconf import OmegaConf

from ccp.config import compose
from ccp.pipelines import run as sample_cli
from ccp.guidance import Condition, GuidanceConfigError, GuidanceSpec, GuidanceTerm, Source
from ccp.pipelines.gcfg import GCFGPipeline
from ccp.priors import PriorNotFoundError, build_clip_tokenizer, load_controlnet

REPO = Path(__file__).resolve().parents[1]
SMALL = ["sampling.height=64", "sampling.width=64", "sampling.steps=2"]


def config(prior_dir, *overrides):
    return compose("sample", overrides=[f"prior.path={prior_dir}", *SMALL, *overrides])


def read_images(folder: Path) -> list[np.ndarray]:
    return [np.asarray(PIL.Image.open(p)) for p in sorted((folder / "images").glob("*.png"))]


def direct(pipe: GCFGPipeline, spec: GuidanceSpec, num_images: int, batch_size: int) -> list[np.ndarray]:
    """GCFGPipeline called as the CLI should call it: image i from seed i, in the same batches."""
    images = []
    for start in range(0, num_images, batch_size):
        generators = [torch.Generator().manual_seed(i) for i in range(start, min(start + batch_size, num_images))]
        images += pipe(
            guidance=spec, num_images=len(generators), height=64, width=64, num_inference_steps=2, generator=generators
        ).images
    return [np.asarray(im) for im in images]


def assert_equal_up_to_batching(a: np.ndarray, b: np.ndarray) -> None:
    """Batched CPU convolutions may round differently: allow 1/255 on a few pixels, nothing more."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def text_term(name: str, prompt: str, weight: float, denoiser: str = "prior", **condition) -> GuidanceTerm:
    return GuidanceTerm(name, Source(denoiser, Condition(prompt=prompt, **condition)), weight)


@pytest.fixture(autouse=True)
def one_thread():
    # Intra-op threads only add overhead on models this small, and thrash on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def control_png(tmp_path_factory) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("control") / "edges.png"
    PIL.Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(sample_cli, "load_prior", refuse)
    monkeypatch.setattr(sample_cli, "load_controlnet", refuse)


def test_run_writes_outputs_and_equals_the_pipeline(tiny_prior_dir, tiny_prior, control_png, tmp_path):
    cfg = config(
        tiny_prior_dir,
        "sampling.num_images=3",
        "sampling.batch_size=2",
        "guidance.terms.text.weight=4.5",
        "controlnet.path=${prior.path}/controlnet",
        f"+control_images.edges={control_png}",
        "+guidance.terms.edges={denoiser: controlnet, prompt: a face, weight: 2.0, control_image: edges}",
    )
    out = sample_cli.run_sampling(cfg, tmp_path)

    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    assert PIL.Image.open(out / "grid.png").size == (2 * 64 + 3 * 2, 2 * 64 + 3 * 2)  # 2x2 grid, 2 px padding
    text = (out / "config.yaml").read_text()
    assert "${" not in text
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.controlnet.path == f"{tiny_prior_dir}/controlnet"
    assert saved.guidance.terms.text.weight == 4.5 and saved.guidance.terms.edges.weight == 2.0

    # Same spec, seeds and batches through the pipeline directly.
    pipe = GCFGPipeline.from_prior(tiny_prior, controlnet=load_controlnet(Path(tiny_prior_dir) / "controlnet"))
    pipe.set_progress_bar_config(disable=True)
    edges = PIL.Image.open(control_png).convert("RGB")
    spec = GuidanceSpec(
        terms=(
            text_term("text", "a photo of a face", 4.5),
            text_term("edges", "a face", 2.0, denoiser="controlnet", control_image=edges),
        )
    )
    got = read_images(out)
    for a, b in zip(got, direct(pipe, spec, 3, batch_size=2), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(got[0], got[1])  # each image has its own seed


def test_denoiser_checkpoint_term_uses_that_checkpoint(tiny_prior_dir, tiny_prior, tmp_path):
    from diffusers import UNet2DConditionModel

    from ccp.priors.tiny import TINY_UNET_CONFIG

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        other = UNet2DConditionModel(**TINY_UNET_CONFIG).eval()
    other.save_pretrained(tmp_path / "other")
    cfg = config(
        tiny_prior_dir,
        f"+denoiser_checkpoints.other={tmp_path / 'other'}",
        "guidance.terms.text.denoiser=other",
        "sampling.num_images=1",
    )
    out = sample_cli.run_sampling(cfg, tmp_path / "out")

    pipe = GCFGPipeline.from_prior(tiny_prior)
    pipe.add_denoiser("other", other)
    pipe.set_progress_bar_config(disable=True)
    spec = GuidanceSpec(terms=(text_term("text", "a photo of a face", 7.5, denoiser="other"),))
    np.testing.assert_array_equal(read_images(out)[0], direct(pipe, spec, 1, batch_size=1)[0])


def test_images_do_not_depend_on_batch_size_or_ignore_the_scheduler(tiny_prior_dir, tmp_path):
    # An ancestral sampler draws noise at every step too, from the per-image generators.
    ancestral = ["sampling.scheduler=EulerAncestralDiscreteScheduler", "sampling.num_images=3"]
    one, three = (
        read_images(sample_cli.run_sampling(config(tiny_prior_dir, *ancestral, f"sampling.batch_size={n}"), tmp_path / str(n)))
        for n in (1, 3)
    )
    assert len(one) == len(three) == 3
    for a, b in zip(one, three):
        assert_equal_up_to_batching(a, b)
    default = read_images(sample_cli.run_sampling(config(tiny_prior_dir, "sampling.num_images=1"), tmp_path / "dpm"))
    assert not np.array_equal(default[0], one[0])


def run_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "ccp.cli.sample", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_multirun_writes_one_folder_per_weight(tiny_prior_dir, tmp_path):
    result = run_cli(
        "-m",
        f"prior.path={tiny_prior_dir}",
        *SMALL,
        "sampling.num_images=1",
        "guidance.terms.text.weight=1.0,3.0",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and (p / "images").is_dir())
    assert [p.name for p in jobs] == [
        "0_guidance.terms.text.weight=1.0,sampling.height=64,sampling.num_images=1,sampling.steps=2,sampling.width=64",
        "1_guidance.terms.text.weight=3.0,sampling.height=64,sampling.num_images=1,sampling.steps=2,sampling.width=64",
    ]
    weights = []
    for job in jobs:
        text = (job / "config.yaml").read_text()
        assert "${" not in text
        weights.append(OmegaConf.create(text).guidance.terms.text.weight)
        assert (job / "grid.png").is_file()
    assert weights == [1.0, 3.0]
    first, second = (read_images(job) for job in jobs)
    assert len(first) == len(second) == 1
    assert not np.array_equal(first[0], second[0])


def test_cli_reports_a_bad_weight_in_one_line_and_writes_nothing(tiny_prior_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        f"prior.path={tiny_prior_dir}", "guidance.terms.text.weight=abc", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert result.returncode != 0
    assert "guidance.terms.text.weight must be a number, got 'abc' (e.g. guidance.terms.text.weight=1.5)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (run_dir / "images").exists() and not (run_dir / "config.yaml").exists()


@pytest.mark.parametrize(
    "overrides, error, fragments",
    [
        pytest.param(
            ["guidance=concept_control", "+denoiser_checkpoints.dreambooth=/nowhere"],
            GuidanceConfigError,
            ["guidance.terms.concept uses denoiser 'concept'", "configured: ['dreambooth', 'prior']", "concept.path=..."],
            id="unconfigured-denoiser",
        ),
        pytest.param(
            ["guidance=concept_control", "concept.path=/nowhere", "guidance.terms.control.weight=abc"],
            GuidanceConfigError,
            ["guidance.terms.control.weight must be a number, got 'abc'"],
            id="non-numeric-weight",
        ),
        pytest.param(
            [
                "controlnet.path=/nowhere",
                "+guidance.terms.edges={denoiser: controlnet, weight: 2.0, control_image: /missing/edges.png}",
            ],
            sample_cli.SampleConfigError,
            ["guidance.terms.edges.control_image: file /missing/edges.png does not exist"],
            id="missing-control-image-path",
        ),
        pytest.param(
            ["controlnet.path=/nowhere", "+control_images.edges=/missing/edges.png",
             "+guidance.terms.edges={denoiser: controlnet, weight: 2.0, control_image: edges}"],
            sample_cli.SampleConfigError,
            ["control_images.edges: file /missing/edges.png does not exist"],
            id="missing-named-control-image",
        ),
        pytest.param(
            ["guidance=controlnet", "concept.path=/nowhere", "controlnet.path=/nowhere"],
            sample_cli.SampleConfigError,
            ["guidance.terms.controlnet.control_image", "pass guidance.terms.controlnet.control_image=..."],
            id="control-image-not-set",
        ),
        pytest.param(
            ["guidance=concept", "concept.path=/nowhere/concept"],
            sample_cli.SampleConfigError,
            ["concept.path: folder /nowhere/concept does not exist"],
            id="missing-concept-folder",
        ),
        pytest.param(
            ["sampling.scheduler=FancyScheduler"],
            sample_cli.SampleConfigError,
            ["sampling.scheduler='FancyScheduler' is not a diffusers scheduler", "EulerDiscreteScheduler"],
            id="unknown-scheduler",
        ),
        pytest.param(
            ["sampling.height=65"],
            sample_cli.SampleConfigError,
            ["sampling.height must be null or a positive multiple of 8"],
            id="bad-height",
        ),
    ],
)
def test_bad_config_fails_before_loading_models(tiny_prior_dir, tmp_path, no_model_loading, overrides, error, fragments):
    with pytest.raises(error) as caught:
        sample_cli.run_sampling(config(tiny_prior_dir, *overrides), tmp_path)
    for fragment in fragments:
        assert fragment in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_missing_prior_folder_is_the_loaders_error(tmp_path):
    with pytest.raises(PriorNotFoundError) as caught:
        sample_cli.run_sampling(config(tmp_path / "no-prior"), tmp_path / "out")
    assert f"prior folder {tmp_path / 'no-prior'} does not exist" in str(caught.value)
    assert "huggingface-cli download" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_prior_path_is_required(tmp_path):
    cfg = compose("sample", overrides=SMALL)
    with pytest.raises(sample_cli.SampleConfigError, match=r"prior\.path=/path/to/sd-v1-5"):
        sample_cli.run_sampling(cfg, tmp_path)


def test_long_prompt_warns_before_denoising_and_samples_the_truncated_prompt(tiny_prior_dir, tmp_path, caplog, monkeypatch):
    long_prompt = "a photo of a face " + " ".join(["glasses"] * 100)
    truncated = "a photo of a face " + " ".join(["glasses"] * 70)
    tokenizer = build_clip_tokenizer()
    assert tokenizer(long_prompt, truncation=True, max_length=77).input_ids == tokenizer(truncated).input_ids

    events = []
    original = GCFGPipeline.predict_noise

    def recording_predict_noise(self, *args, **kwargs):
        events.append("step")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GCFGPipeline, "predict_noise", recording_predict_noise)

    class Recorder(logging.Handler):
        def emit(self, record):
            if "truncated" in record.getMessage():
                events.append("warning")

    recorder = Recorder()
    logging.getLogger("ccp.pipelines.gcfg").addHandler(recorder)
    batches = ["sampling.num_images=2", "sampling.batch_size=1"]
    try:
        with caplog.at_level(logging.WARNING, logger="ccp.pipelines.gcfg"):
            long_out = sample_cli.run_sampling(
                config(tiny_prior_dir, *batches, f"guidance.terms.text.prompt='{long_prompt}'"), tmp_path / "long"
            )
    finally:
        logging.getLogger("ccp.pipelines.gcfg").removeHandler(recorder)
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1  # once per run, not once per batch
    assert warnings[0].levelno == logging.WARNING and "glasses" in warnings[0].getMessage()
    assert events[0] == "warning" and events.count("step") == 4

    short_out = sample_cli.run_sampling(
        config(tiny_prior_dir, *batches, f"guidance.terms.text.prompt='{truncated}'"), tmp_path / "short"
    )
    for a, b in zip(read_images(long_out), read_images(short_out), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("preset", ["cfg", "concept", "concept_control", "controlnet"])
def test_presets_compose_into_valid_guidance(tiny_prior_dir, control_png, preset):
    cfg = config(
        tiny_prior_dir,
        f"guidance={preset}",
        "concept.path=/c",
        "controlnet.path=/n",
        *([f"guidance.terms.controlnet.control_image={control_png}"] if preset == "controlnet" else []),
    )
    spec = sample_cli.build_guidance(cfg)
    expected = {
        "cfg": {"text": ("prior", 7.5)},
        "concept": {"concept": ("concept", 1.0)},
        "concept_control": {"concept": ("concept", 1.5), "control": ("prior", 5.0)},
        "controlnet": {"concept": ("concept", 1.5), "controlnet": ("controlnet", 5.0)},
    }[preset]
    assert {t.name: (t.source.denoiser, t.weight) for t in spec.terms} == expected
    assert spec.unconditional == Source("prior", Condition(prompt=""))


def test_default_preset_needs_only_the_prior(tiny_prior_dir):
    cfg = config(tiny_prior_dir)
    assert sample_cli.configured_denoisers(cfg) == {"prior": "unet"}
    assert [t.source.denoiser for t in sample_cli.build_guidance(cfg).terms] == ["prior"]


def test_concept_model_with_controlnet_end_to_end(tiny_prior_dir, tiny_prior, control_png, tmp_path):
    from ccp.models.null_text_unet import NullTextUNet2DConditionModel

    concept_dir = tmp_path / "concept"
    NullTextUNet2DConditionModel.from_prior(tiny_prior.unet, tiny_prior.text_encoder, tiny_prior.tokenizer).save_pretrained(
        concept_dir
    )
    cfg = config(
        tiny_prior_dir,
        "guidance=controlnet",
        f"concept.path={concept_dir}",
        f"controlnet.path={tiny_prior_dir}/controlnet",
        f"guidance.terms.controlnet.control_image={control_png}",
        "guidance.terms.concept.weight=1.25",
        "sampling.num_images=2",
    )
    out = sample_cli.run_sampling(cfg, tmp_path / "out")
    assert OmegaConf.load(out / "config.yaml").guidance.terms.concept.weight == 1.25

    pipe = GCFGPipeline.from_prior(
        tiny_prior,
        concept_unet=NullTextUNet2DConditionModel.from_pretrained(concept_dir),
        controlnet=load_controlnet(Path(tiny_prior_dir) / "controlnet"),
    )
    pipe.set_progress_bar_config(disable=True)
    edges = PIL.Image.open(control_png).convert("RGB")
    spec = GuidanceSpec(
        terms=(
            GuidanceTerm("concept", Source("concept"), 1.25),
            text_term("controlnet", "", 5.0, denoiser="controlnet", control_image=edges),
        )
    )
    for a, b in zip(read_images(out), direct(pipe, spec, 2, batch_size=4), strict=True):
        np.testing.assert_array_equal(a, b)
