"""TRADES (Zhang et al., 2019): CE on the clean rows + lam * KL(p(x) || p(x')), x' from PGD on
that KL (or on CE with adv_loss='ce') started at x + 0.001 N(0, 1)."""
from __future__ import annotations

from .base import Batch, Plan, WeightedObjectiveMethod, register_method


@register_method
class TRADES(WeightedObjectiveMethod):
    name = "trades"
    description = "TRADES: clean CE + lam * KL(clean || adversarial)"

    def prepare(self, batch: Batch) -> Plan:
        cfg = self.trainer.config
        return Plan([batch.x, self.trainer.attack(batch.x, batch.y, cfg.adv_loss, batch.eps, random_start="normal")])
