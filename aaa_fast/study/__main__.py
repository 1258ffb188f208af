"""Studies: grids of resumable `python -m aaa_fast.train` runs, from a laptop to a cluster.

    python -m aaa_fast.study run GRID.json                      # every unfinished run
    python -m aaa_fast.study run GRID.json --address auto --gpus-per-run 0.25
    python -m aaa_fast.study status GRID.json
    python -m aaa_fast.study report GRID.json --markdown docs/RESULTS.md --figures docs/figures

`run` starts each unfinished run with --resume (an interrupted study continues inside the run it
was in) and skips finished ones (final.json and run.json from the command the config gives now).
With Ray installed (pip install 'aaa_fast[study]') each run is a Ray task: --address (default
$RAY_ADDRESS, else an embedded local cluster sized to this machine) joins a cluster, on which
the run directories must be on storage every node sees (a shared file system); without Ray, or
with --executor local, a local process pool runs --workers runs at a time. A run directory is
owned by one study task at a time, so two drivers on one grid never train a run twice.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from ..runtime import check_out_dir, run_cli
from .grid import cell_dir, cells, command, finished, load_grid
from .runner import held


def add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="grid config (JSON), e.g. experiments/fmnist_v2.json")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="a subset of the config's seeds")
    p.add_argument("--scenarios", nargs="+", default=None, help="a subset of the config's scenarios")
    p.add_argument("--methods", nargs="+", default=None, help="a subset of the config's methods")


def at_least(kind, low):
    def parse(text: str):
        value = kind(text)
        if not value >= low:  # NaN fails too
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aaa_fast.study", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train every unfinished run of the grid",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_selection(run)
    run.add_argument("--executor", choices=["auto", "ray", "local"], default="auto",
                     help="auto: Ray when it is installed, else the local process pool")
    run.add_argument("--address", default=None,
                     help="Ray cluster to join (default: $RAY_ADDRESS, else an embedded local cluster); the "
                          "grid's 'out' must then be on storage every node sees")
    run.add_argument("--cpus-per-run", type=at_least(float, 0), default=1.0, help="Ray: CPUs each run needs")
    run.add_argument("--gpus-per-run", type=at_least(float, 0), default=0.0,
                     help="Ray: GPUs each run needs (0.25 packs four runs per GPU)")
    run.add_argument("--num-cpus", type=at_least(int, 1), default=None,
                     help="Ray: CPUs of the embedded cluster (default: this machine's)")
    run.add_argument("--max-retries", type=at_least(int, 0), default=2,
                     help="times a failed run is started again (it resumes from its checkpoint)")
    run.add_argument("--workers", type=at_least(int, 1), default=1, help="local executor: runs at a time")
    run.add_argument("--keep-checkpoints", action="store_true", help="keep finished runs' checkpoints")
    run.add_argument("--dry-run", action="store_true", help="print the commands of unfinished runs and stop")
    status = sub.add_parser("status", help="which runs are finished, running or to run")
    add_selection(status)
    report = sub.add_parser("report", help="tables and plots of the finished runs (aaa_fast.study.report)",
                            add_help=False)
    report.add_argument("args", nargs=argparse.REMAINDER)
    return p


def executor_for(args):
    from .executors import LocalExecutor, RayExecutor, ray_missing

    missing = ray_missing()
    if args.executor == "ray" and missing:
        raise SystemExit(f"error: --executor ray: {missing}")
    if args.executor == "local" or (args.executor == "auto" and missing):
        if args.address:
            raise SystemExit(f"error: --address needs Ray: {missing or 'pass --executor ray'}")
        if args.executor == "auto":
            print(f"study: {missing}; running on a local process pool instead", flush=True)
        return LocalExecutor(workers=args.workers, max_retries=args.max_retries)
    return RayExecutor(address=args.address, cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run,
                       max_retries=args.max_retries, num_cpus=args.num_cpus)


def run(args) -> int:
    from .executors import Progress

    grid = load_grid(args.config)
    selected = cells(grid, args.seeds, args.scenarios, args.methods)
    todo = [c for c in selected if not finished(grid, c.seed, c.scenario, c.method)]
    print(f"grid {args.config}: {len(selected)} runs, {len(selected) - len(todo)} finished, {len(todo)} to run",
          flush=True)
    if args.dry_run:
        for c in todo:
            print(" ".join(command(grid, c.scenario, c.method, c.seed)))
        return 0
    if not todo:
        return 0
    check_out_dir(grid["out"])  # every node writes there: refuse an unwritable one before any task starts
    executor = executor_for(args)
    print(f"study: {executor.describe()}", flush=True)
    t0 = time.time()
    rc = executor.execute(grid, todo, args.keep_checkpoints, Progress(grid, todo))
    print(f"study: {time.time() - t0:.0f}s", flush=True)
    return rc


def status(args) -> int:
    grid = load_grid(args.config)
    rows = {"finished": [], "running": [], "started": [], "to run": []}
    for c in cells(grid, args.seeds, args.scenarios, args.methods):
        out = cell_dir(grid, c)
        if finished(grid, c.seed, c.scenario, c.method):
            rows["finished"].append(c)
        elif held(os.path.join(out, ".study.lock")) or held(os.path.join(out, ".lock")):
            rows["running"].append(c)
        elif os.path.exists(os.path.join(out, "checkpoint.pt")):
            rows["started"].append(c)
        else:
            rows["to run"].append(c)
    print(f"grid {args.config}: " + ", ".join(f"{len(v)} {k}" for k, v in rows.items()))
    for kind in ("running", "started", "to run"):
        for c in rows[kind]:
            print(f"  {kind:8s} {c}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "report":
        from .report import main as report_main
        return report_main(args.args)
    return run(args) if args.command == "run" else status(args)


if __name__ == "__main__":
    run_cli(lambda argv: sys.exit(main(argv)))
