"""Generalized Classifier-free Guidance (Eq. 3): terms as data, the combine, the batching plan."""

from ccp.guidance.combine import combine, reference_prediction, rescale
from ccp.guidance.plan import UNCONDITIONAL, DenoiserCall, GuidancePlan
from ccp.guidance.terms import Condition, GuidanceConfigError, GuidanceSpec, GuidanceTerm, Source

__all__ = [
    "UNCONDITIONAL",
    "Condition",
    "DenoiserCall",
    "GuidanceConfigError",
    "GuidancePlan",
    "GuidanceSpec",
    "GuidanceTerm",
    "Source",
    "combine",
    "reference_prediction",
    "rescale",
]
