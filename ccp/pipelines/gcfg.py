"""Sampling with Generalized Classifier-free Guidance (Eq. 3, Algorithm 1), as a diffusers pipeline.

`__call__` reads top to bottom as the algorithm, in diffusers' numbered steps: check the inputs,
encode the prompts once, set the timesteps, draw the initial latents exactly as diffusers does,
then at every step evaluate each distinct denoiser once on all conditions that use it, combine
the predictions with the guidance weights (`guided_prediction`, a function of its inputs alone),
step the scheduler, and decode. A call keeps its state in its locals, its scheduler included, so
calls on one pipeline may interleave.

Image to image (translation) and inpainting are the same loop started later: the schedule and
the noised init latents are diffusers' img2img ones, and with a mask the known region is blended
back after every step as diffusers' inpainting pipeline does for a non-inpainting UNet.
"""

from __future__ import annotations

import copy
import logging
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
from ccp.guidance import GuidancePlan, GuidanceSpec
from ccp.models.denoisers import (
    BatchedCondition,
    ConceptDenoiser,
    ControlNetDenoiser,
    Denoiser,
    LoRADenoiser,
    TextUNetDenoiser,
)
from ccp.pipelines.extra_denoisers import (
    load_extra_denoiser_modules,
    quiet_about_extra_components,
    read_extra_denoisers,
    saved_class_name,
    write_extra_denoisers,
)
from ccp.pipelines.prediction import guided_prediction
from ccp.pipelines.validation import check_control_inputs, check_guidance_against, check_init_inputs, open_image

logger = logging.getLogger(__name__)


@dataclass
class GCFGPipelineOutput(BaseOutput):
    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


@dataclass
class InitImages:
    """An image-to-image call's init images, preprocessed, and the sample size they set."""

    image: torch.Tensor  # [N, 3, H, W] in [-1, 1]
    mask: torch.Tensor | None  # [N, 1, H, W] in {0, 1}, 1 = repaint; None: no inpainting
    height: int
    width: int


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

    def pin_execution_device(self, device: torch.device | str | None) -> None:
        """Sample on `device` even while some unused components live elsewhere (None: diffusers' rule)."""
        self._pinned_device = None if device is None else torch.device(device)

    @property
    def _execution_device(self) -> torch.device:
        return getattr(self, "_pinned_device", None) or super()._execution_device

    @property
    def device_for_call(self) -> torch.device:
        """The device a call samples on (diffusers' `_execution_device`, or the pinned one)."""
        return self._execution_device

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
        write_extra_denoisers(save_directory, self._extra_denoisers)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "GCFGPipeline":
        """diffusers' loading, plus the extra denoisers a local folder's `EXTRA_DENOISERS` names."""
        folder = Path(pretrained_model_name_or_path)
        if cls is GCFGPipeline:
            saved_as = saved_class_name(folder)
            for other in set(cls._family_classes.values()):
                if other.__name__ == saved_as:
                    return other.from_pretrained(pretrained_model_name_or_path, **kwargs)
        table = read_extra_denoisers(folder)
        if not table:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        with quiet_about_extra_components(folder, cls):
            pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        for name, (unet, controlnet) in load_extra_denoiser_modules(pipe, folder, table, kwargs.get("torch_dtype")).items():
            pipe.add_denoiser(name, unet, controlnet=controlnet)
        return pipe

    # --- checks, all before any denoising --------------------------------------------------------
    def check_guidance(self, spec: GuidanceSpec, num_images: int = 1) -> None:
        spec = spec.without_zero_weights()  # a weight-0 term's denoiser is never run (it may not be loaded)
        denoisers = self.denoisers
        check_guidance_against(spec, {name: d.kind for name, d in denoisers.items()})
        controlnets = {name: d.num_controlnets for name, d in denoisers.items() if isinstance(d, ControlNetDenoiser)}
        check_control_inputs(spec, controlnets, num_images)

    # --- conditions --------------------------------------------------------------------------
    def encode_prompt(self, prompt: str, device: torch.device | None = None) -> torch.Tensor:
        """[1, 77, D] text embedding, computed exactly as diffusers' StableDiffusionPipeline does
        (on `device`; None: the pipeline's execution device)."""
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
        device = self._execution_device if device is None else device
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(device)
        embeds = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        return embeds.to(dtype=self.text_encoder.dtype, device=device)

    def encode_text(self, prompt: str, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """The `BatchedCondition` fields of one prompt on a text denoiser, each with batch 1."""
        return {"prompt_embeds": self.encode_prompt(prompt, device)}

    def image_conditions(self, height: int, width: int, device: torch.device | None = None, **conditioning) -> dict[str, torch.Tensor]:
        """Fields every condition carries whatever its text, each with batch 1 (none on SD v1.x/2.x).
        `conditioning`: a family's own keyword arguments of `__call__` (SDXL's size conditioning)."""
        if conditioning:
            raise TypeError(f"{type(self).__name__} takes no {', '.join(sorted(conditioning))} (SDXL priors' "
                            "GCFGXLPipeline takes original_size, crops_coords_top_left and target_size)")
        return {}

    def prepare_control_image(
        self, image: Any, height: int, width: int, dtype: torch.dtype, num_images: int = 1,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """[num_images, 3, H, W] in [0, 1], preprocessed as StableDiffusionControlNetPipeline does:
        one image for every output, or a list of one per output."""
        images = [open_image(im, "control image") for im in image] if isinstance(image, list) else open_image(image, "control image")
        image = self.control_image_processor.preprocess(images, height=height, width=width).to(dtype=torch.float32)
        if image.shape[0] == 1:
            image = image.repeat_interleave(num_images, dim=0)
        return image.to(device=self._execution_device if device is None else device, dtype=dtype)

    def batch_conditions(
        self, plan: GuidancePlan, num_images: int, height: int, width: int, dtype: torch.dtype, **conditioning
    ) -> dict[str, BatchedCondition]:
        """Per denoiser, the conditions of its call stacked in call order, each repeated per image
        (control images in `dtype`; each step casts a call's tensors to its denoiser's dtype).
        `conditioning`: as `image_conditions` takes it."""
        device = self._execution_device
        denoisers = self.denoisers
        prompt_cache: dict[str, dict[str, torch.Tensor]] = {}
        shared = self.image_conditions(height, width, device, **conditioning)
        batched = {}
        for call in plan.calls:
            denoiser = denoisers[call.denoiser]
            fields: dict[str, list[torch.Tensor]] = {}
            images, scales = [], []
            for condition in call.conditions:
                tensors = dict(shared)
                if denoiser.takes_prompt:
                    prompt = condition.prompt or ""
                    if prompt not in prompt_cache:
                        prompt_cache[prompt] = self.encode_text(prompt, device)
                    tensors.update(prompt_cache[prompt])
                for key, value in tensors.items():
                    fields.setdefault(key, []).append(value.repeat(num_images, *[1] * (value.ndim - 1)))
                if denoiser.takes_control_image:
                    several = denoiser.num_controlnets > 1
                    per_net = condition.control_image if several else [condition.control_image]
                    net_scales = _control_scales(condition.control_scale, denoiser.num_controlnets)
                    images.append([self.prepare_control_image(im, height, width, dtype, num_images, device) for im in per_net])
                    scales.append(net_scales)
            control = None
            if images:  # per ControlNet: its images and strengths over the call's conditions
                control = []
                for j in range(len(images[0])):
                    net_scales = [s[j] for s in scales]
                    control.append((
                        torch.cat([im[j] for im in images]),
                        torch.tensor(net_scales).repeat_interleave(num_images).to(device),
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

    # --- timesteps and latents -------------------------------------------------------------------
    def scheduler_for_call(self, num_inference_steps: int, device: torch.device) -> Any:
        """A scheduler set to `num_inference_steps` steps for one call alone: a multistep solver
        keeps a history of its steps, which interleaved calls must not share. The pipeline's own
        scheduler is set to the same steps (what it shows after a call, as in diffusers) and copied."""
        retrieve_timesteps(self.scheduler, num_inference_steps, device)
        return copy.deepcopy(self.scheduler)

    def prepare_latents(
        self, num_images, height, width, dtype, generator, latents=None, scheduler: Any = None,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """Initial noise drawn exactly as diffusers' SD pipelines draw it for the same generator,
        scaled by `scheduler`'s (None: the pipeline's) initial sigma."""
        scheduler = self.scheduler if scheduler is None else scheduler
        device = self._execution_device if device is None else device
        shape = (num_images, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * scheduler.init_noise_sigma

    def preprocess_init(self, image: Any, mask_image: Any, height: int | None, width: int | None) -> InitImages:
        """The init images (and mask), preprocessed as diffusers' img2img and inpainting pipelines
        do. Without height/width the first image's size (rounded down to a multiple of 8) is used,
        as img2img does."""
        images = [open_image(im, "init image") for im in _as_list(image)]
        height, width = self.image_processor.get_default_height_width(images[0], height, width)
        init = self.image_processor.preprocess(images, height=height, width=width).to(dtype=torch.float32)
        mask = None
        if mask_image is not None:
            masks = [open_image(m, "mask image") for m in _as_list(mask_image)]
            mask = self.mask_processor.preprocess(masks, height=height, width=width)
        return InitImages(init, mask, height, width)

    def prepare_init_latents(
        self, init: InitImages, strength: float, timesteps: torch.Tensor, num_images: int, dtype: torch.dtype,
        generator, scheduler: Any, device: torch.device,
    ) -> InitLatents:
        """The noised init latents exactly as diffusers' img2img (no mask) or inpainting pipeline
        (mask) draws them: the VAE's sample with the same generators, then the noise."""
        image, mask = init.image.to(device=device, dtype=self.vae.dtype), init.mask
        timestep = timesteps[:1].repeat(num_images)
        per_image = isinstance(generator, list)
        if per_image and len(generator) != num_images:
            raise ValueError(f"{len(generator)} generators for {num_images} images; pass one per image")
        if mask is None and per_image and image.shape[0] == 1:
            image = image.repeat(num_images, 1, 1, 1)  # img2img encodes one copy per generator
        if per_image:
            latents = torch.cat([self._encode(image[i : i + 1], generator[i]) for i in range(image.shape[0])])
        else:
            latents = self._encode(image, generator)
        image_latents = latents.repeat(num_images // latents.shape[0], 1, 1, 1)
        shape = (num_images, *image_latents.shape[1:])
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if mask is None:
            return InitLatents(scheduler.add_noise(image_latents, noise, timestep), timesteps)
        if strength == 1.0:  # inpainting at full strength starts from pure noise
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(image_latents, noise, timestep)
        size = (image_latents.shape[-2], image_latents.shape[-1])
        mask = torch.nn.functional.interpolate(mask, size=size).to(device=device, dtype=dtype)
        return InitLatents(latents, timesteps, noise, image_latents, mask.repeat(num_images // mask.shape[0], 1, 1, 1))

    def _encode(self, image: torch.Tensor, generator) -> torch.Tensor:
        latents = retrieve_latents(self.vae.encode(image), generator=generator).float()
        # the inverse of decoding's latents / scaling_factor + shift_factor
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return self.vae.config.scaling_factor * (latents - shift)

    @staticmethod
    def blend_known_region(latents: torch.Tensor, init: InitLatents, i: int, scheduler: Any) -> torch.Tensor:
        """Inpainting with a non-inpainting UNet: outside the mask, the init latents noised to the
        next timestep (diffusers' StableDiffusionInpaintPipeline, 4-channel case)."""
        known = init.image_latents
        if i < len(init.timesteps) - 1:
            known = scheduler.add_noise(known, init.noise, torch.tensor([init.timesteps[i + 1]]))
        return (1 - init.mask) * known + init.mask * latents

    # --- sampling --------------------------------------------------------------------------------
    def predict_noise(
        self, plan: GuidancePlan, latents: torch.Tensor, t: torch.Tensor, conditions: dict[str, BatchedCondition],
        denoisers: dict[str, Denoiser] | None = None, scheduler: Any = None, dtypes: dict[str, torch.dtype] | None = None,
    ) -> torch.Tensor:
        """One GCFG step, `guided_prediction`, with the given denoisers, scheduler and dtypes (None:
        the pipeline's registered denoisers and scheduler; `__call__` passes those it read once)."""
        scheduler = self.scheduler if scheduler is None else scheduler
        return guided_prediction(latents, t, self.denoisers if denoisers is None else denoisers, plan, conditions,
                                 scale_model_input=scheduler.scale_model_input, dtypes=dtypes)

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
        **conditioning: Any,
    ):
        """Text to image, or, with `image` (one, or a list of one per output), image to image from
        `strength` in (0, 1] as diffusers' img2img; with `mask_image` too, inpainting (white =
        repaint) as diffusers' inpainting pipeline with a non-inpainting UNet. `conditioning`: a
        prior family's own conditions, shared by every term (SDXL: original_size,
        crops_coords_top_left, target_size; None sizes: the sample's height and width).

        Everything a call needs lives in its locals, its scheduler too: calls may interleave (one
        started from another's step callback) and each gives the images it gives alone."""
        # 1. check inputs, and read and size the init images, before any model runs
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        check_init_inputs(image, mask_image, strength, num_images, num_inference_steps, latents)
        plan = GuidancePlan.from_spec(guidance)  # weight-0 terms left out: never evaluated
        self.check_guidance(plan.spec, num_images)
        init = None if image is None else self.preprocess_init(image, mask_image, height, width)
        if init is not None:
            height, width = init.height, init.width
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"height and width must be multiples of {self.vae_scale_factor}, got {height}x{width}")
        device = self._execution_device
        denoisers = self.denoisers
        dtypes = {call.denoiser: denoisers[call.denoiser].dtype for call in plan.calls}
        dtype = torch.float32  # latents, the scheduler and Eq. 3 run in fp32 whatever the denoisers' dtypes

        # 2. encode the prompts and control images, once per call
        conditions = self.batch_conditions(plan, num_images, height, width, dtype, **conditioning)

        # 3. timesteps (img2img: the last `strength` of them)
        scheduler = self.scheduler_for_call(num_inference_steps, device)
        timesteps = scheduler.timesteps if init is None else img2img_timesteps(scheduler, num_inference_steps, strength)

        # 4. latents: noise, or the init images' latents noised to the first timestep
        start = None
        if init is None:
            latents = self.prepare_latents(num_images, height, width, dtype, generator, latents, scheduler, device)
        else:
            start = self.prepare_init_latents(init, strength, timesteps, num_images, dtype, generator, scheduler, device)
            latents = start.latents
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 5. denoising loop
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                noise_pred = self.predict_noise(plan, latents, t, conditions, denoisers, scheduler, dtypes)
                latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if start is not None and start.mask is not None:
                    latents = self.blend_known_region(latents, start, i, scheduler)
                if callback_on_step_end is not None:
                    callback_on_step_end(i, t, latents)
                progress.update()

        # 6. decode
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


def img2img_timesteps(scheduler: Any, num_inference_steps: int, strength: float) -> torch.Tensor:
    """The last `strength` of the steps `scheduler` is set to, its begin index set to the first
    of them: diffusers' `StableDiffusionImg2ImgPipeline.get_timesteps`, on a given scheduler."""
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    t_start = max(num_inference_steps - init_timestep, 0)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return scheduler.timesteps[t_start * scheduler.order :]


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _control_scales(scale: Any, count: int) -> list[float]:
    scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * count
    return [float(s) for s in scales]
