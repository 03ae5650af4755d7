"""Trainable parameters per method (Table 1's ``#param``), counted on a prior's architecture.

`count` builds each method of `ROWS` on a prior (weights do not matter: the counts depend only on
the architecture) and reports its trainable parameters next to the paper's number, with a note on
how ours and the paper count differently where they do.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

from diffusers import StableDiffusionPipeline

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
