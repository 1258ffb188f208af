"""The run's plots: curves.png (loss, lr, test accuracy per epoch), classwise.png (final
accuracy per class) and, for methods whose meta-network chooses each row's term (AAA and its
variants), mechanism.png (what it chose), written by python -m aaa_fast.train at the end of a run."""
from __future__ import annotations

import os
from dataclasses import dataclass

from .checkpoint import atomic_write
from .data import CLASS_NAMES
from .diagnostics import GROUP_SHARES


def save_figure(fig, path: str) -> None:
    """A PNG written atomically (a crash leaves the old plot, never half of one)."""
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


@dataclass(frozen=True)
class PlotInfo:
    """What the plots say about the run besides its history and final results."""
    method: str
    dataset: str
    arch: str
    seed: int
    train_eps: float
    eval_eps: float
    eval_steps: int     # the per-epoch PGD's steps
    eval_subset: int    # test images of the per-epoch evaluation
    test_size: int      # test images of the final evaluation


def make_plots(out: str, history: list[dict], final: dict, info: PlotInfo, mechanism: dict | None = None) -> None:
    """curves.png (loss, lr, test accuracy per epoch), classwise.png (final accuracy per class)
    and, given the last epoch's `mechanism` (diagnostics.ChoiceDiagnostics.distributions),
    mechanism.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    run = f"{info.method} on {info.dataset} ({info.arch}, seed {info.seed}), training eps {info.train_eps:.4g}"
    pgd = f"PGD-{info.eval_steps}, eps {info.eval_eps:.4g}"
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_lr, ax_acc) = plt.subplots(1, 3, figsize=(14, 4))
    ax_loss.plot(epochs, [h["loss"] for h in history], marker="o", label="training loss")
    ax_loss.set_ylabel("training loss")
    ax_lr.plot(epochs, [h["lr"] for h in history], marker="o", color="tab:gray")
    ax_lr.set_ylabel("learning rate (end of epoch)")
    evaluated = [h for h in history if h.get("test_clean_acc") not in (None, "")]
    sub = f"first {min(info.eval_subset, info.test_size)} test images"
    ax_acc.plot([h["epoch"] for h in evaluated], [h["test_clean_acc"] for h in evaluated], marker="o", label="clean")
    ax_acc.plot([h["epoch"] for h in evaluated], [h["test_pgd_acc"] for h in evaluated], marker="s", label=pgd)
    ax_acc.set_ylabel(f"test accuracy (%), {sub}")
    ax_acc.legend(loc="lower right", fontsize="small")
    for ax in (ax_loss, ax_lr, ax_acc):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)  # whole epochs, a 1-epoch run included
        ax.grid(alpha=0.3)
    fig.suptitle(run)
    fig.tight_layout()
    save_figure(fig, os.path.join(out, "curves.png"))
    plt.close(fig)

    nat = final["classwise_clean_acc"]
    if "classwise_pgd_acc" in final:
        rob, attack = final["classwise_pgd_acc"], "PGD"
    else:  # --final-attack autoattack
        rob, attack = final["classwise_aa_acc"], "AutoAttack"
        pgd = f"AutoAttack {final['aa_version']}, eps {info.eval_eps:.4g}"
    names = CLASS_NAMES.get(info.dataset, [str(k) for k in range(len(nat))])
    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(nat)), 4.5))
    idx = list(range(len(nat)))
    ax.bar([k - 0.2 for k in idx], nat, width=0.4, label="clean")
    ax.bar([k + 0.2 for k in idx], rob, width=0.4, label=pgd)
    ax.set_xticks(idx, names, rotation=45 if len(nat) <= 20 else 90, ha="right", fontsize="small")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{run}\nfinal, {info.test_size} test images; worst class: clean {min(nat):.1f}%, {attack} {min(rob):.1f}%",
                 fontsize="medium")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")  # outside the bars
    fig.tight_layout()
    save_figure(fig, os.path.join(out, "classwise.png"))
    plt.close(fig)
    if mechanism is not None:
        plot_mechanism(out, history, mechanism, names, run)


def plot_mechanism(out: str, history: list[dict], mechanism: dict, names: list[str], run: str) -> None:
    """mechanism.png: the share of each group's rows sent to the anti-adversarial term per epoch
    (with the AUROC of b_i for the corrupted labels where there is label noise), the last
    epoch's distribution of b_i per group, and its mean eps_i per true class."""
    import matplotlib.pyplot as plt  # the Agg backend is chosen by make_plots
    from matplotlib.ticker import MaxNLocator

    groups = list(mechanism["b_hist"])
    fig, (ax_share, ax_b, ax_eps) = plt.subplots(1, 3, figsize=(15, 4.2))
    epochs = [h["epoch"] for h in history]
    for name in groups:
        values = [(h["epoch"], h[GROUP_SHARES[name]]) for h in history if h.get(GROUP_SHARES[name]) not in (None, "")]
        if values:
            ax_share.plot(*zip(*values), marker="o", label=name)
    aurocs = [(h["epoch"], h["anti_auroc_corrupted"]) for h in history if h.get("anti_auroc_corrupted") not in (None, "")]
    if aurocs:
        ax_auc = ax_share.twinx()
        ax_auc.plot(*zip(*aurocs), color="tab:gray", linestyle="--", label="AUROC of b_i, corrupted")
        ax_auc.set_ylim(0, 1)
        ax_auc.set_ylabel("AUROC of b_i, corrupted (0.5: chance)")
        ax_auc.legend(loc="lower right", fontsize="small")
    ax_share.set_ylim(0, 1)
    ax_share.set_xlabel("epoch")
    ax_share.set_ylabel("share of rows with b_i > a_i (anti term)")
    ax_share.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    ax_share.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax_share.legend(loc="upper left", fontsize="small")
    ax_share.set_title("rows sent to the anti-adversarial term", fontsize="medium")
    bins = mechanism["bins"]
    centres = [(k + 0.5) / bins for k in range(bins)]
    width = 1 / bins / max(len(groups), 1)
    for j, name in enumerate(groups):
        ax_b.bar([c - 0.5 / bins + (j + 0.5) * width for c in centres], mechanism["b_hist"][name], width=width, label=name)
    ax_b.set_xlim(0, 1)
    ax_b.set_xlabel("b_i, the weight of the row's anti-adversarial term")
    ax_b.set_ylabel("share of the group's rows")
    ax_b.legend(loc="upper center", fontsize="small")
    ax_b.set_title(f"b_i in the last epoch ({epochs[-1]})", fontsize="medium")
    eps = mechanism["eps_per_class"]
    if eps is not None:
        idx = list(range(len(eps)))
        ax_eps.bar(idx, eps, color="tab:green")
        ax_eps.set_xticks(idx, names[:len(eps)], rotation=45 if len(eps) <= 20 else 90, ha="right", fontsize="small")
        ax_eps.set_ylabel("mean eps_i of the class's rows")
    ax_eps.set_title(f"per-sample bounds eps_i by true class, epoch {epochs[-1]}", fontsize="medium")
    for ax in (ax_share, ax_b, ax_eps):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{run}: what the meta-network chose")
    fig.tight_layout()
    save_figure(fig, os.path.join(out, "mechanism.png"))
    plt.close(fig)
