"""How far half-precision sampling lands from fp32: `ccp-sample`'s own path (`run_sampling`), three
GCFG terms (unconditional + concept + control prompt, guidance=concept_control), the same seeds, with
`prior.dtype` float32, then bfloat16 and float16 (what `prior.dtype=auto` picks on CUDA).

Per prior and dtype: the mean and largest absolute pixel difference to the fp32 images (0-255), the
share of pixels more than 8 levels off, and the PSNR. Priors: the random tiny prior (always; a lower
bound on nothing, but the same arithmetic) and, when given, a trained one with its concept model
(`--prior outputs/toy/prior --concept <export>/concept_unet`: `make demo` writes both).

    python benchmarks/sampling_precision.py [--prior DIR --concept DIR] [--steps 25] [--num-images 8]

Writes benchmarks/results/sampling_precision_<device>.json with the CPU's model and bf16 flags: on a
CPU without avx512_bf16/amx, bf16 is emulated (slow, and other rounding than a GPU's).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")


def sample(prior: Path, concept: Path, dtype: str, out: Path, args) -> tuple[list[np.ndarray], float]:
    from ccp.config import compose
    from ccp.pipelines.run import run_sampling

    cfg = compose("sample", [f"prior.path={prior}", f"concept.path={concept}", "guidance=concept_control",
                             f"prior.dtype={dtype}", f"device={args.device}", f"sampling.steps={args.steps}",
                             f"sampling.num_images={args.num_images}", f"sampling.batch_size={args.num_images}"])
    start = time.perf_counter()
    run_sampling(cfg, out)
    seconds = time.perf_counter() - start
    return [np.asarray(PIL.Image.open(p).convert("RGB")) for p in sorted((out / "images").glob("*.png"))], seconds


def compare(reference: list[np.ndarray], other: list[np.ndarray]) -> dict:
    a = np.stack(reference).astype(np.float64)
    b = np.stack(other).astype(np.float64)
    diff = np.abs(a - b)
    mse = float((diff ** 2).mean())
    return {"mean_abs_pixel_diff": round(float(diff.mean()), 3), "max_abs_pixel_diff": int(diff.max()),
            "share_over_8_levels": round(float((diff > 8).mean()), 5),
            "psnr_db": round(10 * np.log10(255.0 ** 2 / mse), 2) if mse else None}


def measure(name: str, prior: Path, concept: Path, work: Path, args) -> dict:
    images, seconds = {}, {}
    for dtype in DTYPES:
        images[dtype], seconds[dtype] = sample(prior, concept, dtype, work / name / dtype, args)
        print(f"{name} {dtype}: {seconds[dtype]:.1f} s", flush=True)
    return {"prior": str(prior), "concept": str(concept), "seconds": {k: round(v, 2) for k, v in seconds.items()},
            "vs_float32": {d: compare(images["float32"], images[d]) for d in DTYPES[1:]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prior", type=Path, help="a trained prior folder (e.g. outputs/toy/prior)")
    parser.add_argument("--concept", type=Path, help="its null-text concept UNet folder")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()

    from ccp.models import NullTextUNet2DConditionModel
    from ccp.priors import load_prior
    from ccp.priors.tiny import save_tiny_prior

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tiny = save_tiny_prior(work / "tiny-prior", seed=0)
        pipe = load_prior(str(tiny))
        NullTextUNet2DConditionModel.from_prior(pipe.unet, pipe.text_encoder, pipe.tokenizer).save_pretrained(
            work / "tiny-concept")
        results["tiny_random"] = measure("tiny_random", tiny, work / "tiny-concept", work, args)
        if args.prior:
            if not args.concept:
                parser.error("--prior needs --concept (its null-text concept UNet folder)")
            results["trained"] = measure("trained", args.prior, args.concept, work, args)
    device = torch.device(args.device)
    payload = {"benchmark": "sampling_precision", "machine": machine(device),
               "settings": {"steps": args.steps, "num_images": args.num_images, "guidance": "concept_control",
                            "sampler": "dpmsolver++"},
               "results": results}
    name = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).lower().replace(" ", "-")
    print(write_json(args.out, f"sampling_precision_{name}.json", payload))


if __name__ == "__main__":
    main()
