"""The AAA training objective, the meta-network's per-sample features, and the baselines'
losses as special cases of one weighted objective (see METHOD.md, "The training objective").

    L = sum_i a_i u_{y_i} CE(f(x_i), y_i) / sum_i u_{y_i}
      + lam * sum_i a_i v_{y_i} KL(p(x_i) || p(x_i^adv)) / sum_i v_{y_i}
      + (1/|B|) sum_i b_i CE(f(x_i^anti), y_i)

ERM is (a=1, lam=0, b=0); TRADES is (a=1, b=0, u=v=1); FRL is TRADES with fairness class
weights u, v; PGD-AT is ERM on adversarial logits. OBJECTIVES: "paper" as above; "kl-all"
(extension) weights the KL term by 1 instead of a_i, so anti rows keep adversarial training.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

NUM_FEATURES = 6
OBJECTIVES = ("paper", "kl-all")
INITIAL_CLASS_LOSS = 5.0  # METHOD.md: the previous-epoch class loss starts at 5


def upcast(t: Tensor) -> Tensor:
    """Half-precision logits to float32 for the losses; float32/float64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def per_sample_ce(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(upcast(logits), y, reduction="none")


def per_sample_kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL(softmax(p_logits) || softmax(q_logits)) per row."""
    log_p = F.log_softmax(upcast(p_logits), dim=1)
    return (log_p.exp() * (log_p - F.log_softmax(upcast(q_logits), dim=1))).sum(dim=1)


def sample_features(clean_logits: Tensor, y: Tensor, class_loss_avg: Tensor, class_share: Tensor) -> Tensor:
    """The six per-sample statistics zeta_i fed to the meta-network, (N, 6), detached:
    clean CE loss; previous-epoch average clean loss of the class; ||onehot(y) - p||_2;
    margin p_y - max_{k != y} p_k; sum_k p_k log p_k; the class's share of the training set."""
    logits = upcast(clean_logits.detach())
    log_p = F.log_softmax(logits, dim=1)
    p = log_p.exp()
    onehot = (y[:, None] == torch.arange(logits.shape[1], device=y.device)).to(p.dtype)  # F.one_hot reads max(y)
    ce = -(log_p * onehot).sum(1)
    grad_norm = (onehot - p).norm(dim=1)
    p_true = (p * onehot).sum(1)
    p_other = p.masked_fill(onehot.bool(), float("-inf")).amax(1)
    neg_entropy = (p * log_p).sum(1)
    return torch.stack([ce, class_loss_avg[y].to(ce.dtype), grad_norm, p_true - p_other, neg_entropy,
                        class_share[y].to(ce.dtype)], dim=1)


@dataclass
class LossTerms:
    total: Tensor
    natural: Tensor      # weighted CE on the clean (or, for PGD-AT, adversarial) rows
    boundary: Tensor     # weighted KL(clean || adversarial), before lam
    anti: Tensor         # mean b-weighted CE on the anti-adversarial rows
    per_sample_ce: Tensor  # unweighted CE of the natural rows, detached (for class statistics)


def weighted_objective(y: Tensor, nat_logits: Tensor, *, a: Tensor | float = 1.0, u: Tensor | None = None,
                       adv_logits: Tensor | None = None, v: Tensor | None = None, lam: float = 0.0,
                       anti_logits: Tensor | None = None, b: Tensor | float = 0.0,
                       a_boundary: Tensor | float | None = None, adv_index: Tensor | None = None,
                       anti_index: Tensor | None = None) -> LossTerms:
    """The three-term objective above. u, v: (C,) class weights (None: all 1); a, b: (N,) or numbers.
    A term whose logits are None (or lam = 0) is left out. `a_boundary` weights the KL term in
    place of a: 1.0 is the "kl-all" objective (extension), in which a row sent to the anti term
    keeps its label-free adversarial term. adv_index / anti_index: the rows of the batch that
    adv_logits / anti_logits belong to (None: every row); the others' terms count as 0, the
    normalisers stay the whole batch's."""
    ce = per_sample_ce(nat_logits, y)
    u_rows = u[y] if u is not None else torch.ones_like(ce)
    natural = (a * u_rows * ce).sum() / u_rows.sum()
    zero = natural.new_zeros(())
    boundary = zero
    if adv_logits is not None and lam != 0:
        v_rows = v[y] if v is not None else torch.ones_like(ce)
        a_kl = a if a_boundary is None else a_boundary
        kl = per_sample_kl(rows_of(nat_logits, adv_index), adv_logits)
        boundary = (rows_of(a_kl * v_rows, adv_index) * kl).sum() / v_rows.sum()
    anti = zero
    if anti_logits is not None:
        anti = (rows_of(b, anti_index) * per_sample_ce(anti_logits, rows_of(y, anti_index))).sum() / y.shape[0]
    return LossTerms(natural + lam * boundary + anti, natural, boundary, anti, ce.detach())


def rows_of(t: Tensor | float, index: Tensor | None) -> Tensor | float:
    """t's rows `index` (all of them for None; a number stands for every row)."""
    return t if index is None or not isinstance(t, Tensor) else t[index]
