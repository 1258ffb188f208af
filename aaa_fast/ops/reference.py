"""Plain-PyTorch reference of the fused PGD step: the oracle every backend is tested against.

The native kernels follow this exact operation order in float32, so linf results agree bit
for bit; l2 results agree up to the summation order of the two per-sample norms.
"""
from __future__ import annotations

import torch
from torch import Tensor


def pgd_step_reference(
    x_adv: Tensor,
    x_nat: Tensor,
    grad: Tensor,
    direction: Tensor,
    eps: Tensor,
    alpha: Tensor,
    norm: str = "linf",
    lo: float = 0.0,
    hi: float = 1.0,
) -> Tensor:
    """One signed, per-sample-bounded PGD step; `direction`, `eps`, `alpha` are float32 (N,)."""
    per_sample = (-1,) + (1,) * (x_adv.dim() - 1)
    xa, xn, g = x_adv.float(), x_nat.float(), grad.float()
    step = (direction * alpha).view(per_sample)
    e = eps.view(per_sample)
    if norm == "linf":
        delta = torch.clamp(xa + step * g.sign() - xn, -e, e)
    elif norm == "l2":
        g_norm = g.flatten(1).norm(dim=1).view(per_sample)
        unit = torch.where(g_norm > 0, g / torch.where(g_norm > 0, g_norm, 1.0), 0.0)
        delta = xa + step * unit - xn
        d_norm = delta.flatten(1).norm(dim=1).view(per_sample)
        delta = delta * torch.where(d_norm > e, e / d_norm, 1.0)
    else:
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    return torch.clamp(xn + delta, lo, hi).to(x_adv.dtype)
