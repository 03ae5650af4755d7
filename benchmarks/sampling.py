"""Per-image sampling time of batched GCFG vs. its alternatives, ratios from one run.

(a) ccp's batched GCFG, three terms: unconditional and a control prompt from the prior, concept
    from a null-text UNet (one prior call of 2B, one concept call of B per step);
(b) the same three terms, one model call per term per image (how a literal Algorithm 1 runs);
(c) diffusers' StableDiffusionPipeline CFG (two evaluations, batched);
(d) the limit: per step one batched forward per distinct denoiser, timed alone.

    python benchmarks/sampling.py --size tiny            # CPU, tiny prior
    python benchmarks/sampling.py --size tiny --family sdxl
    python benchmarks/sampling.py --size sd15 --device cuda --dtype bfloat16 --resolution 512
    python benchmarks/sampling.py --size full --family sdxl --device cuda --dtype bfloat16 --resolution 1024
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median_seconds, write_json  # noqa: E402

from ccp.guidance import Condition, GuidancePlan, GuidanceSpec, GuidanceTerm, Source  # noqa: E402
from ccp.models.denoisers import BatchedCondition  # noqa: E402
from ccp.models.null_text_unet import null_text_from_pipeline  # noqa: E402
from ccp.pipelines.gcfg import GCFGPipeline  # noqa: E402
from ccp.priors.loading import resolve_dtype  # noqa: E402
from ccp.priors.tiny import (  # noqa: E402
    SD15_SCHEDULER_CONFIG,
    TINY_VAE_CONFIG,
    build_sd15_shaped_text_encoder,
    build_sd15_shaped_unet,
    build_sdxl_shaped_prior,
    build_tiny_prior,
)
from ccp.priors.tokenizer import build_clip_tokenizer  # noqa: E402


def build_prior(size: str, family: str = "sd1") -> StableDiffusionPipeline:
    if size == "tiny":
        return build_tiny_prior(0, family=family)
    if family == "sdxl":  # SDXL base's UNet and text encoders, random weights; the tiny VAE
        return build_sdxl_shaped_prior(0)
    # SD v1.5 UNet and text encoder with random weights; the VAE is not timed (latent output).
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**TINY_VAE_CONFIG),
        text_encoder=build_sd15_shaped_text_encoder(1),
        tokenizer=build_clip_tokenizer(),
        unet=build_sd15_shaped_unet(0),
        scheduler=DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def three_term_spec() -> GuidanceSpec:
    return GuidanceSpec(
        terms=(
            GuidanceTerm("concept", Source("concept"), 1.5),
            GuidanceTerm("control", Source("prior", Condition(prompt="wearing glasses")), 5.0),
        )
    )


def rows(cond: BatchedCondition, start: int, n: int = 1) -> BatchedCondition:
    """Rows start..start+n of a batched condition (the text and, on SDXL, pooled and time ids)."""
    pick = lambda v: None if v is None else v[start : start + n]  # noqa: E731
    return BatchedCondition(prompt_embeds=pick(cond.prompt_embeds), pooled_embeds=pick(cond.pooled_embeds),
                            time_ids=pick(cond.time_ids))


@torch.no_grad()
def unbatched_sample(pipe: GCFGPipeline, conditions: dict, num_images: int, latent_hw: int, steps: int) -> torch.Tensor:
    """Algorithm 1 literally: each term, each image, its own model call."""
    prior, concept = pipe.denoisers["prior"], pipe.denoisers["concept"]
    # the prior's call holds the unconditional then the control condition, num_images rows each
    uncond_in = [rows(conditions["prior"], i) for i in range(num_images)]
    control_in = [rows(conditions["prior"], num_images + i) for i in range(num_images)]
    concept_in = [rows(conditions["concept"], i) for i in range(num_images)]
    pipe.scheduler.set_timesteps(steps, device=pipe.device)
    latents = torch.randn(num_images, 4, latent_hw, latent_hw, device=pipe.device, dtype=pipe.unet.dtype)
    for t in pipe.scheduler.timesteps:
        out = []
        for i in range(num_images):
            x = latents[i : i + 1]
            uncond = prior(x, t, uncond_in[i])
            control = prior(x, t, control_in[i])
            concept_eps = concept(x, t, concept_in[i])
            out.append(uncond + 1.5 * (concept_eps - uncond) + 5.0 * (control - uncond))
        latents = pipe.scheduler.step(torch.cat(out), t, latents).prev_sample
    return latents


def run(size: str, device: torch.device, dtype: torch.dtype, resolution: int, batches: list[int], steps: int, repeats: int,
        family: str = "sd1") -> dict:
    prior = build_prior(size, family)
    concept = null_text_from_pipeline(prior, definition="value_mean")
    prior = prior.to(device, dtype)
    concept = concept.to(device, dtype).eval()
    prior.set_progress_bar_config(disable=True)
    pipe = GCFGPipeline.from_prior(prior, concept_unet=concept, scheduler=DPMSolverMultistepScheduler.from_config(prior.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    spec = three_term_spec()
    plan = GuidancePlan.from_spec(spec)
    latent_hw = resolution // pipe.vae_scale_factor
    results = []
    for batch in tqdm(batches, desc="batch sizes"):
        kw = dict(height=resolution, width=resolution, num_inference_steps=steps, output_type="latent")
        t_batched = median_seconds(lambda: pipe(spec, num_images=batch, **kw), device, repeats)
        conditions = pipe.batch_conditions(plan, batch, resolution, resolution, dtype)
        t_unbatched = median_seconds(lambda: unbatched_sample(pipe, conditions, batch, latent_hw, steps), device,
                                     max(1, repeats // 2))
        t_diffusers = median_seconds(
            lambda: prior("wearing glasses", guidance_scale=7.5, num_images_per_prompt=batch, **kw), device, repeats
        )
        x = torch.randn(batch, 4, latent_hw, latent_hw, device=device, dtype=dtype)
        t = torch.tensor(500, device=device)

        @torch.no_grad()
        def forwards_only():
            for _ in range(steps):
                for call in plan.calls:
                    pipe.denoisers[call.denoiser](torch.cat([x] * len(call.conditions)), t, conditions[call.denoiser])

        t_limit = median_seconds(forwards_only, device, repeats)
        prior_in = rows(conditions["prior"], 0, batch)
        with torch.no_grad():
            t_prior_fwd = median_seconds(lambda: pipe.denoisers["prior"](x, t, prior_in), device, repeats * 3)
            t_concept_fwd = median_seconds(lambda: pipe.denoisers["concept"](x, t, conditions["concept"]), device,
                                           repeats * 3)
        row = {
            "batch": batch,
            "per_image_s": {
                "a_batched_gcfg": t_batched / batch,
                "b_unbatched_per_term": t_unbatched / batch,
                "c_diffusers_cfg": t_diffusers / batch,
                "d_forwards_only": t_limit / batch,
            },
            "unet_forward_s": {"prior": t_prior_fwd, "null_text_concept": t_concept_fwd},
            "ratios": {
                "a_over_d": t_batched / t_limit,
                "b_over_a": t_unbatched / t_batched,
                "a_over_c": t_batched / t_diffusers,
                "null_text_over_prior_forward": t_concept_fwd / t_prior_fwd,
            },
        }
        results.append(row)
        tqdm.write(f"batch {batch}: " + ", ".join(f"{k}={v:.3f}" for k, v in row["ratios"].items()))
    return {
        "benchmark": "sampling",
        "machine": machine(device),
        "model": {
            "size": size,
            "family": family,
            "unet_params": sum(p.numel() for p in prior.unet.parameters()),
            "null_text_unet_params": sum(p.numel() for p in concept.parameters()),
            "dtype": str(dtype).replace("torch.", ""),
            "resolution": resolution,
        },
        "steps": steps,
        "repeats": repeats,
        "terms": ["unconditional: prior ''", "control: prior 'wearing glasses' x5.0", "concept: null-text UNet x1.5"],
        "targets": {"a_over_d": "<= 1.10", "b_over_a_at_batch_8": ">= 1.5", "null_text_over_prior_forward": "<= 0.9"},
        "results": results,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "sd15", "full"], default="tiny",
                        help="tiny: the tiny prior of --family; sd15/full: the family's real architecture, random weights")
    parser.add_argument("--family", choices=["sd1", "sd2", "sdxl"], default="sd1")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--resolution", type=int, default=None, help="pixels; default 64 (tiny) or 512 (sd15)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 is steadier on a shared machine)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.size != "tiny" and args.family == "sd2" or args.size == "sd15" and args.family != "sd1":
        parser.error(f"--size {args.size} --family {args.family}: the real architectures here are SD v1.5's "
                     "(--size sd15) and SDXL's (--size full --family sdxl); SD 2.x runs at --size tiny")
    resolution = args.resolution or (64 if args.size == "tiny" else 1024 if args.family == "sdxl" else 512)
    payload = run(args.size, device, resolve_dtype(args.dtype), resolution, args.batches, args.steps, args.repeats,
                  args.family)
    family = "" if args.family == "sd1" else f"{args.family}_"
    tag = f"{family}{args.size}_{device.type}_{args.dtype}_{resolution}px"
    print(f"wrote {write_json(args.out, f'sampling_{tag}.json', payload)}")


if __name__ == "__main__":
    main()
