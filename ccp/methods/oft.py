"""OFT baseline [30]: orthogonal fine-tuning of the UNet's attention projections, with peft.

peft's `OFTConfig` on ``to_q``, ``to_k``, ``to_v`` and ``to_out.0`` of every attention layer
(self- and cross-attention) of (a copy of) the prior UNet, ``r=4`` block-diagonal rotations, exact
Cayley parametrisation, no COFT constraint. ``r=4`` is the original OFT code's setting for
DreamBooth on SD; that code stores each block as a full b x b matrix (of which only the
skew-symmetric part is used), giving 23.3M parameters on SD v1.5 -- the paper's "23M". peft stores
only the b(b-1)/2 free entries of each skew-symmetric block, so the same model counts 11.6M
trainable parameters here. ``r=2`` gives 23.3M in peft's count, but with twice-as-large blocks it
is a larger model than the paper's; see docs/methods.md.

The prompt carries no token (Appendix D.2) and runs through the frozen text encoder: cached (on
SDXL through both, with the pooled embedding, as GCFG encodes it; see `FixedPromptMixin`).
Export: ``out_dir/oft`` via peft's ``save_pretrained`` (``adapter_config.json`` +
``adapter_model.safetensors``). Loading applies the adapter to a copy of the prior UNet with peft
and merges it (``merge_and_unload``), so sampling runs a plain UNet at the prior's speed; in memory
(validation during training) the method's own UNet runs with its OFT layers unmerged.
"""

from __future__ import annotations

import copy
from pathlib import Path

from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import OFTConfig, PeftModel, get_peft_model
from torch import nn

from ccp.methods.base import Method, PromptTemplate
from ccp.methods.dreambooth import (
    FixedPromptMixin,
    baseline_guidance,
    export_folder,
    frozen_copy,
    pipeline_with_denoiser,
    register_unet_denoiser,
)

EXPORT_SUBFOLDER = "oft"
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


def oft_config(r: int = 4, coft: bool = False, eps: float = 6e-5, use_cayley_neumann: bool = False, module_dropout: float = 0.0) -> OFTConfig:
    return OFTConfig(
        r=r,
        oft_block_size=0,  # peft takes either r or the block size; r x block size = in_features
        target_modules=list(TARGET_MODULES),
        coft=coft,
        eps=eps,
        use_cayley_neumann=use_cayley_neumann,
        module_dropout=module_dropout,
        init_weights=True,  # identity rotations: training starts from the prior exactly
    )


class OFT(FixedPromptMixin, Method):
    name = "oft"
    trains_token = False

    def __init__(
        self,
        prior: StableDiffusionPipeline,
        template: PromptTemplate,
        r: int = 4,
        coft: bool = False,
        eps: float = 6e-5,
        use_cayley_neumann: bool = False,
        module_dropout: float = 0.0,
        encode_prompt_every_step: bool = False,
    ):
        super().__init__(prior, template)
        config = oft_config(r=r, coft=coft, eps=eps, use_cayley_neumann=use_cayley_neumann, module_dropout=module_dropout)
        peft_unet = get_peft_model(frozen_copy(prior.unet), config)  # injects into the copy; freezes its base
        self._frozen["unet"] = peft_unet
        # The rotation modules are the same objects the UNet runs ("." is not allowed in names).
        rotations = {
            name.replace(".", "__"): module
            for name, module in peft_unet.base_model.model.named_modules()
            if name.endswith(".oft_R.default")
        }
        if not rotations:
            raise ValueError(f"OFT found none of {TARGET_MODULES} in the UNet")
        self.oft = nn.ModuleDict(rotations)
        self.oft.requires_grad_(True)
        self._init_fixed_prompt(prior, encode_prompt_every_step)

    @property
    def peft_unet(self) -> PeftModel:
        return self._frozen["unet"]

    @property
    def unet(self) -> UNet2DConditionModel:
        """The UNet copy with the OFT layers injected (what runs)."""
        return self.peft_unet.get_base_model()

    def predict_noise(self, noisy_latents, timesteps, time_ids=None):
        return self.fixed_prompt_prediction(self.unet, noisy_latents, timesteps, time_ids)

    def export(self, out_dir):
        path = Path(out_dir) / EXPORT_SUBFOLDER
        self.peft_unet.save_pretrained(str(path))
        return path

    def sampling_pipeline(self, prior):
        # The UNet with the OFT layers active, unmerged: merging would write into the weights it
        # shares with the prior. Slower per step than the merged export, same predictions.
        return pipeline_with_denoiser(prior, self.name, self.unet)

    @classmethod
    def load_export(cls, prior, export_dir):
        folder = export_folder(export_dir, EXPORT_SUBFOLDER)
        # merge_and_unload writes the rotated weights into the UNet: a real copy, not the prior.
        unet = copy.deepcopy(prior.unet).requires_grad_(False)
        merged = PeftModel.from_pretrained(unet, str(folder)).merge_and_unload()
        return register_unet_denoiser(prior, cls.name, merged)

    @classmethod
    def default_guidance(cls, denoiser, template, control_prompt=None, concept_weight=1.0, control_weight=5.0):
        return baseline_guidance(cls, denoiser, template, control_prompt, control_weight)
