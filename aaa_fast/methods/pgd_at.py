"""PGD-AT (Madry et al., 2018): cross-entropy on PGD-CE examples from a uniform random start."""
from __future__ import annotations

from .base import Batch, Plan, WeightedObjectiveMethod, register_method


@register_method
class PGDAT(WeightedObjectiveMethod):
    name = "pgd-at"
    description = "PGD-AT: cross-entropy on PGD-CE examples (uniform random start)"

    def prepare(self, batch: Batch) -> Plan:
        # the natural term on the adversarial rows: no clean row is trained on
        return Plan([self.trainer.attack(batch.x, batch.y, "ce", batch.eps, random_start=True)])
