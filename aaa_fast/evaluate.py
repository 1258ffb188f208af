"""python -m aaa_fast.evaluate --checkpoint RUN/best.pt: re-evaluate a run's checkpoint, in fp32.

With no overrides it reproduces the run's final.json numbers (same test set or --test-subset,
same PGD budget and random starts); --eval-eps, --eval-steps and --test-subset change them.
--autoattack adds AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square; fast: APGD-CE + APGD-T,
not the standard), class-wise and worst-class; --masking-report writes the gradient-masking
checks (several attacks on the same images, accuracy against eps, flags) as JSON and a plot.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .autoattack import VERSIONS
from .checkpoint import CheckpointError, load_checkpoint, write_json_atomic
from .cli import HelpFormatter, check_device, number_arg, refuse_existing_output
from .data import DatasetError, load_dataset
from .evaluation import (EvalConfig, check_final_attack, check_same_evaluation, check_test_subset,
                         final_evaluation_points, final_test_set, format_final, model_for, read_earlier_autoattack)
from .runtime import run_cli
from .trainer import check_module_state


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aaa_fast.evaluate", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint.pt, best.pt or model.pt of a run (config.json beside it)")
    p.add_argument("--eval-eps", type=number_arg(float, 0), default=None, help="attack budget (e.g. 8/255); default: the run's")
    p.add_argument("--eval-steps", type=number_arg(int, 0), default=None, help="PGD steps; default: the run's")
    p.add_argument("--test-subset", type=number_arg(int, 1), default=None,
                   help="class-balanced test subset; default: the run's (the whole test set if it had none)")
    p.add_argument("--autoattack", nargs="?", const="standard", default=None, choices=sorted(VERSIONS),
                   metavar="VERSION", help="also run AutoAttack: standard (the flag alone) or fast (APGD-CE + "
                                           "APGD-T, not the standard)")
    p.add_argument("--masking-report", action="store_true",
                   help="gradient-masking checks on the same test images: PGD-20, PGD-100 x 5 restarts, APGD-CE, "
                        "AutoAttack (--autoattack's version, default standard), Square alone, APGD-CE against "
                        "growing eps; writes masking_report.json and .png to --report-dir")
    p.add_argument("--autoattack-from", default=None, metavar="EVAL_JSON",
                   help="with --masking-report: AutoAttack's robust accuracy from an earlier `evaluate --autoattack "
                        "--json` of this checkpoint on the same images and eps, instead of running it again "
                        "(checked: method, epoch, test subset, eps, norm and the clean accuracy measured now)")
    p.add_argument("--report-dir", default=None, help="where the masking report goes; default: the checkpoint's directory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                   help="where to evaluate")
    p.add_argument("--data-dir", default=None,
                   help="where the run's data is now (default: the run's --data-dir); its content must be the run's")
    p.add_argument("--allow-other-data", action="store_true",
                   help="evaluate although the data's content differs from the run's (recorded as other_data)")
    p.add_argument("--json", default=None, help="also write the results to this file (a new file)")
    return p


# what evaluate reads from a run's config.json
RUN_SETTINGS = ("config_hash", "dataset", "data_dir", "arch", "method", "seed", "batch_size", "eval_eps", "eval_steps",
                "test_subset")


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    check_device(args.device)
    if os.path.isdir(args.checkpoint):
        raise SystemExit(f"error: --checkpoint {args.checkpoint} is a directory; pass a file in it "
                         "(checkpoint.pt, best.pt or model.pt)")
    config_path = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "config.json")
    if not os.path.exists(config_path):
        raise SystemExit(f"error: {config_path} not found: the checkpoint must sit in its run directory")
    report_dir = args.report_dir or os.path.dirname(os.path.abspath(args.checkpoint))
    report_path = os.path.join(report_dir, "masking_report.json")
    if args.json:
        refuse_existing_output(args.json, "--json")
    if args.masking_report:
        refuse_existing_output(report_path, "--report-dir")
    if args.autoattack_from is not None and (not args.masking_report or args.autoattack):
        raise SystemExit("error: --autoattack-from goes with --masking-report and without --autoattack "
                         "(it stands for running AutoAttack again)")
    earlier = read_earlier_autoattack(args.autoattack_from) if args.autoattack_from else None
    try:
        with open(config_path) as f:
            run = argparse.Namespace(**json.load(f))
        missing = [k for k in RUN_SETTINGS if not hasattr(run, k)]
        if missing:
            raise ValueError(f"it has no {', '.join(missing)} (it is not a config.json of aaa_fast.train, or damaged)")
        if args.data_dir is not None:
            run.data_dir = args.data_dir
        state = load_checkpoint(args.checkpoint, expected_hash=run.config_hash)
        data = load_dataset(run.dataset, run.data_dir, download_missing=False)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise SystemExit(f"error: cannot read the run's settings from {config_path}: {exc}") from None
    except (CheckpointError, DatasetError) as exc:
        raise SystemExit(f"error: {exc}") from None
    recorded = getattr(run, "data_fingerprint", None)
    other_data = recorded is not None and data.fingerprint() != recorded
    if other_data and not args.allow_other_data:
        raise SystemExit(f"error: the data under {run.data_dir or 'the default data directory'} is not the data the "
                         f"run was trained and tested on (its content digest differs from {config_path}'s); "
                         "pass --allow-other-data to evaluate on it anyway")
    for name in ("eval_eps", "eval_steps", "test_subset"):
        if getattr(args, name) is not None:
            setattr(run, name, getattr(args, name))
    check_test_subset(run.test_subset, data.num_classes, data.test_y.shape[0])
    run.aa_version = earlier["aa_version"] if earlier else args.autoattack or "standard"
    # the masking report reuses the final evaluation's AutoAttack (the same images and eps) or the earlier one
    run.final_attack = "both" if args.autoattack or (args.masking_report and not earlier) else "pgd"
    check_final_attack(run.final_attack, run.aa_version)
    device = torch.device(args.device)
    model = model_for(run.arch, data, device)
    try:
        check_module_state("model", model, state.get("trainer", {}).get("model"))
    except ValueError as exc:
        raise SystemExit(f"error: {args.checkpoint} does not fit {config_path} (--arch {run.arch}): {exc}") from None
    model.load_state_dict(state["trainer"]["model"])
    model.eval()
    print(f"evaluating {args.checkpoint} (epoch {state.get('epoch')}) on "
          f"{run.test_subset or data.test_y.shape[0]} test images, fp32", file=sys.stderr, flush=True)
    cfg = EvalConfig.of_run(run)
    same = dict(method=run.method, epoch=state.get("epoch"), test_subset=run.test_subset, eps=cfg.eps, norm=cfg.norm)
    if earlier:
        check_same_evaluation(earlier, args.autoattack_from, **same)
    result, aa = final_evaluation_points(model, data, cfg, device, progress=True)
    result.update(method=run.method, dataset=run.dataset, arch=run.arch, eval_eps=run.eval_eps,
                  eval_steps=run.eval_steps, test_subset=run.test_subset, checkpoint=args.checkpoint,
                  epoch=state.get("epoch"), other_data=other_data)
    if earlier:
        check_same_evaluation(earlier, args.autoattack_from, **same, clean_acc=result["clean_acc"])
        result["autoattack_from"] = args.autoattack_from
    print(format_final(result))
    if args.json:
        write_json_atomic(result, args.json)
    if args.masking_report:
        from .masking import masking_report, write_masking_report

        x, y = final_test_set(data, run.test_subset, device)
        report = masking_report(model, x, y, eps=run.eval_eps, num_classes=data.num_classes, seed=run.seed,
                                norm=cfg.norm,
                                device=device, progress=True, autoattack_result=aa,
                                autoattack_accuracy=(earlier["aa_version"], earlier["aa_acc"]) if earlier else None)
        report.update(checkpoint=args.checkpoint, method=run.method, arch=run.arch, dataset=run.dataset)
        if earlier:
            report["autoattack_from"] = args.autoattack_from
        print(write_masking_report(report, report_path, title=f"{run.method}, {run.dataset} ({run.arch})"))

if __name__ == "__main__":
    run_cli(main)
