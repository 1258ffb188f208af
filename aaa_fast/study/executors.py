"""Two ways to run a grid's unfinished runs, behind one interface (`execute`): a local pool of
processes (one thread per concurrent run, each waiting on its training subprocess) and Ray tasks
(an embedded local cluster, or one that exists: a laptop to a cluster). Both run each run with
aaa_fast.study.runner.run_cell, start a hot-start run only after its pretraining run, print a
progress line, and on Ctrl-C/SIGTERM stop every run (each checkpoints) and return 130."""
from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ..runtime import format_seconds
from .grid import Cell, cell_dir, source_of
from .runner import RunFailed, held, run_cell


class Progress:
    """'study: 3/14 done, 2 running, 0 failed, ETA 1h05m' every $AAA_FAST_PROGRESS_SECONDS (default
    30) s and after each run; running = runs whose directory a study task owns."""

    def __init__(self, grid: dict, todo: list[Cell]):
        self.grid, self.todo, self.t0, self.last = grid, todo, time.time(), 0.0
        self.every = float(os.environ.get("AAA_FAST_PROGRESS_SECONDS", "30"))
        self.ended: dict[Cell, dict] = {}

    def end(self, result: dict) -> None:
        self.ended[result["cell"]] = result
        cell, status = result["cell"], result["status"]
        detail = {"done": f"{result['summary']} ({result['seconds']:.0f}s on {result['node']})",
                  "skipped": "finished already (by another driver)", "blocked": f"SKIPPED, {result['summary']}",
                  "interrupted": "interrupted; rerun to continue", "failed": f"FAILED, {result['summary']}"}[status]
        print(f"[{len(self.ended)}/{len(self.todo)}] {cell}: {detail}", flush=True)
        self.show(force=True)

    def show(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self.last < self.every:
            return
        self.last = now
        done = sum(r["status"] in ("done", "skipped") for r in self.ended.values())
        failed = sum(r["status"] in ("failed", "blocked") for r in self.ended.values())
        running = sum(held(os.path.join(cell_dir(self.grid, c), ".study.lock")) for c in self.todo
                      if c not in self.ended)
        left = len(self.todo) - len(self.ended)
        trained = sum(r["status"] == "done" for r in self.ended.values())
        eta = (now - self.t0) / trained * left if trained else float("inf")
        print(f"study: {done}/{len(self.todo)} done, {running} running, {failed} failed, "
              f"ETA {format_seconds(eta) if left else '0m00s'}", flush=True)


def exit_status(stopping: list, progress: Progress) -> int:
    """130 after a signal (every run checkpointed), 1 when a run failed or could not start, else 0."""
    if stopping:
        print("interrupted; rerun to continue", flush=True)
        return 130
    return 1 if any(r["status"] in ("failed", "blocked") for r in progress.ended.values()) else 0


def failed_result(cell: Cell, exc: BaseException) -> dict:
    return {"cell": cell, "status": "failed", "seconds": 0.0, "summary": str(exc), "node": "?"}


class LocalExecutor:
    """`workers` runs at a time on this machine. A run whose pretraining run is still going
    waits for it (runs start in order, so its source has started before it)."""

    name = "local"

    def __init__(self, workers: int = 1, max_retries: int = 0):
        self.workers, self.max_retries = workers, max_retries

    def describe(self) -> str:
        return f"local process pool, {self.workers} at a time"

    def execute(self, grid: dict, todo: list[Cell], keep_checkpoints: bool, progress: Progress) -> int:
        live, stopping, lock = set(), [], threading.Lock()

        def track(proc):
            with lock:
                live.add(proc)
            if stopping:  # a signal came while it started
                proc.send_signal(signal.SIGTERM)

        def untrack(proc):
            with lock:
                live.discard(proc)

        futures: dict[Cell, object] = {}

        def job(cell: Cell) -> dict:
            source = source_of(grid, cell)
            if source in futures:
                futures[source].result()
            for attempt in range(self.max_retries + 1):
                if stopping:
                    return {"cell": cell, "status": "interrupted", "seconds": 0.0, "summary": "", "node": "?"}
                try:
                    return run_cell(grid, cell, keep_checkpoints=keep_checkpoints, on_start=track, on_end=untrack,
                                    stop_requested=lambda: bool(stopping))
                except RunFailed as exc:
                    if attempt == self.max_retries:
                        return failed_result(cell, exc)
                    print(f"{exc}; retrying ({attempt + 1} of {self.max_retries})", flush=True)

        def forward(signum, _frame):
            stopping.append(signum)
            with lock:
                for proc in live:
                    proc.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            with ThreadPoolExecutor(self.workers) as pool:
                for cell in todo:
                    futures[cell] = pool.submit(job, cell)
                pending = set(todo)
                while pending:
                    for cell in [c for c in pending if futures[c].done()]:
                        pending.discard(cell)
                        progress.end(futures[cell].result())
                    progress.show()
                    time.sleep(0.2)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return exit_status(stopping, progress)


class RayExecutor:
    """One Ray task per run, needing `cpus_per_run` CPUs and `gpus_per_run` GPUs (fractions pack
    several small runs onto one GPU); a task whose worker or node died, or whose training process
    failed, is retried up to `max_retries` times (the retry resumes from the run's checkpoint).
    `address`: an existing cluster ("auto", "ray://host:10001", host:port), else $RAY_ADDRESS, else
    an embedded local cluster sized to this machine. The grid's "out" must be on storage every
    node sees."""

    name = "ray"

    def __init__(self, address: str | None = None, cpus_per_run: float = 1.0, gpus_per_run: float = 0.0,
                 max_retries: int = 2, num_cpus: int | None = None):
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.cpus_per_run, self.gpus_per_run, self.max_retries = cpus_per_run, gpus_per_run, max_retries
        self.num_cpus = num_cpus

    def describe(self) -> str:
        where = f"the cluster at {self.address}" if self.address else "an embedded local cluster"
        return (f"Ray on {where}, {self.cpus_per_run:g} CPU and {self.gpus_per_run:g} GPU per run, "
                f"{self.max_retries} retries")

    def execute(self, grid: dict, todo: list[Cell], keep_checkpoints: bool, progress: Progress) -> int:
        import ray

        if self.address is None:
            ray.init(num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=self.address, log_to_driver=False, configure_logging=False)
        try:
            return self._run(ray, grid, todo, keep_checkpoints, progress)
        finally:
            ray.shutdown()

    def _run(self, ray, grid, todo, keep_checkpoints, progress) -> int:
        task = ray.remote(ray_task).options(num_cpus=self.cpus_per_run, num_gpus=self.gpus_per_run,
                                            max_retries=self.max_retries, retry_exceptions=[RunFailed])
        root, refs = os.getcwd(), {}
        for cell in todo:  # in priority order; a hot start waits for its pretraining task's result
            source = source_of(grid, cell)
            refs[cell] = task.remote(grid, cell, root, keep_checkpoints, refs.get(source))
        stopping = []

        def stop(signum, _frame):
            stopping.append(signum)

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            pending = {ref: cell for cell, ref in refs.items()}
            cancelled = False
            while pending:
                if stopping and not cancelled:  # each running task stops its run (a checkpoint)
                    for ref in pending:
                        ray.cancel(ref)
                    cancelled = True
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                for ref in ready:
                    cell = pending.pop(ref)
                    try:
                        progress.end(ray.get(ref))
                    except (ray.exceptions.TaskCancelledError, ray.exceptions.RayTaskError) as exc:
                        if not stopping:
                            progress.end(failed_result(cell, getattr(exc, "cause", None) or exc))
                progress.show()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return exit_status(stopping, progress)


def ray_task(grid: dict, cell: Cell, root: str, keep_checkpoints: bool, _source_result=None) -> dict:
    """A run as a Ray task (on any node): the grid's relative paths are the driver's."""
    import ray

    os.chdir(root)
    return run_cell(grid, cell, keep_checkpoints=keep_checkpoints, node=ray.get_runtime_context().get_node_id())


def ray_missing() -> str | None:
    try:
        import ray  # noqa: F401
    except ImportError:
        return "Ray is not installed (pip install 'aaa_fast[study]')"
    return None
