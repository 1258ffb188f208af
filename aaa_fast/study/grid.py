"""What a study grid runs: its config, its runs (cells), each run's command and whether it is
finished. Shared by both executors (aaa_fast.study.executors) and the report.

A grid config (JSON) has "out" (the results' root), "seeds", "common" (arguments of every run),
"scenarios" (name -> arguments) and "methods" (name -> arguments, or {"args": [...],
"scenarios": [...], "init_from": NAME}: "scenarios" limits a method to those scenarios;
"init_from" makes it a hot start, fine-tuned from the final weights of method NAME's run of the
same scenario and seed, a shared pretraining stage listed before it, whose checkpoint is kept).
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
    with open(os.path.join(out, "run.json")) as f:
        recorded = json.load(f)["command"]
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
