"""One default guidance weight: ``ccp.config.DEFAULT_GUIDANCE_WEIGHTS`` (concept 1.0, control 5.0).

The configs that sample "at the method's default guidance" (ccp-train's validation grid and sample
metrics, ccp-eval, every ccp-reproduce scale) read it through ``${ccp.default_weight:...}``; the
keyword defaults in the code, which callers outside the configs get, must say the same, or Table 1's
FID would run at another weight than the one a config names.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from ccp.config import DEFAULT_GUIDANCE_WEIGHTS, compose
from ccp.evaluation.alignment import SamplingConfig
from ccp.evaluation.callbacks import SampleMetrics
from ccp.methods import TRAINABLE
from ccp.methods.export import TrainedModel, UntrainedPrior
from ccp.training.callbacks import ValidationGrid

WEIGHTS = {f"{term}_weight": weight for term, weight in DEFAULT_GUIDANCE_WEIGHTS.items()}


def keyword_defaults(function) -> dict[str, float]:
    params = inspect.signature(function).parameters
    return {key: params[key].default for key in WEIGHTS}


@pytest.mark.parametrize("function", [
    *(cls.default_guidance for cls in TRAINABLE.values()), UntrainedPrior.default_guidance, TrainedModel.guidance,
    ValidationGrid.__init__, SampleMetrics.__init__], ids=lambda f: f.__qualname__)
def test_code_defaults_are_the_one_default(function):
    assert keyword_defaults(function) == WEIGHTS


def test_sampling_config_defaults_are_the_one_default():
    fields = {f.name: f.default for f in dataclasses.fields(SamplingConfig)}
    assert {key: fields[key] for key in WEIGHTS} == WEIGHTS


@pytest.mark.parametrize("config, overrides, node", [
    ("train", [], "validation"), ("eval", [], "guidance"),
    ("reproduce", ["scale=tiny"], "guidance"), ("reproduce", ["scale=toy"], "guidance"),
    ("reproduce", ["scale=full"], "guidance")])
def test_configs_sample_at_the_one_default(config, overrides, node):
    cfg = compose(config, overrides)[node]
    assert {key: cfg[key] for key in WEIGHTS} == WEIGHTS
