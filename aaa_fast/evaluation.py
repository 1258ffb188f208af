"""Clean / PGD / class-wise / worst-class metrics (docs/METHOD.md, "Evaluation"), shared by the
training and evaluation CLIs.

Natural error e_c = 1 - clean accuracy of class c; robust error = 1 - PGD accuracy; boundary
error r_c = clean accuracy - PGD accuracy (the share of class c that is correct but not robust).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .attack import AMP, eval_mode, perturb, predict, unit_float
from .data import class_balanced_subset
from .models import build_model
from .runtime import ProgressLines

# the final evaluation's PGD random starts are drawn from seed + this, in train and evaluate alike
FINAL_EVAL_SEED_OFFSET = 99


@dataclass
class ClasswiseResult:
    nat_acc: Tensor  # (C,) clean accuracy per class
    rob_acc: Tensor  # (C,) PGD accuracy per class
    counts: Tensor   # (C,) samples per class

    @property
    def nat_err(self) -> Tensor:
        return 1 - self.nat_acc

    @property
    def rob_err(self) -> Tensor:
        return 1 - self.rob_acc

    @property
    def bdy_err(self) -> Tensor:
        return self.nat_acc - self.rob_acc

    def summary(self) -> dict[str, float]:
        """Averages over classes and worst classes, in percent (as METHOD.md's tables)."""
        present = self.counts > 0
        out = {}
        for name, err in (("nat", self.nat_err), ("bdy", self.bdy_err), ("rob", self.rob_err)):
            e = err[present]
            out[f"avg_{name}_err"] = 100 * e.mean().item()
            out[f"worst_{name}_err"] = 100 * e.max().item()
        total = self.counts.sum().clamp_min(1)
        out["clean_acc"] = 100 * (self.nat_acc * self.counts).sum().item() / total.item()
        out["pgd_acc"] = 100 * (self.rob_acc * self.counts).sum().item() / total.item()
        return out


def classwise_accuracy(model: nn.Module, x: Tensor, y: Tensor, num_classes: int, *, eps: float = 8 / 255,
                       steps: int = 20, alpha: float = 2 / 255, batch_size: int = 256,
                       amp_dtype: torch.dtype | None = None, generator: torch.Generator | None = None,
                       device: torch.device | None = None,
                       on_batch: Callable[[int], None] | None = None) -> ClasswiseResult:
    """Clean and PGD-`steps` (CE, uniform random start) accuracy per class over (x, y), in batches.
    x, y may live on the CPU; batches are moved to `device` (default: the model's). `on_batch(rows
    done)` is called after every batch (progress reports)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
    device = device or next(model.parameters()).device
    correct_nat = torch.zeros(num_classes, dtype=torch.float64, device=device)
    correct_rob = torch.zeros_like(correct_nat)
    counts = torch.zeros_like(correct_nat)
    with eval_mode(model):  # BatchNorm statistics frozen for every batch (perturb keeps it so)
        for start in range(0, x.shape[0], batch_size):
            xb = unit_float(x[start:start + batch_size].to(device, non_blocking=True))
            yb = y[start:start + batch_size].to(device, non_blocking=True).long()
            nat_ok = predict(model, xb, amp_dtype).argmax(1) == yb
            if steps > 0 and eps > 0:
                xa = perturb(model, xb, yb, eps=eps, steps=steps, alpha=alpha, random_start=True,
                             amp_dtype=amp_dtype, generator=generator)
                rob_ok = predict(model, xa, amp_dtype).argmax(1) == yb
            else:
                rob_ok = nat_ok
            counts += torch.bincount(yb, minlength=num_classes)
            correct_nat.index_add_(0, yb, nat_ok.double())
            correct_rob.index_add_(0, yb, rob_ok.double())
            if on_batch is not None:
                on_batch(start + yb.shape[0])
    denom = counts.clamp_min(1)
    return ClasswiseResult((correct_nat / denom).cpu(), (correct_rob / denom).cpu(), counts.cpu())


def model_for(arch: str, data, device) -> torch.nn.Module:
    """`arch` sized for the dataset (classes, channels) with its normalisation as first layer."""
    mean, std = data.mean_std
    return build_model(arch, num_classes=data.num_classes, in_channels=data.train_x.shape[1], mean=mean,
                       std=std).to(device)


def evaluate_split(model, x, y, num_classes, args, device, seed, progress_label: str | None = None,
                   on_batch: Callable[[int], None] | None = None) -> dict:
    """classwise_accuracy with a run's evaluation settings (args: eval_eps, eval_steps, batch_size,
    amp), as the summary dict plus per-class accuracies. With `progress_label`, progress lines;
    `on_batch(rows done)` after every batch (e.g. to stop on a signal)."""
    lines = None
    if progress_label:
        print(f"{progress_label}: started", file=sys.stderr, flush=True)
        lines = ProgressLines(progress_label, y.shape[0])

    def after_batch(done: int) -> None:
        if lines is not None:
            lines.update(done)
        if on_batch is not None:
            on_batch(done)

    result = classwise_accuracy(model, x, y, num_classes, eps=args.eval_eps, steps=args.eval_steps,
                                alpha=args.eval_eps / 4, batch_size=max(args.batch_size, 256), amp_dtype=AMP[args.amp],
                                generator=torch.Generator(device=device).manual_seed(seed), device=device,
                                on_batch=after_batch)
    out = result.summary()
    out["classwise_clean_acc"] = (100 * result.nat_acc).tolist()
    out["classwise_pgd_acc"] = (100 * result.rob_acc).tolist()
    return out


def check_test_subset(test_subset: int | None, num_classes: int) -> None:
    """The final test subset is class-balanced: it needs at least one image per class."""
    if test_subset is not None and test_subset < num_classes:
        raise SystemExit(f"error: --test-subset must be at least the number of classes ({num_classes}), "
                         f"got {test_subset}")


def final_test_set(data, test_subset: int | None, device) -> tuple[Tensor, Tensor]:
    """The test images of the final evaluation: all, or a class-balanced subset that is the same for
    every seed and method (drawn with a fixed generator)."""
    x, y = data.test_x, data.test_y
    if test_subset is not None and test_subset < y.shape[0]:
        keep = class_balanced_subset(y, test_subset, data.num_classes, torch.Generator().manual_seed(0))
        x, y = x[keep], y[keep]
    return x.to(device), y.to(device)


def final_evaluation(model, data, args, device, progress: bool = False,
                     on_batch: Callable[[int], None] | None = None) -> dict:
    """The run's final.json numbers: train's last step and `python -m aaa_fast.evaluate` both call
    this. `progress`: lines with rate and ETA (images) while it runs."""
    test_x, test_y = final_test_set(data, args.test_subset, device)
    label = f"PGD-{args.eval_steps} evaluation on {test_y.shape[0]} test images" if progress else None
    result = evaluate_split(model, test_x, test_y, data.num_classes, args, device,
                            seed=args.seed + FINAL_EVAL_SEED_OFFSET, progress_label=label, on_batch=on_batch)
    if args.autoattack:
        result["autoattack_acc"] = autoattack_accuracy(model, test_x, test_y, args)
    return result


def autoattack_accuracy(model, x, y, args) -> float | str:
    try:
        import torchattacks
    except ImportError:
        msg = "torchattacks is not installed (pip install --no-deps torchattacks); AutoAttack skipped"
        print(f"warning: {msg}", file=sys.stderr)
        return msg
    model.eval()
    attack = torchattacks.AutoAttack(model, norm="Linf", eps=args.eval_eps, n_classes=int(y.max()) + 1, seed=args.seed)
    correct = 0
    for s in range(0, y.shape[0], 256):
        xb = unit_float(x[s:s + 256])
        xa = attack(xb, y[s:s + 256])
        correct += (predict(model, xa).argmax(1) == y[s:s + 256]).sum().item()
    return 100 * correct / y.shape[0]


def format_final(final: dict) -> str:
    lines = [f"final ({final['method']}, {final['dataset']}, {final['arch']}; PGD-{final['eval_steps']} "
             f"eps {final['eval_eps']:.4f}):",
             f"{'':<10}{'natural':>10}{'boundary':>10}{'robust':>10}   (error, %)",
             f"{'average':<10}{final['avg_nat_err']:>10.2f}{final['avg_bdy_err']:>10.2f}{final['avg_rob_err']:>10.2f}",
             f"{'worst':<10}{final['worst_nat_err']:>10.2f}{final['worst_bdy_err']:>10.2f}{final['worst_rob_err']:>10.2f}",
             f"clean accuracy {final['clean_acc']:.2f}%, PGD accuracy {final['pgd_acc']:.2f}%"]
    if "autoattack_acc" in final:
        lines.append(f"AutoAttack accuracy: {final['autoattack_acc']}")
    return "\n".join(lines)


