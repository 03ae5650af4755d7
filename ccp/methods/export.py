"""The export format of a trained method and the one handle every sampler and metric takes.

An export is the folder ``ccp-train`` writes at the end of a run: the method's own files (a
diffusers UNet, a peft adapter, learned embeddings, ...) and `EXPORT_INFO`, which names the
method, the prior it was trained on and its prompt template. `load_trained` turns it back into a
`TrainedModel`: the GCFG pipeline with the export plugged in, the name of the method's denoiser,
the method class (how it is sampled) and the template. `prior_reference` gives the untrained
prior the same shape, as the reference row of a table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusers import StableDiffusionPipeline

from ccp.config import ConfigError
from ccp.guidance import GuidanceSpec
from ccp.io import write_text_atomic
from ccp.methods.base import Method, PromptTemplate
from ccp.methods.dreambooth import baseline_guidance

EXPORT_INFO = "ccp_export.json"


class ExportNotFoundError(ConfigError, FileNotFoundError):
    """A folder that is not a ccp-train export; the message says what to point at instead."""


class UntrainedPrior:
    """The prior as a reference row: sampled like a baseline, i.e. CFG on the prior UNet with the
    template prompt without a token (``a photo of face[, control prompt]``), scale ``control_weight``."""

    name = "prior"
    trains_token = False

    @classmethod
    def default_guidance(cls, denoiser, template, control_prompt=None, concept_weight=1.0, control_weight=5.0):
        return baseline_guidance(cls, denoiser, template, control_prompt, control_weight)


@dataclass
class TrainedModel:
    """A trained method plugged into a GCFG pipeline: what sampling, metrics and figures need."""

    pipe: Any  # GCFGPipeline
    denoiser: str  # the pipeline's name for the method's denoiser
    method: type[Method] | type[UntrainedPrior]
    template: PromptTemplate
    export_dir: Path | None = None  # None: built in memory (validation) or the untrained prior

    def guidance(self, control_prompt: str | None = None, concept_weight: float = 1.0,
                 control_weight: float = 5.0) -> GuidanceSpec:
        """How the method is sampled in the paper's evaluation (its `default_guidance`)."""
        return self.method.default_guidance(self.denoiser, self.template, control_prompt, concept_weight, control_weight)

    def unconditional(self) -> GuidanceSpec:
        """The method's own unconditional source alone: what its sampling falls back to."""
        return GuidanceSpec(terms=(), unconditional=self.guidance().unconditional)

    @property
    def name(self) -> str:
        return self.method.name


def export_info(method: str, prior: str, template: PromptTemplate | dict, step: int, ema: bool) -> dict:
    template = template if isinstance(template, dict) else template.__dict__
    return {"method": method, "prior": str(prior), "template": dict(template), "step": int(step), "ema": bool(ema)}


def write_export_info(export_dir: str | Path, method: str, prior: str, template: PromptTemplate | dict,
                      step: int, ema: bool) -> Path:
    """`EXPORT_INFO`, written last: a folder with it is a finished export."""
    info = export_info(method, prior, template, step, ema)
    return write_text_atomic(Path(export_dir) / EXPORT_INFO, json.dumps(info, indent=2) + "\n")


def export_is_current(export_dir: str | Path, method: str, prior: str, template: PromptTemplate | dict, step: int,
                      ema: bool) -> bool:
    """Whether `export_dir` is already the finished export these settings would write: a rerun of a
    finished training keeps it untouched, so what was measured on it (FID shards, records) stays valid."""
    path = Path(export_dir) / EXPORT_INFO
    try:
        return json.loads(path.read_text()) == json.loads(json.dumps(export_info(method, prior, template, step, ema)))
    except (OSError, ValueError):
        return False


def is_export(path: str | Path) -> bool:
    return (Path(path) / EXPORT_INFO).is_file()


def read_export_info(export_dir: str | Path, key: str = "export") -> dict:
    """The export's `EXPORT_INFO`; `ExportNotFoundError` for anything else, naming the config `key`."""
    folder = Path(str(export_dir)).expanduser()
    if not folder.is_dir():
        raise ExportNotFoundError(f"{key}={export_dir}: the folder does not exist; set {key}=outputs/train/<run>/export "
                                  "(written by ccp-train)")
    if not is_export(folder):
        near = [f for f in (folder.parent, folder / "export") if is_export(f)]  # a subfolder of it, or its run folder
        fix = f"set {key}={near[0]}" if near else f"set {key}=the export/ folder of a ccp-train run"
        raise ExportNotFoundError(f"{key}={export_dir}: no {EXPORT_INFO} there, so it is not an export written by "
                                  f"ccp-train; {fix}")
    return json.loads((folder / EXPORT_INFO).read_text())


def export_template(export_dir: str | Path) -> PromptTemplate:
    return PromptTemplate(**read_export_info(export_dir)["template"])


def load_trained(export_dir: str | Path, prior: StableDiffusionPipeline | None = None,
                 template: PromptTemplate | None = None) -> TrainedModel:
    """The export as a `TrainedModel` on `prior` (default: the prior it names, loaded here);
    `template` replaces the export's own."""
    from ccp.methods import method_class
    from ccp.priors.loading import load_prior

    info = read_export_info(export_dir)
    prior = prior if prior is not None else load_prior(info["prior"])
    cls = method_class(info["method"])
    pipe, denoiser = cls.load_export(prior, export_dir)
    return TrainedModel(pipe, denoiser, cls, template or PromptTemplate(**info["template"]), Path(export_dir))


def prior_reference(prior: StableDiffusionPipeline, template: PromptTemplate) -> TrainedModel:
    """The untrained prior, sampled as a baseline with `template` (``model=prior`` of ccp-eval)."""
    from ccp.pipelines.gcfg import GCFGPipeline

    return TrainedModel(GCFGPipeline.from_prior(prior), "prior", UntrainedPrior, template)


def in_memory(method: Method, prior: StableDiffusionPipeline) -> TrainedModel:
    """The method's current weights as a `TrainedModel` (validation and metrics during training):
    its `sampling_pipeline`, built in memory on the method's own modules (nothing exported or
    copied), so it follows the weights as they train."""
    pipe, denoiser = method.sampling_pipeline(prior)
    return TrainedModel(pipe, denoiser, type(method), method.template)
