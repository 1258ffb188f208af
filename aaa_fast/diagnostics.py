"""What the meta-network chose, per epoch: the learning signal and the mechanism.

Learning signal: the anti-adversarial share (rows with b_i > a_i), the share of rows inside the
softmax's gradient band (a_i(1 - a_i) > 1e-3, so a meta step can still move them) and the
meta-gradient's norm. Mechanism (docs/METHOD.md, "Idea"): whether corrupted-label rows and
tail-class rows go to the anti term more often than clean and head-class rows, and how well b_i
ranks the corrupted rows (AUROC; 0.5 is chance).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# metrics.csv columns this module fills (blank where a scenario has no such group)
GROUP_FIELDS = ["anti_share_corrupted", "anti_share_clean", "anti_share_tail", "anti_share_head", "anti_auroc_corrupted"]
# the groups `ChoiceDiagnostics.groups` names, with the metrics.csv column of each one's anti share
GROUP_SHARES = {"corrupted labels": "anti_share_corrupted", "clean labels": "anti_share_clean",
                "tail classes": "anti_share_tail", "head classes": "anti_share_head", "all rows": "frac_anti"}


def auroc(scores: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve of `scores` for the rows where `positive` is True: the chance
    that a random positive scores above a random negative, ties counting half
    (Mann-Whitney U with mid-ranks). NaN when either class is empty."""
    scores, positive = scores.double().flatten(), positive.bool().flatten()
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = scores.argsort()
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    # mid-ranks for ties: every member of a run of equal scores gets the run's mean rank
    unique, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    if unique.numel() < scores.numel():
        sums = torch.zeros(unique.numel(), dtype=torch.float64).index_add_(0, inverse, ranks[order])
        ranks[order] = (sums / counts)[inverse]
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


class ChoiceDiagnostics:
    """Accumulates the rows' (a, b) over an epoch, with each row's group membership.

    corrupted: (N_train,) bool, True where the training label differs from the true one (None
    when the scenario has no label noise); tail_class: (C,) bool, True for tail classes (None for
    a balanced training set). `add` takes the batch's dataset indices and true classes."""

    def __init__(self, corrupted: Tensor | None, tail_class: Tensor | None):
        self.corrupted = corrupted.cpu() if corrupted is not None and bool(corrupted.any()) else None
        self.tail_class = tail_class.cpu() if tail_class is not None else None
        self.reset()

    def reset(self) -> None:
        self._b, self._anti, self._index, self._eps = [], [], [], []

    def state_dict(self) -> dict:
        return {"index": [t.cpu() for t in self._index], "b": [t.cpu() for t in self._b],
                "anti": [t.cpu() for t in self._anti], "eps": [t.cpu() for t in self._eps]}

    def load_state_dict(self, state: dict) -> None:
        self._index, self._b, self._anti = list(state["index"]), list(state["b"]), list(state["anti"])
        self._eps = list(state.get("eps", []))  # checkpoints written before the bounds were kept

    def add(self, index: Tensor, a: Tensor, b: Tensor, eps: Tensor | None = None) -> None:
        """Kept on the training device: no host copy per step, one per epoch in `summary`.
        eps: the rows' bounds eps_i (for the class-wise mean in `distributions`)."""
        self._index.append(index.detach())
        self._b.append(b.detach().float())
        self._anti.append((b > a).detach())
        if eps is not None:
            self._eps.append(eps.detach().float())

    def groups(self, index: Tensor, true_labels: Tensor) -> dict[str, Tensor]:
        """The rows' groups by name: corrupted / clean labels, else tail / head classes, else all."""
        if self.corrupted is not None:
            bad = self.corrupted[index]
            return {"corrupted labels": bad, "clean labels": ~bad}
        if self.tail_class is not None:
            tail = self.tail_class[true_labels.cpu()[index]]
            return {"tail classes": tail, "head classes": ~tail}
        return {"all rows": torch.ones_like(index, dtype=torch.bool)}

    def distributions(self, true_labels: Tensor, num_classes: int, bins: int = 20) -> dict | None:
        """What mechanism.png shows of this epoch: each group's histogram of b_i over [0, 1] (the
        share of the group's rows per bin) and the mean eps_i per true class (None: no rows)."""
        if not self._index:
            return None
        index, b = torch.cat([t.cpu() for t in self._index]), torch.cat([t.cpu() for t in self._b])
        hist = {}
        for name, mask in self.groups(index, true_labels).items():
            if bool(mask.any()):
                counts = torch.histc(b[mask].clamp(0, 1), bins=bins, min=0, max=1)
                hist[name] = (counts / counts.sum()).tolist()
        eps_per_class = None
        if self._eps and sum(t.numel() for t in self._eps) == index.numel():
            eps, labels = torch.cat([t.cpu() for t in self._eps]), true_labels.cpu()[index]
            total = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, eps.double())
            count = torch.bincount(labels, minlength=num_classes).double()
            eps_per_class = torch.where(count > 0, total / count.clamp(min=1), torch.nan).tolist()
        return {"bins": bins, "b_hist": hist, "eps_per_class": eps_per_class}

    def summary(self, true_labels: Tensor) -> dict:
        """{field: value} for GROUP_FIELDS ('' where the group does not exist or saw no row)."""
        out = dict.fromkeys(GROUP_FIELDS, "")
        if not self._index:
            return out
        index, b, anti = (torch.cat([t.cpu() for t in parts]) for parts in (self._index, self._b, self._anti))
        anti = anti.float()

        def share(mask: Tensor):
            return float(anti[mask].mean()) if bool(mask.any()) else ""

        if self.corrupted is not None:
            bad = self.corrupted[index]
            out["anti_share_corrupted"], out["anti_share_clean"] = share(bad), share(~bad)
            value = auroc(b, bad)
            out["anti_auroc_corrupted"] = "" if math.isnan(value) else value
        if self.tail_class is not None:
            tail = self.tail_class[true_labels.cpu()[index]]
            out["anti_share_tail"], out["anti_share_head"] = share(tail), share(~tail)
        return out


def tail_classes(true_counts: Tensor) -> Tensor | None:
    """The floor(C/2) classes with the fewest training samples (None when all are equal)."""
    if true_counts.max() == true_counts.min():
        return None
    tail = torch.zeros(true_counts.numel(), dtype=torch.bool)
    tail[true_counts.cpu().argsort(stable=True)[:true_counts.numel() // 2]] = True
    return tail
