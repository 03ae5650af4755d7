"""Stand-in methods for tests of the training loop alone."""

from __future__ import annotations

from ccp.methods.base import Method


class TrainingOnlyMethod(Method):
    """A `Method` that the training loop can drive but that has nothing to export or sample: the
    loop never calls these four, so a test that reaches one fails loudly."""

    def export(self, out_dir):
        raise AssertionError("the training loop does not export")

    def sampling_pipeline(self, prior):
        raise AssertionError("the training loop does not sample")

    @classmethod
    def load_export(cls, prior, export_dir):
        raise AssertionError("the training loop does not load exports")

    @classmethod
    def default_guidance(cls, denoiser, template, control_prompt=None, concept_weight=1.0, control_weight=5.0):
        raise AssertionError("the training loop does not sample")
