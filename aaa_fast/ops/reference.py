"""Plain-PyTorch reference of the fused PGD step: the oracle every backend is tested against.

The native kernels follow this exact operation order in float32, so linf results agree bit
for bit; l2 results agree up to the summation order of the two per-sample norms. The two
halves, `unprojected_step` and `project`, are also used on their own: `project` is
differentiable in eps, which the `meta` bound mode needs.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _rows(t: Tensor, like: Tensor) -> Tensor:
    return t.view((-1,) + (1,) * (like.dim() - 1))


def unprojected_step(x_adv: Tensor, grad: Tensor, direction: Tensor, alpha: Tensor, norm: str = "linf") -> Tensor:
    """x_adv + d*alpha*sign(g) (linf) or x_adv + d*alpha*g/|g| (l2), in float32."""
    xa, g = x_adv.float(), grad.float()
    step = _rows(direction * alpha, xa)
    if norm == "linf":
        return xa + step * g.sign()
    if norm == "l2":
        g_norm = _rows(g.flatten(1).norm(dim=1), g)
        return xa + step * torch.where(g_norm > 0, g / torch.where(g_norm > 0, g_norm, 1.0), 0.0)
    raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")


def project(v: Tensor, x_nat: Tensor, eps: Tensor, norm: str = "linf", lo: float = 0.0, hi: float = 1.0) -> Tensor:
    """clamp(x_nat + Proj_eps(v - x_nat), lo, hi) in float32, differentiable in v and eps."""
    xn = x_nat.float()
    e = _rows(eps, xn)
    delta = v - xn
    if norm == "linf":
        delta = torch.clamp(delta, -e, e)
    elif norm == "l2":
        d_norm = _rows(delta.flatten(1).norm(dim=1), delta)
        delta = delta * torch.where(d_norm > e, e / d_norm, 1.0)
    else:
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    return torch.clamp(xn + delta, lo, hi)


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
    v = unprojected_step(x_adv, grad, direction, alpha, norm)
    return project(v, x_nat, eps, norm, lo, hi).to(x_adv.dtype)
