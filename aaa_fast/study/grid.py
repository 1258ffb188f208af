"""What a study grid runs: its config, its runs (cells), each run's command and whether it is
finished. Shared by both executors (aaa_fast.study.executors) and the report.

A grid config (JSON) has "out" (the results' root), "seeds", "common" (arguments of every run),
"scenarios" (name -> arguments) and "methods" (name -> arguments, or {"args": [...],
"scenarios": [...], "init_from": NAME}: "scenarios" limits a method to those scenarios;
"init_from" makes it a hot start, fine-tuned from the final weights of method NAME's run of the
same scenario and seed, a shared pretraining stage listed before it, whose checkpoint is kept).
Optional: "paired" ([[A, B], ...]: the report compares A with B seed by seed), "report" (roles),
"evaluation" (experiments/evaluate_grid.py), "class_names", "keep_weights".
Each run writes to <out>/<scenario>/<method>/seed<k>/.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

CHECKPOINTS = ("checkpoint.pt", "checkpoint.prev.pt", "best.pt")
WEIGHTS = "model.pt"


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""
    seed: int
    scenario: str
    method: str

    def __str__(self) -> str:
        return f"{self.scenario} {self.method} seed {self.seed}"


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
    def refuse(what: str):
        raise SystemExit(f"error: grid config {path}: {what}")

    for key, kind in (("out", str), ("seeds", list), ("common", list), ("scenarios", dict), ("methods", dict)):
        if not isinstance(grid.get(key), kind):
            refuse(f"'{key}' must be a {kind.__name__}")
    seeds = grid["seeds"]
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds) or len(set(seeds)) < len(seeds):
        refuse(f"'seeds' must be distinct integers >= 0, got {seeds}")
    if not all(isinstance(a, str) for a in grid["common"]):
        refuse("'common' must be a list of strings (command-line arguments)")
    for kind in ("scenarios", "methods"):
        for name in grid[kind]:
            if not name or name in (".", "..") or "/" in name or "\\" in name:
                refuse(f"{kind[:-1]} name {name!r} must be a plain directory name (no '/', not '.' or '..')")
    for name, args in grid["scenarios"].items():
        if not (isinstance(args, list) and all(isinstance(a, str) for a in args)):
            refuse(f"scenario {name!r} must be a list of strings (command-line arguments), got {args!r}")
    names = list(grid["methods"])
    for name, spec in grid["methods"].items():
        if not isinstance(spec, (list, dict)) or (isinstance(spec, dict) and not isinstance(spec.get("args"), list)):
            refuse(f"method {name!r} must be a list of arguments or a dict with 'args'")
        args = spec if isinstance(spec, list) else spec["args"]
        if not all(isinstance(a, str) for a in args):
            refuse(f"method {name!r}: its arguments must be strings, got {args!r}")
        if isinstance(spec, list):
            continue
        scenarios = spec.get("scenarios")
        if scenarios is not None and not (isinstance(scenarios, list) and all(isinstance(c, str) for c in scenarios)):
            refuse(f"method {name!r}: 'scenarios' must be a list of scenario names, got {scenarios!r}")
        unknown = set(scenarios or []) - set(grid["scenarios"])
        if unknown:
            refuse(f"method {name!r} names unknown scenarios {sorted(unknown)}")
        source = spec.get("init_from")
        if source is not None and (source not in names or names.index(source) >= names.index(name)):
            refuse(f"method {name!r} starts from {source!r}, which must be another method listed before it")
    paired = grid.get("paired", [])
    if not (isinstance(paired, list) and all(isinstance(pair, list) and len(pair) == 2 and pair[0] != pair[1]
                                             and all(m in grid["methods"] for m in pair) for pair in paired)):
        refuse(f"'paired' must be a list of [A, B] pairs of two different methods of the grid, got {paired!r}")
    return grid


def run_dir(grid: dict, scenario: str, method: str, seed: int) -> str:
    return os.path.join(grid["out"], scenario, method, f"seed{seed}")


def cell_dir(grid: dict, cell: Cell) -> str:
    return run_dir(grid, cell.scenario, cell.method, cell.seed)


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


def source_of(grid: dict, cell: Cell) -> Cell | None:
    """The pretraining run a hot-start run fine-tunes from (None for other runs)."""
    source = method_spec(grid, cell.method)["init_from"]
    return None if source is None else Cell(cell.seed, cell.scenario, source)


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
    path = os.path.join(out, "run.json")
    try:
        with open(path) as f:
            recorded = json.load(f)["command"]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise SystemExit(f"error: {path} is damaged ({type(exc).__name__}: {exc}): it records the run's command; "
                         "restore it, or delete the run's directory to rerun it") from None
    if recorded != command(grid, scenario, method, seed)[1:]:
        raise SystemExit(f"error: {out} was run with other arguments than the config gives now; "
                         "delete it (or change 'out') to rerun it")
    return True


def select(names: list | None, available: dict | list, what: str) -> list:
    if names is None:
        return list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise SystemExit(f"error: unknown {what} {unknown}; the config has {list(available)}")
    return names


def cells(grid: dict, seeds: list | None = None, scenarios: list | None = None,
          methods: list | None = None) -> list[Cell]:
    """The grid's runs (or those of the named seeds, scenarios, methods) in order of priority:
    seeds outermost (a grid stopped half-way has whole seeds of every cell), then the config's
    order of scenarios and of methods; a pretraining stage always comes before its hot starts."""
    return [Cell(seed, sc, m) for seed in select(seeds, grid["seeds"], "seeds")
            for sc in select(scenarios, grid["scenarios"], "scenarios")
            for m in select(methods, grid["methods"], "methods") if runs_in(grid, sc, m)]
