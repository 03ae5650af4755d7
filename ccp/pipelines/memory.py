"""The peak memory of a GCFG sampling job, predicted from shapes: the sampler's own code on the meta device.

`predict_sampling_memory` runs one pipeline call (`GCFGPipeline`: prompt encoding, two denoising
steps of the guidance plan, the VAE decode and the image post-processing) with every model on the
meta device, where tensors have shapes and dtypes but no memory and no compute, and counts the
bytes of every tensor the call creates while it is alive (`LiveTensorBytes`). Nothing is fitted:
the activation peak follows from the architectures, the per-denoiser batching of
`ccp.guidance.GuidancePlan` (one batched forward per denoiser and step, rows = conditions x
images), the resolution and the dtypes. The weights are counted from the same modules.

What the meta device does differently from a real one is modelled as the real kernels behave:

- attention: on the meta device `scaled_dot_product_attention` falls back to its math form, which
  materialises the L x L score matrix; on a CPU (flash kernel) and on CUDA (flash or
  memory-efficient kernels) it does not, so it is replaced by its output alone (`_FusedAttention`);
- on a CPU (``device="cpu"``): the layouts PyTorch's CPU kernels return (channels-last propagation
  through convolution and group norm, TensorIterator's fast path), oneDNN's blocked copy held during
  an NCHW convolution, and ``output_type="pil"``'s host conversion (two fp32 image copies at the
  peak of `numpy_to_pil`), all in the same memory as the models.

Not counted: the process itself (Python and library imports, ~0.9 GiB of RSS with ccp's imports on
a CPU), the CUDA context and the caching allocator's reserve on a GPU, kernel workspaces, and
transient copies while loading weights stored in another dtype than `prior.dtype`.
"""

from __future__ import annotations

import copy
import inspect
import weakref
from collections.abc import Mapping
from typing import Any

import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ControlNetModel, ModelMixin, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.utils import logging as diffusers_logging
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedModel

from ccp.guidance import GuidancePlan, GuidanceSpec
from ccp.pipelines.gcfg import GCFGPipeline
from ccp.pipelines.gcfg_xl import GCFGXLPipeline  # noqa: F401  (registers the SDXL pipeline for from_prior)
from ccp.pipelines.prediction import guided_prediction

META = torch.device("meta")
GIB = 2**30


CPU_CONV_BLOCK = 16  # oneDNN's AVX-512 blocked layouts pad channels to a multiple of 16


def _channels_last(t: torch.Tensor) -> bool:
    """Whether PyTorch suggests channels-last for `t` (c10's is_channels_last_strides_2d, which
    falls back to NCHW when size-1 dimensions make it ambiguous): the layout its CPU convolution
    and group norm then compute and return in."""
    if t.dim() != 4 or t.stride(1) == 0:
        return False
    low = 0
    for d in (1, 3, 2, 0):
        if t.shape[d] == 0 or t.stride(d) < low or (d == 0 and low == t.stride(1)):
            return False
        low = t.stride(d) * (t.shape[d] if t.shape[d] > 1 else 1)
    return True


def _aliases(t: torch.Tensor, args) -> bool:
    key = t.untyped_storage()._cdata
    return any(isinstance(a, torch.Tensor) and a.untyped_storage()._cdata == key for a in args)


def _blocked_bytes(t: torch.Tensor) -> int:
    """Bytes of a 4-d tensor with its channels padded to `CPU_CONV_BLOCK`."""
    n, c, h, w = t.shape
    return n * -(-c // CPU_CONV_BLOCK) * CPU_CONV_BLOCK * h * w * t.element_size()


def _as_cpu_kernels(func, args, out):
    """(`out` with the layout PyTorch's CPU kernel gives it, bytes the CPU kernel holds besides its
    output while it runs); the meta kernels differ in both."""
    if isinstance(out, torch.Tensor) and out.dim() == 4 and out._base is None and not _aliases(out, args):
        # TensorIterator's fast path: inputs of the output's shape, all with one layout, give it theirs
        same = {a.stride() for a in args if isinstance(a, torch.Tensor) and a.shape == out.shape}
        if len(same) == 1 and out.stride() not in same:
            out = torch.empty_strided(out.shape, same.pop(), dtype=out.dtype, device=out.device)
    if func not in (torch.ops.aten.convolution.default, torch.ops.aten.native_group_norm.default) or args[0].dim() != 4:
        return out, 0
    x, first = args[0], out[0] if isinstance(out, tuple) else out
    if _channels_last(x) != _channels_last(first) or not (_channels_last(x) or first.is_contiguous()):
        n, c, h, w = first.shape  # both keep a channels-last input's layout, else return NCHW
        strides = (h * w * c, 1, w * c, c) if _channels_last(x) else (c * h * w, h * w, w, 1)
        first = torch.empty_strided(first.shape, strides, dtype=first.dtype, device=first.device)
        out = (first, *out[1:]) if isinstance(out, tuple) else first
    if func is torch.ops.aten.convolution.default and not _channels_last(x):
        # oneDNN runs an NCHW convolution through blocked copies (channels padded to 16): the larger
        # of input and output is held while it runs (from single-convolution RSS measurements)
        return out, max(_blocked_bytes(x), _blocked_bytes(first))
    return out, 0


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the storages created under this mode that are still alive, and their peak.

    An op's output that shares a storage with one of its inputs (a view, an in-place op) allocates
    nothing; a storage counts until its last tensor is gone. Only tensors on `device` count.

    With `cpu_kernels` the meta device's ops are given what PyTorch's CPU kernels do differently
    from their meta versions: convolution and group norm keep a channels-last input's layout, and
    a convolution over an NCHW input runs through oneDNN's blocked copies (channels padded to 16),
    of which the larger of input and output is held while it runs."""

    def __init__(self, device: torch.device = META, cpu_kernels: bool = False):
        super().__init__()
        self.device, self.cpu_kernels = device, cpu_kernels
        self.current = self.peak = 0
        self._live: dict[int, int] = {}

    def reset_peak(self) -> None:
        self.peak = self.current

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        transient = 0
        if self.cpu_kernels:
            out, transient = _as_cpu_kernels(func, args, out)
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device != self.device:
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self._live:
                continue
            self._live[key] = storage.nbytes()
            self.current += storage.nbytes()
            weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.current + transient)
        return out


class _FusedAttention(TorchFunctionMode):
    """`scaled_dot_product_attention` as the fused CPU and CUDA kernels allocate: the output and the
    per-row log-sum-exp (fp32), no L x L scores (which the meta device's math fallback would make)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, v = args[0], args[2] if len(args) > 2 else kwargs["value"]
        *batch, length, _ = q.shape
        if q.dim() == 4 and q.transpose(1, 2).is_contiguous():  # [B, L, H, d] memory, as diffusers' heads view it
            out = q.new_empty((batch[0], length, batch[1], v.shape[-1])).transpose(1, 2)
        else:
            out = q.new_empty((*batch, length, v.shape[-1]))
        q.new_empty((*batch, length), dtype=torch.float32)  # log-sum-exp, dropped at once
        return out


# --- meta-device models ---------------------------------------------------------------------
def meta_like(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A module of the same class and config on the meta device (in `dtype`; None: the module's)."""
    if isinstance(module, MultiControlNetModel):
        return MultiControlNetModel([meta_like(net, dtype) for net in module.nets])
    with torch.device(META):
        if isinstance(module, ModelMixin):
            copy_ = type(module).from_config(module.config)
        elif isinstance(module, PreTrainedModel):
            copy_ = type(module)(module.config)
        else:
            raise TypeError(f"meta_like: {type(module).__name__} is neither a diffusers nor a transformers model")
    return _cast(copy_, dtype or module.dtype).eval()


def _cast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    # nn.Module.to: diffusers' own .to warns about fp32 modules on every cast, even when there are none
    return nn.Module.to(module, dtype)


def meta_pipeline(pipe: GCFGPipeline, dtype: torch.dtype | None = None) -> GCFGPipeline:
    """`pipe` with every model replaced by `meta_like` (in `dtype`, or each model's own): its
    denoisers, ControlNets and extra checkpoints included; LoRA denoisers are not carried over."""
    if pipe._lora_denoisers:
        raise ValueError("meta_pipeline: LoRA denoisers are not supported; predict without them (their adapters are small)")
    copies: dict[int, nn.Module] = {}

    def like(module):
        if module is None:
            return None
        if id(module) not in copies:
            copies[id(module)] = meta_like(module, dtype)
        return copies[id(module)]

    kwargs = {}
    for name in inspect.signature(type(pipe).__init__).parameters:
        if name in pipe.components:
            value = pipe.components[name]
            kwargs[name] = like(value) if isinstance(value, nn.Module) else copy.deepcopy(value)
        elif name in pipe.config:  # e.g. SDXL's force_zeros_for_empty_prompt
            kwargs[name] = pipe.config[name]
    out = type(pipe)(**kwargs)
    for name, (unet, controlnet) in pipe._extra_denoisers.items():
        out.add_denoiser(name, like(getattr(pipe, unet)), controlnet=like(getattr(pipe, controlnet)) if controlnet else None)
    return out


# SDXL base 1.0's VAE (vae/config.json): SD's VAE architecture with SDXL's scaling factor.
SDXL_VAE_CONFIG_OVERRIDES = dict(scaling_factor=0.13025, force_upcast=True, sample_size=1024)
ARCHITECTURES = ("sd15", "sdxl", "tiny", "tiny_sdxl")


def shaped_prior(arch: str):
    """The prior of `arch` on the meta device: "sd15" (SD v1.5: UNet 859.5M, SD VAE, ViT-L/14 text
    encoder), "sdxl" (SDXL base 1.0: UNet 2.6B, SDXL VAE, CLIP-L and OpenCLIP bigG), "tiny" and
    "tiny_sdxl" (ccp's test priors)."""
    from ccp.priors.tiny import (SD15_SCHEDULER_CONFIG, SD15_TEXT_ENCODER_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG,
                                 build_sdxl_shaped_prior, build_tiny_prior)
    from ccp.priors.tokenizer import build_clip_tokenizer

    if arch not in ARCHITECTURES:
        raise ValueError(f"architecture {arch!r}: use one of {', '.join(ARCHITECTURES)}")
    if arch.startswith("tiny"):
        prior = build_tiny_prior(0, family="sdxl" if arch == "tiny_sdxl" else "sd1")
        for name, module in prior.components.items():
            if isinstance(module, nn.Module):
                prior.register_modules(**{name: meta_like(module)})
        return prior
    if arch == "sdxl":
        prior = build_sdxl_shaped_prior(meta=True)
        with torch.device(META):
            prior.register_modules(vae=AutoencoderKL(**{**SD15_VAE_CONFIG, **SDXL_VAE_CONFIG_OVERRIDES}).eval())
        return prior
    with torch.device(META):
        unet, vae = UNet2DConditionModel(**SD15_UNET_CONFIG), AutoencoderKL(**SD15_VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG))
    return StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=build_clip_tokenizer(),
                                   unet=unet.eval(), scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def denoisers_in_use(spec: GuidanceSpec) -> set[str]:
    """The denoisers ccp-sample loads for `spec`: the prior (it holds the VAE and text encoder) and
    every denoiser Eq. 3 evaluates."""
    return {"prior"} | spec.denoisers_run


def kind_of(name: str) -> str:
    """How `shaped_pipeline` builds a denoiser named `name`, by ccp-sample's names: "concept" (the
    null-text UNet, concept.path), "controlnet" (the prior UNet + a ControlNet: controlnet.path, or
    any controlnets.NAME containing "controlnet"), else "unet" (another full UNet checkpoint,
    denoiser_checkpoints.NAME)."""
    return "prior" if name == "prior" else "concept" if name == "concept" else "controlnet" if "controlnet" in name else "unet"


def shaped_pipeline(arch: str, denoisers: Mapping[str, str] | set[str], dtype: torch.dtype = torch.float32,
                    scheduler: Any = "dpmsolver++") -> GCFGPipeline:
    """The GCFG pipeline ccp-sample would load for `arch` (`shaped_prior`) and `denoisers` (names,
    or name -> kind: "concept", "controlnet", "unet"; see `kind_of`), on the meta device in `dtype`.
    A ControlNet has diffusers' default conditioning embedding (SD v1.5's and SDXL's ControlNets)."""
    from ccp.models.null_text_unet import NullTextUNet2DConditionModel

    kinds = dict(denoisers) if isinstance(denoisers, Mapping) else {n: kind_of(n) for n in denoisers}
    prior = shaped_prior(arch)
    config = prior.unet.config

    def controlnet():
        with torch.device(META):
            return ControlNetModel.from_unet(prior.unet, load_weights_from_unet=False).eval()

    concept = net = None
    with torch.device(META):
        if "concept" in kinds:
            concept = NullTextUNet2DConditionModel.from_config(config).eval()
    if kinds.get("controlnet") == "controlnet":
        net = controlnet()
    pipe = GCFGPipeline.from_prior(prior, concept_unet=concept, controlnet=net, scheduler=scheduler)
    for name, kind in kinds.items():
        if name in ("prior", "concept") or (name == "controlnet" and kind == "controlnet"):
            continue
        if kind == "controlnet":
            pipe.add_denoiser(name, pipe.unet, controlnet=controlnet())
        else:
            with torch.device(META):
                pipe.add_denoiser(name, UNet2DConditionModel.from_config(config).eval())
    for module in pipe.components.values():
        if isinstance(module, nn.Module):
            _cast(module, dtype)
    return pipe


# --- the prediction -------------------------------------------------------------------------
def weight_bytes(pipe: GCFGPipeline) -> dict[str, int]:
    """Bytes of the parameters and buffers of every model of `pipe`, per component (a tensor shared
    by two components counts once, under the first)."""
    seen: set[int] = set()
    out = {}
    for name, module in pipe.components.items():
        if not isinstance(module, nn.Module):
            continue
        total = 0
        for t in (*module.parameters(), *module.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        if total:
            out[name] = total
    return out


def _control_placeholders(spec: GuidanceSpec, height: int, width: int) -> GuidanceSpec:
    """`spec` with each control image (a path, a name, a missing value) replaced by a blank image of
    the sample's size, one object per distinct reference, so the plan merges what the real one merges."""
    from ccp.guidance import Condition, GuidanceTerm, Source

    images: dict[Any, PIL.Image.Image] = {}

    def blank(ref):
        if isinstance(ref, tuple):
            return tuple(blank(r) for r in ref)
        if isinstance(ref, list):
            return [blank(r) for r in ref]
        key = ref if isinstance(ref, (str, int, float)) else id(ref)
        return images.setdefault(key, PIL.Image.new("RGB", (width, height)))

    def source(src: Source) -> Source:
        c = src.condition
        if c.control_image is None:
            return src
        return Source(src.denoiser, Condition(c.prompt, blank(c.control_image), c.control_scale))

    return GuidanceSpec(terms=tuple(GuidanceTerm(t.name, source(t.source), t.weight) for t in spec.terms),
                        unconditional=source(spec.unconditional), rescale=spec.rescale)


def predict_sampling_memory(pipe: GCFGPipeline, spec: GuidanceSpec, num_images: int = 1, height: int | None = None,
                            width: int | None = None, device: str = "cuda", init_image: bool = False) -> dict:
    """Bytes one call of `pipe` (on the meta device: `shaped_pipeline`, `meta_pipeline`) holds at its
    peak for `spec`, `num_images` images (ccp-sample's sampling.batch_size) at height x width
    (None: the prior's default), on a "cuda" or "cpu" `device`.

    Returns weights (every model `pipe` holds; ccp-sample loads only the denoisers in use, so build
    `pipe` with those), rows (forward rows per denoiser and step), the activation peak of each
    phase (text: prompt encoding; encode: the init image, with `init_image`; denoise: two steps,
    so a multistep solver's history is full; decode: the VAE and post-processing), activations
    (their maximum, with what stays alive from phase to phase: conditions, latents), peak (weights
    + activations) and peak_phase."""
    spec = spec.without_zero_weights()
    scale = pipe.vae_scale_factor
    height = height or pipe.unet.config.sample_size * scale
    width = width or pipe.unet.config.sample_size * scale
    spec = _control_placeholders(spec, height, width)
    plan = GuidancePlan.from_spec(spec)
    pipe.check_guidance(spec, num_images)
    weights = weight_bytes(pipe)
    phases: dict[str, int] = {}
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(2, device="cpu")
    tracker = LiveTensorBytes(cpu_kernels=device == "cpu")
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # SDXL's fp16 VAE upcast casts with diffusers' .to, which warns
    denoisers = pipe.denoisers
    dtypes = {call.denoiser: denoisers[call.denoiser].dtype for call in plan.calls}
    try:
        with torch.no_grad(), _FusedAttention(), tracker:
            conditions = pipe.batch_conditions(plan, num_images, height, width, torch.float32)
            phases["text"] = tracker.peak
            if init_image:  # img2img: the init batch through the VAE encoder (diffusers' preprocessing: fp32)
                tracker.reset_peak()
                image = torch.empty(num_images, 3, height, width, device=META)
                latents = pipe._encode(image, None)
                del image
                phases["encode"] = tracker.peak
            else:
                latents = pipe.prepare_latents(num_images, height, width, torch.float32, None, scheduler=scheduler, device=META)
            tracker.reset_peak()
            for t in scheduler.timesteps:
                noise = guided_prediction(latents, t, denoisers, plan, conditions, scheduler.scale_model_input, dtypes)
                latents = scheduler.step(noise, t, latents, return_dict=False)[0]
            del noise
            phases["denoise"] = tracker.peak
            tracker.reset_peak()
            decoded = pipe.decode_latents(latents)
            images = pipe.image_processor.postprocess(decoded, output_type="pt", do_denormalize=[True] * len(decoded))
            # on a CPU numpy_to_pil's (x * 255).round() holds two more fp32 copies of the batch
            host = 2 * 4 * images.numel() if device == "cpu" else 0
            phases["decode"] = max(tracker.peak, tracker.current + host)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    activations = max(phases.values())
    total = sum(weights.values())
    return {
        "height": height, "width": width, "num_images": num_images, "device": device,
        "dtype": str(pipe.unet.dtype).removeprefix("torch."),
        "denoisers": plan.denoisers, "rows": plan.batch_size(num_images), "terms": len(spec.terms),
        "weights": total, "weights_by_component": weights, "phases": phases, "activations": activations,
        "peak": total + activations, "peak_phase": max(phases, key=phases.get),
    }


# ccp-sample's guidance presets with one, two and three terms besides the unconditional prediction
SAMPLING_PRESETS = ("cfg", "concept_control", "stylize")


def guidance_preset(name: str) -> tuple[GuidanceSpec, bool]:
    """ccp-sample's ``guidance=NAME`` (ccp/conf/guidance/NAME.yaml) as a spec, and whether it starts
    from an init image (translate). Control images it leaves unset stay unset: the prediction puts
    blank images of the sample's size in their place."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from ccp.config import CONF_DIR, compose

    cfg = compose("sample", [f"guidance={name}"])
    spec = GuidanceSpec.from_config(OmegaConf.to_container(cfg.guidance, resolve=True))
    # the preset's own init.image (`???`, to be set) does not survive the merge into sample.yaml's null
    return spec, "init" in OmegaConf.load(Path(CONF_DIR) / "guidance" / f"{name}.yaml")


def sampling_rows(arch: str, presets=SAMPLING_PRESETS, num_images: int = 1, resolution: int | None = None,
                  dtype: torch.dtype = torch.float32, device: str = "cuda") -> list[dict]:
    """`predict_sampling_memory` for each guidance preset on `arch` (`shaped_prior`), with the
    denoisers ccp-sample would load for it (`denoisers_in_use`, built as `kind_of` says)."""
    rows = []
    for name in presets:
        spec, init = guidance_preset(name)
        pipe = shaped_pipeline(arch, denoisers_in_use(spec), dtype)
        rows.append({"guidance": name, **predict_sampling_memory(pipe, spec, num_images, resolution, resolution,
                                                                 device, init_image=init)})
    return rows
