"""The first N training steps of a run's command, one line per step (loss, anti share) and a digest
of the model's weights after them: run it at two commits, or on two machines, to tell whether they
compute the same run (the same lines to the last digit) or where they part:

    python experiments/first_steps.py --steps 79 -- TRAINING ARGUMENTS OF THE RUN

The training arguments are those of `python -m aaa_fast.train` (a run.json's "command" pasted
as it is: its --out, --resume and --progress are dropped; the steps run in a temporary directory
through the CLI's own Run, so data, noise, seeds and the schedule are the run's).
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile

import torch

from aaa_fast.run import Run
from aaa_fast.train import build_parser, resolve_defaults

DROPPED = {"--out": 1, "--resume": 0, "--progress": 1}


class Enough(Exception):
    """Raised from inside the epoch once the asked number of steps ran."""


def training_argv(argv: list[str]) -> list[str]:
    """argv without the leading '-m aaa_fast.train' of a run.json command and without the flags
    that name where and how a run writes (DROPPED: flag -> number of values)."""
    if argv[:2] == ["-m", "aaa_fast.train"]:
        argv = argv[2:]
    kept, i = [], 0
    while i < len(argv):
        if argv[i] in DROPPED:
            i += 1 + DROPPED[argv[i]]
            continue
        kept.append(argv[i])
        i += 1
    return kept


def weights_digest(state: dict) -> str:
    """sha256 over a model's state_dict (parameters and buffers, in order), as stored bytes."""
    h = hashlib.sha256()
    for name, t in state.items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def first_steps(train_argv: list[str], steps: int) -> tuple[list[tuple[float, float]], str]:
    """([(loss, anti share)] of the run's first `steps` training steps, weights digest after them)."""
    with tempfile.TemporaryDirectory() as out:
        args = resolve_defaults(build_parser().parse_args([*training_argv(train_argv), "--out", out,
                                                           "--progress", "lines"]))
        run = Run(args)
        total = run.steps_per_epoch * args.epochs
        if not 1 <= steps <= total:
            raise SystemExit(f"error: --steps must be between 1 and the run's {total} training steps, got {steps}")
        trainer, taken = run.trainer, []
        step = trainer.step

        def counted(*a, **k):
            stats = step(*a, **k)
            taken.append((float(stats["loss"]), float(stats["frac_anti"]) if "frac_anti" in stats else 0.0))
            if len(taken) == steps:
                raise Enough
            return stats

        trainer.step = counted
        try:
            for epoch in range(args.epochs):
                run.train_epoch(epoch)
        except Enough:
            pass
        return taken, weights_digest(trainer.model.state_dict())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, train_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, required=True, help="training steps to run (from the first)")
    args = p.parse_args(ours)
    taken, digest = first_steps(train_argv, args.steps)
    for i, (loss, anti) in enumerate(taken, 1):
        print(f"step {i}: loss {loss!r}, anti share {anti!r}")
    mean = sum(loss for loss, _ in taken) / len(taken)
    print(f"{len(taken)} steps: mean loss {mean:.6f}, mean anti share {sum(a for _, a in taken) / len(taken):.4f}, "
          f"weights digest {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
