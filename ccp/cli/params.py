"""`ccp-params [--json PATH] [--tiny] [--family sd1|sdxl] [--methods NAME ...] [--memory [--optimizer adamw8bit] [--ema]
[--ema-on-cpu] [--frozen-dtype bfloat16] [--device cpu]] [--memory --sampling [--guidance PRESET ...] [--batch-size N]
[--resolution PX] [--dtype bfloat16] [--device cpu]]`: trainable parameters per method, the bytes a training run holds
on the device and in host memory (weights, gradients, optimizer state, EMA, frozen parts;
`ccp.methods.params.memory_estimate`), or the peak of ccp-sample jobs (`ccp.pipelines.memory`).

Builds SD v1.5's architecture with random weights (no download: only shapes matter) and each method
on it; the counts stand next to the paper's Table 1 ``#param``. The --memory options are ccp-train's
optim.name, ema.enabled, ema.device=cpu and prior.dtype. ``--tiny``: the tiny test prior (seconds).
``--family sdxl``: SDXL base 1.0's architecture (UNet and both text encoders) on the meta device, shapes
only, counts in seconds (no training --memory there); with ``--tiny``, the tiny SDXL prior.
``--memory --sampling``: one row per guidance preset (ccp/conf/guidance; default cfg, concept_control,
stylize: one, two and three terms), with the denoisers ccp-sample loads for it, at sampling.batch_size
images per call, sampling.height/width (default: the prior's) and prior.dtype; weights plus the largest
activation phase (prompt encoding, denoising, VAE decode), computed on the meta device (SDXL included).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ccp.hardware import machine
from ccp.methods.params import ARCHITECTURES, OPTIMIZERS, report
from ccp.pipelines.memory import SAMPLING_PRESETS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ccp-params", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the result as JSON to this path")
    parser.add_argument("--tiny", action="store_true", help="the tiny test prior instead of SD v1.5's shapes")
    parser.add_argument("--family", choices=("sd1", "sdxl"), default="sd1",
                        help="sd1: SD v1.5's architecture; sdxl: SDXL base 1.0's (meta device)")
    parser.add_argument("--methods", nargs="+", metavar="NAME", help="only these methods (registry names)")
    parser.add_argument("--memory", action="store_true", help="bytes of a training run (GiB) instead of counts")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    parser.add_argument("--ema", action="store_true")
    parser.add_argument("--ema-on-cpu", action="store_true", help="EMA in host memory (implies --ema)")
    parser.add_argument("--frozen-dtype", default="float32", help="dtype of the frozen parts (prior.dtype)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where it runs (cpu: process totals)")
    parser.add_argument("--sampling", action="store_true", help="with --memory: the peak of ccp-sample jobs")
    parser.add_argument("--guidance", nargs="+", default=list(SAMPLING_PRESETS), metavar="PRESET", help="guidance presets")
    parser.add_argument("--batch-size", type=int, default=1, help="images per pipeline call (sampling.batch_size)")
    parser.add_argument("--resolution", type=int, help="sampling.height = width (default: the prior's)")
    parser.add_argument("--dtype", default="float32", help="prior.dtype of the sampling job (weights and activations)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    arch = {("sd1", False): "sd15", ("sd1", True): "tiny", ("sdxl", False): "sdxl", ("sdxl", True): "tiny_sdxl"}[
        (args.family, args.tiny)]
    if args.sampling and not args.memory:
        parser.error("--sampling goes with --memory")
    if args.memory and not args.sampling and arch == "sdxl":
        parser.error("--memory needs real tensors; SDXL's architecture is counted on the meta device "
                     "(use --tiny --family sdxl for the tiny SDXL prior)")
    print(f"building the {ARCHITECTURES[arch]}-shaped prior ({'meta device' if args.sampling else 'random weights'})...", flush=True)
    memory = dict(optimizer=args.optimizer, ema=args.ema or args.ema_on_cpu, ema_on_cpu=args.ema_on_cpu,
                  frozen_dtype=args.frozen_dtype, device=args.device) if args.memory else None
    sampling = dict(guidance=args.guidance, batch_size=args.batch_size, resolution=args.resolution, dtype=args.dtype,
                    device=args.device) if args.sampling else None
    result, text = report(arch, args.methods, None if sampling else memory, sampling)
    print(text)
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**result, "machine": machine()}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
