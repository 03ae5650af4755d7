"""How close the null-text UNet is to its prior at initialisation, per feature definition, and its cost.

For each prior and definition it measures, over timesteps t, the relative error
    ||eps_nulltext(x_t, t) - eps_prior(x_t, t, "")|| / ||eps_prior(x_t, t, "")||
on fresh noisy latents (not the calibration ones), with "zero_feature" (the cross-attention
residual simply dropped) as a reference; then times one forward of each model (interleaved
repeats, median) and counts its FLOPs.

    python benchmarks/null_text_init.py                       # tiny prior + SD v1.5-shaped random UNet
    python benchmarks/null_text_init.py --prior /path/to/sd-v1-5 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, sync, write_json  # noqa: E402

from ccp.models.null_text_unet import (  # noqa: E402
    DEFAULT_NULL_TEXT_DEFINITION,
    NULL_TEXT_DEFINITIONS,
    NullTextCalibration,
    NullTextUNet2DConditionModel,
    empty_prompt_embedding,
)
from ccp.priors.loading import load_prior, resolve_dtype  # noqa: E402
from ccp.priors.tiny import (  # noqa: E402
    SD15_SCHEDULER_CONFIG,
    build_sd15_shaped_text_encoder,
    build_sd15_shaped_unet,
    build_tiny_prior,
)
from ccp.priors.tokenizer import build_clip_tokenizer  # noqa: E402

RANDOM_PRIORS = {
    "tiny": "ccp.priors.tiny.build_tiny_prior(0): random SD-shaped prior, 8x8 latents",
    "sd15_shaped_random": "SD v1.5 UNet + CLIP ViT-L text encoder architectures, random weights, 64x64 latents",
}


def build(name: str, args) -> dict:
    if name == "tiny":
        pipe = build_tiny_prior(0)
        parts = dict(unet=pipe.unet, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        scheduler_config = pipe.scheduler.config
    elif name == "sd15_shaped_random":
        parts = dict(
            unet=build_sd15_shaped_unet(0).eval(),
            text_encoder=build_sd15_shaped_text_encoder(1).eval(),
            tokenizer=build_clip_tokenizer(),
        )
        scheduler_config = SD15_SCHEDULER_CONFIG
    else:
        pipe = load_prior(name, dtype=args.dtype, device=args.device)
        parts = dict(unet=pipe.unet, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        scheduler_config = pipe.scheduler.config
    dtype = resolve_dtype(args.dtype)
    for module in (parts["unet"], parts["text_encoder"]):
        module.to(args.device)
        if module.dtype != dtype:  # an unconditional .to(dtype=...) makes diffusers warn
            module.to(dtype)
    parts["scheduler"] = DDPMScheduler.from_config(scheduler_config)  # only its noise schedule is used
    return parts


def relative_errors(model, pairs, reference) -> dict:
    per_t = {}
    with torch.no_grad():
        for (t, x_t), eps_prior in zip(pairs, reference):
            eps = model(x_t, t).sample.float()
            per_t[str(t)] = ((eps - eps_prior).norm() / eps_prior.norm()).item()
    return {"per_timestep": per_t, "mean": statistics.fmean(per_t.values())}


def time_and_count(prior, null_model, x, t, text, repeats) -> dict:
    """Median seconds and FLOPs of one forward each; repeats alternate so load drifts hit both alike."""
    return time_calls({"prior": lambda: prior(x, t, encoder_hidden_states=text), "null_text": lambda: null_model(x, t)},
                      x, repeats)


def time_calls(calls: dict, x: torch.Tensor, repeats: int) -> dict:
    """`calls` = {"prior": f, "null_text": g}: FLOPs of one call each, median seconds over interleaved repeats."""
    flops = {}
    times = {name: [] for name in calls}
    with torch.no_grad():
        for name, call in calls.items():  # the FLOP-counted call doubles as warm-up
            with FlopCounterMode(display=False) as counter:
                call()
            flops[name] = counter.get_total_flops()
        for _ in range(repeats):
            for name, call in calls.items():
                sync(x.device)
                start = time.perf_counter()
                call()
                sync(x.device)
                times[name].append(time.perf_counter() - start)
    prior_s, null_s = statistics.median(times["prior"]), statistics.median(times["null_text"])
    return {
        "batch": x.shape[0],
        "latent_size": x.shape[-1],
        "repeats": repeats,
        "prior_s": prior_s,
        "null_text_s": null_s,
        "time_ratio_null_text_over_prior": null_s / prior_s,
        "prior_gflops": flops["prior"] / 1e9,
        "null_text_gflops": flops["null_text"] / 1e9,
        "flop_ratio_null_text_over_prior": flops["null_text"] / flops["prior"],
        "all_times_s": times,
    }


def run_prior(name: str, args) -> dict:
    started = time.perf_counter()
    parts = build(name, args)
    unet, scheduler = parts["unet"], parts["scheduler"]
    sd15_sized = unet.config.sample_size >= 64
    eval_batch = args.eval_batch or (1 if sd15_sized else 4)
    calibration = NullTextCalibration(
        num_timesteps=args.calibration_timesteps,
        batch_size=args.calibration_batch or (1 if sd15_sized else 4),
        seed=args.calibration_seed,
        scheduler=scheduler,
    )
    null_text = empty_prompt_embedding(parts["text_encoder"], parts["tokenizer"])
    text = null_text.to(dtype=unet.dtype).expand(eval_batch, -1, -1)
    # Same noising recipe as calibration, but another seed: the evaluation latents are fresh.
    evaluation = NullTextCalibration(
        timesteps=args.timesteps, batch_size=eval_batch, seed=args.eval_seed, scheduler=scheduler
    )
    pairs = evaluation.noisy_latents(unet)
    with torch.no_grad():
        reference = [unet(x_t, t, encoder_hidden_states=text).sample.float() for t, x_t in pairs]

    errors, conversion_s, models = {}, {}, {}
    for definition in NULL_TEXT_DEFINITIONS:
        start = time.perf_counter()
        models[definition] = NullTextUNet2DConditionModel.from_prior(
            unet, parts["text_encoder"], parts["tokenizer"], definition=definition, calibration=calibration
        )
        conversion_s[definition] = time.perf_counter() - start
        errors[definition] = relative_errors(models[definition], pairs, reference)
        print(f"[{name}] {definition}: mean relative error {errors[definition]['mean']:.4f}", flush=True)

    zero = models.pop("value_mean")  # reuse its weights; only the features change
    with torch.no_grad():
        for feature in zero.null_text_features().values():
            feature.zero_()
    errors["zero_feature"] = relative_errors(zero, pairs, reference)
    del zero
    print(f"[{name}] zero_feature: mean relative error {errors['zero_feature']['mean']:.4f}", flush=True)

    t_mid, x_mid = pairs[len(pairs) // 2]
    repeats = args.repeats or (3 if sd15_sized else 20)
    forward = time_and_count(unet, models["calibrated"], x_mid, t_mid, text, repeats)
    print(f"[{name}] forward time ratio null-text/prior {forward['time_ratio_null_text_over_prior']:.3f}", flush=True)
    best = min(NULL_TEXT_DEFINITIONS, key=lambda d: errors[d]["mean"])
    return {
        "description": RANDOM_PRIORS.get(name, f"prior loaded from {name}"),
        "latent_size": unet.config.sample_size,
        "eval": {"timesteps": list(args.timesteps), "batch": eval_batch, "seed": args.eval_seed},
        "calibration": calibration.to_config(),
        "relative_error": errors,
        "best_definition": best,
        "conversion_s": conversion_s,
        "forward": forward,
        "elapsed_s": time.perf_counter() - started,
    }


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON result")
    parser.add_argument("--prior", help="an SD v1.x folder or hub id to measure instead of the random priors")
    parser.add_argument("--priors", nargs="+", choices=sorted(RANDOM_PRIORS), default=list(RANDOM_PRIORS))
    parser.add_argument("--timesteps", type=int, nargs="+", default=list(range(0, 1000, 100)))
    parser.add_argument("--eval-batch", type=int, help="default: 4 (tiny), 1 (64x64 latents)")
    parser.add_argument("--eval-seed", type=int, default=1234)
    parser.add_argument("--calibration-batch", type=int, help="default: 4 (tiny), 1 (64x64 latents)")
    parser.add_argument("--calibration-timesteps", type=int, default=8)
    parser.add_argument("--calibration-seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, help="timed forwards per model; default: 20 (tiny), 3 (64x64 latents)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    if args.calibration_seed == args.eval_seed:
        parser.error("--eval-seed must differ from --calibration-seed: evaluation needs fresh latents")
    torch.manual_seed(0)

    started = time.perf_counter()
    names = [args.prior] if args.prior else args.priors
    results = {name: run_prior(name, args) for name in names}
    lower_everywhere = {r["best_definition"] for r in results.values()}
    payload = {
        "benchmark": "null_text_init",
        "metric": "||eps_nulltext(x_t,t) - eps_prior(x_t,t,'')|| / ||eps_prior(x_t,t,'')|| at initialisation",
        "machine": machine(torch.device(args.device)) | {"dtype": args.dtype},
        "priors": results,
        "best_definition_per_prior": {name: r["best_definition"] for name, r in results.items()},
        "best_definition_on_all": lower_everywhere.pop() if len(lower_everywhere) == 1 else None,
        "library_default_definition": DEFAULT_NULL_TEXT_DEFINITION,
        "elapsed_s": time.perf_counter() - started,
    }
    file_name = f"null_text_init_{Path(args.prior).name or 'prior'}.json" if args.prior else "null_text_init.json"
    path = write_json(args.out, file_name, payload)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
