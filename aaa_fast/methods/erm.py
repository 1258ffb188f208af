"""ERM: plain cross-entropy on the clean rows (the reference point, no adversary)."""
from __future__ import annotations

from .base import Batch, Plan, WeightedObjectiveMethod, register_method


@register_method
class ERM(WeightedObjectiveMethod):
    name = "erm"
    description = "ERM: cross-entropy on clean images (no adversary)"
    role = "reference"

    def prepare(self, batch: Batch) -> Plan:
        return Plan([batch.x])
