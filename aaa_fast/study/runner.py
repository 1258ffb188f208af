"""One run of a study grid, as either executor runs it: `python -m aaa_fast.train ... --resume`
as a subprocess, logged to <run>/train.log, then recorded (run.json) and tidied (final weights
kept, checkpoints deleted). Safe to run twice at once or after a crash: a run directory is owned
by one study task at a time (<run>/.study.lock), "finished" is checked again once the task owns
it, and a training process still stopping (it holds <run>/.lock) is waited for."""
from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time

from .grid import CHECKPOINTS, WEIGHTS, Cell, cell_dir, command, finished, init_sources, source_of

# how a task ended: "done" (trained now), "skipped" (finished before), "blocked" (its pretraining
# run is not finished), "interrupted" (stopped by a signal, checkpointed), "failed"
STATUSES = ("done", "skipped", "blocked", "interrupted", "failed")


class RunFailed(RuntimeError):
    """A training process that exited with an error; Ray retries the task (it resumes)."""


# resolved here, in the parent: dlopen in a child forked from a threaded process can deadlock
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _term_when_parent_dies(parent: int) -> None:
    """In the child, before exec (Linux): SIGHUP it if the process that started it dies, even by
    SIGKILL, so no orphaned run keeps writing to a directory the next task will resume (the
    training CLI checkpoints and stops on SIGHUP; repeated SIGHUPs, one per thread of the dying
    parent, do not escalate as a second SIGTERM would). A parent that died between the fork and the
    prctl is caught by the parent-pid check."""
    if _PRCTL(_PR_SET_PDEATHSIG, signal.SIGHUP) != 0 or os.getppid() != parent:
        os._exit(1)


def launch(cmd: list[str], log) -> subprocess.Popen:
    """The training process, in a session of its own: a Ctrl-C at the terminal reaches it once,
    through the driver's forwarding (the CLI then checkpoints and exits with 130)."""
    parent = os.getpid()
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=(lambda: _term_when_parent_dies(parent)) if _PRCTL is not None else None)


class StopWhileWaiting(Exception):
    """A stop was requested while waiting for another task's lock."""


class _Flock:
    """An exclusive flock on `path`, taken by waiting (`say` is printed once if it has to wait).
    `stop_requested()` is asked while waiting: a driver told to stop must not wait for another
    task's run to end first (StopWhileWaiting)."""

    def __init__(self, path: str, say: str | None = None, poll: float = 0.2, stop_requested=None):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if say:
                print(say, flush=True)
            while True:
                if stop_requested is not None and stop_requested():
                    os.close(self.fd)
                    raise StopWhileWaiting(path) from None
                time.sleep(poll)
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    continue

    def release(self) -> None:
        os.close(self.fd)


def held(path: str) -> bool:
    """Whether another process holds the flock on `path` (the driver's 'running' count)."""
    if not os.path.exists(path):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def keep_weights(out: str) -> None:
    """The final model's weights from the run's checkpoint into model.pt (atomic, digest-checked,
    the run's config hash kept), without the optimizer and trainer state: ~1 MB for a small CNN."""
    from aaa_fast.checkpoint import load_checkpoint, save_atomic
    state = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    save_atomic({"config_hash": state["config_hash"], "epoch": state["epoch"],
                 "trainer": {"model": state["trainer"]["model"]}}, os.path.join(out, WEIGHTS))


def summary(out: str) -> str:
    with open(os.path.join(out, "final.json")) as f:
        final = json.load(f)
    robust = (f"PGD {final['pgd_acc']:.1f}% worst-class robust error {final['worst_rob_err']:.1f}%"
              if "pgd_acc" in final else
              f"AutoAttack {final['aa_acc']:.1f}% worst-class robust error {final['aa_worst_rob_err']:.1f}%")
    return f"clean {final['clean_acc']:.1f}% {robust}"


def record(grid: dict, cell: Cell, cmd: list[str], seconds: float, node: str, keep_checkpoints: bool) -> None:
    """A finished run: run.json (its command: what `finished` compares), model.pt where the grid
    keeps weights, and its checkpoints deleted (a pretraining stage keeps its last one)."""
    from aaa_fast.checkpoint import write_json_atomic  # torch loads only when a run finished

    out = cell_dir(grid, cell)
    write_json_atomic({"command": cmd[1:], "seconds": round(seconds, 1), "node": node},
                      os.path.join(out, "run.json"))
    if grid.get("keep_weights"):
        keep_weights(out)
    if not keep_checkpoints:
        for name in CHECKPOINTS if cell.method not in init_sources(grid) else CHECKPOINTS[1:]:
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))


def run_cell(grid: dict, cell: Cell, *, keep_checkpoints: bool = False, node: str | None = None,
             on_start=None, on_end=None, stop_requested=None) -> dict:
    """Train one run to its end (or to a signal) and record it. Returns {"cell", "status",
    "seconds", "summary", "node"}; raises RunFailed when the training process fails.
    on_start(proc) / on_end(proc): the executor's hooks to forward signals to the process;
    stop_requested(): asked while waiting for another task that owns the run (status
    "interrupted" when it says yes). A KeyboardInterrupt (Ray's cancellation) stops the
    training process (it checkpoints) first."""
    out = cell_dir(grid, cell)
    node = node or socket.gethostname()
    result = {"cell": cell, "status": "skipped", "seconds": 0.0, "summary": "", "node": node}
    if finished(grid, cell.seed, cell.scenario, cell.method):
        return result
    source = source_of(grid, cell)
    if source is not None and not finished(grid, source.seed, source.scenario, source.method):
        return dict(result, status="blocked", summary=f"its start {source.method} did not finish")
    os.makedirs(out, exist_ok=True)
    try:
        owner = _Flock(os.path.join(out, ".study.lock"), f"{cell}: another study task owns {out}; waiting for it",
                       stop_requested=stop_requested)
    except StopWhileWaiting:
        return dict(result, status="interrupted")
    try:
        if finished(grid, cell.seed, cell.scenario, cell.method):  # the other task finished it
            return result
        # a training process still stopping (its task was killed, it got SIGTERM) holds .lock
        _Flock(os.path.join(out, ".lock"), f"{cell}: waiting for the previous process of {out} to stop",
               stop_requested=stop_requested).release()
        cmd = command(grid, cell.scenario, cell.method, cell.seed)
        t0 = time.time()
        with open(os.path.join(out, "train.log"), "a") as log:
            proc = launch(cmd, log)
            if on_start is not None:
                on_start(proc)
            try:
                rc = proc.wait()
            except KeyboardInterrupt:
                proc.send_signal(signal.SIGTERM)
                proc.wait()
                raise
            finally:
                if on_end is not None:
                    on_end(proc)
        seconds = time.time() - t0
        if rc == 130:
            return dict(result, status="interrupted", seconds=seconds)
        if rc != 0:
            raise RunFailed(f"{cell}: exit {rc}, see {out}/train.log")
        record(grid, cell, cmd, seconds, node, keep_checkpoints)
        return dict(result, status="done", seconds=seconds, summary=summary(out))
    except StopWhileWaiting:
        return dict(result, status="interrupted")
    finally:
        owner.release()
