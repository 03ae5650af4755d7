"""Sampling memory: `ccp.pipelines.memory.predict_sampling_memory` (shapes on the meta device, nothing
fitted) against the peak RSS of real ccp-sample jobs on the tiny prior, and ``ccp-params --memory --sampling``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from rss import measuring_env
from ccp.pipelines.memory import LiveTensorBytes, denoisers_in_use, predict_sampling_memory, shaped_pipeline

# Each case's ccp-sample job (`run_sampling`) in one fresh process, after a 64 px warm-up of every
# case (libraries load lazily, kernels set up on first use); peak RSS per phase is exact (the kernel's
# high-water mark, reset at each phase). A fixed mmap threshold makes RSS follow the tensors: glibc
# otherwise keeps freed tensors up to 32 MiB in its heap (docs/memory.md).
MEASURE = textwrap.dedent("""
    import gc, json, sys
    import torch
    from ccp.config import compose
    from ccp.pipelines import gcfg
    from ccp.pipelines.run import run_sampling

    from rss import reset_peak, status

    cases, out = json.loads(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    for name, overrides in cases.items():
        small = ["sampling.height=64", "sampling.width=64", "sampling.num_images=1", "sampling.batch_size=1"]
        run_sampling(compose("sample", overrides + small), f"{out}/warm-{name}")
    phases = {}
    call, decode_latents = gcfg.GCFGPipeline.__call__, gcfg.GCFGPipeline.decode_latents

    def called(self, *args, **kwargs):  # models loaded: the denoise phase starts
        phases["load"], phases["at_call"] = status("VmHWM"), status("VmRSS")
        reset_peak()
        return call(self, *args, **kwargs)

    def decode(self, latents, generator=None):
        phases["denoise"] = status("VmHWM")
        reset_peak()
        return decode_latents(self, latents, generator)

    gcfg.GCFGPipeline.__call__, gcfg.GCFGPipeline.decode_latents = called, decode
    results = {}
    for name, overrides in cases.items():
        gc.collect()
        phases.clear()
        baseline = status("VmRSS")
        reset_peak()
        run_sampling(compose("sample", overrides), f"{out}/{name}")
        phases["decode"] = status("VmHWM")  # the VAE, post-processing and the PNG files
        results[name] = {"baseline": baseline, **phases}
    print(json.dumps(results))
""")

PX, BATCH = 384, 4


@pytest.fixture(scope="module")
def jobs(tiny_prior_dir, tiny_prior, tmp_path_factory):
    """ccp-sample overrides of two jobs: prior-only CFG with a negative prompt (three conditions in
    one batched prior call), and three denoisers (prior, concept UNet, a second UNet checkpoint)."""
    from diffusers import UNet2DConditionModel

    from ccp.models.null_text_unet import NullTextUNet2DConditionModel

    root = tmp_path_factory.mktemp("sampling-memory")
    NullTextUNet2DConditionModel.from_prior(tiny_prior.unet, tiny_prior.text_encoder, tiny_prior.tokenizer,
                                            definition="value_mean").save_pretrained(root / "concept")
    UNet2DConditionModel.from_config(tiny_prior.unet.config).save_pretrained(root / "style")
    common = [f"prior.path={tiny_prior_dir}", "device=cpu", "prior.dtype=float32", "sampling.steps=2",
              f"sampling.height={PX}", f"sampling.width={PX}", f"sampling.num_images={BATCH}",
              f"sampling.batch_size={BATCH}"]
    return {
        "cfg_negative": [*common, "guidance=cfg",
                         "+guidance.terms.negative={denoiser: prior, prompt: blurry, weight: -1.0}"],
        "three_denoisers": [*common, "guidance=stylize", f"concept.path={root / 'concept'}",
                            f"+denoiser_checkpoints.style={root / 'style'}"],
    }


def _prediction(overrides: list[str]) -> dict:
    from ccp.config import compose
    from ccp.pipelines.run import build_guidance

    spec = build_guidance(compose("sample", overrides))
    pipe = shaped_pipeline("tiny", denoisers_in_use(spec), torch.float32)  # the tiny prior's architecture
    return predict_sampling_memory(pipe, spec, BATCH, PX, PX, device="cpu")


def test_live_tensor_bytes_counts_storages_once_until_freed():
    with LiveTensorBytes() as live:
        a = torch.empty(1000, device="meta")  # 4,000 bytes
        b = a * 2
        view = b.view(10, 100)  # no new storage
        assert live.current == 8000
        del b
        assert live.current == 8000  # the view keeps it
        del view
        c = a + 1
        assert live.current == 8000 and live.peak == 8000
        del a, c
    assert live.current == 0


def test_predicted_sampling_peak_matches_the_measured_job(jobs, tmp_path):
    env = measuring_env()
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(jobs), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    predicted = {name: _prediction(overrides) for name, overrides in jobs.items()}

    # the plan: one batched call per denoiser, rows = its conditions x images
    assert predicted["cfg_negative"]["rows"] == {"prior": 3 * BATCH}
    assert predicted["three_denoisers"]["rows"] == {"prior": 2 * BATCH, "concept": BATCH, "style": BATCH}
    assert predicted["three_denoisers"]["weights"] > 1.3 * predicted["cfg_negative"]["weights"]  # three UNets
    # 12 prior rows need more than 8 in the denoising step
    assert predicted["cfg_negative"]["phases"]["denoise"] > 1.3 * predicted["three_denoisers"]["phases"]["denoise"]
    report = {}
    for name, m in measured.items():
        p = predicted[name]
        peak = max(m["load"], m["denoise"], m["decode"]) - m["baseline"]
        # per phase, the activations over what the loaded job holds when sampling starts
        denoise, decode = m["denoise"] - m["at_call"], m["decode"] - m["at_call"]
        pairs = {"peak": (peak, p["peak"]), "denoise": (denoise, max(p["phases"]["text"], p["phases"]["denoise"])),
                 "decode": (decode, p["phases"]["decode"])}
        report[name] = {k: f"{a / 2**20:.1f} MiB measured, {b / 2**20:.1f} predicted: {a / b:.3f}" for k, (a, b) in pairs.items()}
        assert all(0.85 <= a / b <= 1.15 for a, b in pairs.values()), (name, report[name], m, p)
    print(json.dumps(report, indent=1))  # pytest -s shows it


def test_a_loaded_pipeline_predicts_as_its_architecture(tiny_prior):
    """`meta_pipeline` (the models of a loaded pipeline, on the meta device) and `shaped_pipeline`
    (the architecture from ccp's configs) give the same prediction; the loaded models stay put."""
    from ccp.guidance import Condition, GuidanceSpec, GuidanceTerm, Source
    from ccp.models.null_text_unet import NullTextUNet2DConditionModel
    from ccp.pipelines.gcfg import GCFGPipeline
    from ccp.pipelines.memory import meta_pipeline

    concept = NullTextUNet2DConditionModel.from_prior(tiny_prior.unet, tiny_prior.text_encoder, tiny_prior.tokenizer,
                                                      definition="value_mean")
    spec = GuidanceSpec(terms=(GuidanceTerm("concept", Source("concept"), 1.5),
                               GuidanceTerm("control", Source("prior", Condition(prompt="a red digit")), 3.0)))
    loaded = meta_pipeline(GCFGPipeline.from_prior(tiny_prior, concept_unet=concept))
    shaped = shaped_pipeline("tiny", {"prior", "concept"})
    a, b = (predict_sampling_memory(p, spec, 2, 64, 64, device="cpu") for p in (loaded, shaped))
    assert a["weights"] == b["weights"] and a["phases"] == b["phases"] and a["rows"] == {"prior": 4, "concept": 2}
    assert concept.device.type == tiny_prior.unet.device.type == "cpu"


def test_ccp_params_memory_sampling_tiny(tmp_path, capsys):
    from ccp.cli.params import main

    out = tmp_path / "sampling.json"
    main(["--tiny", "--memory", "--sampling", "--guidance", "cfg", "concept_control", "--resolution", "64",
          "--batch-size", "2", "--device", "cpu", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "concept_control" in printed and "GiB" in printed
    report = json.loads(out.read_text())
    assert report["machine"]["cpu"]["model_name"]
    assert report["options"] == {"guidance": ["cfg", "concept_control"], "batch_size": 2, "resolution": 64,
                                 "dtype": "float32", "device": "cpu"}
    rows = {r["guidance"]: r for r in report["rows"]}
    assert rows["cfg"]["rows"] == {"prior": 4} and rows["concept_control"]["rows"] == {"prior": 4, "concept": 2}
    assert rows["concept_control"]["weights"] > rows["cfg"]["weights"]  # the concept UNet is loaded too
    for row in rows.values():
        assert row["peak"] == row["weights"] + row["activations"] and row["height"] == row["width"] == 64
