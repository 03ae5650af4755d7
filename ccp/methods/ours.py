"""Ours (§4.3): the null-text concept UNet, every UNet parameter trained, no text in the loop.

On SDXL the model's pooled text is a fixed buffer and the size/crop time ids stay inputs: training
feeds the concept images' real sizes (`Method.batch_inputs`), GCFG the sample's."""

from __future__ import annotations

from pathlib import Path

from diffusers import StableDiffusionPipeline

from ccp.guidance import Condition, GuidanceSpec, GuidanceTerm, Source
from ccp.methods.base import Method, PromptTemplate
from ccp.models.null_text_unet import NullTextUNet2DConditionModel, null_text_from_pipeline

EXPORT_SUBFOLDER = "concept_unet"


class NullTextConcept(Method):
    name = "ours"

    def __init__(self, prior: StableDiffusionPipeline, template: PromptTemplate, definition: str | None = None):
        super().__init__(prior, template)
        kwargs = {"definition": definition} if definition else {}
        if self.sdxl:  # both encoders; the pooled null text becomes a buffer, the time ids stay inputs
            self.unet = null_text_from_pipeline(prior, **kwargs)
        else:
            self.unet = NullTextUNet2DConditionModel.from_prior(prior.unet, prior.text_encoder, prior.tokenizer, **kwargs)
        self.unet.requires_grad_(True).train()

    @property
    def training_prompt(self) -> None:
        return None  # no captions: the null-text model has no text input

    def predict_noise(self, noisy_latents, timesteps, time_ids=None):
        # SDXL: the images' size/crop time ids (the real sizes in training), no text
        added = self.added_cond_kwargs(noisy_latents, self.unet.dtype, None, time_ids)
        return self.unet(noisy_latents, timesteps, added_cond_kwargs=added, return_dict=False)[0]

    def export(self, out_dir):
        path = Path(out_dir) / EXPORT_SUBFOLDER
        self.unet.save_pretrained(path)
        return path

    def sampling_pipeline(self, prior):
        from ccp.pipelines.gcfg import GCFGPipeline

        # Registered after from_prior, whose .to(prior.device) would otherwise move the trained UNet.
        pipe = GCFGPipeline.from_prior(prior)
        pipe.register_modules(concept_unet=self.unet)
        return pipe, "concept"

    @classmethod
    def load_export(cls, prior, export_dir):
        from ccp.pipelines.gcfg import GCFGPipeline

        export_dir = Path(export_dir)
        folder = export_dir / EXPORT_SUBFOLDER if (export_dir / EXPORT_SUBFOLDER).is_dir() else export_dir
        concept = NullTextUNet2DConditionModel.from_pretrained(folder, torch_dtype=prior.unet.dtype).to(prior.device)
        return GCFGPipeline.from_prior(prior, concept_unet=concept.eval()), "concept"

    @classmethod
    def default_guidance(cls, denoiser, template, control_prompt=None, concept_weight=1.0, control_weight=5.0):
        # Concept guidance from the concept model, unconditional and control from the prior (§4.2).
        terms = [GuidanceTerm("concept", Source(denoiser), concept_weight)]
        if control_prompt:
            terms.append(GuidanceTerm("control", Source("prior", Condition(prompt=control_prompt)), control_weight))
        return GuidanceSpec(terms=tuple(terms))
