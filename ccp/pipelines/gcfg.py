"""Sampling with Generalized Classifier-free Guidance (Eq. 3, Algorithm 1), as a diffusers pipeline.

Reads top to bottom as the algorithm: encode the prompts once, draw the initial latents exactly
as diffusers does, then at every step evaluate each distinct denoiser once on all conditions
that use it, combine the predictions with the guidance weights, and step the scheduler.

Image to image (translation) and inpainting are the same loop started later: the schedule and
the noised init latents are diffusers' img2img ones, and with a mask the known region is blended
back after every step as diffusers' inpainting pipeline does for a non-inpainting UNet.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import TextualInversionLoaderMixin
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from ccp.config import ConfigError
from ccp.guidance import Condition, GuidanceConfigError, GuidancePlan, GuidanceSpec, combine, reference_prediction, rescale
from ccp.models.denoisers import (
    BatchedCondition,
    ConceptDenoiser,
    ControlNetDenoiser,
    Denoiser,
    LoRADenoiser,
    TextUNetDenoiser,
)

logger = logging.getLogger(__name__)
EXTRA_DENOISERS = "ccp_extra_denoisers.json"  # beside model_index.json: denoiser name -> its components


@dataclass
class GCFGPipelineOutput(BaseOutput):
    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class ImageInputError(ConfigError, ValueError):
    """An init image, mask or strength that cannot start a sample; the message says how to fix it."""


@dataclass
class InitLatents:
    """Where an image-to-image sample starts: the noised latents, and what inpainting blends back."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor | None = None  # inpainting only
    image_latents: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # [B, 1, h, w] at latent size; 1 = repaint


class GCFGPipeline(DiffusionPipeline, TextualInversionLoaderMixin):
    """Text-to-image sampling where every guidance term may come from a different denoiser.

    Registered denoisers: ``prior`` (the SD UNet), ``concept`` (a null-text concept UNet, if
    given), ``controlnet`` (the prior UNet + ControlNet, if given); more with `add_denoiser`, whose
    modules become components like the others, and `add_lora_denoiser` (the prior UNet with a LoRA
    adapter, no second UNet).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["concept_unet", "controlnet"]
    prior_families: ClassVar[tuple[str, ...]] = ("sd1", "sd2")
    # family -> the pipeline class for it: sibling classes register themselves (GCFGXLPipeline: sdxl),
    # so this module needs no import of theirs; ccp.pipelines imports them all
    _family_classes: ClassVar[dict[str, type]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for family in cls.__dict__.get("prior_families", ()):
            GCFGPipeline._family_classes[family] = cls

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        concept_unet: UNet2DConditionModel | None = None,
        controlnet: ControlNetModel | None = None,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            concept_unet=concept_unet,
            controlnet=controlnet,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.control_image_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True, do_normalize=False
        )
        # as StableDiffusionInpaintPipeline: grey, binarised at 0.5, 1 = repaint
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )
        # Denoisers beyond the built-in three: name -> (UNet component, ControlNet component or None).
        # Their modules are registered components, so .to(), offload and save_pretrained see them.
        self._extra_denoisers: dict[str, tuple[str, str | None]] = {}
        self._lora_denoisers: dict[str, str] = {}  # name -> adapter name on the prior UNet
        self._device_for_call: torch.device | None = None
        self._call_denoisers: dict[str, Denoiser] = {}  # built once per __call__, with their dtypes
        self._call_dtypes: dict[str, torch.dtype] = {}

    def pin_execution_device(self, device: torch.device | str | None) -> None:
        """Sample on `device` even while some unused components live elsewhere (None: diffusers' rule)."""
        self._pinned_device = None if device is None else torch.device(device)

    @property
    def _execution_device(self) -> torch.device:
        return getattr(self, "_pinned_device", None) or super()._execution_device

    @property
    def device_for_call(self) -> torch.device:
        # diffusers' _execution_device walks every module (~17 ms on a tiny model): once per call.
        return self._device_for_call or self._execution_device

    @classmethod
    def from_prior(
        cls,
        prior: StableDiffusionPipeline,
        concept_unet: UNet2DConditionModel | None = None,
        controlnet: ControlNetModel | None = None,
        scheduler: Any = "dpmsolver++",
    ) -> "GCFGPipeline":
        """Wrap a loaded SD pipeline. `scheduler`: "dpmsolver++" (the paper's DPM-Solver++, default),
        "prior" (keep the prior's own), or a diffusers scheduler instance.

        An SDXL prior gives a `GCFGXLPipeline` (the same guidance, with SDXL's two text encoders
        and added conditioning)."""
        from ccp.priors.families import family_of

        family = family_of(prior)
        if family not in cls.prior_families:
            other = cls._family_classes.get(family)
            if cls is GCFGPipeline and other is not None:
                return other.from_prior(prior, concept_unet, controlnet, scheduler)
            raise ConfigError(
                f"{cls.__name__} does not take a {family} prior ({type(prior).__name__}); "
                f"{other.__name__ if other else 'GCFGPipeline'}.from_prior does"
            )
        if scheduler == "dpmsolver++":
            scheduler = DPMSolverMultistepScheduler.from_config(prior.scheduler.config)
        elif scheduler == "prior":
            scheduler = prior.scheduler
        pipe = cls(**cls._prior_components(prior), scheduler=scheduler, concept_unet=concept_unet, controlnet=controlnet)
        # Only the new models join the prior's device: the prior's own parts stay where they are
        # (during training its VAE is on the GPU and its UNet on the CPU until a sample needs it).
        for model in (concept_unet, controlnet):
            if model is not None:
                model.to(prior.device)
        return pipe

    @classmethod
    def _prior_components(cls, prior) -> dict[str, Any]:
        """What this pipeline takes from the prior, besides the scheduler."""
        return dict(vae=prior.vae, text_encoder=prior.text_encoder, tokenizer=prior.tokenizer, unet=prior.unet)

    # --- denoisers ---------------------------------------------------------------------------
    @property
    def denoisers(self) -> dict[str, Denoiser]:
        found: dict[str, Denoiser] = {"prior": TextUNetDenoiser(self.unet)}
        if self.concept_unet is not None:
            found["concept"] = ConceptDenoiser(self.concept_unet)
        if self.controlnet is not None:
            found["controlnet"] = ControlNetDenoiser(self.unet, self.controlnet)
        for name, (unet, controlnet) in self._extra_denoisers.items():
            found[name] = (ControlNetDenoiser(getattr(self, unet), getattr(self, controlnet)) if controlnet
                           else TextUNetDenoiser(getattr(self, unet)))
        for name, adapter in self._lora_denoisers.items():
            found[name] = LoRADenoiser(self.unet, adapter)
        return found

    def add_denoiser(
        self, name: str, unet: UNet2DConditionModel, controlnet: ControlNetModel | MultiControlNetModel | None = None
    ) -> None:
        """Register another denoiser: any SD-family UNet checkpoint (it shares the prior's text
        encoder, as SD v1.x fine-tunes do), optionally steered by a ControlNet, or by several in a
        diffusers `MultiControlNetModel` (a term then gives one control image and scale per
        ControlNet). New modules become pipeline components, so `.to()`, CPU offload and
        `save_pretrained` treat them like the prior's."""
        if not isinstance(unet, UNet2DConditionModel):
            raise TypeError(f"add_denoiser({name!r}): expected a UNet2DConditionModel, got {type(unet).__name__}")
        if controlnet is not None and not isinstance(controlnet, (ControlNetModel, MultiControlNetModel)):
            raise TypeError(f"add_denoiser({name!r}): expected a ControlNetModel or MultiControlNetModel, "
                            f"got {type(controlnet).__name__}")
        if name in self._extra_denoisers:
            unet_key, controlnet_key = self._extra_denoisers[name]
            if getattr(self, unet_key) is unet and (controlnet_key and getattr(self, controlnet_key)) is controlnet:
                return  # the same models again
        if name in self.denoisers:
            raise ValueError(f"a denoiser named {name!r} is already registered; pick another name")
        unet_component = self._register_component(unet, name)
        controlnet_name = name if "controlnet" in name else f"{name}_controlnet"
        controlnet_component = None if controlnet is None else self._register_component(controlnet, controlnet_name)
        self._extra_denoisers[name] = (unet_component, controlnet_component)

    def add_lora_denoiser(self, name: str, lora: Any, weight_name: str | None = None) -> None:
        """Register denoiser `name`: the prior UNet with the LoRA `lora` (a file, a folder with
        diffusers' ``pytorch_lora_weights.safetensors``, or a state dict; diffusers, peft and kohya
        formats, read by diffusers' ``lora_state_dict``).

        The adapter is attached to the prior UNet itself and is on only during this denoiser's
        call, so the added memory is the adapter's weights alone. Shapes are checked first: a LoRA
        for another architecture raises `LoRAShapeError` and leaves the UNet untouched."""
        from ccp.priors.lora import check_lora_fits, read_lora

        if name in self.denoisers:
            raise ValueError(f"a denoiser named {name!r} is already registered; pick another name")
        state_dict, alphas, metadata = read_lora(lora, weight_name=weight_name)
        check_lora_fits(state_dict, self.unet, where=f"LoRA denoiser {name!r}")
        self.unet.load_lora_adapter(state_dict, network_alphas=alphas, adapter_name=name, prefix="unet",
                                    metadata=metadata)
        self.unet.disable_adapters()  # the prior's own calls see the base weights only
        self._lora_denoisers[name] = name

    def _register_component(self, module: torch.nn.Module, wanted: str) -> str:
        """The component name of `module`: its existing one, or a new identifier made from `wanted`."""
        for key, value in self.components.items():
            if value is module:
                return key
        base = re.sub(r"\W", "_", wanted)
        key, n = base, 1
        while hasattr(self, key):
            n += 1
            key = f"{base}_{n}"
        self.register_modules(**{key: module})
        return key

    @classmethod
    def _get_signature_keys(cls, obj):
        # diffusers derives a pipeline's components from __init__; add the registered extra denoisers'.
        expected, optional = super()._get_signature_keys(obj)
        table = getattr(obj, "_extra_denoisers", None) if not isinstance(obj, type) else None
        extra = {key for pair in (table or {}).values() for key in pair if key}
        return sorted(set(expected) | extra), optional

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """diffusers' layout, plus `EXTRA_DENOISERS` naming each extra denoiser's components."""
        if self._lora_denoisers:
            raise ConfigError(
                f"cannot save a pipeline whose prior UNet carries LoRA adapters ({sorted(self._lora_denoisers)}): "
                "keep the LoRA files and add them again with add_lora_denoiser after loading"
            )
        super().save_pretrained(save_directory, **kwargs)
        if self._extra_denoisers:
            table = {name: {"unet": unet, "controlnet": cn} for name, (unet, cn) in self._extra_denoisers.items()}
            (Path(save_directory) / EXTRA_DENOISERS).write_text(json.dumps(table, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "GCFGPipeline":
        """diffusers' loading, plus the extra denoisers a local folder's `EXTRA_DENOISERS` names."""
        folder = Path(pretrained_model_name_or_path)
        index_file = folder / "model_index.json"
        if cls is GCFGPipeline and index_file.is_file():
            saved_as = json.loads(index_file.read_text()).get("_class_name")
            for other in set(cls._family_classes.values()):
                if other.__name__ == saved_as:
                    return other.from_pretrained(pretrained_model_name_or_path, **kwargs)
        if not (folder / EXTRA_DENOISERS).is_file():
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        index = json.loads((folder / "model_index.json").read_text())
        extra = set(index) - set(inspect.signature(cls.__init__).parameters) - {"_class_name", "_diffusers_version"}
        with _dropping_warnings_about(extra):  # diffusers warns that it ignores them; loaded below
            pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        dtype = kwargs.get("torch_dtype")
        for name, parts in json.loads((folder / EXTRA_DENOISERS).read_text()).items():
            modules = []
            for key in (parts["unet"], parts["controlnet"]):
                if key is None or hasattr(pipe, key):
                    modules.append(getattr(pipe, key) if key else None)
                    continue
                library, class_name = index[key]
                model_cls = getattr(importlib.import_module(library), class_name)
                modules.append(model_cls.from_pretrained(folder / key, torch_dtype=dtype).to(pipe.device))
            pipe.add_denoiser(name, modules[0], controlnet=modules[1])
        return pipe

    # --- checks, all before any denoising --------------------------------------------------------
    def check_guidance(self, spec: GuidanceSpec, num_images: int = 1) -> None:
        spec = spec.without_zero_weights()  # a weight-0 term's denoiser is never run (it may not be loaded)
        denoisers = self.denoisers
        check_guidance_against(spec, {name: d.kind for name, d in denoisers.items()})
        controlnets = {name: d.num_controlnets for name, d in denoisers.items() if isinstance(d, ControlNetDenoiser)}
        check_control_inputs(spec, controlnets, num_images)

    # --- conditions --------------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """[1, 77, D] text embedding, computed exactly as diffusers' StableDiffusionPipeline does."""
        prompt = self.maybe_convert_prompt(prompt, self.tokenizer)  # multi-vector textual inversion
        tokens = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        untruncated = self.tokenizer(prompt, padding="longest", return_tensors="pt").input_ids
        if untruncated.shape[-1] > tokens.input_ids.shape[-1]:
            removed = self.tokenizer.batch_decode(untruncated[:, self.tokenizer.model_max_length - 1 : -1])
            logger.warning(
                "prompt longer than %d tokens was truncated as CLIP does; dropped: %r",
                self.tokenizer.model_max_length,
                removed[0],
            )
        device = self.device_for_call
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(device)
        embeds = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        return embeds.to(dtype=self.text_encoder.dtype, device=device)

    def encode_text(self, prompt: str) -> dict[str, torch.Tensor]:
        """The `BatchedCondition` fields of one prompt on a text denoiser, each with batch 1."""
        return {"prompt_embeds": self.encode_prompt(prompt)}

    def image_conditions(self, height: int, width: int) -> dict[str, torch.Tensor]:
        """Fields every condition carries whatever its text, each with batch 1 (none on SD v1.x/2.x)."""
        return {}

    def prepare_control_image(
        self, image: Any, height: int, width: int, dtype: torch.dtype, num_images: int = 1
    ) -> torch.Tensor:
        """[num_images, 3, H, W] in [0, 1], preprocessed as StableDiffusionControlNetPipeline does:
        one image for every output, or a list of one per output."""
        images = [open_image(im, "control image") for im in image] if isinstance(image, list) else open_image(image, "control image")
        image = self.control_image_processor.preprocess(images, height=height, width=width).to(dtype=torch.float32)
        if image.shape[0] == 1:
            image = image.repeat_interleave(num_images, dim=0)
        return image.to(device=self.device_for_call, dtype=dtype)

    def batch_conditions(
        self, plan: GuidancePlan, num_images: int, height: int, width: int, dtype: torch.dtype
    ) -> dict[str, BatchedCondition]:
        """Per denoiser, the conditions of its call stacked in call order, each repeated per image
        (control images in `dtype`; `predict_noise` casts each call's tensors to its denoiser's dtype)."""
        prompt_cache: dict[str, dict[str, torch.Tensor]] = {}
        shared = self.image_conditions(height, width)
        batched = {}
        for call in plan.calls:
            denoiser = self.denoisers[call.denoiser]
            fields: dict[str, list[torch.Tensor]] = {}
            images, scales = [], []
            for condition in call.conditions:
                tensors = dict(shared)
                if denoiser.takes_prompt:
                    prompt = condition.prompt or ""
                    if prompt not in prompt_cache:
                        prompt_cache[prompt] = self.encode_text(prompt)
                    tensors.update(prompt_cache[prompt])
                for key, value in tensors.items():
                    fields.setdefault(key, []).append(value.repeat(num_images, *[1] * (value.ndim - 1)))
                if denoiser.takes_control_image:
                    several = denoiser.num_controlnets > 1
                    per_net = condition.control_image if several else [condition.control_image]
                    net_scales = _control_scales(condition.control_scale, denoiser.num_controlnets)
                    images.append([self.prepare_control_image(im, height, width, dtype, num_images) for im in per_net])
                    scales.append(net_scales)
            control = None
            if images:  # per ControlNet: its images and strengths over the call's conditions
                control = []
                for j in range(len(images[0])):
                    net_scales = [s[j] for s in scales]
                    control.append((
                        torch.cat([im[j] for im in images]),
                        torch.tensor(net_scales).repeat_interleave(num_images).to(self.device_for_call),
                        net_scales[0] if len(set(net_scales)) == 1 else None,
                    ))
                several = len(control) > 1
                pack = (lambda k: tuple(c[k] for c in control)) if several else (lambda k: control[0][k])
            batched[call.denoiser] = BatchedCondition(
                **{key: torch.cat(values) for key, values in fields.items()},
                control_image=pack(0) if control else None,
                control_scale=pack(1) if control else None,
                uniform_control_scale=pack(2) if control else None,
            )
        return batched

    def prepare_latents(self, num_images, height, width, dtype, generator, latents=None) -> torch.Tensor:
        """Initial noise drawn exactly as diffusers' SD pipelines draw it for the same generator."""
        shape = (num_images, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device_for_call, dtype=dtype)
        else:
            latents = latents.to(device=self.device_for_call, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def preprocess_init(self, image: Any, mask_image: Any, height: int | None, width: int | None):
        """(image in [-1, 1], mask in {0, 1} or None, height, width), preprocessed as diffusers'
        img2img and inpainting pipelines do. Without height/width the first image's size (rounded
        down to a multiple of 8) is used, as img2img does."""
        images = [open_image(im, "init image") for im in _as_list(image)]
        height, width = self.image_processor.get_default_height_width(images[0], height, width)
        init = self.image_processor.preprocess(images, height=height, width=width).to(dtype=torch.float32)
        mask = None
        if mask_image is not None:
            masks = [open_image(m, "mask image") for m in _as_list(mask_image)]
            mask = self.mask_processor.preprocess(masks, height=height, width=width)
        return init, mask, height, width

    def prepare_init_latents(
        self, init: torch.Tensor, mask: torch.Tensor | None, strength: float, timesteps: torch.Tensor,
        num_images: int, dtype: torch.dtype, generator,
    ) -> InitLatents:
        """The noised init latents exactly as diffusers' img2img (no mask) or inpainting pipeline
        (mask) draws them: the VAE's sample with the same generators, then the noise."""
        device = self.device_for_call
        init = init.to(device=device, dtype=self.vae.dtype)
        timestep = timesteps[:1].repeat(num_images)
        per_image = isinstance(generator, list)
        if per_image and len(generator) != num_images:
            raise ValueError(f"{len(generator)} generators for {num_images} images; pass one per image")
        if mask is None and per_image and init.shape[0] == 1:
            init = init.repeat(num_images, 1, 1, 1)  # img2img encodes one copy per generator
        if per_image:
            latents = torch.cat([self._encode(init[i : i + 1], generator[i]) for i in range(init.shape[0])])
        else:
            latents = self._encode(init, generator)
        image_latents = latents.repeat(num_images // latents.shape[0], 1, 1, 1)
        shape = (num_images, *image_latents.shape[1:])
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if mask is None:
            return InitLatents(self.scheduler.add_noise(image_latents, noise, timestep), timesteps)
        if strength == 1.0:  # inpainting at full strength starts from pure noise
            latents = noise * self.scheduler.init_noise_sigma
        else:
            latents = self.scheduler.add_noise(image_latents, noise, timestep)
        size = (image_latents.shape[-2], image_latents.shape[-1])
        mask = torch.nn.functional.interpolate(mask, size=size).to(device=device, dtype=dtype)
        return InitLatents(latents, timesteps, noise, image_latents, mask.repeat(num_images // mask.shape[0], 1, 1, 1))

    def _encode(self, image: torch.Tensor, generator) -> torch.Tensor:
        latents = retrieve_latents(self.vae.encode(image), generator=generator).float()
        # the inverse of decoding's latents / scaling_factor + shift_factor
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return self.vae.config.scaling_factor * (latents - shift)

    def blend_known_region(self, latents: torch.Tensor, init: InitLatents, i: int) -> torch.Tensor:
        """Inpainting with a non-inpainting UNet: outside the mask, the init latents noised to the
        next timestep (diffusers' StableDiffusionInpaintPipeline, 4-channel case)."""
        known = init.image_latents
        if i < len(init.timesteps) - 1:
            known = self.scheduler.add_noise(known, init.noise, torch.tensor([init.timesteps[i + 1]]))
        return (1 - init.mask) * known + init.mask * latents

    # --- sampling --------------------------------------------------------------------------------
    def predict_noise(
        self, plan: GuidancePlan, latents: torch.Tensor, t: torch.Tensor, conditions: dict[str, BatchedCondition]
    ) -> torch.Tensor:
        """One GCFG step: one batched forward per distinct denoiser, then Eq. 3.

        Denoisers may differ in dtype (a bf16 prior beside an fp32 concept UNet): each gets its
        inputs in its own dtype, and the predictions are combined in fp32."""
        denoisers = self._call_denoisers or self.denoisers
        outputs = {}
        for call in plan.calls:
            denoiser = denoisers[call.denoiser]
            dtype = self._call_dtypes.get(call.denoiser) or denoiser.dtype
            model_input = torch.cat([latents] * len(call.conditions))
            model_input = self.scheduler.scale_model_input(model_input, t).to(dtype)
            prediction = denoiser(model_input, t, conditions[call.denoiser].to(dtype))
            outputs[call.denoiser] = prediction.float()
        uncond, predictions = plan.split(outputs)
        spec = plan.spec
        guided = combine(uncond, predictions, spec.weights)
        if spec.rescale > 0 and predictions:
            guided = rescale(guided, reference_prediction(uncond, predictions, spec.weights), spec.rescale)
        return guided

    @torch.no_grad()
    def __call__(
        self,
        guidance: GuidanceSpec,
        num_images: int = 1,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
        image: Any = None,
        strength: float = 1.0,
        mask_image: Any = None,
    ):
        """Text to image, or, with `image` (one, or a list of one per output), image to image from
        `strength` in (0, 1] as diffusers' img2img; with `mask_image` too, inpainting (white =
        repaint) as diffusers' inpainting pipeline with a non-inpainting UNet."""
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        check_init_inputs(image, mask_image, strength, num_images, num_inference_steps, latents)
        guidance = guidance.without_zero_weights()
        self.check_guidance(guidance, num_images)
        init = None
        if image is not None:  # read and size the init images before any model runs
            init = self.preprocess_init(image, mask_image, height, width)
            height, width = init[2], init[3]
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"height and width must be multiples of {self.vae_scale_factor}, got {height}x{width}")
        plan = GuidancePlan.from_spec(guidance)
        self._device_for_call = self._execution_device
        self._call_denoisers = self.denoisers
        self._call_dtypes = {name: d.dtype for name, d in self._call_denoisers.items()}
        try:
            # Latents, the scheduler and Eq. 3 run in fp32 whatever the denoisers' dtypes.
            return self._sample(plan, num_images, height, width, num_inference_steps, generator, latents, eta,
                                output_type, return_dict, callback_on_step_end, torch.float32, init, strength)
        finally:
            self._device_for_call = None
            self._call_denoisers, self._call_dtypes = {}, {}

    # diffusers' img2img schedule: the last `strength` of the steps, begin index set on the scheduler
    get_timesteps = StableDiffusionImg2ImgPipeline.get_timesteps

    def _sample(self, plan, num_images, height, width, num_inference_steps, generator, latents, eta, output_type,
                return_dict, callback_on_step_end, dtype, init=None, strength=1.0):

        conditions = self.batch_conditions(plan, num_images, height, width, dtype)
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, self.device_for_call)
        start = None
        if init is None:
            latents = self.prepare_latents(num_images, height, width, dtype, generator, latents)
        else:
            timesteps, num_inference_steps = self.get_timesteps(num_inference_steps, strength, self.device_for_call)
            start = self.prepare_init_latents(init[0], init[1], strength, timesteps, num_images, dtype, generator)
            latents = start.latents
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                noise_pred = self.predict_noise(plan, latents, t, conditions)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if start is not None and start.mask is not None:
                    latents = self.blend_known_region(latents, start, i)
                if callback_on_step_end is not None:
                    callback_on_step_end(i, t, latents)
                progress.update()

        if output_type == "latent":
            images = latents
        else:
            decoded = self.decode_latents(latents, generator)
            images = self.image_processor.postprocess(decoded, output_type=output_type, do_denormalize=[True] * len(decoded))
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return GCFGPipelineOutput(images=images)

    def decode_latents(self, latents: torch.Tensor, generator=None) -> torch.Tensor:
        """Images in [-1, 1] (fp32) from final latents, as diffusers' SD pipelines decode them."""
        # the inverse of training's (latents - shift_factor) * scaling_factor
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = (latents / self.vae.config.scaling_factor + shift).to(self.vae.dtype)
        return self.vae.decode(latents, return_dict=False, generator=generator)[0].float()

    # Same as diffusers' StableDiffusionPipeline: pass eta/generator only to schedulers that take them.
    prepare_extra_step_kwargs = StableDiffusionPipeline.prepare_extra_step_kwargs


@contextlib.contextmanager
def _dropping_warnings_about(keys: set[str]):
    """Silence diffusers' "not expected and will be ignored" warnings that name any of `keys`."""

    def keep(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("not expected" in message and any(repr(k) in message for k in keys))

    loggers = [logging.getLogger(n) for n in ("diffusers.configuration_utils", "diffusers.pipelines.pipeline_utils")]
    for lg in loggers:
        lg.addFilter(keep)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(keep)


def check_guidance_against(spec: GuidanceSpec, denoiser_kinds: dict[str, str]) -> None:
    """Validate a spec against the configured denoisers (name -> kind: unet, controlnet, concept).

    Cheap and model-free, so a CLI can call it before loading any weights.
    """
    takes_prompt = {"unet", "controlnet"}
    for where, source in [("guidance.unconditional", spec.unconditional)] + [
        (f"guidance.terms.{t.name}", t.source) for t in spec.terms
    ]:
        if where == "guidance.unconditional" and not spec.needs_unconditional:
            continue
        kind = denoiser_kinds.get(source.denoiser)
        if kind is None:
            raise GuidanceConfigError(
                f"{where} uses denoiser {source.denoiser!r}, which is not configured; configured: "
                f"{sorted(denoiser_kinds)}. Configure it (e.g. concept.path=... for 'concept', "
                f"controlnet.path=... for 'controlnet') or point {where}.denoiser at one of those."
            )
        condition: Condition = source.condition
        if kind == "concept" and condition.prompt:
            raise GuidanceConfigError(
                f"{where}: the null-text concept model takes no prompt (got {condition.prompt!r}); "
                "put the prompt in its own term on the prior (control guidance)."
            )
        if kind not in takes_prompt and condition.control_image is not None:
            raise GuidanceConfigError(f"{where}: denoiser {source.denoiser!r} ({kind}) takes no control image")
        if kind == "controlnet":
            image = condition.control_image
            if image is None:
                raise GuidanceConfigError(
                    f"{where} uses the ControlNet denoiser {source.denoiser!r} but has no control image; "
                    f"set {where}.control_image=path/to/image.png"
                )
            for file in _paths_in(image):
                if not Path(file).expanduser().is_file():
                    raise GuidanceConfigError(f"{where}.control_image: file {file} does not exist")
    for term in spec.terms:
        if not math.isfinite(term.weight):
            raise GuidanceConfigError(f"guidance.terms.{term.name}.weight must be finite, got {term.weight}")


def _paths_in(value: Any) -> list:
    if isinstance(value, (str, Path)):
        return [value]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _paths_in(v)]
    return []


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def open_image(image: Any, what: str) -> Any:
    """A PIL image, array or tensor as given; a path opened, with an error that names it."""
    if not isinstance(image, (str, Path)):
        return image
    path = Path(image).expanduser()
    if not path.is_file():
        raise ImageInputError(f"{what} {image} does not exist; pass an existing image file")
    try:
        with PIL.Image.open(path) as opened:
            return opened.convert("RGB")
    except OSError as err:
        raise ImageInputError(f"{what} {image} cannot be read as an image ({err}); pass a PNG or JPEG file") from None


def _image_count(value: Any) -> int:
    if isinstance(value, (list, tuple)):
        return len(value)
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 4:
        return value.shape[0]
    return 1


def check_init_inputs(image: Any, mask_image: Any, strength: Any, num_images: int, steps: int, latents: Any = None) -> None:
    """Image-to-image inputs that cannot start a sample, found before any model runs."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise ImageInputError(f"strength must be a number in (0, 1], got {strength!r}")
    if image is None:
        if mask_image is not None:
            raise ImageInputError("a mask image needs an init image to inpaint: pass image=... with mask_image")
        if strength != 1.0:
            raise ImageInputError(f"strength={strength} needs an init image (image=...); text to image runs all steps")
        return
    if latents is not None:
        raise ImageInputError("pass either latents or an init image, not both: the init image defines the start latents")
    if not 0.0 < strength <= 1.0:
        raise ImageInputError(
            f"strength must be in (0, 1], got {strength}: the share of the schedule run from the init image "
            "(1 = from pure noise, small = close to the image)"
        )
    if int(steps * strength) < 1:
        raise ImageInputError(
            f"strength {strength} of {steps} steps leaves no denoising step; raise strength to at least "
            f"{1 / steps:.3g} or the number of steps"
        )
    for what, value in (("init image", image), ("mask image", mask_image)):
        count = _image_count(value) if value is not None else 1
        if count not in (1, num_images):
            raise ImageInputError(
                f"{count} {what}s for {num_images} output images; give one for all outputs or one per output"
            )


def _control_scales(scale: Any, count: int) -> list[float]:
    scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * count
    return [float(s) for s in scales]


def check_control_inputs(spec: GuidanceSpec, controlnets: dict[str, int], num_images: int) -> None:
    """Every ControlNet term's images and strengths against its ControlNets and the batch.

    `controlnets`: denoiser name -> its number of ControlNets. A term on one ControlNet takes one
    image or a list of one per output; on several, a tuple of one entry per ControlNet (each one
    image or a list per output) and one strength or one per ControlNet."""
    for where, source in [("guidance.unconditional", spec.unconditional)] + [
        (f"guidance.terms.{t.name}", t.source) for t in spec.terms
    ]:
        if where == "guidance.unconditional" and not spec.needs_unconditional:
            continue
        count = controlnets.get(source.denoiser)
        if count is None:
            continue
        image, scale = source.condition.control_image, source.condition.control_scale
        per_net = [image]
        if count > 1:
            if not isinstance(image, tuple) or len(image) != count:
                given = f"{len(image)} control image entries" if isinstance(image, tuple) else f"a {type(image).__name__}"
                raise GuidanceConfigError(
                    f"{where}: denoiser {source.denoiser!r} has {count} ControlNets but got {given}; give a tuple "
                    f"of {count} control images, one per ControlNet in order (a list means one image per output)"
                )
            per_net = list(image)
        if isinstance(scale, (list, tuple)) and len(scale) != count:
            raise GuidanceConfigError(
                f"{where}.control_scale: {len(scale)} strengths for {count} ControlNet(s); give one number or {count}"
            )
        for entry in per_net:
            n = len(entry) if isinstance(entry, list) else 1
            if n not in (1, num_images):
                raise GuidanceConfigError(
                    f"{where}.control_image: a list of {n} images for {num_images} output images; give one "
                    f"image for all outputs or a list of exactly {num_images}, one per output"
                )
