"""The null-text UNet beyond SD v1.5: error to the prior at initialisation and forward cost, on SDXL and SD 2.x.

Like benchmarks/null_text_init.py, per null-text definition and over t = 0, 100, ..., 900:
    ||eps_nulltext(x_t, t) - eps_prior(x_t, t, uncond)|| / ||eps_prior(x_t, t, uncond)||
(0, 300, 600, 900 on the SDXL architecture, for time) where "uncond" is the null text the conversion used (SDXL: hidden states, pooled embedding and
the time ids of the latents' size, which both models get), with "zero_feature" (the cross-attention
residual dropped) as a reference. Then the parameter counts, FLOPs and the median wall time of one
forward of each (interleaved repeats, time.perf_counter).

    python benchmarks/null_text_init_sdxl.py                          # all three below
    python benchmarks/null_text_init_sdxl.py --priors tiny_sdxl tiny_sd2
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402
from null_text_init import time_calls  # noqa: E402

from ccp.models.null_text_unet import (  # noqa: E402
    NULL_TEXT_DEFINITIONS,
    NullTextCalibration,
    NullTextUNet2DConditionModel,
    empty_prompt_embedding,
    sdxl_empty_prompt,
    size_time_ids,
)
from ccp.priors.tiny import SDXL_SCHEDULER_CONFIG, build_sdxl_shaped_unet, build_tiny_prior  # noqa: E402

PRIORS = {
    "tiny_sdxl": "build_tiny_prior(0, family='sdxl'), 8x8 latents; null text: zeros and the encoded ''",
    "tiny_sd2": "build_tiny_prior(0, family='sd2') (v-prediction, linear projections), 8x8 latents; encoded ''",
    "sdxl_shaped_random": "SDXL base UNet architecture (build_sdxl_shaped_unet(0)), random weights, 32x32 latents; "
    "null text: zeros, and standard normal [1,77,2048] + pooled [1,1280] (seed 5)",
}


def null_texts(name: str):
    """(unet, scheduler config, {source: (text, pooled)}) for a prior."""
    if name == "sdxl_shaped_random":
        unet = build_sdxl_shaped_unet(0).eval()
        g = torch.Generator().manual_seed(5)
        random = (torch.randn(1, 77, 2048, generator=g), torch.randn(1, 1280, generator=g))
        zeros = (torch.zeros(1, 77, 2048), torch.zeros(1, 1280))
        return unet, SDXL_SCHEDULER_CONFIG, {"zeros": zeros, "random_normal": random}
    pipe = build_tiny_prior(0, family=name.removeprefix("tiny_"))
    if name == "tiny_sd2":
        return pipe.unet, pipe.scheduler.config, {"empty_prompt": (empty_prompt_embedding(pipe.text_encoder, pipe.tokenizer), None)}
    empty = sdxl_empty_prompt(pipe.text_encoder, pipe.tokenizer, pipe.text_encoder_2, pipe.tokenizer_2)
    zeros = (torch.zeros_like(empty[0]), torch.zeros_like(empty[1]))
    return pipe.unet, pipe.scheduler.config, {"zeros": zeros, "empty_prompt": empty}


def prior_call(unet, text, pooled):
    def call(x, t):
        added = None
        if pooled is not None:
            added = {"text_embeds": pooled.expand(x.shape[0], -1), "time_ids": size_time_ids(x)}
        return unet(x, t, encoder_hidden_states=text.expand(x.shape[0], -1, -1), added_cond_kwargs=added).sample

    return call


def null_call(model):
    def call(x, t):
        added = {"time_ids": size_time_ids(x)} if model.pooled_null_text is not None else None
        return model(x, t, added_cond_kwargs=added).sample

    return call


def relative_errors(call, pairs, reference) -> dict:
    per_t = {}
    with torch.no_grad():
        for (t, x_t), eps_prior in zip(pairs, reference):
            per_t[str(t)] = ((call(x_t, t).float() - eps_prior).norm() / eps_prior.norm()).item()
    return {"per_timestep": per_t, "mean": statistics.fmean(per_t.values())}


def cost(prior, null, x, t, repeats) -> dict:
    return time_calls({"prior": lambda: prior(x, t), "null_text": lambda: null(x, t)}, x, repeats)


def run_prior(name: str, args) -> dict:
    started = time.perf_counter()
    unet, scheduler_config, sources = null_texts(name)
    big = name == "sdxl_shaped_random"
    size, batch = (32, 1) if big else (8, 4)
    g = torch.Generator().manual_seed(0)
    # Explicit latents: the SDXL UNet's sample_size (128) would be far too slow here.
    calibration = NullTextCalibration(
        latents=torch.randn(batch, 4, size, size, generator=g), num_timesteps=4 if big else 8, seed=0,
        scheduler=_ddpm(scheduler_config),
    )
    evaluation = NullTextCalibration(
        latents=torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(1234)),
        timesteps=args.big_timesteps if big else args.timesteps, seed=1234, scheduler=_ddpm(scheduler_config),
    )
    pairs = evaluation.noisy_latents(unet)
    result = {"description": PRIORS[name], "latent_size": size, "eval_batch": batch,
              "calibration": calibration.to_config(), "relative_error": {}, "conversion_s": {}}
    models = {}
    for source, (text, pooled) in sources.items():
        prior = prior_call(unet, text, pooled)
        with torch.no_grad():
            reference = [prior(x_t, t).float() for t, x_t in pairs]
        print(f"[{name}/{source}] reference done at {time.perf_counter() - started:.0f} s", flush=True)
        errors = {}
        for definition in NULL_TEXT_DEFINITIONS:
            start = time.perf_counter()
            model = NullTextUNet2DConditionModel.from_null_text(
                unet, text, pooled, definition, calibration,
                source=source if source in ("zeros", "empty_prompt") else "custom", share_prior_weights=big,
            )
            result["conversion_s"][f"{source}/{definition}"] = time.perf_counter() - start
            errors[definition] = relative_errors(null_call(model), pairs, reference)
            models[source, definition] = model
            print(f"[{name}/{source}] {definition}: {errors[definition]['mean']:.3g}", flush=True)
        zero = NullTextUNet2DConditionModel.from_null_text(
            unet, text, pooled, "value_mean", source="custom", share_prior_weights=True
        )
        with torch.no_grad():
            for feature in zero.null_text_features().values():
                feature.zero_()
        errors["zero_feature"] = relative_errors(null_call(zero), pairs, reference)
        del zero
        print(f"[{name}/{source}] zero_feature: {errors['zero_feature']['mean']:.3g}", flush=True)
        result["relative_error"][source] = errors

    source = next(iter(sources))
    model = models[source, "calibrated"]
    t_mid, x_mid = pairs[len(pairs) // 2]
    result["forward"] = cost(prior_call(unet, *sources[source]), null_call(model), x_mid, t_mid, 2 if big else 20)
    result["params"] = {
        "prior": sum(p.numel() for p in unet.parameters()),
        "null_text": sum(p.numel() for p in model.parameters()),
    }
    result["params"]["ratio_null_text_over_prior"] = result["params"]["null_text"] / result["params"]["prior"]
    print(f"[{name}] params {result['params']}, time ratio {result['forward']['time_ratio_null_text_over_prior']:.3f}",
          flush=True)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result["elapsed_s"] = time.perf_counter() - started
    return result


def _ddpm(config):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(config)  # only the noise schedule is used


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--priors", nargs="+", choices=list(PRIORS), default=list(PRIORS))
    parser.add_argument("--timesteps", type=int, nargs="+", default=list(range(0, 1000, 100)))
    parser.add_argument("--big-timesteps", type=int, nargs="+", default=[0, 300, 600, 900],
                        help="for the SDXL architecture (about 10 s a forward on 2 CPU cores)")
    parser.add_argument("--name", default="null_text_init_sdxl.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    started = time.perf_counter()
    payload = {
        "benchmark": "null_text_init_sdxl",
        "metric": "||eps_nulltext(x_t,t) - eps_prior(x_t,t,uncond)|| / ||eps_prior(x_t,t,uncond)|| at initialisation",
        "machine": machine(torch.device("cpu")) | {"dtype": "float32"},
        "priors": {name: run_prior(name, args) for name in args.priors},
    }
    payload["elapsed_s"] = time.perf_counter() - started
    path = write_json(args.out, args.name, payload)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
