"""Run a study grid (experiments/grid.py) on one GPU machine with a pool of runners.

    python scripts/gpu_study.py experiments/fmnist_v2.json [--workers N] [--deadline SECONDS] [--logs DIR]

Small models leave a GPU mostly idle and each run is bound by its one host thread, so N runs side
by side (default: one per CPU core) fill the machine. Every unfinished run is one job for
`experiments/grid.py`, except a hot-start chain (a pretraining stage and the runs that fine-tune
from it), which is one job run in order. Chains start first (they are the longest), then the
other runs in the config's method order (its order of priority). With --deadline the pool starts
no job after that many seconds and then SIGTERMs the runners still going: each run checkpoints
and stops, and running this again resumes it. The result is the serial grid's, only sooner.
--pack FILE.tar.gz then writes the results (no checkpoints, no plots) as one archive, the form
in which a lent machine's output comes back whole.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tarfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments"))
from grid import finished, load_grid, method_spec, runs_in  # noqa: E402


def jobs(grid: dict) -> list[tuple[int, str, list[str]]]:
    """(seed, scenario, methods) per job: hot-start chains first, then single runs by priority."""
    sources = {}
    for method in grid["methods"]:
        source = method_spec(grid, method)["init_from"]
        if source is not None:
            sources.setdefault(source, []).append(method)
    chains, singles = [], []
    for method in grid["methods"]:
        for seed in grid["seeds"]:
            for scenario in grid["scenarios"]:
                todo = lambda m: runs_in(grid, scenario, m) and not finished(grid, seed, scenario, m)  # noqa: E731
                if method in sources:
                    chain = [m for m in [method, *sources[method]] if todo(m)]
                    if chain:
                        (chains if chain[0] == method else singles).append((seed, scenario, chain))
                elif method_spec(grid, method)["init_from"] is None and todo(method):
                    singles.append((seed, scenario, [method]))
    return chains + singles


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--deadline", type=float, default=None, help="seconds after which runners are stopped")
    p.add_argument("--logs", default="runs/gpu_study_logs")
    p.add_argument("--pack", default=None, help="write the results (json, csv, logs) to this .tar.gz at the end")
    args = p.parse_args(argv)
    grid = load_grid(args.config)
    queue = jobs(grid)
    os.makedirs(args.logs, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    grid_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments", "grid.py")
    print(f"gpu_study: {sum(len(j[2]) for j in queue)} runs in {len(queue)} jobs, {args.workers} workers", flush=True)
    t0, running, failed, stopping = time.time(), {}, 0, False
    while queue or running:
        late = args.deadline is not None and time.time() - t0 > args.deadline
        if late and not stopping:
            stopping = True
            print(f"gpu_study: deadline; stopping {len(running)} runners, {len(queue)} jobs not started", flush=True)
            for proc in running:
                proc.send_signal(signal.SIGTERM)
            queue = []
        while queue and len(running) < args.workers:
            seed, scenario, methods = queue.pop(0)
            name = f"{scenario}-seed{seed}-{'+'.join(methods)}"
            log = open(os.path.join(args.logs, name + ".log"), "w")
            cmd = [sys.executable, grid_py, args.config, "--seeds", str(seed), "--scenarios", scenario,
                   "--methods", *methods]
            running[subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)] = (name, log)
        time.sleep(1)
        for proc in [q for q in running if q.poll() is not None]:
            name, log = running.pop(proc)
            log.close()
            failed += proc.returncode not in (0, 130)
            print(f"gpu_study: {name} exit {proc.returncode} at {time.time() - t0:.0f}s", flush=True)
    print(f"gpu_study: done in {time.time() - t0:.0f}s, {failed} job(s) failed", flush=True)
    if args.pack:
        with tarfile.open(args.pack, "w:gz") as tar:
            tar.add(grid["out"], filter=lambda info: None if info.name.endswith((".pt", ".png")) else info)
            tar.add(args.logs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
