"""Run a (method x scenario x seed) grid of `python -m aaa_fast.train` runs from a JSON config.

    python experiments/grid.py experiments/fmnist.json              # everything not finished yet
    python experiments/grid.py experiments/fmnist.json --seeds 0 --methods PGD-AT AAA-meta --dry-run

Each run writes to <out>/<scenario>/<method>/seed<k>/. A run with a final.json is finished and
skipped; any other run is started with --resume, so an interrupted grid (Ctrl-C, SIGKILL, a lost
session) picks up inside the run it was in. Seeds are the outer loop: a grid stopped half-way has
whole seeds of every cell. Checkpoints of finished runs are deleted unless --keep-checkpoints (the
results are final.json, metrics.csv, config.json and train.log); a config with "keep_weights": true
first keeps the final model's weights as model.pt (a small checkpoint `python -m aaa_fast.evaluate
--checkpoint` reads), so that exactly these models can be re-evaluated. Exit status 1 when a run failed.

A method is a list of CLI arguments, or {"args": [...], "scenarios": [...], "init_from": NAME}:
"scenarios" limits it to those scenarios; "init_from" makes it a hot start, fine-tuned from the
final weights of method NAME's run of the same scenario and seed (a shared pretraining stage,
listed before it; its checkpoint is kept). Runs of one (scenario, seed) never depend on another,
so `--seeds S --scenarios C` splits a grid across runners.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import time

CHECKPOINTS = ("checkpoint.pt", "checkpoint.prev.pt", "best.pt")
WEIGHTS = "model.pt"


def unique_keys(pairs: list) -> dict:
    """json object hook: a key given twice (two methods of one name: the second would silently
    replace the first) is an error."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"{key!r} is given twice in one object")
        seen[key] = value
    return seen


def load_grid(path: str) -> dict:
    """The grid config, checked for the keys the runner and the report need."""
    try:
        with open(path) as f:
            grid = json.load(f, object_pairs_hook=unique_keys)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: cannot read grid config {path}: {exc}") from None
    for key, kind in (("out", str), ("seeds", list), ("common", list), ("scenarios", dict), ("methods", dict)):
        if not isinstance(grid.get(key), kind):
            raise SystemExit(f"error: grid config {path}: '{key}' must be a {kind.__name__}")
    names = list(grid["methods"])
    for name, spec in grid["methods"].items():
        if isinstance(spec, list):
            continue
        if not isinstance(spec, dict) or not isinstance(spec.get("args"), list):
            raise SystemExit(f"error: grid config {path}: method {name!r} must be a list of arguments or a dict "
                             "with 'args'")
        unknown = set(spec.get("scenarios") or []) - set(grid["scenarios"])
        if unknown:
            raise SystemExit(f"error: grid config {path}: method {name!r} names unknown scenarios {sorted(unknown)}")
        source = spec.get("init_from")
        if source is not None and (source not in names or names.index(source) > names.index(name)):
            raise SystemExit(f"error: grid config {path}: method {name!r} starts from {source!r}, which must be "
                             "a method listed before it")
    return grid


def run_dir(grid: dict, scenario: str, method: str, seed: int) -> str:
    return os.path.join(grid["out"], scenario, method, f"seed{seed}")


def method_spec(grid: dict, method: str) -> dict:
    """{"args": [...], "scenarios": [...] or None, "init_from": NAME or None} of a method entry."""
    spec = grid["methods"][method]
    if isinstance(spec, list):
        return {"args": spec, "scenarios": None, "init_from": None}
    return {"args": spec["args"], "scenarios": spec.get("scenarios"), "init_from": spec.get("init_from")}


def runs_in(grid: dict, scenario: str, method: str) -> bool:
    scenarios = method_spec(grid, method)["scenarios"]
    return scenarios is None or scenario in scenarios


def init_sources(grid: dict) -> set[str]:
    """The methods whose final weights another method starts from."""
    return {method_spec(grid, m)["init_from"] for m in grid["methods"]} - {None}


def command(grid: dict, scenario: str, method: str, seed: int) -> list[str]:
    spec = method_spec(grid, method)
    init = []
    if spec["init_from"] is not None:
        init = ["--init", os.path.join(run_dir(grid, scenario, spec["init_from"], seed), "checkpoint.pt")]
    return [sys.executable, "-m", "aaa_fast.train", *grid["common"], *grid["scenarios"][scenario],
            *spec["args"], *init, "--seed", str(seed), "--out", run_dir(grid, scenario, method, seed),
            "--resume", "--progress", "lines"]


def finished(grid: dict, seed: int, scenario: str, method: str) -> bool:
    """True when the run has its final.json, from the command the config gives now."""
    out = run_dir(grid, scenario, method, seed)
    if not os.path.exists(os.path.join(out, "final.json")) or not os.path.exists(os.path.join(out, "run.json")):
        return False  # not run, or stopped before the runner recorded it: --resume finishes it
    with open(os.path.join(out, "run.json")) as f:
        recorded = json.load(f)["command"]
    if recorded != command(grid, scenario, method, seed)[1:]:
        raise SystemExit(f"error: {out} was run with other arguments than the config gives now; "
                         "delete it (or change 'out') to rerun it")
    return True


def keep_weights(out: str) -> None:
    """The final model's weights from the run's checkpoint into model.pt (atomic, digest-checked,
    the run's config hash kept), without the optimizer and trainer state: ~1 MB for a small CNN."""
    from aaa_fast.checkpoint import load_checkpoint, save_atomic
    state = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    save_atomic({"config_hash": state["config_hash"], "epoch": state["epoch"],
                 "trainer": {"model": state["trainer"]["model"]}}, os.path.join(out, WEIGHTS))


def _term_when_parent_dies() -> None:
    """In the child, before exec (Linux): SIGTERM it if the runner dies, even by SIGKILL, so no
    orphaned run keeps writing to a directory the next runner will resume."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_forwarding_signals(cmd: list[str], log) -> tuple[int, bool]:
    """Run one training command; return its exit status and whether a signal was forwarded to
    it. It has a session of its own, so a Ctrl-C at the terminal reaches it once, through this
    forwarding (the CLI then checkpoints and exits with 130; a second signal stops it at once),
    and a SIGTERM sent to the runner alone reaches it too. A signal that lands after the last
    training step lets the run finish (exit 0): the caller stops after it all the same."""
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_term_when_parent_dies if sys.platform.startswith("linux") else None)
    forwarded = []

    def forward(signum, _frame):
        forwarded.append(signum)
        proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait(), bool(forwarded)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def select(names: list[str] | None, available: dict | list, what: str) -> list:
    if names is None:
        return list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise SystemExit(f"error: unknown {what} {unknown}; the config has {list(available)}")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="grid config (JSON), e.g. experiments/fmnist.json")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="a subset of the config's seeds")
    p.add_argument("--scenarios", nargs="+", default=None)
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--dry-run", action="store_true", help="print the commands of unfinished runs and stop")
    p.add_argument("--keep-checkpoints", action="store_true")
    args = p.parse_args(argv)
    grid = load_grid(args.config)
    seeds = select(args.seeds, grid["seeds"], "seeds")
    scenarios = select(args.scenarios, grid["scenarios"], "scenarios")
    methods = select(args.methods, grid["methods"], "methods")

    cells = [(seed, sc, m) for seed in seeds for sc in scenarios for m in methods if runs_in(grid, sc, m)]
    todo = [c for c in cells if not finished(grid, *c)]
    keep = init_sources(grid)
    print(f"grid {args.config}: {len(cells)} runs, {len(cells) - len(todo)} finished, {len(todo)} to run", flush=True)
    failed = []
    for i, (seed, scenario, method) in enumerate(todo, 1):
        cmd, out = command(grid, scenario, method, seed), run_dir(grid, scenario, method, seed)
        if args.dry_run:
            print(" ".join(cmd))
            continue
        source = method_spec(grid, method)["init_from"]
        if source is not None and not finished(grid, seed, scenario, source):
            failed.append(out)
            print(f"[{i}/{len(todo)}] {scenario} {method} seed {seed}: SKIPPED, its start {source} did not finish",
                  flush=True)
            continue
        os.makedirs(out, exist_ok=True)
        t0 = time.time()
        with open(os.path.join(out, "train.log"), "a") as log:
            rc, interrupted = run_forwarding_signals(cmd, log)
        seconds = time.time() - t0
        if rc == 130:  # SIGINT / SIGTERM: the run wrote its checkpoint; stop the grid too
            print(f"[{i}/{len(todo)}] {scenario} {method} seed {seed}: interrupted; rerun to continue", flush=True)
            return 130
        if rc != 0:
            failed.append(out)
            print(f"[{i}/{len(todo)}] {scenario} {method} seed {seed}: FAILED (exit {rc}), see {out}/train.log",
                  flush=True)
        else:
            from aaa_fast.checkpoint import write_json_atomic  # torch loads only when a run finished

            write_json_atomic({"command": cmd[1:], "seconds": round(seconds, 1)}, os.path.join(out, "run.json"))
            if grid.get("keep_weights"):
                keep_weights(out)
            if not args.keep_checkpoints:
                for name in CHECKPOINTS if method not in keep else CHECKPOINTS[1:]:
                    if os.path.exists(os.path.join(out, name)):
                        os.remove(os.path.join(out, name))
            with open(os.path.join(out, "final.json")) as f:
                final = json.load(f)
            robust = (f"PGD {final['pgd_acc']:.1f}% worst-class robust error {final['worst_rob_err']:.1f}%"
                      if "pgd_acc" in final else
                      f"AutoAttack {final['aa_acc']:.1f}% worst-class robust error {final['aa_worst_rob_err']:.1f}%")
            print(f"[{i}/{len(todo)}] {scenario} {method} seed {seed}: clean {final['clean_acc']:.1f}% {robust} "
                  f"({seconds:.0f}s)", flush=True)
        if interrupted:  # the signal reached the run too late to stop it (it finished or failed): stop now
            print("interrupted after this run; rerun to continue", flush=True)
            return 130
    if failed:
        print(f"{len(failed)} run(s) failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
