"""ControlNet training on a prior: a ControlNet learns to steer the frozen prior UNet from a
conditioning image (``data.condition=canny``: the Canny edges of each training image).

Not a personalization method (it is not in `METHODS`' table rows) but the same loop trains it, as
diffusers' ``examples/controlnet/train_controlnet.py`` does: the ControlNet starts as
``ControlNetModel.from_unet(prior.unet)`` (the UNet's encoder copied, zero-initialised output
convolutions), the prior UNet and text encoder stay frozen, each item carries its own caption
(``data.captions``; with probability ``caption_dropout`` replaced by the empty prompt, that
script's ``--proportion_empty_prompts``) and its conditioning image ``condition`` [3, H, W] in
[0, 1]. The export is a diffusers ControlNet folder, which ccp-sample loads with
``controlnet.path=``; sampling runs it as the pipeline's ``controlnet`` denoiser (prior UNet +
this ControlNet).
"""

from __future__ import annotations

from pathlib import Path

import PIL.Image
import torch
from diffusers import ControlNetModel, StableDiffusionPipeline

from ccp.config import ConfigError
from ccp.guidance import Condition, GuidanceSpec, GuidanceTerm, Source
from ccp.methods.base import Method, PromptTemplate
from ccp.methods.dreambooth import frozen_copy
from ccp.methods.text_to_image import TextToImage

CONDITIONING_WIDTHS = (16, 32, 96, 256)  # ControlNetModel's conditioning_embedding_out_channels default
DENOISER = "controlnet"  # the GCFG pipeline's name for prior UNet + its ControlNet (ccp-sample's too)


class ControlNetConfigError(ConfigError, ValueError):
    """ControlNet settings that cannot train; the message names the key."""


class ControlNetTraining(Method):
    name = "controlnet"
    trains_token = False
    needs_data = {"captions": "captions.jsonl", "condition": "canny"}

    def __init__(self, prior: StableDiffusionPipeline, template: PromptTemplate, caption_dropout: float = 0.0,
                 max_memoised_captions: int = 4096):
        super().__init__(prior, template)
        self.caption_dropout = float(caption_dropout)
        self.max_memoised = int(max_memoised_captions)
        # One stride-2 convolution per halving from the image to the latents, on diffusers' widths: SD's 8x
        # VAE gets diffusers' default (16, 32, 96, 256), the toy prior's 4x VAE one step fewer.
        widths = CONDITIONING_WIDTHS[: int(self.vae_scale).bit_length()]
        self.controlnet = ControlNetModel.from_unet(prior.unet, conditioning_embedding_out_channels=widths,
                                                    conditioning_channels=3).float().requires_grad_(True).train()
        self._frozen["unet"] = frozen_copy(prior.unet).eval()
        self._frozen["text_encoder"] = frozen_copy(prior.text_encoder).eval()
        self._tokenizer = prior.tokenizer
        self._memo: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    # Captions are embedded (and memoised) exactly as text_to_image does it.
    _embed = TextToImage._embed

    @classmethod
    def check_settings(cls, caption_dropout: float = 0.0, **_) -> None:
        if isinstance(caption_dropout, bool) or not isinstance(caption_dropout, (int, float)) \
                or not 0.0 <= caption_dropout < 1.0:
            raise ControlNetConfigError(f"method.module.caption_dropout={caption_dropout!r}: must be a number in [0, 1) "
                                        "(the share of captions replaced by the empty prompt; e.g. 0.1)")

    @classmethod
    def check_prior(cls, family: str, **settings) -> None:
        if family == "sdxl":
            raise ControlNetConfigError("method 'controlnet' trains ControlNets for SD v1.x/2.x priors only; "
                                        "SDXL (its added size/crop conditioning) is not supported yet")

    @property
    def unet(self):
        """The frozen prior UNet the prediction runs through (the loop's speed options reach it here)."""
        return self._frozen["unet"]

    @property
    def training_prompt(self) -> str | None:
        return None  # per-item captions

    def batch_inputs(self, batch, generator):
        captions, condition = batch.get("caption"), batch.get("condition")
        if captions is None:
            raise ValueError("controlnet trains on captions: set data.captions (e.g. captions.jsonl beside the images)")
        if condition is None:
            raise ValueError("controlnet trains on conditioning images: set data.condition=canny")
        drop = torch.rand(len(captions), generator=generator, device=generator.device) < self.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        # looked up once per batch: diffusers' ModelMixin.dtype walks every parameter
        dtype = self.unet.conv_in.weight.dtype
        device = next(self._frozen["text_encoder"].parameters()).device
        embeds = torch.stack([self._embed(c, dtype, device) for c in captions])
        return {"encoder_hidden_states": embeds, "condition": condition}

    def predict_noise(self, noisy_latents, timesteps, encoder_hidden_states=None, condition=None):
        if encoder_hidden_states is None or condition is None:
            raise ValueError("controlnet needs the batch's caption embeddings and conditioning images (batch_inputs)")
        unet = self.unet
        weight_dtype = unet.conv_in.weight.dtype
        # As train_controlnet.py: the ControlNet's residuals, in the frozen UNet's dtype, added to its skips.
        down, mid = self.controlnet(
            noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=condition.to(self.controlnet.conv_in.weight.dtype), conditioning_scale=1.0, return_dict=False,
        )
        return unet(
            noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
            down_block_additional_residuals=[d.to(weight_dtype) for d in down],
            mid_block_additional_residual=mid.to(weight_dtype), return_dict=False,
        )[0]

    def export(self, out_dir):
        self.controlnet.save_pretrained(out_dir, safe_serialization=True)
        return Path(out_dir)

    def sampling_pipeline(self, prior):
        """`prior`'s GCFG pipeline with the method's ControlNet as its ``controlnet`` denoiser; registered
        after `from_prior`, which would move it to the prior's device."""
        from ccp.pipelines.gcfg import GCFGPipeline

        pipe = GCFGPipeline.from_prior(prior)
        pipe.register_modules(controlnet=self.controlnet)
        return pipe, DENOISER

    @classmethod
    def load_export(cls, prior, export_dir):
        """As ccp-sample's ``controlnet.path=<export_dir>`` builds it."""
        from ccp.pipelines.gcfg import GCFGPipeline
        from ccp.priors.loading import load_controlnet

        controlnet = load_controlnet(str(export_dir), dtype=prior.unet.dtype)
        return GCFGPipeline.from_prior(prior, controlnet=controlnet), DENOISER

    @classmethod
    def default_guidance(cls, denoiser, template, control_prompt=None, concept_weight=1.0, control_weight=5.0,
                         control_image=None):
        """Classifier-free guidance with both halves through the ControlNet denoiser, as diffusers'
        StableDiffusionControlNetPipeline: the caption at `control_weight`, the unconditional on "",
        both with `control_image`. Without one (validation grids during training), an empty edge
        map: the ControlNet steered by "no edges here"."""
        image = PIL.Image.new("RGB", (8, 8)) if control_image is None else control_image

        def source(prompt: str) -> Source:
            return Source(denoiser, Condition(prompt=prompt, control_image=image, control_scale=1.0))

        return GuidanceSpec(terms=(GuidanceTerm("prompt", source(control_prompt or ""), float(control_weight)),),
                            unconditional=source(""))
