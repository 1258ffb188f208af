"""Data scenarios of METHOD.md: a clean balanced meta set, long-tailed training sets, label noise.

Order, as in Meta-Weight-Net: the meta set is drawn from the clean training set and removed
from it; the rest is made long-tailed (by true labels); label noise touches only that rest.
Everything is seeded by one torch.Generator and recorded in `Scenario.info`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .datasets import Dataset

NOISE_KINDS = ("none", "uniform", "flip1", "flip2")


@dataclass
class Scenario:
    train_x: Tensor
    train_y: Tensor          # possibly noisy labels the model trains on
    train_y_clean: Tensor    # true labels, for analysis only
    meta_x: Tensor
    meta_y: Tensor
    num_classes: int
    info: dict = field(default_factory=dict)

    @property
    def class_counts(self) -> Tensor:
        return torch.bincount(self.train_y, minlength=self.num_classes)


def split_meta(y: Tensor, num_meta: int, num_classes: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Indices (meta, rest): num_meta / C random samples of every class, and all the others."""
    if num_meta % num_classes:
        raise ValueError(f"num_meta must be a multiple of the {num_classes} classes, got {num_meta}")
    per_class = num_meta // num_classes
    meta = []
    for c in range(num_classes):
        idx = (y == c).nonzero().squeeze(1)
        if idx.numel() < per_class:
            raise ValueError(f"class {c} has {idx.numel()} samples, fewer than the {per_class} the meta set needs")
        meta.append(idx[torch.randperm(idx.numel(), generator=generator)[:per_class]])
    meta = torch.cat(meta)
    keep = torch.ones(y.shape[0], dtype=torch.bool)
    keep[meta] = False
    return meta, keep.nonzero().squeeze(1)


def long_tail_counts(n_max: int, imbalance_factor: float, num_classes: int, generator: torch.Generator) -> Tensor:
    """Samples kept per class: the class at rank r (order shuffled) keeps n_max / IF^(r/(C-1))."""
    if imbalance_factor < 1:
        raise ValueError(f"imbalance factor must be >= 1, got {imbalance_factor}")
    order = torch.randperm(num_classes, generator=generator)
    counts = torch.empty(num_classes, dtype=torch.long)
    for rank, c in enumerate(order.tolist()):
        counts[c] = int(n_max / imbalance_factor ** (rank / (num_classes - 1)))
    return counts


def make_long_tailed(y: Tensor, imbalance_factor: float, num_classes: int, generator: torch.Generator) -> Tensor:
    """Indices of a long-tailed subset of the samples with labels y."""
    available = torch.bincount(y, minlength=num_classes)
    counts = long_tail_counts(int(available.min()), imbalance_factor, num_classes, generator)
    keep = []
    for c in range(num_classes):
        idx = (y == c).nonzero().squeeze(1)
        keep.append(idx[torch.randperm(idx.numel(), generator=generator)[:counts[c]]])
    return torch.cat(keep).sort().values


def noise_targets(kind: str, num_classes: int, generator: torch.Generator) -> Tensor | None:
    """flip1: (C, 1) one fixed other class per class; flip2: (C, 2) two distinct other classes."""
    if kind in ("none", "uniform"):
        return None
    k = 1 if kind == "flip1" else 2
    if num_classes <= k:
        raise ValueError(f"{kind} noise needs more than {k} classes")
    rows = []
    for c in range(num_classes):
        others = torch.tensor([o for o in range(num_classes) if o != c])
        rows.append(others[torch.randperm(others.numel(), generator=generator)[:k]])
    return torch.stack(rows)


def corrupt_labels(y: Tensor, kind: str, rate: float, num_classes: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
    """uniform: with probability rate the label is redrawn uniformly over all C classes;
    flip1: it becomes its class's fixed other class with probability rate; flip2: one of two
    fixed other classes, rate/2 each. Returns the new labels and the flip targets."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"label noise must be one of {NOISE_KINDS}, got {kind!r}")
    if not 0 <= rate < 1:
        raise ValueError(f"noise rate must be in [0, 1), got {rate}")
    targets = noise_targets(kind, num_classes, generator)
    if kind == "none" or rate == 0:
        return y.clone(), targets
    u = torch.rand(y.shape[0], generator=generator)
    y = y.clone()
    if kind == "uniform":
        hit = u < rate
        y[hit] = torch.randint(0, num_classes, (int(hit.sum()),), generator=generator)
    elif kind == "flip1":
        hit = u < rate
        y[hit] = targets[y[hit], 0]
    else:
        first, second = u < rate / 2, (u >= rate / 2) & (u < rate)
        y_orig = y.clone()
        y[first] = targets[y_orig[first], 0]
        y[second] = targets[y_orig[second], 1]
    return y, targets


def class_balanced_subset(y: Tensor, total: int, num_classes: int, generator: torch.Generator) -> Tensor:
    """Sorted indices of a random subset with `total // num_classes` samples of each class (all of
    a class's samples where it has fewer)."""
    per_class = total // num_classes
    members = [(y == k).nonzero().squeeze(1) for k in range(num_classes)]
    return torch.cat([m[torch.randperm(m.shape[0], generator=generator)[:per_class]] for m in members]).sort().values


def build_scenario(data: Dataset, *, num_meta: int = 1000, imbalance_factor: float = 1.0, noise: str = "none",
                   noise_rate: float = 0.0, seed: int = 0, train_subset: int | None = None) -> Scenario:
    """The training and meta sets of one scenario. `train_subset` keeps a random, class-balanced
    share of the training set first (for quick runs)."""
    g = torch.Generator().manual_seed(seed)
    x, y = data.train_x, data.train_y
    c = data.num_classes
    if train_subset is not None and train_subset < y.shape[0]:
        idx = class_balanced_subset(y, train_subset, c, g)
        x, y = x[idx], y[idx]
    meta_idx, rest = split_meta(y, num_meta, c, g)
    x_rest, y_rest = x[rest], y[rest]
    if imbalance_factor > 1:
        kept = make_long_tailed(y_rest, imbalance_factor, c, g)
        x_rest, y_rest = x_rest[kept], y_rest[kept]
    y_noisy, targets = corrupt_labels(y_rest, noise, noise_rate, c, g)
    info = dict(seed=seed, num_meta=num_meta, imbalance_factor=imbalance_factor, noise=noise, noise_rate=noise_rate,
                train_size=int(y_rest.shape[0]), actual_noise_rate=float((y_noisy != y_rest).float().mean()),
                class_counts=torch.bincount(y_noisy, minlength=c).tolist(),
                true_class_counts=torch.bincount(y_rest, minlength=c).tolist(),
                flip_targets=None if targets is None else targets.tolist())
    return Scenario(x_rest, y_noisy, y_rest, x[meta_idx], y[meta_idx], c, info)
