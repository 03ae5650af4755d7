"""`ccp-params [--json PATH] [--tiny] [--methods NAME ...]`: trainable parameters per method.

Builds the SD v1.5 UNet and text encoder architectures with random weights (no download; the
counts depend only on the architecture), builds each method on them and prints its trainable
parameter count next to the paper's Table 1 ``#param`` column. ``--tiny`` uses the tiny test
prior instead (seconds; for smoke tests).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline

# (row label, registry name, constructor kwargs, paper's Table 1 #param)
ROWS: list[tuple[str, str, dict, str | None]] = [
    ("textual_inversion", "textual_inversion", {}, "<1K"),
    ("dreambooth", "dreambooth", {}, "859M"),
    ("custom_diffusion", "custom_diffusion", {}, "44M"),
    ("custom_diffusion (train_q_out)", "custom_diffusion", {"train_q_out": True}, "44M"),
    ("oft", "oft", {}, "23M"),
    ("ours", "ours", {"definition": "value_mean"}, "859M"),  # counts do not depend on the definition
]


@dataclass
class Row:
    label: str
    method: str
    kwargs: dict
    trainable: int
    paper: str | None
    notes: list[str] = field(default_factory=list)


def build_sd15_shaped_prior(seed: int = 0) -> StableDiffusionPipeline:
    """SD v1.5's UNet, text encoder and tokenizer (random weights) with the tiny VAE."""
    from ccp.priors.tiny import (
        SD15_SCHEDULER_CONFIG,
        TINY_VAE_CONFIG,
        build_sd15_shaped_text_encoder,
        build_sd15_shaped_unet,
    )
    from ccp.priors.tokenizer import build_clip_tokenizer

    return StableDiffusionPipeline(
        vae=AutoencoderKL(**TINY_VAE_CONFIG).eval(),
        text_encoder=build_sd15_shaped_text_encoder(seed + 2).eval(),
        tokenizer=build_clip_tokenizer(),
        unet=build_sd15_shaped_unet(seed).eval(),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _notes(method, prior) -> list[str]:
    notes = []
    name = method.name
    unet_total = sum(p.numel() for p in prior.unet.parameters())
    if name == "ours":
        notes.append(f"prior UNet {unet_total:,} minus attn2+norm2 of every transformer block (replaced by fixed features)")
    elif name == "dreambooth":
        notes.append(f"= all {unet_total:,} prior UNet parameters")
    elif name == "custom_diffusion":
        token = method.token_embeds.weight.numel()
        notes.append(f"{method.num_trainable_parameters() - token:,} attention + {token} token")
    elif name == "oft":
        # The original OFT code stores each block as a full b x b matrix (using its skew part);
        # peft stores only the b(b-1)/2 free entries.
        full = sum(m.r * m.block_size**2 for m in method.oft.values())
        notes.append(f"peft stores b(b-1)/2 per block; full b x b blocks (original OFT code) = {full:,}")
    elif name == "textual_inversion":
        notes.append("= text encoder hidden size")
    return notes


def count(prior: StableDiffusionPipeline, methods: list[str] | None = None) -> list[Row]:
    from ccp.methods import build_method

    rows = []
    for label, name, kwargs, paper in ROWS:
        if methods and name not in methods and label not in methods:
            continue
        method = build_method(name, prior, **kwargs)
        rows.append(Row(label, name, kwargs, method.num_trainable_parameters(), paper, _notes(method, prior)))
        del method
        gc.collect()
    return rows


def human(n: int) -> str:
    for unit, scale in (("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def format_table(rows: list[Row]) -> str:
    header = ("method", "trainable", "", "paper #param", "notes")
    lines = [header] + [(r.label, f"{r.trainable:,}", human(r.trainable), r.paper or "-", "; ".join(r.notes)) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    out = []
    for i, line in enumerate(lines):
        cells = [line[0].ljust(widths[0]), line[1].rjust(widths[1]), line[2].rjust(widths[2]), line[3].rjust(widths[3]), line[4]]
        out.append("  ".join(cells).rstrip())
        if i == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ccp-params", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the counts as JSON to this path")
    parser.add_argument("--tiny", action="store_true", help="count on the tiny test prior instead of SD v1.5's shapes")
    parser.add_argument("--methods", nargs="+", metavar="NAME", help="only these methods (registry names)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    if args.tiny:
        from ccp.priors.tiny import build_tiny_prior

        prior, arch = build_tiny_prior(0), "tiny"
    else:
        print("building SD v1.5-shaped UNet and text encoder (random weights)...", flush=True)
        prior, arch = build_sd15_shaped_prior(0), "sd15"
    rows = count(prior, args.methods)
    facts = {
        "unet_parameters": sum(p.numel() for p in prior.unet.parameters()),
        "text_encoder_hidden_size": prior.text_encoder.config.hidden_size,
    }
    print(f"trainable parameters on the {'SD v1.5' if arch == 'sd15' else 'tiny'} architecture "
          f"(UNet {facts['unet_parameters']:,} parameters):")
    print(format_table(rows))
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"architecture": arch, **facts, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
