"""python -m aaa_fast.evaluate --checkpoint RUN/best.pt: re-evaluate a run's checkpoint.

With no overrides it reproduces the run's final.json numbers (same test set or --test-subset,
same PGD budget and random starts); --eval-eps, --eval-steps and --test-subset change them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .checkpoint import CheckpointError, load_checkpoint
from .data import DatasetError, load_dataset
from .cli import HelpFormatter, number_arg
from .evaluation import check_test_subset, final_evaluation, format_final, model_for
from .runtime import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aaa_fast.evaluate", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt or best.pt of a run (config.json beside it)")
    p.add_argument("--eval-eps", type=number_arg(float, 0), default=None, help="PGD budget (e.g. 8/255); default: the run's")
    p.add_argument("--eval-steps", type=number_arg(int, 0), default=None, help="PGD steps; default: the run's")
    p.add_argument("--test-subset", type=number_arg(int, 1), default=None,
                   help="class-balanced test subset; default: the run's (the whole test set if it had none)")
    p.add_argument("--autoattack", action="store_true", help="also run torchattacks' AutoAttack")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                   help="where to evaluate")
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    config_path = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "config.json")
    if not os.path.exists(config_path):
        raise SystemExit(f"error: {config_path} not found: the checkpoint must sit in its run directory")
    try:
        with open(config_path) as f:
            run = argparse.Namespace(**json.load(f))
        state = load_checkpoint(args.checkpoint, expected_hash=run.config_hash)
        data = load_dataset(run.dataset, run.data_dir, download_missing=False)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise SystemExit(f"error: cannot read the run's settings from {config_path}: {exc}") from None
    except (CheckpointError, DatasetError) as exc:
        raise SystemExit(f"error: {exc}") from None
    for name in ("eval_eps", "eval_steps", "test_subset"):
        if getattr(args, name) is not None:
            setattr(run, name, getattr(args, name))
    check_test_subset(run.test_subset, data.num_classes)
    run.autoattack = args.autoattack
    device = torch.device(args.device)
    model = model_for(run.arch, data, device)
    model.load_state_dict(state["trainer"]["model"])
    print(f"evaluating {args.checkpoint} (epoch {state.get('epoch')}) on "
          f"{run.test_subset or data.test_y.shape[0]} test images", file=sys.stderr, flush=True)
    result = final_evaluation(model, data, run, device, progress=True)
    result.update(method=run.method, dataset=run.dataset, arch=run.arch, eval_eps=run.eval_eps,
                  eval_steps=run.eval_steps, test_subset=run.test_subset, checkpoint=args.checkpoint,
                  epoch=state.get("epoch"))
    print(format_final(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    run_cli(main)
