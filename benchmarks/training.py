"""Images/s and peak memory of one training step, ours vs. a DreamBooth-style step, same UNet.

One step = forward + backward + AdamW step (lr 1e-5), through `PersonalizationModule.training_step`
(the loop every method trains with), driven by a manual optimizer loop instead of a Lightning
Trainer:

  ours        cached latents (a ``{"latents"}`` batch: no VAE, no text encoder), the null-text
              concept UNet, every UNet parameter trained;
  dreambooth  a ``{"pixel_values"}`` batch, so the frozen VAE encodes every step, and
              ``DreamBooth(encode_prompt_every_step=True)``, so the frozen text encoder runs every
              step; every UNet parameter trained.

Each variant runs in a fresh process (spawn), so its peak memory is its own: on CUDA
`torch.cuda.max_memory_allocated` (everything on the device: weights, gradients, AdamW state,
activations); on CPU the process's max RSS (resource.getrusage) minus its RSS just before the first
step. The ratio ours/dreambooth is taken from the same invocation.

    python benchmarks/training.py --size tiny                      # CPU, tiny prior, 64 px
    python benchmarks/training.py --size tiny --family sdxl        # CPU, tiny SDXL prior
    python benchmarks/training.py --size sd15 --device cuda --dtype bf16-mixed --resolution 512
    python benchmarks/training.py --size full --family sdxl --device cuda --dtype bf16-mixed --resolution 1024
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import resource
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median_seconds, write_json  # noqa: E402

VARIANTS = ("ours", "dreambooth")
TARGET_RATIO = 1.4
LR = 1e-5
MOSAICML_ANCHOR = (
    "Reference only, not measured here and not comparable to a CPU or tiny-model run: MosaicML's anchor of "
    "about 36 images/s per A100 for an SD2-size UNet with precomputed latents."
)
# Lightning's precision name: "bf16-mixed" autocasts to bfloat16 and keeps trainable weights fp32.
DTYPES = {"float32": None, "bf16-mixed": torch.bfloat16}


def build_prior(size: str, family: str = "sd1"):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline

    from ccp.priors.tiny import (
        SD15_SCHEDULER_CONFIG,
        SD15_VAE_CONFIG,
        build_sd15_shaped_text_encoder,
        build_sd15_shaped_unet,
        build_sdxl_shaped_prior,
        build_tiny_prior,
    )
    from ccp.priors.tokenizer import build_clip_tokenizer

    if size == "tiny":
        return build_tiny_prior(0, family=family)
    if family == "sdxl":
        # SDXL base's UNet and text encoders; its VAE has SD's architecture with another latent scale
        prior = build_sdxl_shaped_prior(0)
        torch.manual_seed(2)
        prior.register_modules(vae=AutoencoderKL(**dict(SD15_VAE_CONFIG, scaling_factor=0.13025, force_upcast=True)).eval())
        return prior
    # SD v1.5 UNet, text encoder and VAE with random weights (no download).
    torch.manual_seed(2)
    vae = AutoencoderKL(**SD15_VAE_CONFIG)
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=build_sd15_shaped_text_encoder(1).eval(),
        tokenizer=build_clip_tokenizer(),
        unet=build_sd15_shaped_unet(0).eval(),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def count(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_variant(variant: str, size: str, device_name: str, dtype_name: str, resolution: int, batch: int,
                steps: int, warmup: int, threads: int, family: str = "sd1") -> dict:
    """One variant, in its own process. Returns step time, images/s, memory and model sizes."""
    from diffusers import DDPMScheduler

    from ccp.methods import DreamBooth, PromptTemplate, build_method
    from ccp.training.module import OptimConfig, PersonalizationModule, TrainingConfig

    warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer attached: logging is a no-op
    device = torch.device(device_name)
    if device.type == "cpu":
        torch.set_num_threads(threads)
    autocast_dtype = DTYPES[dtype_name]
    torch.manual_seed(0)

    prior = build_prior(size, family)
    sizes = {"unet_params": count(prior.unet), "vae_params": count(prior.vae),
             "text_encoder_params": count(prior.text_encoder) + count(getattr(prior, "text_encoder_2", None))}
    template = PromptTemplate()
    if variant == "ours":
        method = build_method("ours", prior, template, definition="value_mean")  # value_mean: no calibration run
        vae = None  # trains from the latent cache: the VAE is never loaded
    else:
        method = DreamBooth(prior, template, encode_prompt_every_step=True)
        vae = prior.vae
    scheduler = DDPMScheduler.from_config(prior.scheduler.config)
    scale = prior.vae_scale_factor
    del prior  # the method holds its own UNet; keep only what this variant trains with
    gc.collect()

    module = PersonalizationModule(method, scheduler, vae=vae, config=TrainingConfig(optim=OptimConfig(lr=LR)))
    module.to(device)
    module.on_fit_start()  # frozen parts (VAE, text encoder) to the device, as under a Trainer
    if autocast_dtype is not None:
        # Frozen parts in the compute dtype, as mixed-precision SD fine-tuning does; trainable weights stay fp32.
        method.move_frozen(device, autocast_dtype)
        if vae is not None:
            vae.to(dtype=autocast_dtype)
    optimizer = module.configure_optimizers()["optimizer"]

    g = torch.Generator().manual_seed(1)
    if variant == "ours":
        latent_hw = resolution // scale
        batch_data = {"latents": torch.randn(batch, 4, latent_hw, latent_hw, generator=g).to(device)}
    else:
        batch_data = {"pixel_values": (torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1).to(device)}

    # Count what runs per step, so the JSON states it rather than assumes it.
    calls = {"vae.encode": 0, "text_encoder": 0}
    encoders = method._frozen.get("text_encoder")
    if isinstance(encoders, torch.nn.ModuleList):  # SDXL: both encoders run; count the first
        encoders = encoders[0]
    frozen_runs = {"vae.encode": vae.encoder if vae is not None else None, "text_encoder": encoders}
    def counter(name):
        # not traced: a compiled forward would otherwise guard on the count and recompile every step
        return torch.compiler.disable(lambda *_: calls.__setitem__(name, calls[name] + 1))

    for name, sub in frozen_runs.items():
        if sub is not None:
            sub.register_forward_hook(counter(name))
    losses = []

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = module.training_step(batch_data, 0)
        loss.backward()
        optimizer.step()
        method.on_after_optimizer_step()
        losses.append(loss.detach())

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        allocated_before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = current_rss_bytes()
    seconds = median_seconds(step, device, repeats=steps, warmup=warmup)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        memory = {
            "kind": "cuda max_memory_allocated",
            "peak_gb": peak / 2**30,
            "before_steps_gb": allocated_before / 2**30,
            "step_delta_gb": (peak - allocated_before) / 2**30,
        }
    else:
        peak = max_rss_bytes()
        memory = {
            "kind": "process RSS (resource.getrusage ru_maxrss), not allocator memory",
            "max_rss_gb": peak / 2**30,
            "rss_before_steps_gb": rss_before / 2**30,
            "max_rss_delta_gb": (peak - rss_before) / 2**30,
        }
    final_loss = float(losses[-1].float().cpu())
    if not torch.isfinite(torch.tensor(final_loss)):
        raise RuntimeError(f"{variant}: non-finite loss {final_loss}")
    return {
        "variant": variant,
        "step_s": seconds,
        "images_per_s": batch / seconds,
        "memory": memory,
        "trainable_params": method.num_trainable_parameters(),
        "frozen_calls_per_step": {k: v / (warmup + steps) for k, v in calls.items()},
        "frozen_modules_loaded": [k for k, v in frozen_runs.items() if v is not None],
        "batch_keys": sorted(batch_data),
        "final_loss": final_loss,
        "prior_sizes": sizes,
    }


def run(size: str, device: torch.device, dtype_name: str, resolution: int, batch: int, steps: int, warmup: int,
        threads: int, family: str = "sd1") -> dict:
    results = {}
    ctx = mp.get_context("spawn")
    for variant in VARIANTS:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:  # a fresh process per variant
            row = pool.submit(run_variant, variant, size, str(device), dtype_name, resolution, batch, steps, warmup,
                              threads, family).result()
        results[variant] = row
        print(f"{variant}: {row['images_per_s']:.2f} images/s ({row['step_s'] * 1000:.1f} ms/step)", flush=True)
    sizes = results["ours"].pop("prior_sizes")
    results["dreambooth"].pop("prior_sizes")
    ratio = results["ours"]["images_per_s"] / results["dreambooth"]["images_per_s"]
    print(f"ours/dreambooth images/s: {ratio:.2f}x (target >= {TARGET_RATIO}x)", flush=True)
    return {
        "benchmark": "training",
        "machine": machine(device),
        "torch": torch.__version__,
        "model": {"size": size, "family": family, **sizes},
        "dtype": dtype_name,
        "resolution": resolution,
        "batch": batch,
        "timed_steps": steps,
        "warmup_steps": warmup,
        "step": "PersonalizationModule.training_step (forward + MSE) + backward + AdamW step, lr 1e-5, weight decay 1e-2",
        "variants": {
            "ours": "cached latents ({'latents'} batch; no VAE, no text encoder), null-text UNet "
                    "(definition='value_mean'), full UNet trained",
            "dreambooth": "{'pixel_values'} batch (frozen VAE encodes every step), DreamBooth with "
                          "encode_prompt_every_step=True (frozen text encoder every step), full UNet trained",
        },
        "results": results,
        "ratio_images_per_s_ours_over_dreambooth": ratio,
        "target": f"ratio >= {TARGET_RATIO}",
        "meets_target": ratio >= TARGET_RATIO,
        "reference": MOSAICML_ANCHOR,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "sd15", "full"], default="tiny",
                        help="tiny: the tiny prior of --family; sd15/full: the family's real architecture, random weights")
    parser.add_argument("--family", choices=["sd1", "sd2", "sdxl"], default="sd1")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", "--precision", dest="dtype", choices=sorted(DTYPES), default="float32",
                        help="float32, or bf16-mixed (autocast bfloat16, trainable weights fp32, frozen VAE/text encoder bf16)")
    parser.add_argument("--resolution", type=int, default=None, help="pixels; default 64 (tiny) or 512 (sd15)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 is steadier on a shared machine)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--no-write", action="store_true", help="print only (smoke runs)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the variant processes
        torch.set_num_threads(args.threads)
    if args.size != "tiny" and args.family == "sd2" or args.size == "sd15" and args.family != "sd1":
        parser.error(f"--size {args.size} --family {args.family}: the real architectures here are SD v1.5's "
                     "(--size sd15) and SDXL's (--size full --family sdxl); SD 2.x runs at --size tiny")
    resolution = args.resolution or (64 if args.size == "tiny" else 1024 if args.family == "sdxl" else 512)
    if resolution % 8:
        parser.error("--resolution must be a multiple of 8 (the VAE's downsampling)")
    payload = run(args.size, device, args.dtype, resolution, args.batch, args.steps, args.warmup, args.threads,
                  args.family)
    if not args.no_write:
        family = "" if args.family == "sd1" else f"{args.family}_"
        tag = f"{family}{args.size}_{device.type}_{args.dtype}_{resolution}px"
        print(f"wrote {write_json(args.out, f'training_{tag}.json', payload)}")


if __name__ == "__main__":
    main()
