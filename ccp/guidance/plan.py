"""Which denoiser evaluates which conditions at every step: one batched call per denoiser."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ccp.guidance.terms import Condition, GuidanceSpec

UNCONDITIONAL = -1  # slot index of the unconditional source


@dataclass(frozen=True)
class DenoiserCall:
    """One batched evaluation: `denoiser` under `conditions`, each for the whole image batch."""

    denoiser: str
    conditions: tuple[Condition, ...]
    # slots[j] lists the sources (UNCONDITIONAL or a term index) answered by conditions[j]
    slots: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class GuidancePlan:
    calls: tuple[DenoiserCall, ...]
    spec: GuidanceSpec

    @classmethod
    def from_spec(cls, spec: GuidanceSpec) -> "GuidancePlan":
        """Group sources by denoiser (first-use order, unconditional first), merging equal conditions.

        Built from `spec.without_zero_weights()` (its `spec`): Eq. 3 adds 0 * (eps_i - eps_0) for a
        weight-0 term, so the plan never evaluates one."""
        spec = spec.without_zero_weights()
        sources = []
        if spec.needs_unconditional:
            sources.append((UNCONDITIONAL, spec.unconditional))
        sources += [(i, term.source) for i, term in enumerate(spec.terms)]
        grouped: dict[str, dict[tuple, tuple[Condition, list[int]]]] = {}
        for slot, source in sources:
            by_key = grouped.setdefault(source.denoiser, {})
            condition, slots = by_key.setdefault(source.condition.key(), (source.condition, []))
            slots.append(slot)
        calls = tuple(
            DenoiserCall(name, tuple(c for c, _ in by_key.values()), tuple(tuple(s) for _, s in by_key.values()))
            for name, by_key in grouped.items()
        )
        return cls(calls=calls, spec=spec)

    @property
    def denoisers(self) -> list[str]:
        return [call.denoiser for call in self.calls]

    def batch_size(self, num_images: int) -> dict[str, int]:
        return {call.denoiser: len(call.conditions) * num_images for call in self.calls}

    def split(self, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Route each call's batched output back to (unconditional, [term predictions])."""
        uncond = None
        terms: list[torch.Tensor | None] = [None] * len(self.spec.terms)
        for call in self.calls:
            for chunk, slots in zip(outputs[call.denoiser].chunk(len(call.conditions)), call.slots):
                for slot in slots:
                    if slot == UNCONDITIONAL:
                        uncond = chunk
                    else:
                        terms[slot] = chunk
        return uncond, terms  # type: ignore[return-value]
