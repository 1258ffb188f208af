"""Fairness multipliers of Fair Robust Learning (Xu et al. 2021), METHOD.md "Fairness multipliers".

Once per epoch, from class-wise natural errors e_c and boundary errors r_c on the meta set:
    gamma = e - mean(e) - tau,  kappa = r - mean(r) - tau
    nu <- norm(nu + rho1 gamma),  eta <- norm(eta + 2 rho1 kappa),  mu <- mu + rho2 kappa
with norm(z) = clamp(z, 0) rescaled to sum <= 0.5 and rho1 halved every 40 updates. Class weights
u = 1/C + nu - mean(nu) (v likewise from eta) and bound multipliers m = clamp(exp(2 mu), 0.98, 2.5).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _norm(z: Tensor, cap: float = 0.5) -> Tensor:
    z = z.clamp_min(0)
    total = z.sum()
    return z * (cap / total) if total > cap else z


class FairnessMultipliers:
    def __init__(self, num_classes: int, *, tau: float = 0.07, rho1: float = 0.05, rho2: float = 0.2,
                 halve_every: int = 40):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes, self.tau, self.rho1, self.rho2, self.halve_every = num_classes, tau, rho1, rho2, halve_every
        self.nu = torch.zeros(num_classes, dtype=torch.float64)
        self.eta = torch.zeros(num_classes, dtype=torch.float64)
        self.mu = torch.zeros(num_classes, dtype=torch.float64)
        self.updates = 0

    def update(self, classwise_nat_err, classwise_bdy_err) -> None:
        e = torch.as_tensor(classwise_nat_err, dtype=torch.float64).cpu()
        r = torch.as_tensor(classwise_bdy_err, dtype=torch.float64).cpu()
        for name, t in (("classwise_nat_err", e), ("classwise_bdy_err", r)):
            if t.shape != (self.num_classes,):
                raise ValueError(f"{name} must have shape ({self.num_classes},), got {tuple(t.shape)}")
            if not torch.isfinite(t).all():
                raise ValueError(f"{name} must be finite, got {t.tolist()}")
        rho1 = self.rho1 * 0.5 ** (self.updates // self.halve_every)
        gamma = e - e.mean() - self.tau
        kappa = r - r.mean() - self.tau
        self.nu = _norm(self.nu + rho1 * gamma)
        self.eta = _norm(self.eta + 2 * rho1 * kappa)
        self.mu = self.mu + self.rho2 * kappa
        self.updates += 1

    def class_weights(self) -> tuple[Tensor, Tensor]:
        """(u, v) as float32 (C,) tensors; each sums to 1 (the objective normalises by their sum)."""
        c = self.num_classes
        return (1 / c + self.nu - self.nu.mean()).float(), (1 / c + self.eta - self.eta.mean()).float()

    def bound_multipliers(self) -> Tensor:
        return torch.exp(2 * self.mu).clamp(0.98, 2.5).float()

    def state_dict(self) -> dict:
        return {"nu": self.nu.clone(), "eta": self.eta.clone(), "mu": self.mu.clone(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        for key in ("nu", "eta", "mu"):
            t = torch.as_tensor(state[key], dtype=torch.float64)
            if t.shape != (self.num_classes,):
                raise ValueError(f"fairness state {key!r} has shape {tuple(t.shape)}, expected ({self.num_classes},)")
            setattr(self, key, t.clone())
        self.updates = int(state["updates"])
