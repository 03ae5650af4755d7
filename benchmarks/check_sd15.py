"""`make check-sd15`: every method trains one step, and GCFG samples, at SD v1.5 size on this machine.

SD v1.5's architecture with random weights (UNet 859.5M, the SD VAE, a ViT-L/14-shaped CLIP text
encoder; no download), frozen parts in bf16. One case per fresh process, so each peak is its own:

  ours, dreambooth, textual_inversion, custom_diffusion, oft
      the method built on the bf16 prior, its trainable weights cast to fp32 master weights, one
      training step of `PersonalizationModule` under bf16 autocast at 256 px (a pixel batch of one:
      the VAE encodes it), gradients checked finite, the optimizer step taken and a weight seen to
      move. The full-UNet methods (ours, dreambooth) use the memory options of a 24 GB GPU
      (ccp/conf/preset/gpu_24gb.yaml): 8-bit AdamW and gradient checkpointing; the others fp32 AdamW.
  gcfg_sample
      a 2-step three-term GCFG sample at 512 px: unconditional and control prompt on the bf16 prior
      (--sample-dtype float32: fp32), concept term on a null-text concept UNet converted from it; its
      activations (peak RSS of the sample over the RSS before it) next to what
      `ccp.pipelines.memory.predict_sampling_memory` predicts for the same pipeline.

Prints and writes (benchmarks/results/check_sd15_cpu.json) each case's peak RSS, wall time, loss
and, for training, `memory_estimate` next to the measured step. Exits non-zero if a case fails,
gives a non-finite loss or image, or peaks above --limit-gib (default 22).

    python benchmarks/check_sd15.py                       # all cases, one after the other
    python benchmarks/check_sd15.py --cases ours oft      # some
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from memory import GIB, PhaseMeter, build_prior, read_status  # noqa: E402

TRAIN_CASES = ("ours", "dreambooth", "textual_inversion", "custom_diffusion", "oft")
CASES = (*TRAIN_CASES, "gcfg_sample")
FULL_UNET = {"ours", "dreambooth"}  # fp32 AdamW state alone is 6.1-6.4 GiB for these


def train_case(args, meter: PhaseMeter) -> dict:
    import torch
    from diffusers import DDPMScheduler

    from ccp.methods import PromptTemplate, build_method
    from ccp.methods.params import memory_estimate
    from ccp.training.module import PersonalizationModule, SpeedConfig, TrainingConfig
    from ccp.training.optim import build_optimizer

    name = args.case
    optimizer = args.optimizer if args.optimizer != "auto" else ("adamw8bit" if name in FULL_UNET else "adamw")
    checkpointing = {"auto": name in FULL_UNET, "on": True, "off": False}[args.gradient_checkpointing]
    meter.mark("build prior (bf16)")
    prior = build_prior("sd15", seed=0, dtype=torch.bfloat16)
    meter.mark("build method")
    kwargs = {"definition": args.ours_definition} if name == "ours" else {}
    method = build_method(name, prior, PromptTemplate(), **kwargs)
    for p in method.trainable_parameters():  # fp32 master weights; frozen parts stay bf16
        p.data = p.data.float()
    module = PersonalizationModule(method, DDPMScheduler.from_config(prior.scheduler.config), vae=prior.vae,
                                   prior=prior, config=TrainingConfig(speed=SpeedConfig(gradient_checkpointing=checkpointing)))
    module.train()
    module.on_fit_start()
    params = list(method.trainable_parameters())
    opt = build_optimizer(params, optimizer, lr=1e-5)
    estimate = memory_estimate(method, prior, optimizer=optimizer, frozen_dtype=torch.bfloat16)
    watched = sorted({0, len(params) // 2, len(params) - 1})
    before = [params[i].detach().clone() for i in watched]
    generator = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.rand(1, 3, args.resolution, args.resolution, generator=generator) * 2 - 1}

    meter.mark("forward+backward")
    start_rss = read_status()["VmRSS"]
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.training_step(batch, 0)
    loss.backward()
    step_forward_backward = time.perf_counter() - t0
    meter.mark("optimizer step")
    grads_finite = all(torch.isfinite(p.grad).all().item() for p in params if p.grad is not None)
    missing_grads = sum(p.grad is None for p in params)
    opt.step()
    opt.zero_grad(set_to_none=True)
    meter.mark("after step")
    moved = any(not torch.equal(b, params[i].detach()) for b, i in zip(before, watched))
    phases = {p["phase"]: p for p in meter.phases}
    activations = max(0, phases["forward+backward"]["peak_rss"] - start_rss - estimate["gradients"])
    baseline = phases["imports"]["end_rss"]
    step_peak = max(phases[k]["peak_rss"] for k in ("forward+backward", "optimizer step"))
    budget = baseline + estimate["process"] + activations  # this process holds device and host parts
    return {"baseline": baseline, "step_peak": step_peak, "budget": budget, "step_peak_over_budget": step_peak / budget,
            "optimizer": optimizer, "gradient_checkpointing": checkpointing, "loss": loss.item(),
            "loss_finite": bool(torch.isfinite(loss).item()), "grads_finite": grads_finite, "missing_grads": missing_grads,
            "weights_moved": moved, "estimate": estimate, "activations": activations,
            "forward_backward_s": step_forward_backward,
            "ok": bool(torch.isfinite(loss).item()) and grads_finite and missing_grads == 0 and moved}


def sample_case(args, meter: PhaseMeter) -> dict:
    import torch

    from ccp.methods import NullTextConcept, PromptTemplate
    from ccp.models.null_text_unet import NullTextUNet2DConditionModel
    from ccp.pipelines.gcfg import GCFGPipeline
    from ccp.pipelines.memory import meta_pipeline, predict_sampling_memory
    from ccp.pipelines.sampling import sample_images

    dtype = getattr(torch, args.sample_dtype)
    meter.mark(f"build prior ({args.sample_dtype})")
    prior = build_prior("sd15", seed=0, dtype=dtype)
    meter.mark("build concept UNet")
    concept = NullTextUNet2DConditionModel.from_prior(prior.unet, prior.text_encoder, prior.tokenizer,
                                                      definition=args.ours_definition)
    pipe = GCFGPipeline.from_prior(prior, concept_unet=concept.eval())
    pipe.set_progress_bar_config(disable=True)
    spec = NullTextConcept.default_guidance("concept", PromptTemplate(), control_prompt="wearing glasses",
                                            concept_weight=1.0, control_weight=5.0)
    # the same pipeline's shapes on the meta device, predicted before anything runs
    predicted = predict_sampling_memory(meta_pipeline(pipe), spec, 1, args.sample_resolution, args.sample_resolution,
                                        device="cpu")
    meter.mark("sample")
    start_rss = read_status()["VmRSS"]
    t0 = time.perf_counter()
    with torch.no_grad():
        images = sample_images(pipe, spec, [0], seed=0, num_inference_steps=args.sample_steps,
                               height=args.sample_resolution, width=args.sample_resolution, output_type="pt")
    seconds = time.perf_counter() - t0
    meter.mark("after sample")
    finite = bool(torch.isfinite(images).all().item())
    phases = {p["phase"]: p for p in meter.phases}
    activations = phases["sample"]["peak_rss"] - start_rss
    return {"terms": 1 + len(spec.terms), "shape": list(images.shape), "image_finite": finite, "sample_s": seconds,
            "dtype": args.sample_dtype, "predicted": predicted, "activations": activations,
            "activations_over_predicted": activations / predicted["activations"],
            "ok": finite and list(images.shape[-2:]) == [args.sample_resolution] * 2}


def child(args) -> None:
    meter = PhaseMeter()
    meter.mark("imports")
    import torch
    from diffusers.utils import logging as diffusers_logging

    importlib.import_module("ccp.methods")  # imports belong to the baseline

    diffusers_logging.set_verbosity_error()

    torch.set_num_threads(args.threads)
    result = {"case": args.case}
    try:
        result.update(sample_case(args, meter) if args.case == "gcfg_sample" else train_case(args, meter))
    except Exception as err:  # reported, exit status 1
        import traceback

        result.update(ok=False, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-4000:])
    meter.mark(None)
    result["phases"] = meter.close()
    result["peak_rss"] = max(p["peak_rss"] for p in result["phases"])
    result["peak_anon"] = max(p["peak_anon"] for p in result["phases"])
    Path(args.result).write_text(json.dumps(result, indent=2))


def run_case(case: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--child", case, "--result", str(out), "--threads", str(args.threads),
               "--optimizer", args.optimizer, "--gradient-checkpointing", args.gradient_checkpointing,
               "--ours-definition", args.ours_definition, "--resolution", str(args.resolution),
               "--sample-resolution", str(args.sample_resolution), "--sample-steps", str(args.sample_steps),
               "--sample-dtype", args.sample_dtype]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
        start = time.perf_counter()
        code = subprocess.run(cmd, env=env).returncode
        wall = time.perf_counter() - start
        if not out.is_file():
            return {"case": case, "ok": False, "error": f"the process died (exit status {code}; killed for memory?)",
                    "wall_s": wall}
        result = json.loads(out.read_text())
    result["wall_s"] = wall
    if result["ok"] and result["peak_rss"] > args.limit_gib * GIB:
        result.update(ok=False, error=f"peak RSS {result['peak_rss'] / GIB:.2f} GiB over the limit of {args.limit_gib} GiB")
    return result


def line(r: dict) -> str:
    text = f"{r['case']:18s} {'ok' if r['ok'] else 'FAILED':6s} peak RSS {r.get('peak_rss', 0) / GIB:6.2f} GiB  {r['wall_s']:6.0f} s"
    if "estimate" in r:
        est = r["estimate"]
        text += (f"  loss {r['loss']:.4f}  {r['optimizer']}{' +ckpt' if r['gradient_checkpointing'] else ''}"
                 f"  step peak {r['step_peak'] / GIB:.2f} = {r['step_peak_over_budget']:.2f} x (imports "
                 f"{r['baseline'] / GIB:.2f} + estimate {est['process'] / GIB:.2f} + activations {r['activations'] / GIB:.2f})")
    if "sample_s" in r:
        p = r["predicted"]
        text += (f"  {r['terms']}-term GCFG {r['shape']} {r['dtype']}: activations {r['activations'] / GIB:.2f} GiB = "
                 f"{r['activations_over_predicted']:.2f} x predicted {p['activations'] / GIB:.2f} ({p['peak_phase']}; "
                 f"weights {p['weights'] / GIB:.2f})")
    return text + (f"  {r['error']}" if r.get("error") else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--limit-gib", type=float, default=22.0)
    parser.add_argument("--optimizer", choices=("auto", "adamw", "adamw8bit"), default="auto",
                        help="auto: 8-bit AdamW for ours and dreambooth, fp32 AdamW for the others")
    parser.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"), default="auto",
                        help="auto: on for ours and dreambooth")
    parser.add_argument("--ours-definition", default="value_mean",
                        help="null-text features of the conversion (calibrated runs the prior 16 times more)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--sample-resolution", type=int, default=512)
    parser.add_argument("--sample-steps", type=int, default=2)
    parser.add_argument("--sample-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="the sample case's weights and activations (prior.dtype)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "check_sd15_cpu.json")
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.case = args.child
        child(args)
        return 0

    from common import machine

    import torch

    results = []
    for case in args.cases:
        print(f"--- {case}", flush=True)
        results.append(run_case(case, args))
        print(line(results[-1]), flush=True)
    print("\n".join(["", "SD v1.5-shaped check (CPU, bf16 autocast, frozen parts bf16):", *map(line, results)]))
    payload = {"machine": machine(torch.device("cpu")), "limit_gib": args.limit_gib,
               "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),  # glibc: None is its adaptive default
               "settings": {k: v for k, v in vars(args).items() if k not in ("child", "result", "out", "cases")},
               "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    failed = [r["case"] for r in results if not r["ok"]]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
