"""python -m aaa_fast.train: AAA and its baselines on CIFAR-10/100 and Fashion-MNIST.

    python -m aaa_fast.train --arch wrn28-10                     # AAA on CIFAR-10 from ./data (downloads)
    python -m aaa_fast.train --dataset fashion-mnist --arch small-cnn --method trades --epochs 10 --out runs/x
    torchrun --nproc_per_node 4 -m aaa_fast.train ...            # data-parallel on 4 GPUs

Writes under --out: config.json, metrics.csv (one row per epoch), checkpoint.pt (atomic, every
epoch; --resume continues exactly), best.pt, final.json (clean, PGD, class-wise and worst-class
results on the test set), curves.png, classwise.png and, for AAA and its variants, mechanism.png.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from .model_io import AMP_CHOICES, resolve_precision
from .autoattack import VERSIONS
from .cli import HelpFormatter, check_device, number_arg
from .data import DATASETS, NOISE_KINDS
from .evaluation import FINAL_ATTACKS, check_final_attack
from .meta import META_INITS
from .models import ARCHS
from .objective import OBJECTIVES
from .run import train
from .runtime import run_cli
from .methods import defaults_help, get_method, method_names
from .trainer import BOUND_MODES, CONFIG_DEFAULTS, fill_defaults

NOISE_ALIASES = {"sym": "uniform", "asym": "flip1"}
FMNIST_EPS = 0.1  # Fashion-MNIST's training and evaluation bound (its images are not CIFAR's)



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
    g.add_argument("--method", default="aaa", choices=method_names(),
                   help="; ".join(f"{m}: {get_method(m).description}" for m in method_names()))
    g.add_argument("--bound-mode", default=None, choices=BOUND_MODES,
                   help="per-sample bounds eps_i: fixed (eps for all), remargin (FRL's class-wise bounds), "
                        "meta (from the meta-network: " + ", ".join(method_names("learns_bounds"))
                        + "); default " + defaults_help("bound_mode"))
    g.add_argument("--eps", type=number_arg(float, 0), default=None, help="training bound eps_0 in pixel units "
                   "(e.g. 8/255); default " + defaults_help("eps") + "; 0.1 on Fashion-MNIST")
    g.add_argument("--norm", default=CONFIG_DEFAULTS["norm"], choices=["linf", "l2"],
                   help="the threat model: the training attacks' and the evaluation's (PGD and AutoAttack) "
                        "norm; --eps and --eval-eps are in it")
    g.add_argument("--alpha", type=number_arg(float, 0, lo_open=True), default=None,
                   help="attack step size; default eps/4")
    g.add_argument("--steps", type=number_arg(int, 0), default=CONFIG_DEFAULTS["steps"], help="attack steps per training batch")
    g.add_argument("--lam", type=number_arg(float, 0), default=None,
                   help="weight of the KL term (TRADES' 1/lambda, MART's beta); default " + defaults_help("lam"))
    g.add_argument("--adv-loss", default=CONFIG_DEFAULTS["adv_loss"], choices=["kl", "ce"],
                   help="the loss the adversarial examples of TRADES, FRL and AAA ascend: kl (TRADES' "
                        "KL to the clean prediction) or ce (PGD-CE)")
    g.add_argument("--objective", default=CONFIG_DEFAULTS["objective"], choices=OBJECTIVES,
                   help="kl-all (extension; study v2 in docs/RESULTS.md): the KL term applies to every row, so "
                        "anti-adversarial rows keep adversarial training; paper: a_i weights the natural CE and "
                        "the KL term, as the authors' objective")
    g.add_argument("--meta-init", default=CONFIG_DEFAULTS["meta_init"], choices=META_INITS,
                   help="how the meta-network starts: trades (every row on the TRADES side, learnable) "
                        "or reference (the authors' default init; with T=0.001 a near-hard coin toss)")
    g.add_argument("--temperature", type=number_arg(float, 0, lo_open=True), default=None,
                   help="T of the meta-network's softmax; default 0.05 (trades init), 0.001 (reference)")
    g.add_argument("--anti-cap", type=number_arg(float, 0, 1), default=None,
                   help="collapse guard: the meta objective pays for a batch's anti share above this; "
                        "default 0.5 (trades init), 1 = off (reference)")
    g.add_argument("--meta-every", type=number_arg(int, 1), default=CONFIG_DEFAULTS["meta_every"],
                   help="a meta step every this many iterations")
    g.add_argument("--meta-lr", type=number_arg(float, 0, lo_open=True), default=CONFIG_DEFAULTS["meta_lr"],
                   help="meta-network Adam lr")
    g.add_argument("--meta-weight-decay", type=number_arg(float, 0), default=CONFIG_DEFAULTS["meta_weight_decay"],
                   help="meta-network Adam weight decay")
    g.add_argument("--meta-hidden", type=number_arg(int, 1), default=CONFIG_DEFAULTS["meta_hidden"],
                   help="meta-network hidden width")
    g.add_argument("--meta-start-a", type=number_arg(float, 0, 1, lo_open=True, hi_open=True),
                   default=CONFIG_DEFAULTS["meta_start_a"], help="trades init: the TRADES weight a_i every row starts at")
    g.add_argument("--meta-batch-size", type=number_arg(int, 1), default=100, help="meta-set rows per meta step")
    g.add_argument("--s-min", type=number_arg(float, 0, lo_open=True), default=CONFIG_DEFAULTS["s_min"],
                   help="--bound-mode meta: the smallest bound, as a multiple s_i of eps_0")
    g.add_argument("--s-max", type=number_arg(float, 0, lo_open=True), default=CONFIG_DEFAULTS["s_max"],
                   help="--bound-mode meta: the largest bound, as a multiple s_i of eps_0")
    g.add_argument("--fixed-weights", type=number_arg(float, 0), nargs=2, metavar=("A", "B"),
                   default=list(CONFIG_DEFAULTS["fixed_weights"]),
                   help="aaa-fixed: every row's adversarial and anti-adversarial weights (a_i, b_i)")
    g.add_argument("--min-row-weight", type=number_arg(float, 0, 1, hi_open=True),
                   default=CONFIG_DEFAULTS["min_row_weight"], metavar="TAU",
                   help="attack only what has weight (0 = off): on plain steps of " +
                        ", ".join(method_names("chooses_rows")) +
                        ", rows with b_i < TAU get no anti-adversarial example (paper objective: a_i < TAU, no "
                        "adversarial one); every --meta-every-th step attacks every row and measures the share "
                        "of the objective skipping drops (metrics.csv: rows_attacked, dropped_share)")
    g.add_argument("--fairness", action=argparse.BooleanOptionalAction, default=None,
                   help="FRL's class-wise multipliers; default " + defaults_help("fairness"))
    g.add_argument("--tau", type=number_arg(float, 0), default=CONFIG_DEFAULTS["tau"],
                   help="fairness: FRL's tolerance of a class's error above the average")
    g.add_argument("--rho1", type=number_arg(float, 0, lo_open=True), default=CONFIG_DEFAULTS["rho1"],
                   help="fairness: FRL's step for the class weights of the two terms (halved every 40 updates)")
    g.add_argument("--rho2", type=number_arg(float, 0, lo_open=True), default=CONFIG_DEFAULTS["rho2"],
                   help="fairness: FRL's step for the class-wise bound multipliers")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=number_arg(int, 1), default=100,
                   help="training epochs; with --resume, more than the run had extends it")
    g.add_argument("--batch-size", type=number_arg(int, 1), default=128, help="training rows per step (all ranks)")
    g.add_argument("--lr", type=number_arg(float, 0, lo_open=True), default=0.1, help="SGD learning rate")
    g.add_argument("--momentum", type=number_arg(float, 0, 1, hi_open=True), default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=number_arg(float, 0), default=5e-4, help="SGD weight decay")
    g.add_argument("--schedule", default="step", choices=["step", "cosine"],
                   help="lr schedule per step: step (x0.1 at 50%% and 75%% of the steps) or cosine")
    g.add_argument("--amp", default=CONFIG_DEFAULTS["amp"], choices=list(AMP_CHOICES),
                   help="autocast precision of the attacks and the training step; auto: bf16 + channels_last where "
                        "the device computes in bf16 natively (CUDA with bf16; a CPU with AMX-BF16 or AVX512-BF16), "
                        "else fp32 (none)")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster on GPUs)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=CONFIG_DEFAULTS["cuda_graphs"],
                   help="on CUDA, replay the attacks from CUDA graphs (--no-cuda-graphs: eagerly; same results)")
    g.add_argument("--grad-bucket-mb", type=number_arg(float, 0), default=25.0,
                   help="torchrun: average the model's gradients in buckets of this many MiB while the backward "
                        "runs (as DDP); 0: one all-reduce after the backward. Same results (2 ranks: bit for bit)")
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
    g.add_argument("--final-attack", default="pgd", choices=FINAL_ATTACKS,
                   help="the final evaluation's attack: PGD (--eval-steps), AutoAttack (--aa-version), or both; "
                        "every evaluation, final and per epoch, runs in fp32 whatever --amp trained in")
    g.add_argument("--aa-version", default="standard", choices=sorted(VERSIONS),
                   help="standard: APGD-CE, APGD-T (9 targets), FAB-T, Square (5,000 queries), each on the "
                        "points still robust; fast: APGD-CE + APGD-T only, not the standard")
    g.add_argument("--autoattack", action="store_true", help="the same as --final-attack both")
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


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    fmnist = args.dataset == "fashion-mnist"
    args.label_noise = NOISE_ALIASES.get(args.label_noise, args.label_noise)
    fill_defaults(args, default_eps=FMNIST_EPS if fmnist else None)
    if args.eval_eps is None:
        args.eval_eps = FMNIST_EPS if fmnist else CONFIG_DEFAULTS["fairness_eval_eps"]
    if args.download is None:
        args.download = not fmnist
    if args.label_noise == "none" and args.noise_rate > 0:
        raise SystemExit("error: --noise-rate needs --label-noise uniform|flip1|flip2")
    if get_method(args.method).needs_corrupted and (args.label_noise == "none" or args.noise_rate == 0):
        raise SystemExit(f"error: --method {args.method} is told which training labels were corrupted: "
                         "it needs --label-noise and --noise-rate > 0")
    args.fixed_weights = tuple(args.fixed_weights)
    if args.autoattack:
        args.final_attack = "both"
    check_final_attack(args.final_attack, args.aa_version)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(args.device)
    args.amp, args.channels_last, args.amp_choice = resolve_precision(args.amp, args.channels_last, args.device)
    return args


def main(argv=None) -> None:
    train(resolve_defaults(build_parser().parse_args(argv)))


if __name__ == "__main__":
    run_cli(main)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun, after success (errors exit inside run_cli): skip the native teardown. A rank's
        # exit raced with a gloo thread still running after destroy_process_group ("terminate
        # called without an active exception", SIGABRT, with every file already written; seen in
        # about 1 of 15 runs here), and torchrun then failed the run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
