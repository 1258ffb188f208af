"""One training run of python -m aaa_fast.train, from resolved arguments: load the data and
build the scenario, set up (or resume) the trainer, run the epochs (per-epoch metrics,
evaluation, atomic checkpoints), evaluate the final model and write final.json and the plots.
The command line (aaa_fast.train) only parses and resolves the arguments."""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import importlib.util
import json
import math
import os
import sys
import time
import zlib

import torch

from .checkpoint import (CheckpointError, atomic_write, config_hash, load_checkpoint, load_newest, previous_path,
                         save_atomic, save_rotating, write_json_atomic)
from .data import DatasetError, build_scenario, load_dataset, random_crop_flip
from .diagnostics import GROUP_FIELDS, ChoiceDiagnostics, tail_classes
from .evaluation import (EvalConfig, check_test_subset, evaluate_split, final_evaluation, final_test_set, format_final,
                         model_for)
from .model_io import AS_ASKED
from .plots import PlotInfo, make_plots
from .runtime import Distributed, ProgressLines, RunDirLock, StopRequested, check_out_dir, keep_cpu_memory
from .methods import get_method, step_stat_names
from .trainer import CONFIG_DEFAULTS, AAAConfig, AAATrainer, check_module_state, make_meta_net, make_meta_optimizer

# every random stream of a run is drawn from --seed plus a fixed offset (the model's initial
# weights and the attacks' starts from --seed itself; the meta-network's from meta_net_seed;
# the final evaluation's from evaluation.FINAL_EVAL_SEED_OFFSET)
SHUFFLE_SEED_OFFSET = 1      # the epochs' order of training and meta rows
AUGMENT_SEED_OFFSET = 2      # crops and flips (CIFAR)
EPOCH_EVAL_SEED_OFFSET = 1000  # the per-epoch test evaluation's PGD starts, + the epoch
DIAGNOSTIC_FIELDS = ["frac_anti", "grad_band", "mean_eps", "meta_grad_norm", *GROUP_FIELDS]


def csv_name(method: str, stat: str) -> str:
    """metrics.csv's name of a step statistic: a method's loss terms are named <term>_loss (they
    are losses, not errors or shares)."""
    return f"{stat}_loss" if stat in get_method(method).terms else stat


def metric_fields(method: str) -> list[str]:
    """metrics.csv's columns: the trainer's step statistics averaged over an epoch's steps
    (frac_anti: share of rows with b > a; grad_band: share with a(1 - a) > 1e-3; rows_attacked:
    share of the attack rows attacked), meta_grad_norm (mean over its meta steps), dropped_share
    (--min-row-weight: the share of the objective skipping dropped, measured on the steps that
    attacked every row), what the meta-network chose per group, the evaluation."""
    return ["epoch", "lr", *[csv_name(method, k) for k in step_stat_names(method)], "meta_grad_norm", "dropped_share",
            *GROUP_FIELDS, "skipped",
            "test_clean_acc", "test_pgd_acc", "seconds"]


# settings that got a flag after runs were recorded without one: they enter the run's hash only
# when they differ from their default, so run directories written before still resume
LATER_SETTINGS = {name: CONFIG_DEFAULTS[name]
                  for name in ("norm", "adv_loss", "s_min", "s_max", "fixed_weights", "tau", "rho1", "rho2",
                               "min_row_weight")}


def group_shares(row: dict) -> str:
    """' (corrupted labels 0.81, clean 0.12, AUROC 0.93)' or ' (tail classes 0.20, head 0.05)'
    from a metrics row (a group without rows is left out), '' where the scenario has neither."""
    for fields in ((("corrupted labels", "anti_share_corrupted"), ("clean", "anti_share_clean"),
                    ("AUROC", "anti_auroc_corrupted")),
                   (("tail classes", "anti_share_tail"), ("head", "anti_share_head"))):
        parts = [f"{label} {row[key]:.2f}" for label, key in fields if row.get(key, "") != ""]
        if parts:
            return f" ({', '.join(parts)})"
    return ""


def run_hash(run_config: dict) -> str:
    return config_hash({k: v for k, v in run_config.items()
                        if not (k in LATER_SETTINGS and v == LATER_SETTINGS[k])})


def check_data_settings(args: argparse.Namespace, num_classes: int, scenario_info: dict, test_size: int) -> None:
    """Refuse, naming the flags, settings that leave nothing to train on or cannot be evaluated."""
    if scenario_info["train_size"] == 0:
        subset = f" of --train-subset {args.train_subset}" if args.train_subset else ""
        raise SystemExit(f"error: --num-meta {args.num_meta} takes every image{subset}: no training images are "
                         "left; lower --num-meta or raise --train-subset")
    uses_meta_set = get_method(args.method).uses_meta_net or args.fairness
    if uses_meta_set and args.num_meta < num_classes:
        raise SystemExit(f"error: --method {args.method} learns from the meta set (meta-network or fairness "
                         f"multipliers): --num-meta must be at least {num_classes} (one image per class), "
                         f"got {args.num_meta}")
    check_test_subset(args.test_subset, num_classes, test_size)


# the files a run writes into --out besides its checkpoints
RESULT_FILES = ("config.json", "metrics.csv", "final.json", "curves.png", "classwise.png", "mechanism.png")


def final_epochs(out: str):
    """The epoch count final.json was written after (None when unreadable)."""
    try:
        with open(os.path.join(out, "final.json")) as f:
            return json.load(f).get("epochs")
    except (OSError, ValueError, AttributeError):
        return None


def settings_diff(out: str, run_config: dict, flags) -> str:
    """'; differs from the run in OUT: --flag (was A, now B), ...' from its config.json, or ''."""
    try:
        with open(os.path.join(out, "config.json")) as f:
            before = json.load(f)
    except (OSError, ValueError):
        return ""
    changed = [f"{'--' + k.replace('_', '-') if k in flags else k} (was {before[k]!r}, now {v!r})"
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


def meta_net_seed(scenario_info: dict) -> int:
    """The meta-network's initial draw, one per (scenario, seed): runs of one --seed in different
    scenarios must not share it (the first study's did, so three draws decided all its runs)."""
    return zlib.crc32(json.dumps(scenario_info, sort_keys=True).encode())


def load_run_data(args: argparse.Namespace, ranks: Distributed):
    """The dataset and the run's scenario (subset, meta set, label noise, long tail), or a
    one-line refusal naming the flag."""
    try:
        data = load_dataset(args.dataset, args.data_dir, download_missing=args.download and ranks.is_main)
    except DatasetError as exc:
        raise SystemExit(f"error: {exc}") from None
    try:
        scenario = build_scenario(data, num_meta=args.num_meta, imbalance_factor=args.imbalance_factor,
                                  noise=args.label_noise, noise_rate=args.noise_rate, seed=args.seed,
                                  train_subset=args.train_subset)
    except ValueError as exc:  # a meta set the data cannot supply
        subset = f" of --train-subset {args.train_subset}" if args.train_subset else ""
        raise SystemExit(f"error: --num-meta {args.num_meta}{subset}: {exc}") from None
    check_data_settings(args, data.num_classes, scenario.info, data.test_y.shape[0])
    return data, scenario


def trainer_config(args: argparse.Namespace, num_classes: int, class_counts: torch.Tensor) -> AAAConfig:
    """The AAAConfig the flags describe: each flag named as a field sets it (the CLI takes those
    flags' defaults from AAAConfig, and resolve_defaults fills the per-method ones); the per-epoch
    fairness evaluation uses the evaluation's PGD budget; the class shares come from the data."""
    fields = {f.name for f in dataclasses.fields(AAAConfig)}
    counts = class_counts.double()
    return AAAConfig(**{k: v for k, v in vars(args).items() if k in fields}, num_classes=num_classes,
                     class_share=(counts / counts.sum()).tolist(), fairness_eval_eps=args.eval_eps,
                     fairness_eval_steps=args.eval_steps)


def load_init(path: str, arch: str, data) -> dict:
    """The model weights of --init's checkpoint, refused with a message unless they fit --arch."""
    try:
        weights = load_checkpoint(path).get("trainer", {}).get("model")
        check_module_state("model", model_for(arch, data, torch.device("cpu")), weights)
    except (CheckpointError, ValueError) as exc:
        raise SystemExit(f"error: --init {path}: {exc} (--arch {arch})") from None
    return weights


def build_trainer(args: argparse.Namespace, data, scenario, device: torch.device, ranks: Distributed,
                  init: dict | None = None) -> AAATrainer:
    """The model (seeded, or with `init`'s weights: --init), its SGD, the AAAConfig the flags
    describe, the meta-network and its Adam for a method that uses one, and the trainer that holds them."""
    torch.manual_seed(args.seed)
    model = model_for(args.arch, data, device)
    if init is not None:
        model.load_state_dict(init)
    # fused on CUDA: it skips a non-finite step on the device, so a training step never waits for the GPU
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                                fused=device.type == "cuda")
    config = trainer_config(args, data.num_classes, scenario.class_counts)
    meta_net = meta_opt = None
    if get_method(args.method).uses_meta_net:
        meta_net = make_meta_net(config, seed=meta_net_seed(scenario.info)).to(device)
        meta_opt = make_meta_optimizer(config, meta_net)
    trainer = AAATrainer(model, optimizer, meta_net=meta_net, meta_optimizer=meta_opt, config=config)
    trainer.grad_sync = ranks.average
    if args.grad_bucket_mb > 0:
        trainer.grad_reducer = ranks.overlapped_average(model, args.grad_bucket_mb)
    return trainer


class Run:
    """One training run of the CLI, as named steps: __init__ sets it up (devices, data, output
    directory, trainer, schedule, random streams) and resumes it; train_epoch, evaluate_epoch and
    record_epoch make one epoch; finish evaluates the final model and writes final.json."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.ranks = ranks = Distributed(args.device)
        self.device = device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", "0")) if args.device == "cuda" else None)
        if device.type == "cpu":
            keep_cpu_memory()
        if args.tensorboard and importlib.util.find_spec("tensorboard") is None:  # before anything is written
            raise SystemExit("error: --tensorboard needs the tensorboard package: pip install tensorboard "
                             "(or pip install 'aaa_fast[tensorboard]')")
        # data first: a run that cannot get its data leaves nothing behind
        self.data, self.scenario = data, scenario = load_run_data(args, ranks)
        init = load_init(args.init, args.arch, data) if args.init else None  # before --out is created
        self.out_lock = None
        if ranks.is_main:
            check_out_dir(args.out)
            self.out_lock = RunDirLock(args.out)  # held until this process ends
        # what decides the results: the settings (not where the data lives, not --epochs, which a
        # resume may raise to extend a run) and the data's content
        self.run_config = {k: v for k, v in vars(args).items()
                           if k not in ("resume", "progress", "init", "out", "data_dir", "epochs", "tensorboard", "cuda_graphs",
                                        "grad_bucket_mb", "final_attack", "aa_version", "amp_choice")}
        self.run_config.update(world_size=ranks.world, data_fingerprint=data.fingerprint())
        self.run_hash = run_hash(self.run_config)
        self.ckpt_path = os.path.join(args.out, "checkpoint.pt")
        self.finished_before = False
        try:
            state = self.load_state()
        except BaseException:  # a refusal: the directory is free again (for callers of train() in-process)
            if self.out_lock is not None:
                self.out_lock.release()
            raise

        torch.backends.cudnn.benchmark = device.type == "cuda"  # every batch has the same shape
        self.trainer = build_trainer(args, data, scenario, device, ranks, init)
        self.steps_per_epoch = epoch_steps(scenario.train_y.shape[0], args.batch_size)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.trainer.optimizer,
                                                           lr_factor(args.schedule, self.steps_per_epoch * args.epochs))
        # data held on the training device as uint8; shuffling from a seeded generator
        self.train_x, self.train_y = scenario.train_x.to(device), scenario.train_y.to(device)
        self.corrupted = (scenario.train_y != scenario.train_y_clean).to(device)
        self.choices = ChoiceDiagnostics(self.corrupted, tail_classes(torch.bincount(scenario.train_y_clean,
                                                                                     minlength=data.num_classes)))
        self.meta_x, self.meta_y = scenario.meta_x.to(device), scenario.meta_y.to(device)
        self.test_x, self.test_y = final_test_set(data, args.test_subset, device)
        self.shuffle = torch.Generator().manual_seed(args.seed + SHUFFLE_SEED_OFFSET)
        self.augment_gen = torch.Generator(device=device).manual_seed(args.seed + AUGMENT_SEED_OFFSET)
        self.history, self.best, self.start_epoch, self.position, self.mechanism = [], None, 0, None, None
        if state is not None:
            self.restore(state)
        self.write_config()
        if ranks.is_main and args.amp_choice != AS_ASKED:
            layout = ", channels_last" if args.channels_last else ""
            print(f"precision: {args.amp if args.amp != 'none' else 'fp32'}{layout} ({args.amp_choice}); "
                  "evaluation in fp32", file=sys.stderr, flush=True)
        self.use_bar = args.progress == "bar" or (args.progress == "auto" and sys.stderr.isatty())
        self.board = None
        if args.tensorboard and ranks.is_main:  # purge_step: a resumed run overwrites what followed its checkpoint
            from torch.utils.tensorboard import SummaryWriter
            self.board = SummaryWriter(os.path.join(args.out, "tensorboard"), purge_step=self.start_epoch
                                       * self.steps_per_epoch + (self.position["step"] if self.position else 0))
        self.stopper = StopRequested()

    def load_state(self) -> dict | None:
        """The checkpoint --resume continues from (None: nothing written yet), or a refusal that
        names the settings that differ; without --resume, a refusal to overwrite a run."""
        args, ranks = self.args, self.ranks
        has_final = os.path.exists(os.path.join(args.out, "final.json"))
        if args.resume:
            try:
                state = load_newest(self.ckpt_path, expected_hash=self.run_hash)
            except CheckpointError as exc:
                raise SystemExit(f"error: cannot resume: {exc}{settings_diff(args.out, self.run_config, vars(args))}") from None
            if state is None and has_final:  # finished, its checkpoints removed (the grid runner does)
                raise SystemExit(f"error: {args.out} holds a finished run (final.json) without its checkpoints: it "
                                 "cannot be resumed or extended, and its results are kept; choose another --out")
            if state is not None and state["epoch"] > args.epochs:
                raise SystemExit(f"error: the run in {args.out} has trained {state['epoch']} epochs; --epochs "
                                 f"{args.epochs} cannot shorten it: pass --epochs {state['epoch']} or more, or "
                                 "re-evaluate it with python -m aaa_fast.evaluate")
            # final.json of these epochs (an extension stopped in its final evaluation left the old one)
            self.finished_before = (state is not None and has_final and state["epoch"] == args.epochs
                                    and state.get("position") is None and final_epochs(args.out) == args.epochs)
            if ranks.is_main and state is None and not has_final:
                self.refuse_foreign_files(check_hash=True)
            if ranks.is_main:
                print(f"--resume: no checkpoint in {args.out} yet, starting the run" if state is None else
                      f"resuming {args.out} from {describe_position(state, args.epochs)}", file=sys.stderr, flush=True)
            return state
        has_checkpoint = os.path.exists(self.ckpt_path) or os.path.exists(previous_path(self.ckpt_path))
        if ranks.is_main and has_final:
            extend = ("pass --resume --epochs N (more epochs) to extend it" if has_checkpoint else
                      "its checkpoints are gone, so it cannot be extended")
            raise SystemExit(f"error: {args.out} holds a finished run (final.json), whose results are never "
                             f"overwritten: {extend}, or choose another --out")
        if ranks.is_main and has_checkpoint:
            raise SystemExit(f"error: {self.ckpt_path} exists; pass --resume to continue that run or choose another --out")
        if ranks.is_main:
            self.refuse_foreign_files(check_hash=False)
        return None

    def refuse_foreign_files(self, check_hash: bool) -> None:
        """Files a run writes, already in --out without a checkpoint: another run's start or the
        user's own files, never overwritten. With --resume, a config.json of this very run (one
        stopped before its first checkpoint) is its own."""
        out = self.args.out
        present = [name for name in RESULT_FILES if os.path.exists(os.path.join(out, name))]
        if not present:
            return
        if check_hash and present == ["config.json"]:
            try:
                with open(os.path.join(out, "config.json")) as f:
                    if json.load(f).get("config_hash") == self.run_hash:
                        return
            except (OSError, ValueError, AttributeError):
                pass
        raise SystemExit(f"error: --out {out} holds {', '.join(present)} but no checkpoint of this run: they belong "
                         "to another run or to you, and are never overwritten; choose another --out")

    def restore(self, state: dict) -> None:
        self.trainer.load_state_dict(state["trainer"])
        if "rank_states" in state:  # the run hash holds the world size: one saved state per rank here
            self.trainer.load_rank_state(state["rank_states"][self.ranks.rank])
        self.scheduler.load_state_dict(state["scheduler"])
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)  # this run's --epochs decide the rest
        for group in self.trainer.optimizer.param_groups:
            group["lr"] = self.args.lr * factor
        self.shuffle.set_state(state["shuffle_rng"])
        self.augment_gen.set_state(state["augment_rng"])
        self.history, self.best, self.start_epoch = state["history"], state["best"], state["epoch"]
        self.position = state.get("position")  # set when a signal stopped the run inside an epoch
        self.mechanism = state.get("mechanism")  # absent in checkpoints written before mechanism.png

    def write_config(self) -> None:
        if self.ranks.is_main:
            args = self.args
            config = dict(self.run_config, data_dir=args.data_dir, epochs=args.epochs, final_attack=args.final_attack,
                          aa_version=args.aa_version, amp_choice=args.amp_choice, config_hash=self.run_hash, scenario=self.scenario.info,
                          trainer_config=dataclasses.asdict(self.trainer.config), device=str(self.device),
                          torch=torch.__version__)
            write_json_atomic(config, os.path.join(args.out, "config.json"))

    def save_checkpoint(self, epochs_done: int, position: dict | None = None) -> None:
        """On every rank (each hands rank 0 its own trainer.rank_state); rank 0 writes."""
        with self.stopper.saving():
            rank_states = self.ranks.gather(self.trainer.rank_state())
            if self.ranks.is_main:
                save_rotating({"config_hash": self.run_hash, "epoch": epochs_done, "trainer": self.trainer.state_dict(),
                               "rank_states": rank_states, "scheduler": self.scheduler.state_dict(),
                               "shuffle_rng": self.shuffle.get_state(), "augment_rng": self.augment_gen.get_state(),
                               "history": self.history, "best": self.best, "position": position,
                               "mechanism": self.mechanism}, self.ckpt_path)

    @contextlib.contextmanager
    def stop_on_nonfinite(self, epoch: int):
        try:
            yield
        except FloatingPointError as exc:
            last = (f"the last good checkpoint is {self.ckpt_path} (after epoch {self.history[-1]['epoch']})"
                    if self.history else "no checkpoint was written yet")
            raise SystemExit(f"error: {exc} in epoch {epoch + 1}; training stopped, {last}") from None

    def add_step_stats(self, sums: dict, epoch: int) -> None:
        """Fold the trainer's device-side step statistics into the epoch's sums (one sync)."""
        with self.stop_on_nonfinite(epoch):
            read = self.trainer.read_stats()
        sums["steps"] += read["steps"]
        for key in self.trainer.stat_names:
            sums[key] += read[key] * read["steps"] if read["steps"] else 0.0
        for count, mean in (("meta_steps", "meta_grad_norm"), ("measured_steps", "dropped_share")):
            if read[count]:
                sums[count] += read[count]
                sums[mean] += read[mean] * read[count]

    def stop(self, message: str) -> None:
        if self.ranks.is_main:
            print(message, file=sys.stderr, flush=True)
        self.ranks.close()
        raise SystemExit(130)

    def train_epoch(self, epoch: int) -> dict:
        """The epoch's training steps (from where a signal stopped it, if it did); its metrics.csv row."""
        args, trainer, ranks, device = self.args, self.trainer, self.ranks, self.device
        optimizer = trainer.optimizer
        if self.position is not None:  # continue inside the epoch a signal interrupted
            position, self.position = self.position, None
            order, meta_order = position["order"].to(device), position["meta_order"].to(device)
            sums, first_step = position["sums"], position["step"]
            self.choices.load_state_dict(position["choices"])
        else:
            # the reference updates the fairness multipliers before every epoch, the first too
            trainer.update_fairness(self.meta_x, self.meta_y)
            order = torch.randperm(self.train_y.shape[0], generator=self.shuffle).to(device)
            meta_order = torch.randperm(self.meta_y.shape[0], generator=self.shuffle).to(device)
            sums, first_step = dict.fromkeys(["steps", *trainer.stat_names, "meta_steps", "meta_grad_norm",
                                                        "measured_steps", "dropped_share"], 0.0), 0
            self.choices.reset()
        n_meta_batch = min(args.meta_batch_size, self.meta_y.shape[0])
        batches = range(first_step, self.steps_per_epoch)
        lines = None
        if self.use_bar and ranks.is_main:
            from tqdm import tqdm
            batches = tqdm(batches, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, dynamic_ncols=True)
        elif ranks.is_main:
            lines = ProgressLines(f"epoch {epoch + 1}/{args.epochs}", self.steps_per_epoch, first_step)
        for i in batches:
            idx = batch_rows(order, i, self.steps_per_epoch, args.batch_size, ranks.world)[ranks.rank::ranks.world]
            x = self.train_x[idx]
            if args.dataset != "fashion-mnist":
                x = random_crop_flip(x, generator=self.augment_gen)
            meta_rows = meta_order[(i * n_meta_batch) % self.meta_y.shape[0]:][:n_meta_batch]
            with self.stop_on_nonfinite(epoch):
                stats = trainer.step(x, self.train_y[idx], self.meta_x[meta_rows], self.meta_y[meta_rows],
                                     corrupted=self.corrupted[idx])
            self.scheduler.step()
            ranks.broadcast_buffers(trainer.model)
            if trainer.last_choice is not None:
                self.choices.add(idx, *trainer.last_choice, trainer.last_eps)
            if self.board is not None:
                step_no = epoch * self.steps_per_epoch + i + 1
                self.board.add_scalar("step/lr", optimizer.param_groups[0]["lr"], step_no)
                for key in ("loss", *trainer.method.terms, "frac_anti"):
                    self.board.add_scalar(f"step/{csv_name(args.method, key)}", stats[key], step_no)
            if self.use_bar and ranks.is_main and i % 25 == 0:  # reading the loss waits for the GPU
                batches.set_postfix(loss=f"{stats['loss']:.3f}")
            elif lines is not None:
                lines.update(i + 1, lambda: f"loss {stats['loss']:.3f}, lr {optimizer.param_groups[0]['lr']:.3g}")
            if ranks.any_(self.stopper.requested):  # every rank stops after the same step
                self.add_step_stats(sums, epoch)
                self.save_checkpoint(epoch, dict(step=i + 1, order=order.cpu(), meta_order=meta_order.cpu(), sums=sums,
                                                 choices=self.choices.state_dict()))
                self.stop(f"stopped after step {i + 1}/{self.steps_per_epoch} of epoch {epoch + 1}; checkpoint "
                          f"written to {self.ckpt_path}; continue with --resume")
        self.add_step_stats(sums, epoch)
        if trainer.method.chooses_rows:  # for mechanism.png: the last epoch's b_i and eps_i
            self.mechanism = self.choices.distributions(self.scenario.train_y_clean, self.data.num_classes)
        trainer.reduce_epoch_losses(ranks.sum_)
        trainer.end_epoch(fairness=False)
        n = max(sums["steps"], 1)
        return dict(epoch=epoch + 1, lr=optimizer.param_groups[0]["lr"],
                    **{csv_name(args.method, k): sums[k] / n for k in trainer.stat_names},
                    meta_grad_norm=sums["meta_grad_norm"] / sums["meta_steps"] if sums["meta_steps"] else "",
                    dropped_share=sums["dropped_share"] / sums["measured_steps"] if sums["measured_steps"] else "",
                    **self.choices.summary(self.scenario.train_y_clean), skipped=trainer.skipped_steps,
                    test_clean_acc="", test_pgd_acc="")

    def evaluate_epoch(self, epoch: int, row: dict) -> None:
        """Clean and PGD accuracy on the first --eval-subset test images into `row`; best.pt
        follows the best PGD accuracy."""
        args, model = self.args, self.trainer.model
        sub = torch.arange(min(args.eval_subset, self.test_y.shape[0]), device=self.device)
        ev = evaluate_split(model, self.test_x[sub], self.test_y[sub], self.data.num_classes, EvalConfig.of_run(args),
                            self.device, seed=args.seed + EPOCH_EVAL_SEED_OFFSET + epoch)
        row.update(test_clean_acc=ev["clean_acc"], test_pgd_acc=ev["pgd_acc"])
        if self.ranks.is_main and (self.best is None or ev["pgd_acc"] > self.best["test_pgd_acc"]):
            self.best = dict(epoch=epoch + 1, test_clean_acc=ev["clean_acc"], test_pgd_acc=ev["pgd_acc"])
            with self.stopper.saving():
                save_atomic({"config_hash": self.run_hash, "epoch": epoch + 1, "trainer": {"model": model.state_dict()}},
                            os.path.join(args.out, "best.pt"))

    def record_epoch(self, row: dict) -> None:
        """The epoch into the history, the checkpoint, metrics.csv, TensorBoard and the log."""
        args = self.args
        self.history.append(row)
        with self.stopper.saving():  # the checkpoint and metrics.csv as one save: a second signal waits for both
            self.save_checkpoint(row["epoch"])
            if not self.ranks.is_main:
                return
            with atomic_write(os.path.join(args.out, "metrics.csv"), newline="") as f:
                writer = csv.DictWriter(f, fieldnames=metric_fields(args.method))
                writer.writeheader()
                writer.writerows(self.history)
        if self.board is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.board.add_scalar(f"epoch/{key}", value, row["epoch"])
            self.board.flush()
        acc = (f", test clean {row['test_clean_acc']:.2f}% PGD {row['test_pgd_acc']:.2f}%"
               if row["test_clean_acc"] != "" else "")
        anti = f", anti share {row['frac_anti']:.2f}{group_shares(row)}" if self.trainer.method.chooses_rows else ""
        if self.trainer.config.min_row_weight > 0:
            dropped = f", {100 * row['dropped_share']:.2f}% of the loss dropped" if row["dropped_share"] != "" else ""
            anti += f", rows attacked {row['rows_attacked']:.2f}{dropped}"
        print(f"epoch {row['epoch']}/{args.epochs}: loss {row['loss']:.4f}{anti}, mean eps {row['mean_eps']:.4f}, "
              f"lr {self.trainer.optimizer.param_groups[0]['lr']:.3g}{acc} ({row['seconds']:.1f}s)", flush=True)

    def finish(self) -> dict:
        """Evaluate the final model on the test set (or --test-subset); final.json, the plots."""
        args, ranks = self.args, self.ranks

        def stop_during_evaluation(_done: int) -> None:
            if self.ranks.any_(self.stopper.requested):  # training is saved; --resume redoes the evaluation
                self.stop(f"stopped during the final evaluation; training is complete in {self.ckpt_path}; "
                          "--resume redoes the evaluation")

        final = final_evaluation(self.trainer.model, self.data, EvalConfig.of_run(args), self.device,
                                 progress=ranks.is_main and not self.use_bar, on_batch=stop_during_evaluation)
        history = self.history
        final.update(epochs=args.epochs, method=args.method, dataset=args.dataset, arch=args.arch,
                     scenario=self.scenario.info, eval_eps=args.eval_eps, eval_steps=args.eval_steps,
                     diagnostics={k: history[-1].get(k, "") for k in DIAGNOSTIC_FIELDS} if history else {})
        if ranks.is_main:
            with self.stopper.saving():
                write_json_atomic(final, os.path.join(args.out, "final.json"))
            make_plots(args.out, history, final, PlotInfo(args.method, args.dataset, args.arch, args.seed, args.eps,
                                                          args.eval_eps, args.eval_steps, args.eval_subset,
                                                          test_size=self.test_y.shape[0]),
                       mechanism=self.mechanism)
            if self.board is not None:
                for key in ("clean_acc", "pgd_acc", "avg_rob_err", "worst_rob_err", "aa_acc", "aa_avg_rob_err",
                            "aa_worst_rob_err"):
                    if key in final:
                        self.board.add_scalar(f"final/{key}", final[key], args.epochs)
                self.board.close()
            print(format_final(final), flush=True)
            if self.trainer.method.chooses_rows and history:
                print(f"last epoch's choices: anti share {history[-1]['frac_anti']:.2f}{group_shares(history[-1])}; "
                      f"see {os.path.join(args.out, 'mechanism.png')}", flush=True)
        ranks.close()
        if self.out_lock is not None:
            self.out_lock.release()
        return final


def train(args: argparse.Namespace) -> dict:
    """One run from the CLI's arguments, resolved (aaa_fast.train.resolve_defaults); returns final.json's content."""
    run = Run(args)
    if run.finished_before:  # nothing to train, and final.json is kept as it is
        if run.ranks.is_main:
            print(f"{args.out} is finished ({args.epochs} epochs, final.json written): nothing to do; "
                  "python -m aaa_fast.evaluate re-evaluates it", file=sys.stderr, flush=True)
        run.ranks.close()
        with open(os.path.join(args.out, "final.json")) as f:
            return json.load(f)
    for epoch in range(run.start_epoch, args.epochs):
        t0 = time.time()
        row = run.train_epoch(epoch)
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            run.evaluate_epoch(epoch, row)
        row["seconds"] = round(time.time() - t0, 2)
        run.record_epoch(row)
    return run.finish()
