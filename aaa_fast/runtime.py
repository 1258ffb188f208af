"""Process-level helpers for the CLIs: CPU memory settings (opt-in: the library never calls
them by itself; the CLI and the benchmarks do), run-directory ownership and checks, progress
lines, torchrun data parallelism, stop signals, and the CLI's error reporting."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import faulthandler
import functools
import math
import os
import shutil
import signal
import socket
import sys
import time

import torch
import torch.distributed as dist

# mallopt parameters from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


@functools.cache
def keep_cpu_memory() -> bool:
    """Stop glibc from returning large freed buffers to the OS.

    By default glibc serves every allocation above 32 MB with a fresh mmap and gives it back
    on free, so each big activation of a CPU forward/backward faults in zeroed pages again
    (a 2N-row batch is hit far harder than two N-row ones). Serving them from the heap and
    never trimming it keeps the pages: the process holds on to its peak memory instead.
    Returns True when applied (Linux with glibc), False elsewhere.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


class RunDirLock:
    """One process owns a run directory: an exclusive flock on <dir>/.lock, held until the process
    ends. The kernel drops it when the holder dies, so a SIGKILLed run never blocks `--resume`;
    the file names the holder for the message of whoever is refused."""

    def __init__(self, directory: str):
        path = os.path.join(directory, ".lock")
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 256, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise SystemExit(f"error: --out {directory} is in use by {holder}; wait for that run to end, "
                             "or choose another --out") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"run pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  .encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None


class ProgressLines:
    """Progress for logs: a line with rate and ETA every $AAA_FAST_PROGRESS_SECONDS (default 30) s."""

    def __init__(self, label: str, total: int, done: int = 0):
        self.label, self.total, self.start_done = label, total, done
        self.every = float(os.environ.get("AAA_FAST_PROGRESS_SECONDS", "30"))
        self.t0 = self.last = time.time()

    def update(self, done: int, detail=lambda: "") -> None:
        now = time.time()
        if now - self.last < self.every or done >= self.total:
            return
        self.last = now
        rate = (done - self.start_done) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        extra = detail()
        print(f"{self.label}: {done}/{self.total} ({100 * done / self.total:.0f}%), {rate:.2f}/s, "
              f"ETA {format_seconds(eta)}{', ' + extra if extra else ''}", file=sys.stderr, flush=True)


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, sec = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{sec:02d}s"


def run_cli(main, argv=None) -> None:
    """Run a CLI's main so that a user never sees a traceback. A refusal (SystemExit with a
    message) prints it and exits with status 2, as argparse's own; unexpected errors end in one
    line and status 1 (AAA_FAST_DEBUG=1 shows the traceback); Ctrl-C exits with 130. A crash in
    native code (SIGSEGV, SIGABRT from std::terminate, ...) prints every thread's Python stack."""
    try:
        faulthandler.enable()
    except (AttributeError, ValueError, OSError):  # a stderr without a file descriptor (captured)
        pass
    try:
        main(argv)
    except SystemExit as stop:
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
            raise SystemExit(2) from None
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as exc:  # noqa: BLE001  (the last line of defence: report, do not dump)
        if os.environ.get("AAA_FAST_DEBUG") == "1":
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"error: {type(exc).__name__}: {first} (set AAA_FAST_DEBUG=1 for the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


def check_out_dir(out: str) -> None:
    """Fail before training, not after hours, if the output directory cannot be written."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{socket.gethostname()}-{os.getpid()}")  # two processes at once
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as exc:
        raise SystemExit(f"error: cannot write to --out {out}: {exc}") from None
    free = shutil.disk_usage(out).free
    if free < 100 << 20:
        raise SystemExit(f"error: only {free >> 20} MiB free under --out {out}; checkpoints need more")


def attempt_store(rank: int, world: int) -> dist.Store:
    """The rendezvous store of this torchrun attempt, under a prefix of its own. Under
    `torchrun --max-restarts` the agent keeps one store across restarts, and every fresh process
    group writes its ranks' addresses under the same keys: restarted ranks read the dead attempt's
    addresses ("Gloo connectFullMesh ... Connection refused") or wait forever. Prefixing with
    TORCHELASTIC_RESTART_COUNT gives each attempt its own keys."""
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_store, use_libuv=True)
    return dist.PrefixStore(f"aaa_fast/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


class OverlappedGradAverage:
    """A model's gradients averaged across ranks while its backward still runs, as DDP's reducer
    does, for the one backward inside `during_backward()` (the real step's). Parameters go into
    buckets of about `bucket_mb` MiB in reverse registration order (roughly the order the backward
    produces their gradients); a bucket's all-reduce starts asynchronously once all its gradients
    are accumulated and every earlier bucket has started, so every rank issues the same
    collectives in the same order; leaving the context waits for them and writes the averages
    back. Backwards outside it (the attacks' input gradients, the torch.func lookahead) accumulate
    nothing into .grad, and are left alone. A parameter without a gradient contributes zeros and
    keeps grad None, as `Distributed.average`, which skips it (its bucket, and every later one,
    then waits for the end of the backward: correct, with less overlap)."""

    def __init__(self, params, world: int, bucket_mb: float = 25.0, group=None):
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb!r}")
        self.world, self.group = world, group
        params = [p for p in params if p.requires_grad]
        self.buckets: list[list[torch.Tensor]] = []
        size = 0
        for p in reversed(params):
            nbytes = p.numel() * p.element_size()
            last = self.buckets[-1] if self.buckets else None
            if last is None or size + nbytes > bucket_mb * 2 ** 20 or (p.dtype, p.device) != (last[0].dtype, last[0].device):
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += nbytes
        self._slot = {}  # id(param) -> (bucket, offset)
        self._flats = []
        for b, bucket in enumerate(self.buckets):
            offset = 0
            for p in bucket:
                self._slot[id(p)] = (b, offset)
                offset += p.numel()
            self._flats.append(torch.zeros(offset, dtype=bucket[0].dtype, device=bucket[0].device))
        self._armed = False
        for p in params:
            p.register_post_accumulate_grad_hook(self._ready)

    def _ready(self, p: torch.Tensor) -> None:
        if not self._armed:
            return
        b, offset = self._slot[id(p)]
        self._flats[b][offset:offset + p.numel()].copy_(p.grad.reshape(-1))
        self._filled.add(id(p))
        self._waiting[b] -= 1
        self._launch_ready()

    def _launch_ready(self) -> None:
        while len(self._works) < len(self.buckets) and self._waiting[len(self._works)] == 0:
            flat = self._flats[len(self._works)]
            self._works.append(dist.all_reduce(flat, group=self.group, async_op=True))

    @contextlib.contextmanager
    def during_backward(self):
        self._armed, self._filled, self._works = True, set(), []
        self._waiting = [len(bucket) for bucket in self.buckets]
        try:
            yield
        finally:
            self._armed = False
        for b, bucket in enumerate(self.buckets):  # parameters the backward did not reach
            for p in bucket:
                if id(p) not in self._filled:
                    offset = self._slot[id(p)][1]
                    self._flats[b][offset:offset + p.numel()].zero_()
            self._waiting[b] = 0
        self._launch_ready()
        for work, flat, bucket in zip(self._works, self._flats, self.buckets):
            work.wait()
            flat /= self.world
            offset = 0
            for p in bucket:
                if p.grad is not None:
                    p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()


class Distributed:
    """torchrun data parallelism: each rank takes its share of every global batch; gradients of
    the model and the meta-net are averaged, BatchNorm buffers follow rank 0."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.host_group = None
        if self.world > 1:
            dist.init_process_group("nccl" if device == "cuda" else "gloo", store=attempt_store(self.rank, self.world),
                                    rank=self.rank, world_size=self.world)
            if device == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            # host-side agreement (the stop flag, per-rank states) without touching the GPU stream
            self.host_group = dist.new_group(backend="gloo") if device == "cuda" else dist.group.WORLD

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def average(self, tensors: list[torch.Tensor]) -> None:
        if self.world == 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def sum_(self, tensor: torch.Tensor) -> None:
        if self.world > 1:
            dist.all_reduce(tensor)

    def any_(self, flag: bool) -> bool:
        """True on every rank when any rank's flag is set: ranks that act on a signal (which
        reaches them at different steps) agree on the step they act at."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, group=self.host_group)
        return bool(t.item())

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank (a list of one without torchrun)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.host_group)
        return out

    def overlapped_average(self, model: torch.nn.Module, bucket_mb: float) -> OverlappedGradAverage | None:
        """The model's gradient average overlapped with its backward (None without torchrun)."""
        return OverlappedGradAverage(model.parameters(), self.world, bucket_mb) if self.world > 1 else None

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        if self.world > 1:
            for b in module.buffers():
                dist.broadcast(b, 0)

    def close(self) -> None:
        """Leave together: no rank exits (and, if its exit fails, has torchrun stop the others)
        while rank 0 still writes the run's files."""
        if self.world > 1:
            dist.barrier(group=self.host_group)
            dist.destroy_process_group()


class StopRequested:
    """SIGINT/SIGTERM/SIGHUP: finish the current step, write a checkpoint, exit cleanly. A second
    SIGINT or SIGTERM stops at once (exit 130), except inside `saving()`: a file being written is
    finished first. SIGHUP never escalates: it is what a study runner's training process gets when
    its runner dies (PR_SET_PDEATHSIG), and the kernel sends it again each time the process is
    handed to another thread of the dying runner, so one death can arrive as several signals."""

    def __init__(self):
        self.requested = self.again = False
        self._saving = 0
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._handle)

    @contextlib.contextmanager
    def saving(self):
        self._saving += 1
        try:
            yield
        finally:
            self._saving -= 1
        if self.again and not self._saving:
            raise KeyboardInterrupt

    def _handle(self, signum, _frame):
        if self.requested and signum == signal.SIGHUP:
            return
        if self.requested:  # a second signal: stop now, or as soon as the file being written is complete
            self.again = True
            if not self._saving:
                raise KeyboardInterrupt
            return
        self.requested = True
        print(f"\nreceived signal {signum}: finishing this step, then saving a checkpoint", file=sys.stderr, flush=True)
