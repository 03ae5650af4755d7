"""Text-to-image training of a whole prior UNet from captions: how the toy open-world prior is made.

Not a personalization method (it is not in `METHODS`' table rows) but the same loop trains it:
every item carries its own caption (``data.captions``), and with probability
``caption_dropout`` a caption is replaced by the empty prompt, so one UNet learns both the
conditional and the unconditional prediction that classifier-free guidance needs (as SD did).
With ``caption_templates`` each kept caption is also placed in a template drawn per item
(``"a photo of {caption}"``, ...), so the prior learns to follow a caption wherever it sits among
the 77 tokens, as SD did from its varied alt-texts. The draws come from the step's generator, so
a resumed run repeats them.
The text encoder stays frozen; with few distinct captions their embeddings are memoised.
The export is a whole pipeline folder: the trained result is a prior that `load_prior` reads.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

from ccp.config import ConfigError
from ccp.guidance import GuidanceSpec
from ccp.methods.base import Method, PromptTemplate
from ccp.methods.dreambooth import encode_tokens, frozen_copy, tokenize


class TextToImageConfigError(ConfigError, ValueError):
    """Text-to-image settings that cannot train; the message names the key."""


class TextToImage(Method):
    name = "text_to_image"
    trains_token = False
    needs_data = {"captions": "captions.jsonl"}

    def __init__(self, prior: StableDiffusionPipeline, template: PromptTemplate, caption_dropout: float = 0.1,
                 caption_templates: list[str] | tuple[str, ...] = ("{caption}",), max_memoised_captions: int = 4096):
        super().__init__(prior, template)
        self.caption_dropout = float(caption_dropout)
        self.caption_templates = tuple(caption_templates)
        self.max_memoised = int(max_memoised_captions)
        self.unet = copy.deepcopy(prior.unet).requires_grad_(True).train()
        self._frozen["text_encoder"] = frozen_copy(prior.text_encoder).eval()
        self._tokenizer = prior.tokenizer
        # Everything of the prior except the UNet, for the export (outside the module tree).
        self._parts = {k: v for k, v in prior.components.items() if k != "unet"}
        self._memo: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    @classmethod
    def check_settings(cls, caption_dropout: float = 0.1, caption_templates: list[str] | tuple[str, ...] = ("{caption}",),
                       **_) -> None:
        if not 0.0 <= caption_dropout < 1.0:
            raise TextToImageConfigError(f"method.module.caption_dropout={caption_dropout}: must be in [0, 1)")
        bad = [t for t in caption_templates if "{caption}" not in t]
        if not caption_templates or bad:
            raise TextToImageConfigError(
                f"method.module.caption_templates: every template needs '{{caption}}', got {bad or 'none'}")

    @property
    def training_prompt(self) -> str | None:
        return None  # per-item captions

    def _embed(self, caption: str, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
        encoder = self._frozen["text_encoder"]
        key = (caption, device or next(encoder.parameters()).device, dtype)
        if key not in self._memo:
            with torch.no_grad():
                embeds = encode_tokens(encoder, tokenize(self._tokenizer, caption))[0].to(dtype)
            if len(self._memo) >= self.max_memoised:
                self._memo.clear()
            self._memo[key] = embeds
        return self._memo[key]

    def batch_inputs(self, batch, generator):
        captions = batch.get("caption")
        if captions is None:
            raise ValueError("text_to_image trains on captions: set data.captions (e.g. captions.jsonl beside the images)")
        device = generator.device
        drop = torch.rand(len(captions), generator=generator, device=device) < self.caption_dropout
        pick = torch.randint(0, len(self.caption_templates), (len(captions),), generator=generator, device=device)
        captions = ["" if d else self.caption_templates[t].format(caption=c) for c, d, t in zip(captions, drop.tolist(), pick.tolist())]
        # dtype and device looked up once: diffusers' ModelMixin.dtype walks every parameter, and per
        # caption that was 37% of a toy training step (py-spy).
        dtype, device = self.unet.dtype, next(self._frozen["text_encoder"].parameters()).device
        embeds = torch.stack([self._embed(c, dtype, device) for c in captions])
        return {"encoder_hidden_states": embeds}

    def predict_noise(self, noisy_latents, timesteps, encoder_hidden_states=None):
        if encoder_hidden_states is None:
            raise ValueError("text_to_image needs the batch's caption embeddings (batch_inputs)")
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    def export(self, out_dir):
        parts = {k: v for k, v in self._parts.items() if k not in ("safety_checker", "feature_extractor", "image_encoder")}
        pipe = StableDiffusionPipeline(**parts, unet=self.unet, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.save_pretrained(out_dir, safe_serialization=True)
        return Path(out_dir)

    def sampling_pipeline(self, prior):
        """The export is a whole prior whose UNet is the trained one; in memory: `prior`'s pipeline
        with the method's UNet in place of the prior's (denoiser "prior"), the other parts the prior's.

        The sampler is made from the prior's scheduler config as the export saves it, every value
        explicit: diffusers marks the values a scheduler took by default, and a DPM-Solver++ made
        from such a config takes its own defaults for them (SD v1.5's config, for one, has no
        ``timestep_spacing``: "leading" for its PNDM, "linspace" for DPM-Solver++)."""
        from ccp.pipelines.gcfg import GCFGPipeline

        saved = {k: v for k, v in prior.scheduler.config.items() if k != "_use_default_values"}
        scheduler = DPMSolverMultistepScheduler.from_config(saved)
        pipe = GCFGPipeline.from_prior(prior, scheduler=scheduler)  # moves the prior's parts; the UNet joins after
        pipe.register_modules(unet=self.unet)
        return pipe, "prior"

    @classmethod
    def load_export(cls, prior, export_dir):
        from ccp.pipelines.gcfg import GCFGPipeline
        from ccp.priors.loading import load_prior

        trained = load_prior(str(export_dir), dtype=prior.unet.dtype).to(prior.device)
        return GCFGPipeline.from_prior(trained), "prior"

    @classmethod
    def default_guidance(cls, denoiser, template, control_prompt=None, concept_weight=1.0, control_weight=5.0):
        return GuidanceSpec.cfg(control_prompt or "", control_weight, denoiser=denoiser)
