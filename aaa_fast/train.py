"""python -m aaa_fast.train: AAA and its baselines on CIFAR-10/100 and Fashion-MNIST.

    python -m aaa_fast.train --arch wrn28-10                     # AAA on CIFAR-10 from ./data (downloads)
    python -m aaa_fast.train --dataset fashion-mnist --arch small-cnn --method trades --epochs 10 --out runs/x
    torchrun --nproc_per_node 4 -m aaa_fast.train ...            # data-parallel on 4 GPUs

Writes under --out: config.json, metrics.csv (one row per epoch), checkpoint.pt (atomic, every
epoch; --resume continues exactly), best.pt, final.json (clean, PGD, class-wise and worst-class
results on the test set), curves.png and classwise.png.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import shutil
import signal
import sys
import time
import zlib

import torch
import torch.distributed as dist

from .checkpoint import CheckpointError, config_hash, load_checkpoint, load_newest, previous_path, save_atomic, save_rotating
from .data import (CLASS_NAMES, DATASETS, NOISE_KINDS, DatasetError, build_scenario, load_dataset,
                   random_crop_flip)
from .evaluation import evaluate_split, final_evaluation, final_test_set, format_final, model_for
from .diagnostics import GROUP_FIELDS, ChoiceDiagnostics, tail_classes
from .meta import META_INITS
from .models import ARCHS
from .objective import OBJECTIVES
from .runtime import ProgressLines, RunDirLock, keep_cpu_memory, run_cli
from .attack import AMP
from .trainer import AAA_METHODS, BOUND_MODES, METHODS, AAAConfig, AAATrainer, fill_meta_init_defaults, make_meta_net

NOISE_ALIASES = {"sym": "uniform", "asym": "flip1"}
# per-step statistics averaged over an epoch's steps (frac_anti: share of rows with b > a;
# grad_band: share with a(1 - a) > 1e-3); meta_grad_norm: mean over the epoch's meta steps
STEP_FIELDS = ["loss", "natural", "boundary", "anti", "frac_anti", "grad_band", "mean_eps"]
# metrics.csv names: the three objective terms are losses (not errors, not shares)
CSV_NAMES = {"natural": "natural_loss", "boundary": "boundary_loss", "anti": "anti_loss"}
METRIC_FIELDS = ["epoch", "lr", *[CSV_NAMES.get(k, k) for k in STEP_FIELDS], "meta_grad_norm", *GROUP_FIELDS, "skipped",
                 "test_clean_acc", "test_pgd_acc", "seconds"]
DIAGNOSTIC_FIELDS = ["frac_anti", "grad_band", "mean_eps", "meta_grad_norm", *GROUP_FIELDS]


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the module docstring's layout and shows every flag's fixed default (per-method
    defaults are spelled out in the flag's help)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is not None and action.default is not False and action.default != argparse.SUPPRESS and action.option_strings and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def number_arg(kind, lo=None, hi=None, lo_open=False, hi_open=False):
    """argparse type: a finite number within [lo, hi] (or open ends), with a clear message. Floats
    must fit float32 (budgets and rates end up in float32 tensors)."""
    def parse(text: str):
        try:
            if "/" in text and kind is float:  # budgets are often written as fractions: 8/255
                num, den = text.split("/")
                value = float(num) / float(den)
            else:
                value = kind(text)
        except (ValueError, ZeroDivisionError):
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if isinstance(value, float) and abs(value) > FLOAT32_MAX:
            raise argparse.ArgumentTypeError(f"{text!r} does not fit in float32 (max {FLOAT32_MAX:.3g})")
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo}, got {value}")
        if hi is not None and (value > hi or (hi_open and value == hi)):
            raise argparse.ArgumentTypeError(f"must be {'<' if hi_open else '<='} {hi}, got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aaa_fast.train", description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=DATASETS, help="training and test data")
    g.add_argument("--data-dir", default=None, help="where the data lives; default ./data (CIFAR) or "
                   "/usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist)")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=None,
                   help="fetch missing CIFAR data (md5-checked); default on for CIFAR, off for Fashion-MNIST")
    g.add_argument("--label-noise", default="none", choices=list(NOISE_KINDS) + list(NOISE_ALIASES),
                   help="corrupt training labels: uniform (sym) to any other class, flip1 (asym) to the next "
                        "class, flip2 to one of the next two")
    g.add_argument("--noise-rate", type=number_arg(float, 0, 1, hi_open=True), default=0.0,
                   help="share of training labels corrupted (needs --label-noise)")
    g.add_argument("--imbalance-factor", "--imbalance-ratio", type=number_arg(float, 1), default=1.0,
                   help="long tail: the largest class has this many times the samples of the smallest")
    g.add_argument("--num-meta", type=number_arg(int, 0), default=1000,
                   help="clean, class-balanced meta set taken out of the training data (meta-network and "
                        "fairness multipliers)")
    g.add_argument("--train-subset", type=number_arg(int, 1), default=None,
                   help="draw this many training images (class-balanced, the meta set included) for quick runs")
    g = p.add_argument_group("model and method")
    g.add_argument("--arch", default="wrn28-10", choices=sorted(ARCHS), help="network")
    g.add_argument("--method", default="aaa", choices=METHODS,
                   help="erm, pgd-at, trades, frl (baselines); aaa (meta-learned adversarial/anti-adversarial "
                        "choice), aaa-fixed (a = b = 1/2), aaa-oracle (corrupted rows to the anti term)")
    g.add_argument("--bound-mode", default=None, choices=BOUND_MODES,
                   help="per-sample bounds eps_i: fixed (eps for all), remargin (FRL's class-wise bounds), "
                        "meta (from the meta-network, aaa only); default remargin for frl/aaa*, fixed otherwise")
    g.add_argument("--eps", type=number_arg(float, 0), default=None, help="training bound eps_0 in pixel units "
                   "(e.g. 8/255); default 10/255 for aaa*, 8/255 otherwise, 0.1 on Fashion-MNIST")
    g.add_argument("--alpha", type=number_arg(float, 0, lo_open=True), default=None,
                   help="attack step size; default eps/4")
    g.add_argument("--steps", type=number_arg(int, 0), default=10, help="attack steps per training batch")
    g.add_argument("--lam", type=number_arg(float, 0), default=None,
                   help="TRADES lambda; default 1.5 for aaa*, 6 otherwise")
    g.add_argument("--objective", default="kl-all", choices=OBJECTIVES,
                   help="kl-all (extension; study v2 in docs/RESULTS.md): the KL term applies to every row, so "
                        "anti-adversarial rows keep adversarial training; paper: a_i weights the natural CE and "
                        "the KL term, as the authors' objective")
    g.add_argument("--meta-init", default="trades", choices=META_INITS,
                   help="how the meta-network starts: trades (every row on the TRADES side, learnable) "
                        "or reference (the authors' default init; with T=0.001 a near-hard coin toss)")
    g.add_argument("--temperature", type=number_arg(float, 0, lo_open=True), default=None,
                   help="T of the meta-network's softmax; default 0.05 (trades init), 0.001 (reference)")
    g.add_argument("--anti-cap", type=number_arg(float, 0, 1), default=None,
                   help="collapse guard: the meta objective pays for a batch's anti share above this; "
                        "default 0.5 (trades init), 1 = off (reference)")
    g.add_argument("--meta-every", type=number_arg(int, 1), default=50, help="a meta step every this many iterations")
    g.add_argument("--meta-lr", type=number_arg(float, 0, lo_open=True), default=1e-4, help="meta-network Adam lr")
    g.add_argument("--meta-batch-size", type=number_arg(int, 1), default=100, help="meta-set rows per meta step")
    g.add_argument("--no-fairness", action="store_true", help="turn the FRL multipliers off for frl/aaa*")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=number_arg(int, 1), default=100,
                   help="training epochs; with --resume, more than the run had extends it")
    g.add_argument("--batch-size", type=number_arg(int, 1), default=128, help="training rows per step (all ranks)")
    g.add_argument("--lr", type=number_arg(float, 0, lo_open=True), default=0.1, help="SGD learning rate")
    g.add_argument("--momentum", type=number_arg(float, 0, 1, hi_open=True), default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=number_arg(float, 0), default=5e-4, help="SGD weight decay")
    g.add_argument("--schedule", default="step", choices=["step", "cosine"],
                   help="lr schedule per step: step (x0.1 at 50%% and 75%% of the steps) or cosine")
    g.add_argument("--amp", default="none", choices=list(AMP), help="autocast precision")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster on GPUs)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--no-cuda-graphs", action="store_true",
                   help="on CUDA, run the attacks eagerly instead of replaying them from CUDA graphs (same results)")
    g.add_argument("--seed", type=number_arg(int, 0), default=0, help="seed of the data draw, noise and training")
    g.add_argument("--skip-nonfinite", action="store_true", help="skip steps with a NaN/inf loss instead of stopping")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-eps", type=number_arg(float, 0), default=None,
                   help="PGD budget for evaluation; default 8/255 (0.1 on Fashion-MNIST)")
    g.add_argument("--eval-steps", type=number_arg(int, 0), default=20, help="PGD steps for evaluation")
    g.add_argument("--eval-every", type=number_arg(int, 1), default=1, help="evaluate every this many epochs")
    g.add_argument("--eval-subset", type=number_arg(int, 1), default=1000,
                   help="test images for the per-epoch evaluation (the final one uses --test-subset)")
    g.add_argument("--test-subset", type=number_arg(int, 1), default=None,
                   help="final evaluation on this many test images, class-balanced and the same for every "
                        "seed; default the whole test set")
    g.add_argument("--autoattack", action="store_true", help="also run torchattacks' AutoAttack at the end")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/latest", help="run directory (one run at a time owns it)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    g.add_argument("--init", default=None, metavar="CKPT", help="start from this checkpoint's model weights")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when available")
    g.add_argument("--tensorboard", action="store_true",
                   help="also log scalars (per step and per epoch) to OUT/tensorboard (needs the tensorboard package)")
    g.add_argument("--progress", default="auto", choices=["auto", "bar", "lines"],
                   help="bar (tqdm), or lines every ~30 s (for logs); auto: bar on a terminal")
    return p


FLAG_NAMES = {a.dest for a in build_parser()._actions}


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    fmnist = args.dataset == "fashion-mnist"
    args.label_noise = NOISE_ALIASES.get(args.label_noise, args.label_noise)
    if args.eps is None:
        args.eps = 0.1 if fmnist else (10 / 255 if args.method.startswith("aaa") else 8 / 255)
    if args.alpha is None:
        args.alpha = args.eps / 4
    if args.eval_eps is None:
        args.eval_eps = 0.1 if fmnist else 8 / 255
    if args.lam is None:
        args.lam = 1.5 if args.method.startswith("aaa") else 6.0
    fill_meta_init_defaults(args)
    if args.download is None:
        args.download = not fmnist
    if args.label_noise == "none" and args.noise_rate > 0:
        raise SystemExit("error: --noise-rate needs --label-noise uniform|flip1|flip2")
    if args.method == "aaa-oracle" and (args.label_noise == "none" or args.noise_rate == 0):
        raise SystemExit("error: --method aaa-oracle sends the rows whose labels were corrupted to the anti "
                         "term: it needs --label-noise and --noise-rate > 0")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    return args


def check_data_settings(args: argparse.Namespace, num_classes: int, scenario_info: dict) -> None:
    """Refuse, naming the flags, settings that leave nothing to train on or cannot be evaluated."""
    if scenario_info["train_size"] == 0:
        subset = f" of --train-subset {args.train_subset}" if args.train_subset else ""
        raise SystemExit(f"error: --num-meta {args.num_meta} takes every image{subset}: no training images are "
                         "left; lower --num-meta or raise --train-subset")
    uses_meta_set = args.method == "aaa" or (args.method in ("frl", *AAA_METHODS) and not args.no_fairness)
    if uses_meta_set and args.num_meta < num_classes:
        raise SystemExit(f"error: --method {args.method} learns from the meta set (meta-network or fairness "
                         f"multipliers): --num-meta must be at least {num_classes} (one image per class), "
                         f"got {args.num_meta}")
    if args.test_subset is not None and args.test_subset < num_classes:
        raise SystemExit(f"error: --test-subset must be at least the number of classes ({num_classes}), "
                         f"got {args.test_subset}")


def settings_diff(out: str, run_config: dict) -> str:
    """'; differs from the run in OUT: --flag (was A, now B), ...' from its config.json, or ''."""
    try:
        with open(os.path.join(out, "config.json")) as f:
            before = json.load(f)
    except (OSError, ValueError):
        return ""
    changed = [f"{'--' + k.replace('_', '-') if k in FLAG_NAMES else k} (was {before[k]!r}, now {v!r})"
               for k, v in run_config.items() if k in before and before[k] != v]
    return f"; differs from the run in {out}: {', '.join(changed)}" if changed else ""


def describe_position(state: dict, epochs: int) -> str:
    position = state.get("position")
    where = (f"epoch {state['epoch'] + 1}, step {position['step']}" if position
             else f"the end of epoch {state['epoch']}")
    return where + (f" of {epochs}" if state["epoch"] < epochs else f" (finished: {epochs} epochs)")


def batch_rows(order, i: int, steps: int, batch_size: int, world: int):
    """The training rows of step i (of `steps`) across all ranks. The last step takes what is left
    (see epoch_steps). Under torchrun the rows are padded by wrapping around the epoch's order, as
    DistributedSampler does, to a multiple of the ranks with at least 2 rows each: no rank gets
    an empty or one-row batch, and all ranks do the same number of steps."""
    end = order.shape[0] if i == steps - 1 else (i + 1) * batch_size
    rows = order[i * batch_size:end]
    if world > 1:
        need = max(2 * world, -(-rows.shape[0] // world) * world)
        if rows.shape[0] < need:
            rows = torch.cat([rows, order[torch.arange(need - rows.shape[0], device=order.device) % order.shape[0]]])
    return rows


def epoch_steps(n: int, batch_size: int) -> int:
    """Steps per epoch. A last batch of one row (BatchNorm cannot train on it) joins the one before."""
    return math.ceil(n / batch_size) - (1 if n > batch_size and n % batch_size == 1 else 0)


def lr_factor(schedule: str, total_steps: int):
    """The lr at step t as a multiple of --lr, in closed form (so a resume with more --epochs only
    changes total_steps): step: x0.1 at 50% and 75% of the steps; cosine: down to 0 at the end."""
    if schedule == "step":
        milestones = step_milestones(total_steps)
        return lambda t: 0.1 ** sum(t >= m for m in milestones)
    return lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total_steps) / total_steps))


def step_milestones(total_steps: int) -> list[int]:
    """The step schedule's x0.1 points (50% and 75% of the steps), leaving out any that would hit
    the first step or fall after the last (a 1-step run trains at the full lr)."""
    return sorted({m for m in (int(0.5 * total_steps), int(0.75 * total_steps)) if 0 < m < total_steps})


def check_out_dir(out: str) -> None:
    """Fail before training, not after hours, if the output directory cannot be written."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".write-test")
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as exc:
        raise SystemExit(f"error: cannot write to --out {out}: {exc}") from None
    free = shutil.disk_usage(out).free
    if free < 100 << 20:
        raise SystemExit(f"error: only {free >> 20} MiB free under --out {out}; checkpoints need more")


class Distributed:
    """torchrun data parallelism: each rank takes its share of every global batch; gradients of
    the model and the meta-net are averaged, BatchNorm buffers follow rank 0."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1:
            dist.init_process_group("nccl" if device == "cuda" else "gloo")
            if device == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def average(self, tensors: list[torch.Tensor]) -> None:
        if self.world == 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def sum_(self, tensor: torch.Tensor) -> None:
        if self.world > 1:
            dist.all_reduce(tensor)

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        if self.world > 1:
            for b in module.buffers():
                dist.broadcast(b, 0)

    def close(self) -> None:
        if self.world > 1:
            dist.destroy_process_group()


class StopRequested:
    """SIGINT/SIGTERM: finish the current step, write a checkpoint, exit cleanly."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nreceived signal {signum}: finishing this step, then saving a checkpoint", file=sys.stderr, flush=True)


def make_plots(out: str, history: list[dict], final: dict, args: argparse.Namespace, test_size: int) -> None:
    """curves.png (loss, lr, test accuracy per epoch) and classwise.png (final accuracy per class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    run = f"{args.method} on {args.dataset} ({args.arch}, seed {args.seed}), training eps {args.eps:.4g}"
    pgd = f"PGD-{args.eval_steps}, eps {args.eval_eps:.4g}"
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_lr, ax_acc) = plt.subplots(1, 3, figsize=(14, 4))
    ax_loss.plot(epochs, [h["loss"] for h in history], marker="o", label="training loss")
    ax_loss.set_ylabel("training loss")
    ax_lr.plot(epochs, [h["lr"] for h in history], marker="o", color="tab:gray")
    ax_lr.set_ylabel("learning rate (end of epoch)")
    evaluated = [h for h in history if h.get("test_clean_acc") not in (None, "")]
    sub = f"first {min(args.eval_subset, test_size)} test images"
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
    fig.savefig(os.path.join(out, "curves.png"), dpi=100)
    plt.close(fig)

    nat, rob = final["classwise_clean_acc"], final["classwise_pgd_acc"]
    names = CLASS_NAMES.get(args.dataset, [str(k) for k in range(len(nat))])
    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(nat)), 4.5))
    idx = list(range(len(nat)))
    ax.bar([k - 0.2 for k in idx], nat, width=0.4, label="clean")
    ax.bar([k + 0.2 for k in idx], rob, width=0.4, label=pgd)
    ax.set_xticks(idx, names, rotation=45 if len(nat) <= 20 else 90, ha="right", fontsize="small")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{run}\nfinal, {test_size} test images; worst class: clean {min(nat):.1f}%, PGD {min(rob):.1f}%",
                 fontsize="medium")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")  # outside the bars
    fig.tight_layout()
    fig.savefig(os.path.join(out, "classwise.png"), dpi=100)
    plt.close(fig)


def meta_net_seed(scenario_info: dict) -> int:
    """The meta-network's initial draw, one per (scenario, seed): runs of one --seed in different
    scenarios must not share it (the first study's did, so three draws decided all its runs)."""
    return zlib.crc32(json.dumps(scenario_info, sort_keys=True).encode())


def train(args: argparse.Namespace) -> dict:
    args = resolve_defaults(args)
    ranks = Distributed(args.device)
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", "0")) if args.device == "cuda" else None)
    if device.type == "cpu":
        keep_cpu_memory()
    if args.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SystemExit("error: --tensorboard needs the tensorboard package: pip install tensorboard "
                             "(or pip install 'aaa_fast[tensorboard]')") from None
    try:  # data first: a run that cannot get its data leaves nothing behind
        data = load_dataset(args.dataset, args.data_dir, download_missing=args.download and ranks.is_main)
    except DatasetError as exc:
        raise SystemExit(f"error: {exc}") from None
    try:
        scenario = build_scenario(data, num_meta=args.num_meta, imbalance_factor=args.imbalance_factor,
                                  noise=args.label_noise, noise_rate=args.noise_rate, seed=args.seed,
                                  train_subset=args.train_subset)
    except ValueError as exc:  # a meta set the data cannot supply
        raise SystemExit(f"error: --num-meta {args.num_meta}: {exc}") from None
    check_data_settings(args, data.num_classes, scenario.info)
    out_lock = None
    if ranks.is_main:
        check_out_dir(args.out)
        out_lock = RunDirLock(args.out)  # held until this process ends
    # what decides the results: the settings (not where the data lives, not --epochs, which a resume
    # may raise to extend a run) and the data's content
    run_config = {k: v for k, v in vars(args).items()
                  if k not in ("resume", "progress", "init", "out", "data_dir", "epochs", "tensorboard", "no_cuda_graphs")}
    run_config.update(world_size=ranks.world, data_fingerprint=data.fingerprint())
    run_hash = config_hash(run_config)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    state = None
    if args.resume:
        try:
            state = load_newest(ckpt_path, expected_hash=run_hash)
        except CheckpointError as exc:
            raise SystemExit(f"error: cannot resume: {exc}{settings_diff(args.out, run_config)}") from None
        if ranks.is_main:
            print(f"--resume: no checkpoint in {args.out} yet, starting the run" if state is None else
                  f"resuming {args.out} from {describe_position(state, args.epochs)}", file=sys.stderr, flush=True)
    elif ranks.is_main and (os.path.exists(ckpt_path) or os.path.exists(previous_path(ckpt_path))):
        raise SystemExit(f"error: {ckpt_path} exists; pass --resume to continue that run or choose another --out")

    c = data.num_classes
    torch.manual_seed(args.seed)
    model = model_for(args.arch, data, device)
    if args.init:
        try:
            init = load_checkpoint(args.init)
        except CheckpointError as exc:
            raise SystemExit(f"error: --init: {exc}") from None
        model.load_state_dict(init["trainer"]["model"])
    # fused on CUDA: it skips a non-finite step on the device, so a training step never waits for the GPU
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                                fused=device.type == "cuda")
    counts = scenario.class_counts.double()
    config = AAAConfig(method=args.method, num_classes=c, eps=args.eps, alpha=args.alpha, steps=args.steps,
                       lam=args.lam, bound_mode=args.bound_mode, fairness=False if args.no_fairness else None,
                       objective=args.objective, meta_init=args.meta_init, temperature=args.temperature,
                       anti_cap=args.anti_cap, meta_every=args.meta_every,
                       class_share=(counts / counts.sum()).tolist(), fairness_eval_eps=args.eval_eps,
                       fairness_eval_steps=args.eval_steps, amp=args.amp, channels_last=args.channels_last,
                       compile=args.compile, cuda_graphs=not args.no_cuda_graphs,
                       seed=args.seed, skip_nonfinite=args.skip_nonfinite)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # every batch has the same shape
    meta_net = meta_opt = None
    if args.method == "aaa":
        meta_net = make_meta_net(config, seed=meta_net_seed(scenario.info))
        meta_opt = torch.optim.Adam(meta_net.parameters(), lr=args.meta_lr, weight_decay=5e-4,
                                    fused=device.type == "cuda")
    trainer = AAATrainer(model, optimizer, meta_net=meta_net, meta_optimizer=meta_opt, config=config)
    trainer.grad_sync = ranks.average
    steps_per_epoch = epoch_steps(scenario.train_y.shape[0], args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(args.schedule, total_steps))
    # data held on the training device as uint8; shuffling from a seeded generator
    train_x, train_y = scenario.train_x.to(device), scenario.train_y.to(device)
    corrupted = (scenario.train_y != scenario.train_y_clean).to(device)
    choices = ChoiceDiagnostics(corrupted, tail_classes(torch.bincount(scenario.train_y_clean, minlength=c)))
    meta_x, meta_y = scenario.meta_x.to(device), scenario.meta_y.to(device)
    test_x, test_y = final_test_set(data, args.test_subset, device)
    shuffle = torch.Generator().manual_seed(args.seed + 1)
    augment_gen = torch.Generator(device=device).manual_seed(args.seed + 2)
    augment = args.dataset != "fashion-mnist"
    history, best, start_epoch, position = [], None, 0, None
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        scheduler.load_state_dict(state["scheduler"])
        factor = scheduler.lr_lambdas[0](scheduler.last_epoch)  # this run's --epochs decide the rest
        for group in optimizer.param_groups:
            group["lr"] = args.lr * factor
        shuffle.set_state(state["shuffle_rng"])
        augment_gen.set_state(state["augment_rng"])
        history, best, start_epoch = state["history"], state["best"], state["epoch"]
        position = state.get("position")  # set when a signal stopped the run inside an epoch
    if ranks.is_main:
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(dict(run_config, data_dir=args.data_dir, epochs=args.epochs, config_hash=run_hash, scenario=scenario.info, device=str(device),
                           torch=torch.__version__), f, indent=2)
    use_bar = args.progress == "bar" or (args.progress == "auto" and sys.stderr.isatty())
    board = None
    if args.tensorboard and ranks.is_main:  # purge_step: a resumed run overwrites what followed its checkpoint
        board = SummaryWriter(os.path.join(args.out, "tensorboard"),
                              purge_step=start_epoch * steps_per_epoch + (position["step"] if position else 0))
    stopper = StopRequested()

    def checkpoint(epochs_done: int, position: dict | None = None) -> None:
        if not ranks.is_main:
            return
        save_rotating({"config_hash": run_hash, "epoch": epochs_done, "trainer": trainer.state_dict(),
                       "scheduler": scheduler.state_dict(), "shuffle_rng": shuffle.get_state(),
                       "augment_rng": augment_gen.get_state(), "history": history, "best": best,
                       "position": position}, ckpt_path)

    @contextlib.contextmanager
    def stop_on_nonfinite(epoch: int):
        try:
            yield
        except FloatingPointError as exc:
            last = (f"the last good checkpoint is {ckpt_path} (after epoch {history[-1]['epoch']})" if history
                    else "no checkpoint was written yet")
            raise SystemExit(f"error: {exc} in epoch {epoch + 1}; training stopped, {last}") from None

    def add_step_stats(sums: dict, epoch: int) -> None:
        """Fold the trainer's device-side step statistics into the epoch's sums (one sync)."""
        with stop_on_nonfinite(epoch):
            read = trainer.read_stats()
        sums["steps"] += read["steps"]
        for key in STEP_FIELDS:
            sums[key] += read[key] * read["steps"] if read["steps"] else 0.0
        if read["meta_steps"]:
            sums["meta_steps"] += read["meta_steps"]
            sums["meta_grad_norm"] += read["meta_grad_norm"] * read["meta_steps"]

    n_meta_batch = min(args.meta_batch_size, meta_y.shape[0])
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        if position is not None:  # continue inside the epoch a signal interrupted
            order, meta_order = position["order"].to(device), position["meta_order"].to(device)
            sums, first_step = position["sums"], position["step"]
            choices.load_state_dict(position["choices"])
            position = None
        else:
            # the reference updates the fairness multipliers before every epoch, the first too
            trainer.update_fairness(meta_x, meta_y)
            order = torch.randperm(train_y.shape[0], generator=shuffle).to(device)
            meta_order = torch.randperm(meta_y.shape[0], generator=shuffle).to(device)
            sums, first_step = dict.fromkeys(["steps", *STEP_FIELDS, "meta_steps", "meta_grad_norm"], 0.0), 0
            choices.reset()
        batches = range(first_step, steps_per_epoch)
        lines = None
        if use_bar and ranks.is_main:
            from tqdm import tqdm
            batches = tqdm(batches, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, dynamic_ncols=True)
        elif ranks.is_main:
            lines = ProgressLines(f"epoch {epoch + 1}/{args.epochs}", steps_per_epoch, first_step)
        for i in batches:
            idx = batch_rows(order, i, steps_per_epoch, args.batch_size, ranks.world)[ranks.rank::ranks.world]
            x = train_x[idx]
            if augment:
                x = random_crop_flip(x, generator=augment_gen)
            meta_rows = meta_order[(i * n_meta_batch) % meta_y.shape[0]:][:n_meta_batch]
            with stop_on_nonfinite(epoch):
                stats = trainer.step(x, train_y[idx], meta_x[meta_rows], meta_y[meta_rows], corrupted=corrupted[idx])
            scheduler.step()
            ranks.broadcast_buffers(model)
            if trainer.last_choice is not None:
                choices.add(idx, *trainer.last_choice)
            if board is not None:
                step_no = epoch * steps_per_epoch + i + 1
                board.add_scalar("step/lr", optimizer.param_groups[0]["lr"], step_no)
                for key in ("loss", "natural", "boundary", "anti", "frac_anti"):
                    board.add_scalar(f"step/{CSV_NAMES.get(key, key)}", stats[key], step_no)
            if use_bar and ranks.is_main and i % 25 == 0:  # reading the loss waits for the GPU
                batches.set_postfix(loss=f"{stats['loss']:.3f}")
            elif lines is not None:
                lines.update(i + 1, lambda: f"loss {stats['loss']:.3f}, lr {optimizer.param_groups[0]['lr']:.3g}")
            if stopper.requested:
                add_step_stats(sums, epoch)
                checkpoint(epoch, dict(step=i + 1, order=order.cpu(), meta_order=meta_order.cpu(), sums=sums,
                                       choices=choices.state_dict()))
                if ranks.is_main:
                    print(f"stopped after step {i + 1}/{steps_per_epoch} of epoch {epoch + 1}; checkpoint written "
                          f"to {ckpt_path}; continue with --resume", file=sys.stderr, flush=True)
                ranks.close()
                raise SystemExit(130)
        add_step_stats(sums, epoch)
        trainer.reduce_epoch_losses(ranks.sum_)
        trainer.end_epoch(fairness=False)
        n = max(sums["steps"], 1)
        row = dict(epoch=epoch + 1, lr=optimizer.param_groups[0]["lr"], **{CSV_NAMES.get(k, k): sums[k] / n for k in STEP_FIELDS},
                   meta_grad_norm=sums["meta_grad_norm"] / sums["meta_steps"] if sums["meta_steps"] else "",
                   **choices.summary(scenario.train_y_clean), skipped=trainer.skipped_steps,
                   test_clean_acc="", test_pgd_acc="")
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            sub = torch.arange(min(args.eval_subset, test_y.shape[0]), device=device)
            ev = evaluate_split(model, test_x[sub], test_y[sub], c, args, device, seed=args.seed + 1000 + epoch)
            row.update(test_clean_acc=ev["clean_acc"], test_pgd_acc=ev["pgd_acc"])
            if ranks.is_main and (best is None or ev["pgd_acc"] > best["test_pgd_acc"]):
                best = dict(epoch=epoch + 1, test_clean_acc=ev["clean_acc"], test_pgd_acc=ev["pgd_acc"])
                save_atomic({"config_hash": run_hash, "epoch": epoch + 1, "trainer": {"model": model.state_dict()}},
                            os.path.join(args.out, "best.pt"))
        row["seconds"] = round(time.time() - t0, 2)
        history.append(row)
        checkpoint(epoch + 1)
        if ranks.is_main:
            with open(os.path.join(args.out, "metrics.csv"), "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
                writer.writeheader()
                writer.writerows(history)
            acc = (f", test clean {row['test_clean_acc']:.2f}% PGD {row['test_pgd_acc']:.2f}%"
                   if row["test_clean_acc"] != "" else "")
            if board is not None:
                for key, value in row.items():
                    if key != "epoch" and isinstance(value, (int, float)):
                        board.add_scalar(f"epoch/{key}", value, epoch + 1)
                board.flush()
            anti = f", anti share {row['frac_anti']:.2f}" if args.method in AAA_METHODS else ""
            print(f"epoch {epoch + 1}/{args.epochs}: loss {row['loss']:.4f}{anti}, mean eps {row['mean_eps']:.4f}, "
                  f"lr {optimizer.param_groups[0]['lr']:.3g}{acc} ({row['seconds']:.1f}s)", flush=True)

    def stop_during_evaluation(_done: int) -> None:
        if stopper.requested:  # training is saved; only the evaluation is lost, and --resume redoes it
            if ranks.is_main:
                print(f"stopped during the final evaluation; training is complete in {ckpt_path}; "
                      "--resume redoes the evaluation", file=sys.stderr, flush=True)
            ranks.close()
            raise SystemExit(130)

    final = final_evaluation(model, data, args, device, progress=ranks.is_main and not use_bar,
                             on_batch=stop_during_evaluation)
    final.update(epochs=args.epochs, method=args.method, dataset=args.dataset, arch=args.arch,
                 scenario=scenario.info, eval_eps=args.eval_eps, eval_steps=args.eval_steps,
                 diagnostics={k: history[-1].get(k, "") for k in DIAGNOSTIC_FIELDS} if history else {})
    if ranks.is_main:
        with open(os.path.join(args.out, "final.json"), "w") as f:
            json.dump(final, f, indent=2)
        make_plots(args.out, history, final, args, test_size=test_y.shape[0])
        if board is not None:
            for key in ("clean_acc", "pgd_acc", "avg_rob_err", "worst_rob_err"):
                board.add_scalar(f"final/{key}", final[key], args.epochs)
            board.close()
        print(format_final(final), flush=True)
    ranks.close()
    if out_lock is not None:
        out_lock.release()
    return final


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    train(args)


if __name__ == "__main__":
    run_cli(main)
