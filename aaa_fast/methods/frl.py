"""FRL (Xu et al., 2021): TRADES with the fair-robust-learning class weights on both terms and
class-wise bounds (remargin), the multipliers updated from the meta set's class-wise errors."""
from __future__ import annotations

from .base import register_method
from .trades import TRADES


@register_method
class FRL(TRADES):
    name = "frl"
    description = "FRL: TRADES with FRL's class weights and class-wise bounds (remargin)"
    defaults = dict(bound_mode="remargin", fairness=True)
