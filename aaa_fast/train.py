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
from .data import (DATASETS, NOISE_KINDS, DatasetError, build_scenario, class_balanced_subset, load_dataset,
                   random_crop_flip)
from .evaluate import classwise_accuracy
from .diagnostics import GROUP_FIELDS, ChoiceDiagnostics, tail_classes
from .meta import META_INITS
from .models import ARCHS, build_model
from .objective import OBJECTIVES
from .runtime import keep_cpu_memory
from .trainer import AMP, BOUND_MODES, METHODS, AAAConfig, AAATrainer, fill_meta_init_defaults, make_meta_net

NOISE_ALIASES = {"sym": "uniform", "asym": "flip1"}
# per-step statistics averaged over an epoch's steps (frac_anti: share of rows with b > a;
# grad_band: share with a(1 - a) > 1e-3); meta_grad_norm: mean over the epoch's meta steps
STEP_FIELDS = ["loss", "natural", "boundary", "anti", "frac_anti", "grad_band", "mean_eps"]
METRIC_FIELDS = ["epoch", "lr", *STEP_FIELDS, "meta_grad_norm", *GROUP_FIELDS, "skipped",
                 "test_clean_acc", "test_pgd_acc", "seconds"]
DIAGNOSTIC_FIELDS = ["frac_anti", "grad_band", "mean_eps", "meta_grad_norm", *GROUP_FIELDS]


def _number(kind, lo=None, hi=None, lo_open=False, hi_open=False):
    """argparse type: a finite number within [lo, hi] (or open ends), with a clear message."""
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
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo}, got {value}")
        if hi is not None and (value > hi or (hi_open and value == hi)):
            raise argparse.ArgumentTypeError(f"must be {'<' if hi_open else '<='} {hi}, got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aaa_fast.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=DATASETS)
    g.add_argument("--data-dir", default=None, help="default ./data (CIFAR) or /usr/share/datasets/fashion-mnist")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=None,
                   help="fetch missing data (md5-checked); default on for CIFAR, off for Fashion-MNIST")
    g.add_argument("--label-noise", default="none", choices=list(NOISE_KINDS) + list(NOISE_ALIASES))
    g.add_argument("--noise-rate", type=_number(float, 0, 1, hi_open=True), default=0.0)
    g.add_argument("--imbalance-factor", "--imbalance-ratio", type=_number(float, 1), default=1.0)
    g.add_argument("--num-meta", type=_number(int, 0), default=1000, help="clean balanced meta set size")
    g.add_argument("--train-subset", type=_number(int, 1), default=None, help="class-balanced subset for quick runs")
    g = p.add_argument_group("model and method")
    g.add_argument("--arch", default="wrn28-10", choices=sorted(ARCHS))
    g.add_argument("--method", default="aaa", choices=METHODS)
    g.add_argument("--bound-mode", default=None, choices=BOUND_MODES)
    g.add_argument("--eps", type=_number(float, 0), default=None, help="training bound eps_0 (pixel units); "
                   "default 10/255 for aaa*, 8/255 otherwise (0.1 on Fashion-MNIST)")
    g.add_argument("--alpha", type=_number(float, 0, lo_open=True), default=None, help="attack step; default eps/4")
    g.add_argument("--steps", type=_number(int, 0), default=10)
    g.add_argument("--lam", type=_number(float, 0), default=None, help="TRADES lambda; default 1.5 (aaa*), 6 otherwise")
    g.add_argument("--objective", default="kl-all", choices=OBJECTIVES,
                   help="kl-all (extension, default; study v2 in docs/RESULTS.md): the KL term applies to "
                        "every row, so anti-adversarial rows keep adversarial training; paper: a_i weights the "
                        "natural CE and the KL term, as the authors' objective")
    g.add_argument("--meta-init", default="trades", choices=META_INITS,
                   help="how the meta-network starts: trades (every row on the TRADES side, learnable) "
                        "or reference (the authors' default init; with T=0.001 a near-hard coin toss)")
    g.add_argument("--temperature", type=_number(float, 0, lo_open=True), default=None,
                   help="T of the meta-network's softmax; default 0.05 (trades init), 0.001 (reference)")
    g.add_argument("--anti-cap", type=_number(float, 0, 1), default=None,
                   help="collapse guard: the meta objective pays for a batch's anti share above this; "
                        "default 0.5 (trades init), 1 = off (reference)")
    g.add_argument("--meta-every", type=_number(int, 1), default=50)
    g.add_argument("--meta-lr", type=_number(float, 0, lo_open=True), default=1e-4)
    g.add_argument("--meta-batch-size", type=_number(int, 1), default=100)
    g.add_argument("--no-fairness", action="store_true", help="turn the FRL multipliers off for frl/aaa*")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=_number(int, 1), default=100)
    g.add_argument("--batch-size", type=_number(int, 1), default=128)
    g.add_argument("--lr", type=_number(float, 0, lo_open=True), default=0.1)
    g.add_argument("--momentum", type=_number(float, 0, 1, hi_open=True), default=0.9)
    g.add_argument("--weight-decay", type=_number(float, 0), default=5e-4)
    g.add_argument("--schedule", default="step", choices=["step", "cosine"], help="step: x0.1 at 50%% and 75%%")
    g.add_argument("--amp", default="none", choices=list(AMP))
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=_number(int, 0), default=0)
    g.add_argument("--skip-nonfinite", action="store_true", help="skip steps with a NaN/inf loss instead of stopping")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-eps", type=_number(float, 0), default=None, help="PGD-20 budget; default 8/255 (0.1 FMNIST)")
    g.add_argument("--eval-steps", type=_number(int, 0), default=20)
    g.add_argument("--eval-every", type=_number(int, 1), default=1)
    g.add_argument("--eval-subset", type=_number(int, 1), default=1000, help="test samples for per-epoch evaluation")
    g.add_argument("--test-subset", type=_number(int, 1), default=None,
                   help="final evaluation on this many test samples, class-balanced and the same for every "
                        "seed (default: the whole test set)")
    g.add_argument("--autoattack", action="store_true", help="also run torchattacks' AutoAttack at the end")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/latest")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    g.add_argument("--init", default=None, metavar="CKPT", help="start from these model weights")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--progress", default="auto", choices=["auto", "bar", "lines"])
    return p


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
    def main(self) -> bool:
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


def make_plots(out: str, history: list[dict], final: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["loss"] for h in history], label="training loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    evald = [h for h in history if h.get("test_clean_acc") not in (None, "")]
    ax2.plot([h["epoch"] for h in evald], [h["test_clean_acc"] for h in evald], marker="o", label="clean")
    ax2.plot([h["epoch"] for h in evald], [h["test_pgd_acc"] for h in evald], marker="o", label="PGD")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("test accuracy (%)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=100)
    plt.close(fig)
    nat, rob = final["classwise_clean_acc"], final["classwise_pgd_acc"]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(nat)), 4))
    idx = torch.arange(len(nat)).float()
    ax.bar((idx - 0.2).tolist(), nat, width=0.4, label="clean")
    ax.bar((idx + 0.2).tolist(), rob, width=0.4, label="PGD")
    ax.set_xlabel("class")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"worst class: clean {min(nat):.1f}%, PGD {min(rob):.1f}%")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "classwise.png"), dpi=100)
    plt.close(fig)


def model_for(arch: str, data, device) -> torch.nn.Module:
    """`arch` sized for the dataset (classes, channels) with its normalisation as first layer."""
    mean, std = data.mean_std
    return build_model(arch, num_classes=data.num_classes, in_channels=data.train_x.shape[1], mean=mean,
                       std=std).to(device)


def meta_net_seed(scenario_info: dict) -> int:
    """The meta-network's initial draw, one per (scenario, seed): runs of one --seed in different
    scenarios must not share it (the first study's did, so three draws decided all its runs)."""
    return zlib.crc32(json.dumps(scenario_info, sort_keys=True).encode())


def evaluate_split(model, x, y, num_classes, args, device, seed) -> dict:
    result = classwise_accuracy(model, x, y, num_classes, eps=args.eval_eps, steps=args.eval_steps,
                                alpha=args.eval_eps / 4, batch_size=max(args.batch_size, 256), amp_dtype=AMP[args.amp],
                                generator=torch.Generator(device=device).manual_seed(seed), device=device)
    out = result.summary()
    out["classwise_clean_acc"] = (100 * result.nat_acc).tolist()
    out["classwise_pgd_acc"] = (100 * result.rob_acc).tolist()
    return out


def train(args: argparse.Namespace) -> dict:
    args = resolve_defaults(args)
    par = Distributed(args.device)
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", "0")) if args.device == "cuda" else None)
    if device.type == "cpu":
        keep_cpu_memory()
    if par.main:
        check_out_dir(args.out)
    run_config = {k: v for k, v in vars(args).items() if k not in ("resume", "progress", "init", "out")}
    run_config["world_size"] = par.world
    chash = config_hash(run_config)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    state = None
    if args.resume:
        try:
            state = load_newest(ckpt_path, expected_hash=chash)
        except CheckpointError as exc:
            raise SystemExit(f"error: cannot resume: {exc}") from None
        if state is None and par.main:
            print(f"--resume: no checkpoint in {args.out} yet, starting the run", file=sys.stderr)
    elif par.main and (os.path.exists(ckpt_path) or os.path.exists(previous_path(ckpt_path))):
        raise SystemExit(f"error: {ckpt_path} exists; pass --resume to continue that run or choose another --out")

    try:
        data = load_dataset(args.dataset, args.data_dir, download_missing=args.download and par.main)
    except DatasetError as exc:
        raise SystemExit(f"error: {exc}") from None
    scenario = build_scenario(data, num_meta=args.num_meta, imbalance_factor=args.imbalance_factor,
                              noise=args.label_noise, noise_rate=args.noise_rate, seed=args.seed,
                              train_subset=args.train_subset)
    c = data.num_classes
    torch.manual_seed(args.seed)
    model = model_for(args.arch, data, device)
    if args.init:
        try:
            init = load_checkpoint(args.init)
        except CheckpointError as exc:
            raise SystemExit(f"error: --init: {exc}") from None
        model.load_state_dict(init["trainer"]["model"])
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    counts = scenario.class_counts.double()
    config = AAAConfig(method=args.method, num_classes=c, eps=args.eps, alpha=args.alpha, steps=args.steps,
                       lam=args.lam, bound_mode=args.bound_mode, fairness=False if args.no_fairness else None,
                       objective=args.objective, meta_init=args.meta_init, temperature=args.temperature,
                       anti_cap=args.anti_cap, meta_every=args.meta_every,
                       class_share=(counts / counts.sum()).tolist(), fairness_eval_eps=args.eval_eps,
                       fairness_eval_steps=args.eval_steps, amp=args.amp, channels_last=args.channels_last,
                       compile=args.compile,
                       seed=args.seed, skip_nonfinite=args.skip_nonfinite)
    meta_net = meta_opt = None
    if args.method == "aaa":
        meta_net = make_meta_net(config, seed=meta_net_seed(scenario.info))
        meta_opt = torch.optim.Adam(meta_net.parameters(), lr=args.meta_lr, weight_decay=5e-4)
    trainer = AAATrainer(model, optimizer, meta_net=meta_net, meta_optimizer=meta_opt, config=config)
    trainer.grad_sync = par.average
    steps_per_epoch = math.ceil(scenario.train_y.shape[0] / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    if args.schedule == "step":
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, [int(0.5 * total_steps), int(0.75 * total_steps)], gamma=0.1)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)

    # data held on the training device as uint8; shuffling from a seeded generator
    train_x, train_y = scenario.train_x.to(device), scenario.train_y.to(device)
    corrupted = (scenario.train_y != scenario.train_y_clean).to(device)
    choices = ChoiceDiagnostics(corrupted, tail_classes(torch.bincount(scenario.train_y_clean, minlength=c)))
    meta_x, meta_y = scenario.meta_x.to(device), scenario.meta_y.to(device)
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    if args.test_subset is not None and args.test_subset < test_y.shape[0]:
        keep = class_balanced_subset(data.test_y, args.test_subset, c, torch.Generator().manual_seed(0)).to(device)
        test_x, test_y = test_x[keep], test_y[keep]
    shuffle = torch.Generator().manual_seed(args.seed + 1)
    augment_gen = torch.Generator(device=device).manual_seed(args.seed + 2)
    augment = args.dataset != "fashion-mnist"
    history, best, start_epoch, position = [], None, 0, None
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        scheduler.load_state_dict(state["scheduler"])
        shuffle.set_state(state["shuffle_rng"])
        augment_gen.set_state(state["augment_rng"])
        history, best, start_epoch = state["history"], state["best"], state["epoch"]
        position = state.get("position")  # set when a signal stopped the run inside an epoch
    if par.main:
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(dict(run_config, config_hash=chash, scenario=scenario.info, device=str(device),
                           torch=torch.__version__), f, indent=2)
    use_bar = args.progress == "bar" or (args.progress == "auto" and sys.stderr.isatty())
    stopper = StopRequested()

    def checkpoint(epochs_done: int, position: dict | None = None) -> None:
        if not par.main:
            return
        save_rotating({"config_hash": chash, "epoch": epochs_done, "trainer": trainer.state_dict(),
                       "scheduler": scheduler.state_dict(), "shuffle_rng": shuffle.get_state(),
                       "augment_rng": augment_gen.get_state(), "history": history, "best": best,
                       "position": position}, ckpt_path)

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
        if use_bar and par.main:
            from tqdm import tqdm
            batches = tqdm(batches, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, dynamic_ncols=True)
        for i in batches:
            idx = order[i * args.batch_size:(i + 1) * args.batch_size][par.rank::par.world]
            x = train_x[idx]
            if augment:
                x = random_crop_flip(x, generator=augment_gen)
            meta_rows = meta_order[(i * n_meta_batch) % meta_y.shape[0]:][:n_meta_batch]
            try:
                stats = trainer.step(x, train_y[idx], meta_x[meta_rows], meta_y[meta_rows], corrupted=corrupted[idx])
            except FloatingPointError as exc:
                last = (f"the last good checkpoint is {ckpt_path} (after epoch {history[-1]['epoch']})" if history
                        else "no checkpoint was written yet")
                raise SystemExit(f"error: {exc} in epoch {epoch + 1}; training stopped, {last}") from None
            scheduler.step()
            par.broadcast_buffers(model)
            if not stats.get("skipped"):
                sums["steps"] += 1
                for key in STEP_FIELDS:
                    sums[key] += stats[key]
                if "meta_grad_norm" in stats:
                    sums["meta_steps"] += 1
                    sums["meta_grad_norm"] += stats["meta_grad_norm"]
                choices.add(idx, *trainer.last_choice)
            if use_bar and par.main:
                batches.set_postfix(loss=f"{stats['loss']:.3f}")
            if stopper.requested:
                checkpoint(epoch, dict(step=i + 1, order=order.cpu(), meta_order=meta_order.cpu(), sums=sums,
                                       choices=choices.state_dict()))
                if par.main:
                    print(f"stopped after step {i + 1}/{steps_per_epoch} of epoch {epoch + 1}; checkpoint written "
                          f"to {ckpt_path}; continue with --resume", file=sys.stderr, flush=True)
                par.close()
                raise SystemExit(130)
        par.sum_(trainer._epoch_loss_sum)
        par.sum_(trainer._epoch_loss_count)
        trainer.end_epoch(fairness=False)
        n = max(sums["steps"], 1)
        row = dict(epoch=epoch + 1, lr=optimizer.param_groups[0]["lr"], **{k: sums[k] / n for k in STEP_FIELDS},
                   meta_grad_norm=sums["meta_grad_norm"] / sums["meta_steps"] if sums["meta_steps"] else "",
                   **choices.summary(scenario.train_y_clean), skipped=trainer.skipped_steps,
                   test_clean_acc="", test_pgd_acc="")
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            sub = torch.arange(min(args.eval_subset, test_y.shape[0]), device=device)
            ev = evaluate_split(model, test_x[sub], test_y[sub], c, args, device, seed=args.seed + 1000 + epoch)
            row.update(test_clean_acc=ev["clean_acc"], test_pgd_acc=ev["pgd_acc"])
            if par.main and (best is None or ev["pgd_acc"] > best["test_pgd_acc"]):
                best = dict(epoch=epoch + 1, test_clean_acc=ev["clean_acc"], test_pgd_acc=ev["pgd_acc"])
                save_atomic({"config_hash": chash, "epoch": epoch + 1, "trainer": {"model": model.state_dict()}},
                            os.path.join(args.out, "best.pt"))
        row["seconds"] = round(time.time() - t0, 2)
        history.append(row)
        checkpoint(epoch + 1)
        if par.main:
            with open(os.path.join(args.out, "metrics.csv"), "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
                writer.writeheader()
                writer.writerows(history)
            acc = (f", test clean {row['test_clean_acc']:.2f}% PGD {row['test_pgd_acc']:.2f}%"
                   if row["test_clean_acc"] != "" else "")
            print(f"epoch {epoch + 1}/{args.epochs}: loss {row['loss']:.4f}, anti share {row['frac_anti']:.2f}, "
                  f"eps {row['mean_eps']:.4f}{acc} ({row['seconds']:.1f}s)", flush=True)

    final = evaluate_split(model, test_x, test_y, c, args, device, seed=args.seed + 99)
    if args.autoattack:
        final["autoattack_acc"] = autoattack_accuracy(model, test_x, test_y, args)
    final.update(epochs=args.epochs, method=args.method, dataset=args.dataset, arch=args.arch,
                 scenario=scenario.info, eval_eps=args.eval_eps, eval_steps=args.eval_steps,
                 diagnostics={k: history[-1].get(k, "") for k in DIAGNOSTIC_FIELDS} if history else {})
    if par.main:
        with open(os.path.join(args.out, "final.json"), "w") as f:
            json.dump(final, f, indent=2)
        make_plots(args.out, history, final)
        print(format_final(final), flush=True)
    par.close()
    return final


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
        xb = x[s:s + 256].float() / 255
        xa = attack(xb, y[s:s + 256])
        with torch.no_grad():
            correct += (model(xa).argmax(1) == y[s:s + 256]).sum().item()
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


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    train(args)


if __name__ == "__main__":
    main()
