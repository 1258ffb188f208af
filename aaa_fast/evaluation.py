"""Clean / PGD / AutoAttack, class-wise and worst-class metrics (docs/METHOD.md, "Evaluation"),
shared by the training and evaluation CLIs. Every evaluation runs in fp32, whatever precision the
run trained in: a bf16 attack has bf16 gradients and can only be weaker.

Natural error e_c = 1 - clean accuracy of class c; robust error = 1 - accuracy under the attack;
boundary error r_c = clean accuracy - robust accuracy (the share of class c that is correct but
not robust). The same class-wise result is built for PGD and for AutoAttack.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .attack import perturb
from .model_io import eval_mode, predict, unit_float
from .autoattack import autoattack, needs_torchattacks, torchattacks_missing
from .data import class_balanced_subset
from .models import build_model
from .runtime import ProgressLines

# the final evaluation's PGD random starts are drawn from seed + this, in train and evaluate alike
FINAL_EVAL_SEED_OFFSET = 99
EVAL_DTYPE = "float32"  # of every evaluation (final and per epoch), recorded in final.json
FINAL_ATTACKS = ("pgd", "autoattack", "both")


@dataclass(frozen=True)
class EvalConfig:
    """What an evaluation does, apart from the model and the data: the budget, PGD's steps
    (step eps/4), rows per batch, the class-balanced test subset (None: the whole test set), the
    seed of the random starts, the final attack ("pgd", "autoattack", "both"), AutoAttack's
    version and the threat model's norm ("linf" or "l2"). Always fp32."""
    eps: float
    pgd_steps: int = 20
    batch_size: int = 256
    test_subset: int | None = None
    seed: int = 0
    final_attack: str = "pgd"
    aa_version: str = "standard"
    norm: str = "linf"

    @classmethod
    def of_run(cls, run) -> "EvalConfig":
        """A run's evaluation settings from its flags (or its config.json read as a namespace):
        the final evaluation's seed is the run's + FINAL_EVAL_SEED_OFFSET."""
        return cls(eps=run.eval_eps, pgd_steps=run.eval_steps, batch_size=max(run.batch_size, 256),
                   test_subset=run.test_subset, seed=run.seed + FINAL_EVAL_SEED_OFFSET,
                   final_attack=getattr(run, "final_attack", "pgd"), aa_version=getattr(run, "aa_version", "standard"),
                   norm=getattr(run, "norm", "linf"))


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

    @classmethod
    def from_points(cls, y: Tensor, nat_ok: Tensor, rob_ok: Tensor, num_classes: int) -> "ClasswiseResult":
        """From per-point outcomes (correct on the clean input; robust under the attack)."""
        y = y.cpu().long()
        counts = torch.bincount(y, minlength=num_classes).double()
        nat = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, y, nat_ok.cpu().double())
        rob = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, y, rob_ok.cpu().double())
        denom = counts.clamp_min(1)
        return cls(nat / denom, rob / denom, counts)

    def _mean(self, acc: Tensor) -> float:
        return 100 * (acc * self.counts).sum().item() / self.counts.sum().clamp_min(1).item()

    def summary(self, prefix: str = "", acc_name: str = "pgd_acc") -> dict[str, float]:
        """Averages over classes and worst classes, in percent (as METHOD.md's tables): natural
        error and clean accuracy, then boundary and robust error (named with `prefix`) and the
        robust accuracy (named `acc_name`)."""
        present = self.counts > 0
        out = {}
        for name, err in (("nat", self.nat_err), ("bdy", self.bdy_err), ("rob", self.rob_err)):
            e = err[present]
            key = "" if name == "nat" else prefix
            out[f"{key}avg_{name}_err"] = 100 * e.mean().item()
            out[f"{key}worst_{name}_err"] = 100 * e.max().item()
        out["clean_acc"] = self._mean(self.nat_acc)
        out[acc_name] = self._mean(self.rob_acc)
        return out


def classwise_accuracy(model: nn.Module, x: Tensor, y: Tensor, num_classes: int, *, eps: float = 8 / 255,
                       steps: int = 20, alpha: float = 2 / 255, norm: str = "linf", batch_size: int = 256,
                       amp_dtype: torch.dtype | None = None, generator: torch.Generator | None = None,
                       device: torch.device | None = None,
                       on_batch: Callable[[int], None] | None = None) -> ClasswiseResult:
    """Clean and PGD-`steps` (CE, uniform random start, in `norm`) accuracy per class over (x, y), in batches.
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
                xa = perturb(model, xb, yb, eps=eps, steps=steps, alpha=alpha, norm=norm, random_start=True,
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


def evaluate_split(model, x, y, num_classes, cfg: EvalConfig, device, seed: int, progress_label: str | None = None,
                   on_batch: Callable[[int], None] | None = None) -> dict:
    """classwise_accuracy with PGD-cfg.pgd_steps at cfg.eps, in fp32, random starts from `seed`,
    as the summary dict plus per-class accuracies. With `progress_label`, progress lines;
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

    result = classwise_accuracy(model, x, y, num_classes, eps=cfg.eps, steps=cfg.pgd_steps, alpha=cfg.eps / 4,
                                norm=cfg.norm, batch_size=cfg.batch_size, amp_dtype=None,
                                generator=torch.Generator(device=device).manual_seed(seed), device=device,
                                on_batch=after_batch)
    out = result.summary()
    out["classwise_clean_acc"] = (100 * result.nat_acc).tolist()
    out["classwise_pgd_acc"] = (100 * result.rob_acc).tolist()
    return out


def check_test_subset(test_subset: int | None, num_classes: int, test_size: int) -> None:
    """The final test subset is class-balanced: it needs at least one image per class, and at
    most the test set (a larger one would be evaluated on fewer images than it says)."""
    if test_subset is not None and test_subset < num_classes:
        raise SystemExit(f"error: --test-subset must be at least the number of classes ({num_classes}), "
                         f"got {test_subset}")
    if test_subset is not None and test_subset > test_size:
        raise SystemExit(f"error: --test-subset {test_subset} is more than the {test_size} test images; "
                         "leave it out to evaluate on all of them")


def final_test_set(data, test_subset: int | None, device) -> tuple[Tensor, Tensor]:
    """The test images of the final evaluation: all, or a class-balanced subset that is the same for
    every seed and method (drawn with a fixed generator)."""
    x, y = data.test_x, data.test_y
    if test_subset is not None and test_subset < y.shape[0]:
        keep = class_balanced_subset(y, test_subset, data.num_classes, torch.Generator().manual_seed(0))
        x, y = x[keep], y[keep]
    return x.to(device), y.to(device)


def autoattack_progress(version: str, on_batch: Callable[[int], None] | None = None, lines: bool = True):
    """autoattack's progress factory: a start line and lines with rate and ETA per attack, and
    `on_batch(points done)` after every batch (e.g. to stop on a signal)."""
    from .runtime import ProgressLines

    def start(name: str, points: int):
        label = f"AutoAttack {version}: {name} on {points} robust points"
        counter = ProgressLines(label, max(points, 1)) if lines else None
        if lines:
            print(label, file=sys.stderr, flush=True)

        def update(done: int) -> None:
            if counter is not None:
                counter.update(done)
            if on_batch is not None:
                on_batch(done)
        return update
    return start


def autoattack_summary(res, y: Tensor, num_classes: int) -> dict:
    """final.json's aa_* entries from an AutoAttackResult: class-wise and worst-class robust and
    boundary error, accuracy (overall and class-wise) after each attack, timing."""
    cw = ClasswiseResult.from_points(y, res.clean_correct, res.robust, num_classes)
    out = cw.summary(prefix="aa_", acc_name="aa_acc")
    after = {k: ClasswiseResult.from_points(y, res.clean_correct, v, num_classes) for k, v in res.robust_after.items()}
    out.update(classwise_clean_acc=(100 * cw.nat_acc).tolist(), classwise_aa_acc=(100 * cw.rob_acc).tolist(),
               aa_version=res.version, aa_attacks=list(res.attacks), aa_eps=res.eps, aa_norm=res.norm,
               aa_acc_after={k: c.summary()["pgd_acc"] for k, c in after.items()},
               classwise_aa_acc_after={k: (100 * c.rob_acc).tolist() for k, c in after.items()},
               aa_seconds=round(sum(res.seconds.values()), 1), aa_seconds_per_attack=res.seconds,
               aa_test_images=int(y.shape[0]))
    if res.rejected:
        out["aa_rejected_outside_ball"] = res.rejected
    return out


def check_final_attack(final_attack: str, aa_version: str) -> None:
    """Refuse, before any training, an AutoAttack that cannot run here."""
    if final_attack not in FINAL_ATTACKS:
        raise SystemExit(f"error: --final-attack must be one of {', '.join(FINAL_ATTACKS)}, got {final_attack!r}")
    if final_attack != "pgd" and needs_torchattacks(aa_version) and (why := torchattacks_missing()):
        raise SystemExit(f"error: {why}; or pass --aa-version fast (APGD-CE + APGD-T, not the standard AutoAttack)")
    if final_attack != "pgd" and aa_version == "fast":
        print("warning: AutoAttack fast is APGD-CE + APGD-T only, not the standard AutoAttack: report its figures "
              "under that name", file=sys.stderr)


def final_evaluation(model, data, cfg: EvalConfig, device, progress: bool = False,
                     on_batch: Callable[[int], None] | None = None) -> dict:
    """The run's final.json numbers: train's last step and `python -m aaa_fast.evaluate` both call
    this. cfg.final_attack: "pgd" (PGD-cfg.pgd_steps), "autoattack" (cfg.aa_version) or "both";
    always fp32. `progress`: lines with rate and ETA while it runs."""
    return final_evaluation_points(model, data, cfg, device, progress, on_batch)[0]


def final_evaluation_points(model, data, cfg: EvalConfig, device, progress: bool = False,
                            on_batch: Callable[[int], None] | None = None):
    """final_evaluation, and AutoAttack's per-point result (an AutoAttackResult; None when it did
    not run), for checks that reuse it on the same images (the masking report)."""
    test_x, test_y = final_test_set(data, cfg.test_subset, device)
    result, res = {}, None
    if cfg.final_attack in ("autoattack", "both"):
        res = autoattack(model, test_x, test_y, eps=cfg.eps, num_classes=data.num_classes, norm=cfg.norm,
                         version=cfg.aa_version,
                         seed=cfg.seed, batch_size=cfg.batch_size, device=device,
                         progress=autoattack_progress(cfg.aa_version, on_batch, lines=progress))
        result.update(autoattack_summary(res, test_y, data.num_classes))
    if cfg.final_attack in ("pgd", "both"):  # its clean numbers (the same predictions) come first
        label = f"PGD-{cfg.pgd_steps} evaluation on {test_y.shape[0]} test images" if progress else None
        result.update(evaluate_split(model, test_x, test_y, data.num_classes, cfg, device, seed=cfg.seed,
                                     progress_label=label, on_batch=on_batch))
    result.update(final_attack=cfg.final_attack, eval_dtype=EVAL_DTYPE, test_images=int(test_y.shape[0]))
    return result, res


def format_final(final: dict) -> str:
    """The error table of each attack final.json holds (PGD, AutoAttack), in percent."""
    images = f", {final['test_images']} test images" if "test_images" in final else ""
    lines = [f"final ({final['method']}, {final['dataset']}, {final['arch']}; eps {final['eval_eps']:.4f}{images}, "
             f"{final.get('eval_dtype', 'float32')}):"]
    for prefix, acc, name in (("", "pgd_acc", f"PGD-{final['eval_steps']}"),
                              ("aa_", "aa_acc", f"AutoAttack {final.get('aa_version', '')}".rstrip())):
        if acc not in final:
            continue
        lines += [f"{name:<24}{'natural':>10}{'boundary':>10}{'robust':>10}   (error, %)",
                  *(f"  {label:<22}{final[f'{row}_nat_err']:>10.2f}{final[f'{prefix}{row}_bdy_err']:>10.2f}"
                    f"{final[f'{prefix}{row}_rob_err']:>10.2f}" for row, label in (("avg", "average"), ("worst", "worst")))]
    accs = [f"clean accuracy {final['clean_acc']:.2f}%"]
    if "pgd_acc" in final:
        accs.append(f"PGD accuracy {final['pgd_acc']:.2f}%")
    if "aa_acc" in final:
        accs.append(f"AutoAttack accuracy {final['aa_acc']:.2f}% ({final['aa_seconds']:.0f} s)")
    lines.append(", ".join(accs))
    return "\n".join(lines)


EARLIER_KEYS = ("aa_acc", "aa_version", "aa_eps", "aa_norm", "clean_acc", "method", "epoch", "test_subset")


def read_earlier_autoattack(path: str) -> dict:
    """An earlier evaluation's JSON with the AutoAttack figures --autoattack-from needs."""
    try:
        with open(path) as f:
            earlier = json.load(f)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: --autoattack-from {path}: cannot read it ({exc})") from None
    missing = [k for k in EARLIER_KEYS if not isinstance(earlier, dict) or k not in earlier]
    if missing:
        raise SystemExit(f"error: --autoattack-from {path} has no {', '.join(missing)}: it must be the --json of "
                         "`python -m aaa_fast.evaluate --autoattack`")
    return earlier


def check_same_evaluation(earlier: dict, path: str, *, method: str, epoch, test_subset, eps: float, norm: str,
                          clean_acc: float | None = None) -> None:
    """--autoattack-from must describe this model on these images at this budget: the run's
    settings (checked before evaluating), then the clean accuracy just measured (one image moves
    it by 100 / N points)."""
    now = {"method": method, "epoch": epoch, "test_subset": test_subset, "aa_eps": eps, "aa_norm": norm}
    differ = [f"{k} {earlier[k]!r} there, {v!r} here" for k, v in now.items() if earlier[k] != v]
    if clean_acc is not None and abs(earlier["clean_acc"] - clean_acc) > 1e-6:
        differ.append(f"clean accuracy {earlier['clean_acc']} there, {clean_acc} here")
    if differ:
        raise SystemExit(f"error: --autoattack-from {path} is not an evaluation of this checkpoint on these images: "
                         + "; ".join(differ))
