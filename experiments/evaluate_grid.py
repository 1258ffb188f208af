"""Evaluate a grid's finished runs from their kept weights (model.pt) as its config's "evaluation"
says, one `python -m aaa_fast.evaluate` per run, in fp32:

    python experiments/evaluate_grid.py experiments/fmnist_v3.json            # every run not evaluated yet
    python experiments/evaluate_grid.py experiments/fmnist_v3.json --dry-run

"evaluation": {"test_subset": 1000, "autoattack": "fast", "name": "eval_v3",
               "standard": [["uniform-40", "TRADES"], ...]}
evaluates every run on the class-balanced test subset with PGD (the run's --eval-steps) and
AutoAttack "autoattack" into <run>/<name>.json; the (scenario, method) pairs of "standard" get
the standard AutoAttack and the masking report instead (their APGD-CE + APGD-T figures are the
standard run's after its second attack: the same seeds, the same attacks). A run with its JSON is
skipped, so an interrupted evaluation continues where it was; the log goes to <run>/<name>.log.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from aaa_fast.study.grid import cells, load_grid, run_dir


def evaluation_command(grid: dict, scenario: str, method: str, seed: int) -> tuple[list[str], str]:
    spec = grid["evaluation"]
    out = run_dir(grid, scenario, method, seed)
    target = os.path.join(out, f"{spec['name']}.json")
    standard = [scenario, method] in spec.get("standard", [])
    cmd = [sys.executable, "-m", "aaa_fast.evaluate", "--checkpoint", os.path.join(out, "model.pt"),
           "--test-subset", str(spec["test_subset"]), "--autoattack", "standard" if standard else spec["autoattack"],
           "--json", target]
    if standard:
        cmd.append("--masking-report")
    return cmd, target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--scenarios", nargs="+", default=None)
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    grid = load_grid(args.config)
    if not isinstance(grid.get("evaluation"), dict):
        raise SystemExit(f"error: grid config {args.config} has no 'evaluation' section")
    # the standard evaluations first: they are the long ones
    todo = sorted(cells(grid, args.seeds, args.scenarios, args.methods),
                  key=lambda c: [c.scenario, c.method] not in grid["evaluation"].get("standard", []))
    failed = 0
    for scenario, method, seed in ((c.scenario, c.method, c.seed) for c in todo):
        cmd, target = evaluation_command(grid, scenario, method, seed)
        weights = cmd[cmd.index("--checkpoint") + 1]
        if os.path.exists(target) or not os.path.exists(weights):
            continue  # evaluated already, or not trained yet
        if args.dry_run:
            print(" ".join(cmd))
            continue
        t0 = time.time()
        with open(target[:-5] + ".log", "a") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        status = "done" if rc == 0 else f"FAILED (exit {rc}), see {target[:-5]}.log"
        failed += rc != 0
        print(f"{scenario} {method} seed {seed}: {status} ({time.time() - t0:.0f}s)", flush=True)
        if rc == 130:
            return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
