"""Trainable parameters per method (Table 1's ``#param``) and the memory a training run holds,
counted on a prior's architecture.

`count` builds each method of `ROWS` on a prior (weights do not matter: the counts depend only on
the architecture) and reports its trainable parameters next to the paper's number, with a note on
how ours and the paper count differently where they do. SDXL's architecture (2.6 B UNet, CLIP-L and
OpenCLIP bigG text encoders: 13 GB in fp32) is built on the meta device (`sdxl_shaped_prior`): shapes
only, no memory; the methods are built there too, except the two whose construction copies or
computes from weight values: ours (counted on the null-text UNet built from the same config) and
Custom Diffusion (its own processors installed on a meta copy of the UNet, plus one token row per
text encoder).

`memory_estimate` states the bytes a training process holds besides activations: trainable weights
(always fp32), their gradients, the optimiser state, the EMA shadow, and every frozen tensor resident
in the process (the prior pipeline stays loaded for validation and sampling; tensors a method shares
with it are counted once). `sampling_report` states the peak of ccp-sample jobs
(`ccp.pipelines.memory`: weights and activations, from shapes on the meta device).
"""

from __future__ import annotations

import gc
import warnings
from dataclasses import asdict, dataclass, field

import torch
from diffusers import StableDiffusionPipeline
from torch import nn

from ccp.config import ConfigError


# (row label, registry name, constructor kwargs, paper's Table 1 #param)
ROWS: list[tuple[str, str, dict, str | None]] = [
    ("textual_inversion", "textual_inversion", {}, "<1K"),
    ("dreambooth", "dreambooth", {}, "859M"),
    ("custom_diffusion", "custom_diffusion", {}, "44M"),
    ("custom_diffusion (train_q_out)", "custom_diffusion", {"train_q_out": True}, "44M"),
    ("oft", "oft", {}, "23M"),
    ("lora", "lora", {}, None),  # not in the paper's Table 1
    ("ours", "ours", {"definition": "value_mean"}, "859M"),  # counts do not depend on the definition
]


@dataclass
class Row:
    label: str
    method: str
    kwargs: dict
    trainable: int | None  # None: the method does not train on this prior's family
    paper: str | None
    notes: list[str] = field(default_factory=list)


def _token_rows(method) -> list[int]:
    """The trained token rows' sizes: one per text encoder (two on SDXL)."""
    return [getattr(method, k).weight.numel() for k in ("token_embeds", "token_embeds_2") if hasattr(method, k)]


def _notes(method, prior) -> list[str]:
    notes = []
    name = method.name
    unet_total = sum(p.numel() for p in prior.unet.parameters())
    if name == "ours":
        notes.append(f"prior UNet {unet_total:,} minus attn2+norm2 of every transformer block (replaced by fixed features)")
    elif name == "dreambooth":
        notes.append(f"= all {unet_total:,} prior UNet parameters")
    elif name == "custom_diffusion":
        token = _token_rows(method)
        notes.append(f"{method.num_trainable_parameters() - sum(token):,} attention + {' + '.join(map(str, token))} token")
    elif name == "oft":
        # The original OFT code stores each block as a full b x b matrix (using its skew part);
        # peft stores only the b(b-1)/2 free entries.
        full = sum(m.r * m.block_size**2 for m in method.oft.values())
        notes.append(f"peft stores b(b-1)/2 per block; full b x b blocks (original OFT code) = {full:,}")
    elif name == "lora":
        notes.append(f"rank {method.rank}, alpha {method.alpha:g}: rank x (in + out) per attention projection; "
                     "not in the paper")
    elif name == "textual_inversion":
        notes.append("= text encoder hidden size" + (" (one row per encoder)" if len(_token_rows(method)) > 1 else ""))
    return notes


def is_meta(prior) -> bool:
    return prior.unet.device.type == "meta"


def _null_text_count(prior, label: str, kwargs: dict) -> Row:
    """Ours on a meta-device prior: the null-text UNet of the prior's config, every parameter trained
    (the conversion needs weight values to compute its features; the count does not)."""
    from ccp.models.null_text_unet import NullTextUNet2DConditionModel

    with torch.device("meta"):
        unet = NullTextUNet2DConditionModel.from_config(prior.unet.config)
    unet_total = sum(p.numel() for p in prior.unet.parameters())
    return Row(label, "ours", kwargs, sum(p.numel() for p in unet.parameters()), None,
               [f"prior UNet {unet_total:,} minus attn2+norm2 of every transformer block; counted on the "
                "null-text UNet built from the config"])


def _custom_diffusion_count(prior, label: str, kwargs: dict) -> Row:
    """Custom Diffusion on a meta-device prior: its processors on a meta copy of the UNet (they copy
    the projections they start from) plus the modifier token's row in each text encoder."""
    from ccp.methods.custom_diffusion import add_custom_diffusion_processors
    from ccp.methods.dreambooth import frozen_copy

    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")  # meta: shapes only
        processors = add_custom_diffusion_processors(frozen_copy(prior.unet), **kwargs)
    attention = sum(p.numel() for m in processors.values() for p in m.parameters() if p.requires_grad)
    token = [e.config.hidden_size for e in (prior.text_encoder, getattr(prior, "text_encoder_2", None)) if e is not None]
    return Row(label, "custom_diffusion", kwargs, attention + sum(token), None,
               [f"{attention:,} attention + {' + '.join(map(str, token))} token"])


# Rows counted without building the method on a meta-device prior (its construction needs values)
META_COUNTS = {"ours": _null_text_count, "custom_diffusion": _custom_diffusion_count}


def count(prior: StableDiffusionPipeline, methods: list[str] | None = None) -> list[Row]:
    """One row per method of `ROWS` (or those named in `methods`). On a prior other than SD v1.x
    the paper's column is empty (its numbers are SD v1.5's); a method that refuses the prior's
    family gets no count (None) and its reason as the note."""
    from ccp.methods import build_method
    from ccp.priors.families import family_of

    rows = []
    meta, family = is_meta(prior), family_of(prior)
    for label, name, kwargs, paper in ROWS:
        if methods and name not in methods and label not in methods:
            continue
        paper = paper if family == "sd1" else None
        if meta and name in META_COUNTS:
            rows.append(META_COUNTS[name](prior, label, kwargs))
            continue
        try:
            method = build_method(name, prior, **kwargs)
        except ConfigError as err:
            rows.append(Row(label, name, kwargs, None, paper, [str(err).split(";")[0]]))
            continue
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
    lines = [header] + [(r.label, "-" if r.trainable is None else f"{r.trainable:,}",
                         "" if r.trainable is None else human(r.trainable), r.paper or "-", "; ".join(r.notes))
                        for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    out = []
    for i, line in enumerate(lines):
        cells = [line[0].ljust(widths[0]), line[1].rjust(widths[1]), line[2].rjust(widths[2]), line[3].rjust(widths[3]), line[4]]
        out.append("  ".join(cells).rstrip())
        if i == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


# --- memory -------------------------------------------------------------------------------------
# The optimisers of ccp.training.optim (optim.name). bitsandbytes' 8-bit AdamW keeps fp32 moments
# for tensors below 4,096 values; 8-bit moments carry one fp32 scale per block of 256 values.
OPTIMIZERS = ("adamw", "adamw8bit")
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCKSIZE = 256


def optimizer_state_bytes_per_param(name: str) -> float:
    """Bytes of optimiser state per parameter of a large tensor: 8 (AdamW: two fp32 moments) or
    2.03 (8-bit AdamW: two uint8 moments plus two fp32 scales per 256 values)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")
    return 8.0 if name == "adamw" else 2.0 + 2 * 4 / BNB_BLOCKSIZE


def optimizer_state_bytes(shapes, name: str) -> int:
    """Bytes of optimiser state for trainable tensors of these shapes (or element counts), tensor by
    tensor, as torch's AdamW (plus its fp32 step counter) and bitsandbytes' AdamW8bit allocate it."""
    optimizer_state_bytes_per_param(name)  # checks the name
    total = 0
    for shape in shapes:
        n = shape if isinstance(shape, int) else int(torch.Size(shape).numel())
        if name == "adamw":
            total += 8 * n + 4
        elif n < BNB_MIN_8BIT_SIZE:
            total += 8 * n
        else:
            total += 2 * n + 2 * 4 * -(-n // BNB_BLOCKSIZE)
    return total


MEMORY_COLUMNS = ("weights", "gradients", "optimizer_state", "ema", "frozen", "total", "ema_host", "frozen_host", "process")


def _tensors(*modules: nn.Module) -> list[torch.Tensor]:
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


def _storage_bytes(tensors, seen: set[int], dtype: torch.dtype | None) -> tuple[int, int]:
    """(bytes, elements) of the storages behind `tensors` not yet in `seen` (which gains them);
    floating-point storages at `dtype` (None: as they are)."""
    total = elements = 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            continue
        seen.add(storage.data_ptr())
        count = storage.nbytes() // t.element_size()
        total += count * (dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size())
        elements += count
    return total, elements


def memory_estimate(method, prior: StableDiffusionPipeline, optimizer: str = "adamw", ema: bool = False,
                    ema_on_cpu: bool = False, frozen_dtype: torch.dtype | None = torch.float32,
                    device: str = "cpu") -> dict:
    """Bytes a training run of `method` (built on `prior`) holds, activations aside.

    On the training `device`: weights (the trainable parameters, fp32 whatever the prior's dtype),
    gradients (fp32), optimizer_state (`optimizer_state_bytes`, "adamw" | "adamw8bit"), ema (the
    fp32 EMA shadow; 0 with `ema_on_cpu`, then it is `ema_host`), frozen (what the step runs: the
    VAE, the method's frozen parts and buffers; `frozen_copy` parts share the prior's storage and
    count once) and their sum, total. In host memory: ema_host and frozen_host, the rest of the
    prior pipeline, which stays loaded for validation and GCFG sampling (ours: the prior UNet and
    text encoder beside its own UNet; DreamBooth: the prior UNet beside its copy). On a "cuda"
    device the method's frozen copies are moved there and the prior keeps its own tensors, so
    frozen_host is the whole prior but its VAE (moved in place). process: everything, for a CPU
    run. Frozen floating-point tensors are counted at `frozen_dtype` (prior.dtype; None: as built).
    """
    trainable = list(method.trainable_parameters())
    n = sum(p.numel() for p in trainable)
    seen = {p.untyped_storage().data_ptr() for p in trainable}
    run = _tensors(prior.vae, method, *method._frozen.values())
    frozen, frozen_elements = _storage_bytes(run, seen, frozen_dtype)
    rest = [m for m in prior.components.values() if isinstance(m, nn.Module) and m is not prior.vae]
    host_seen = seen if device == "cpu" else {p.untyped_storage().data_ptr() for p in _tensors(prior.vae)}
    frozen_host, _ = _storage_bytes(_tensors(*rest), host_seen, frozen_dtype)
    ema_bytes = 4 * n if ema else 0
    out = {
        "method": method.name, "optimizer": optimizer, "device": device,
        "trainable_parameters": n, "frozen_elements": frozen_elements,
        "weights": 4 * n,
        "gradients": 4 * n,
        "optimizer_state": optimizer_state_bytes([p.shape for p in trainable], optimizer),
        "ema": 0 if ema_on_cpu else ema_bytes,
        "frozen": frozen,
        "ema_host": ema_bytes if ema_on_cpu else 0,
        "frozen_host": frozen_host,
    }
    out["total"] = sum(out[k] for k in ("weights", "gradients", "optimizer_state", "ema", "frozen"))
    out["process"] = out["total"] + out["ema_host"] + out["frozen_host"] if device == "cpu" else None
    # What a checkpoint holds (Lightning's default CheckpointIO builds it in host memory before writing).
    out["checkpoint"] = out["weights"] + out["optimizer_state"] + ema_bytes
    return out


def memory_table(prior: StableDiffusionPipeline, methods: list[str] | None = None, **options) -> list[dict]:
    """`memory_estimate` for each row of `ROWS` (or those named in `methods`), built on `prior`."""
    from ccp.methods import build_method

    rows = []
    for label, name, kwargs, _ in ROWS:
        if methods and name not in methods and label not in methods:
            continue
        method = build_method(name, prior, **kwargs)
        rows.append({"label": label, **memory_estimate(method, prior, **options)})
        del method
        gc.collect()
    return rows


def format_memory_table(rows: list[dict]) -> str:
    """Rows in GiB (2**30 bytes); total is on the training device, process = total + host (CPU runs)."""
    header = ("GiB", *MEMORY_COLUMNS)
    lines = [header] + [(r["label"], *("-" if r[k] is None else f"{r[k] / 2**30:.2f}" for k in MEMORY_COLUMNS)) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join([line[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(line[1:], widths[1:]))]))
        if i == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


def sd15_memory_prior(seed: int = 0) -> StableDiffusionPipeline:
    """`build_sd15_shaped_prior` with SD v1.5's VAE (83.7M parameters) in place of the tiny one, so
    that memory estimates count the VAE a real prior brings."""
    from diffusers import AutoencoderKL

    from ccp.priors.tiny import SD15_VAE_CONFIG, build_sd15_shaped_prior

    prior = build_sd15_shaped_prior(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        prior.register_modules(vae=AutoencoderKL(**SD15_VAE_CONFIG).eval())
    return prior


# SDXL base 1.0's text encoders (text_encoder/ and text_encoder_2/config.json): CLIP ViT-L/14 and
# OpenCLIP ViT-bigG/14 with its 1280-d projection.
def sdxl_shaped_prior():
    """SDXL base's architecture on the meta device (`build_sdxl_shaped_prior`): every shape, no weight memory."""
    from ccp.priors.tiny import build_sdxl_shaped_prior

    return build_sdxl_shaped_prior(meta=True)


ARCHITECTURES = {"sd15": "SD v1.5", "tiny": "tiny", "sdxl": "SDXL base 1.0", "tiny_sdxl": "tiny SDXL"}


# --- sampling memory ------------------------------------------------------------------------------
def format_sampling_table(rows: list[dict]) -> str:
    """`ccp.pipelines.memory.sampling_rows` in GiB: weights, each phase's activations, the peak."""
    header = ("guidance", "terms", "forward rows per step", "weights", "text", "denoise", "decode", "peak")
    gib = lambda n: f"{n / 2**30:.2f}"  # noqa: E731
    lines = [header] + [(r["guidance"], str(r["terms"]), ", ".join(f"{k} {v}" for k, v in r["rows"].items()),
                         gib(r["weights"]), gib(r["phases"]["text"]),
                         gib(r["phases"]["denoise"]) + (f" (encode {gib(r['phases']['encode'])})" if "encode" in r["phases"] else ""),
                         gib(r["phases"]["decode"]), gib(r["peak"])) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join([*(c.ljust(w) for c, w in zip(line[:3], widths)), *(c.rjust(w) for c, w in zip(line[3:], widths[3:]))]))
        if i == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


def sampling_report(arch: str, options: dict) -> tuple[dict, str]:
    """The peak bytes of ccp-sample jobs on `arch`, one row per guidance preset (`options`: guidance,
    batch_size, resolution (None: the prior's default), dtype (prior.dtype), device)."""
    from ccp.pipelines.memory import sampling_rows
    from ccp.priors.loading import resolve_dtype

    dtype = resolve_dtype(options["dtype"]) or torch.float32
    rows = sampling_rows(arch, options["guidance"], options["batch_size"], options["resolution"], dtype, options["device"])
    px = f"{rows[0]['height']}x{rows[0]['width']}" if rows else ""
    text = (f"sampling memory on the {ARCHITECTURES[arch]} architecture, {px} px, {options['batch_size']} image(s) per "
            f"call, {options['dtype']} weights, on {options['device']} (GiB; peak = weights + the largest phase):\n"
            + format_sampling_table(rows))
    return {"architecture": arch, "options": dict(options), "rows": rows}, text


def report(arch: str, methods: list[str] | None = None, memory: dict | None = None,
           sampling: dict | None = None) -> tuple[dict, str]:
    """What ccp-params prints and writes: trainable counts per method on `arch` (`ARCHITECTURES`),
    or with `memory` (`memory_estimate`'s options; frozen_dtype by name) the bytes of a training run
    (not on "sdxl": its meta-device tensors have no bytes to count), or with `sampling`
    (`sampling_report`'s options) the peak of sampling jobs."""
    from ccp.priors.loading import resolve_dtype
    from ccp.priors.tiny import build_sd15_shaped_prior, build_tiny_prior

    if arch not in ARCHITECTURES:
        raise ValueError(f"architecture {arch!r}: use one of {', '.join(ARCHITECTURES)}")
    if sampling:
        return sampling_report(arch, sampling)
    if memory and arch == "sdxl":
        raise ValueError("--memory counts the bytes of real tensors; SDXL's architecture is built on the meta "
                         "device (13 GB in fp32), so its memory is not estimated here; use --tiny --family sdxl "
                         "for the tiny SDXL prior")
    if arch == "sdxl":
        prior = sdxl_shaped_prior()
    elif arch.startswith("tiny"):
        prior = build_tiny_prior(0, family="sdxl" if arch == "tiny_sdxl" else "sd1")
    else:
        prior = sd15_memory_prior(0) if memory else build_sd15_shaped_prior(0)
    out = {"architecture": arch, "unet_parameters": sum(p.numel() for p in prior.unet.parameters()),
           "text_encoder_hidden_size": prior.text_encoder.config.hidden_size}
    if getattr(prior, "text_encoder_2", None) is not None:
        out["text_encoder_2_hidden_size"] = prior.text_encoder_2.config.hidden_size
    where = f"the {ARCHITECTURES[arch]} architecture (UNet {out['unet_parameters']:,} parameters)"
    if memory:
        out["options"] = dict(memory)
        out["rows"] = memory_table(prior, methods, **{**memory, "frozen_dtype": resolve_dtype(memory["frozen_dtype"])})
        return out, f"training memory on {where}, activations aside; {memory}:\n{format_memory_table(out['rows'])}"
    rows = count(prior, methods)
    out["rows"] = [asdict(r) for r in rows]
    return out, f"trainable parameters on {where}:\n{format_table(rows)}"
