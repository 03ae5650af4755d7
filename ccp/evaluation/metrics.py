"""One adapter per metric of Tables 1-2: a `TrainedModel` and the metric's settings in, the value
and its full result out. ccp-eval and ccp-reproduce both measure through these, so a number means
the same in a sweep folder and in a table.

* ``fid`` (Table 1): the method's unconditional guidance (`default_guidance` without a prompt),
  sharded and resumable (`ccp.evaluation.fid.run_fid`);
* ``text`` (Table 2): text-guided alignment (`ccp.evaluation.alignment.text_alignment`);
* ``spatial`` (Table 2): spatial-guided alignment through a canny ControlNet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ccp.evaluation.alignment import SamplingConfig, SpatialAlignmentConfig, TextAlignmentConfig
from ccp.evaluation.attributes import AttributePredictor
from ccp.evaluation.fid import FIDConfig, run_fid
from ccp.evaluation.generation import PipelineSampler
from ccp.io import folder_stamp
from ccp.methods.export import TrainedModel


@dataclass(frozen=True)
class Metric:
    condition: str  # what the samples are conditioned on
    better: str  # "lower" or "higher"


METRICS = {"fid": Metric("unconditional", "lower"), "text": Metric("text", "higher"),
           "spatial": Metric("spatial", "higher")}


def model_stamp(model: TrainedModel) -> str:
    """Which weights are sampled: changes when the export's files are rewritten (a retrained run)."""
    return f"export:{folder_stamp(model.export_dir)}" if model.export_dir is not None else f"{model.name}:in-memory"


def fid_metric(model: TrainedModel, sampling: SamplingConfig, fid: FIDConfig, *,
               feature_extractor: nn.Module | None = None, device: str | torch.device | None = None,
               progress: bool = True) -> tuple[float, dict[str, Any]]:
    """FID of `fid.num_samples` samples of the method's unconditional guidance (seed ``fid.seed``);
    `feature_extractor` None: Inception from ``fid.inception_weights``. A shard folder holding
    samples of other weights is refused (`ShardDirMismatchError`), never mixed in."""
    spec = model.guidance(None, sampling.concept_weight, sampling.control_weight)
    sampler = PipelineSampler(model.pipe, spec, num_inference_steps=sampling.steps, height=sampling.height,
                              width=sampling.width, batch_size=fid.batch_size)
    value = float(run_fid(fid, sampler, feature_extractor=feature_extractor, device=device, progress=progress,
                          run_key={**sampler.run_key, "model": model_stamp(model)}))
    return value, {"fid": value, "num_samples": fid.num_samples, "shard_dir": fid.shard_dir}


def text_metric(model: TrainedModel, config: TextAlignmentConfig, predictor: AttributePredictor | None = None, *,
                out: str | Path | None = None, image_dir: str | Path | None = None,
                progress: bool = True) -> tuple[float, dict[str, Any]]:
    """Mean text-guided alignment over ``config.prompts`` (`predictor` None: CLIP from ``config.clip_weights``)."""
    from ccp.evaluation.alignment import text_alignment

    result = text_alignment(model, predictor, config, out=out, image_dir=image_dir, progress=progress)
    return float(result["mean"]), result


def spatial_metric(model: TrainedModel, config: SpatialAlignmentConfig, condition_dir: str | Path,
                   controlnet: nn.Module, *, out: str | Path | None = None, image_dir: str | Path | None = None,
                   progress: bool = True) -> tuple[float, dict[str, Any]]:
    """Mean edge F1 of samples under the canny edges of ``config.num_conditions`` condition images."""
    from ccp.evaluation.alignment import spatial_alignment

    result = spatial_alignment(model, condition_dir, controlnet, config, out=out, image_dir=image_dir,
                               progress=progress)
    return float(result["mean_f1"]), result
