"""Gradient-masking checks, as a reviewer runs them on a new defence (Athalye et al. 2018; Croce
& Hein 2020's checks): several attacks on the same images, robust accuracy against a growing
budget, and flags for the known signs that gradients, not robustness, stop the attacks.

- black box beats white box: Square (no gradients) breaks points that PGD-20, PGD-100 x 5
  restarts and APGD-CE leave robust;
- more steps do not help: neither PGD-100 x 5 restarts nor APGD-CE gains anything over PGD-20,
  although AutoAttack finds STALL_GAP points more;
- not zero at a large budget: at the largest eps of the sweep (the whole [0, 1] box in linf)
  every input is reachable, so a working attack leaves no point robust;
- zero gradients: points whose input gradient of the loss is exactly 0;
- randomised forward: two forwards of the same input differ (attacks then need EOT).

Everything in fp32, on the same images, with the attacks' budgets in the report.
"""
from __future__ import annotations

import math
import os
import sys
import time

import torch
from torch import Tensor, nn

from .attack import cross_entropy, perturb
from .autoattack import AutoAttackResult, apgd, autoattack, run_attacks, torchattacks_attack, torchattacks_missing
from .checkpoint import write_json_atomic
from .model_io import eval_mode, predict, unit_float
from .plots import save_figure

MARGIN = 2.0          # percentage points an attack must beat another by to count as beating it
STALL_GAP = 5.0       # points AutoAttack must find beyond PGD-20 for stalled PGD to count as a sign
LARGE_EPS_ACC = 1.0   # robust accuracy (%) above which the largest budget counts as "not zero"
SWEEP_FACTORS = (1, 2, 4, 8, 16, 32)


def sweep_budgets(eps: float, norm: str, dims: int) -> list[float]:
    """eps, 2 eps, 4 eps, ... up to the budget that reaches every input of the box (1 in linf,
    sqrt(dims) in l2), which ends the list."""
    top = 1.0 if norm == "linf" else math.sqrt(dims)
    return sorted({min(eps * f, top) for f in SWEEP_FACTORS if eps > 0} | {top})


def _accuracy(ok: Tensor) -> float:
    return 100.0 * ok.float().mean().item() if ok.numel() else 0.0


def _pgd_robust(model, x, y, *, eps, steps, alpha, restarts, norm, batch_size, device, generator) -> Tensor:
    """PGD-`steps` (CE, uniform random start) with `restarts` starts; robust = survives all."""
    robust = torch.zeros(y.shape[0], dtype=torch.bool)
    for s in range(0, y.shape[0], batch_size):
        xb, yb = unit_float(x[s:s + batch_size].to(device)), y[s:s + batch_size].to(device).long()
        ok = predict(model, xb).argmax(1) == yb
        for _ in range(restarts):
            xa = perturb(model, xb, yb, eps=eps, steps=steps, alpha=alpha, norm=norm, random_start=True,
                         generator=generator)
            ok &= predict(model, xa).argmax(1) == yb
        robust[s:s + batch_size] = ok.cpu()
    return robust


def _zero_gradient_share(model, x, y, batch_size, device) -> float:
    zero = 0
    for s in range(0, y.shape[0], batch_size):
        xb = unit_float(x[s:s + batch_size].to(device)).requires_grad_(True)
        yb = y[s:s + batch_size].to(device).long()
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(cross_entropy(model(xb), yb).sum(), xb)
        zero += int((grad.flatten(1).abs().amax(1) == 0).sum())
    return 100.0 * zero / max(y.shape[0], 1)


def masking_report(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, num_classes: int, norm: str = "linf",
                   aa_version: str = "standard", seed: int = 0, batch_size: int = 500,
                   device: torch.device | None = None, progress: bool = False,
                   autoattack_result: AutoAttackResult | None = None,
                   autoattack_accuracy: tuple[str, float] | None = None) -> dict:
    """The gradient-masking report of `model` on (x, y) at budget `eps` (see the module's doc):
    robust accuracy (%) under each attack, robust accuracy against eps, and the flags with the
    evidence for each. Square needs torchattacks; without it the black-box check is skipped and
    says so. autoattack_result: AutoAttack of these very images at this eps, already run (its
    version named in the report), instead of running it again; autoattack_accuracy: (version,
    robust accuracy %) of such a run read back from its results (the report needs only the
    accuracy)."""
    if autoattack_result is not None and autoattack_accuracy is not None:
        raise ValueError("give autoattack_result or autoattack_accuracy, not both")
    if autoattack_accuracy is not None:
        aa_version = autoattack_accuracy[0]
    if autoattack_result is not None:
        if autoattack_result.robust.shape[0] != y.shape[0] or autoattack_result.eps != eps:
            raise ValueError("autoattack_result must come from the same images and eps as the report")
        aa_version = autoattack_result.version
    device = device or next(model.parameters()).device
    n = y.shape[0]
    times = {}

    def log(msg):
        if progress:
            print(f"masking report: {msg}", file=sys.stderr, flush=True)

    def gen():
        return torch.Generator(device=device).manual_seed(seed)

    with eval_mode(model):
        xs = unit_float(x[: min(n, batch_size)].to(device))
        randomized = not torch.equal(predict(model, xs), predict(model, xs))
        clean = torch.cat([(predict(model, unit_float(x[s:s + batch_size].to(device))).argmax(1)
                            == y[s:s + batch_size].to(device)).cpu() for s in range(0, n, batch_size)])
        acc = {"clean": _accuracy(clean)}
        runs = {
            "PGD-20": lambda: _pgd_robust(model, x, y, eps=eps, steps=20, alpha=eps / 4, restarts=1, norm=norm,
                                          batch_size=batch_size, device=device, generator=gen()),
            "PGD-100 x 5 restarts": lambda: _pgd_robust(model, x, y, eps=eps, steps=100, alpha=2.5 * eps / 100,
                                                        restarts=5, norm=norm, batch_size=batch_size,
                                                        device=device, generator=gen()),
            "APGD-CE": lambda: _apgd_points(model, x, y, eps, norm, batch_size, device, gen()),
        }
        if autoattack_accuracy is None:
            runs[f"AutoAttack {aa_version}"] = lambda: (autoattack_result or autoattack(
                model, x, y, eps=eps, num_classes=num_classes, norm=norm, version=aa_version, seed=seed,
                batch_size=batch_size, device=device, progress=progress)).robust
        else:
            acc[f"AutoAttack {aa_version}"], times[f"AutoAttack {aa_version}"] = autoattack_accuracy[1], 0.0
        square_missing = torchattacks_missing()
        if square_missing is None:
            runs["Square (black-box)"] = lambda: _square_points(model, x, y, eps, norm, num_classes, seed,
                                                                batch_size, device)
        robust = {}
        for name, run in runs.items():
            t0 = time.time()
            log(f"{name} on {n} images")
            robust[name] = run()
            acc[name] = _accuracy(robust[name])
            times[name] = round(time.time() - t0, 1)
        sweep = []
        for budget in sweep_budgets(eps, norm, x[0].numel()):
            t0 = time.time()
            log(f"APGD-CE at eps {budget:.4g}")
            sweep.append({"eps": budget, "apgd_ce_acc": _accuracy(_apgd_points(model, x, y, budget, norm, batch_size,
                                                                               device, gen())),
                          "seconds": round(time.time() - t0, 1)})
        zero_share = _zero_gradient_share(model, x, y, batch_size, device)

    only_square = None if square_missing else int(
        (~robust["Square (black-box)"] & robust["PGD-20"] & robust["PGD-100 x 5 restarts"] & robust["APGD-CE"]).sum())
    flags = masking_flags(acc, sweep, zero_share, randomized, aa_name=f"AutoAttack {aa_version}",
                          only_square=only_square, square_missing=square_missing)
    return {"eps": eps, "norm": norm, "test_images": n, "eval_dtype": "float32", "seed": seed,
            "accuracy": acc, "seconds": times, "eps_sweep": sweep, "flags": flags,
            "masking_suspected": any(f["fired"] for f in flags.values()),
            "attacks": {"PGD-20": "CE, step eps/4, uniform random start",
                        "PGD-100 x 5 restarts": "CE, step 2.5 eps/100, 5 uniform random starts, worst case per point",
                        "APGD-CE": "100 iterations, 1 restart, rho 0.75",
                        f"AutoAttack {aa_version}": "see aaa_fast.autoattack",
                        "Square (black-box)": "5,000 queries, p_init 0.8, margin loss, 1 restart",
                        "eps_sweep": "APGD-CE at each eps"}}


def masking_flags(acc: dict, sweep: list[dict], zero_share: float, randomized: bool, *, aa_name: str,
                  only_square: int | None, square_missing: str | None = None) -> dict:
    """The flags of the report from its measurements: acc (attack name -> accuracy %, with
    "PGD-20", "PGD-100 x 5 restarts", "APGD-CE", aa_name and, unless square_missing,
    "Square (black-box)"), the eps sweep, the share of zero gradients (%), whether the forward
    is randomised; each flag {"fired": bool (None: not checked), "evidence": text}."""
    white = {k: acc[k] for k in ("PGD-20", "PGD-100 x 5 restarts", "APGD-CE")}
    best_white = min(white, key=white.get)
    flags = {}
    if square_missing is None:
        square = acc["Square (black-box)"]
        flags["black_box_beats_white_box"] = {
            "fired": square < white[best_white] - MARGIN,
            "evidence": f"Square {square:.2f}% vs the best white-box attack ({best_white}) {white[best_white]:.2f}%; "
                        f"{only_square} points broken by Square alone"}
    else:
        flags["black_box_beats_white_box"] = {"fired": None, "evidence": f"not checked: {square_missing}"}
    longer = min(white["PGD-100 x 5 restarts"], white["APGD-CE"])
    gain, gap = white["PGD-20"] - longer, white["PGD-20"] - acc[aa_name]
    flags["more_steps_do_not_help"] = {
        "fired": gain <= 0 and gap > STALL_GAP,
        "evidence": f"PGD-20 {white['PGD-20']:.2f}% -> PGD-100 x 5 restarts / APGD-CE {longer:.2f}% (gain {gain:.2f} "
                    f"points) while {aa_name} is {gap:.2f} points below PGD-20"}
    last = sweep[-1]
    flags["not_zero_at_large_eps"] = {
        "fired": last["apgd_ce_acc"] > LARGE_EPS_ACC,
        "evidence": f"APGD-CE accuracy {last['apgd_ce_acc']:.2f}% at eps {last['eps']:.4g}, where every input of "
                    "the box is reachable"}
    flags["zero_gradients"] = {"fired": zero_share > 0,
                               "evidence": f"{zero_share:.2f}% of the points have an all-zero input gradient"}
    flags["randomized_forward"] = {"fired": randomized,
                                   "evidence": "two forwards of the same batch " + ("differ" if randomized else "agree")}
    return flags


def _apgd_points(model, x, y, eps, norm, batch_size, device, generator) -> Tensor:
    robust = torch.zeros(y.shape[0], dtype=torch.bool)
    for s in range(0, y.shape[0], batch_size):
        xb, yb = unit_float(x[s:s + batch_size].to(device)), y[s:s + batch_size].to(device).long()
        robust[s:s + batch_size] = apgd(model, xb, yb, eps=eps, norm=norm, loss="ce", batch_size=batch_size,
                                        generator=generator)[0].cpu()
    return robust


def _square_points(model, x, y, eps, norm, num_classes, seed, batch_size, device) -> Tensor:
    square = torchattacks_attack("square", model, eps, norm, num_classes, seed, device)
    return run_attacks(model, x, y, {"square": square}, eps=eps, norm=norm, batch_size=batch_size,
                       device=device).robust


def plot_masking_report(report: dict, path: str, title: str = "") -> None:
    """Robust accuracy per attack (bars) and against eps (APGD-CE), flags in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_bar, ax_eps) = plt.subplots(1, 2, figsize=(12, 4.2))
    names = list(report["accuracy"])
    values = [report["accuracy"][k] for k in names]
    ax_bar.barh(names[::-1], values[::-1], color="tab:blue")
    for i, v in enumerate(values[::-1]):
        ax_bar.text(v + 0.5, i, f"{v:.1f}", va="center", fontsize="small")
    ax_bar.set_xlim(0, 105)
    ax_bar.set_xlabel(f"accuracy (%), {report['test_images']} test images, eps {report['eps']:.4g} ({report['norm']})")
    sweep = report["eps_sweep"]
    ax_eps.plot([p["eps"] for p in sweep], [p["apgd_ce_acc"] for p in sweep], marker="o")
    ax_eps.set_xscale("log")
    ax_eps.set_ylim(-2, 102)
    ax_eps.set_xlabel("eps (log scale)")
    ax_eps.set_ylabel("APGD-CE accuracy (%)")
    ax_eps.axhline(0, color="gray", lw=0.5)
    ax_eps.grid(alpha=0.3)
    fired = [k for k, f in report["flags"].items() if f["fired"]]
    verdict = ("masking suspected: " + ", ".join(fired)) if fired else "no sign of gradient masking"
    fig.suptitle(f"{title}\n{verdict}" if title else verdict, fontsize="medium")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_masking_report(report: dict, path: str, title: str = "") -> str:
    """The report as JSON at `path` (atomic) and its plot beside it (.png); returns the summary
    lines to print."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json_atomic(report, path)
    plot_masking_report(report, os.path.splitext(path)[0] + ".png", title=title)
    fired = [k for k, f in report["flags"].items() if f["fired"]]
    lines = [f"masking report: {path}: " + (f"masking suspected ({', '.join(fired)})" if fired
                                            else "no sign of gradient masking")]
    lines += [f"  {name:<28}{acc:>7.2f}%" for name, acc in report["accuracy"].items()]
    return "\n".join(lines)
