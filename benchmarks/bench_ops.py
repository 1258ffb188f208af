"""Throughput of the fused PGD step against its baselines, all measured in one run.

For N in {128, 512, 2048} samples of 3x32x32, fp32 and bf16, times:
- eager: the plain-PyTorch reference (aaa_fast.ops.pgd_step_reference), out of place;
- compiled: torch.compile of that reference;
- add: torch.add(a, b, out=c), three memory streams: the practical bandwidth ceiling;
- each native backend available here (cpu / cuda / triton), in place, on validated arguments
  (the registered torch.ops op bare, and through the validated tier's launch_pgd_step_), and the public pgd_step_ with its argument checks, given (N,) tensors or Python numbers (the
  difference to the fused kernel is the public op's host overhead; use a small N, e.g. --sizes 8,
  to see it alone).
A step moves 4 streams (read x_adv, x_nat, grad; write x_adv). GB/s counts those bytes.
"time us" is per call with the device synchronised (on a GPU: the longer of the host's and the
device's time); "host us" is the host's time per call alone, calls queued without waiting (on a
CPU the two are the same). A public op whose host time exceeds the kernel's device time keeps a
GPU waiting.

    python benchmarks/bench_ops.py [--sizes 128 512 2048] [--dtypes float32 bfloat16] [--device cpu]
"""
from __future__ import annotations

import argparse
import math
import platform
import time
from typing import Callable

import torch
import torch.utils.benchmark as tbench

from aaa_fast import ops
from aaa_fast.ops import launch_pgd_step_, prepare_step_args
from aaa_fast.ops.backends import backend_supports


def time_s(fn, min_run_time: float) -> float:
    fn()  # warm-up (and compilation)
    return tbench.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def host_time_s(fn, device: torch.device, calls: int = 200) -> float:
    """Host seconds per call, the device not waited for (fewer calls than the launch queue holds)."""
    if device.type != "cuda":
        return math.nan
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls
    torch.cuda.synchronize()
    return host


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def implementations(n: int, dtype: torch.dtype, device: torch.device) -> list[tuple[str, str | None, Callable, int]]:
    """(name, backend to select first or None, fn, bytes moved per call) of every implementation
    timed on an (n, 3, 32, 32) batch; benchmarks/test_bench_ops.py times the same list."""
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (n, 3, 32, 32)
    x_nat = torch.rand(shape, generator=gen, device=device).to(dtype)
    x_adv = x_nat.clone()
    grad = torch.randn(shape, generator=gen, device=device).to(dtype)
    direction = (torch.arange(n, device=device) % 3 - 1).float()
    eps = torch.full((n,), 8 / 255, device=device)
    alpha = torch.full((n,), 2 / 255, device=device)
    step_bytes = 4 * x_nat.numel() * x_nat.element_size()
    ref_args = (x_adv, x_nat, grad, direction, eps, alpha, "linf", 0.0, 1.0)
    compiled_ref = torch.compile(ops.pgd_step_reference)
    out = torch.empty_like(x_nat)
    rows = [
        ("eager reference", None, lambda: ops.pgd_step_reference(*ref_args), step_bytes),
        ("torch.compile(reference)", None, lambda: compiled_ref(*ref_args), step_bytes),
        ("torch.add(out=) ceiling", None, lambda: torch.add(x_nat, grad, out=out), 3 * x_nat.numel() * x_nat.element_size()),
    ]
    for backend in ("cpu", "cuda", "triton"):
        if not backend_supports(backend, device):
            continue
        ops.set_backend(backend)
        d, e, a = prepare_step_args(x_adv, x_nat, grad, direction, eps, alpha, "linf", 0.0, 1.0)
        ops.set_backend(None)
        if backend != "triton":  # the registered op itself, no Python around it
            bare = torch.ops.aaa_fast.pgd_step_.default
            rows.append((f"{backend} bare torch.ops", backend, lambda: bare(x_adv, x_nat, grad, d, e, a, "linf", 0.0, 1.0),
                         step_bytes))
        rows += [
            (f"{backend} fused kernel", backend, lambda: launch_pgd_step_(x_adv, x_nat, grad, d, e, a, "linf", 0.0, 1.0),
             step_bytes),
            (f"{backend} public pgd_step_", backend, lambda: ops.pgd_step_(x_adv, x_nat, grad, direction, eps, alpha),
             step_bytes),
            (f"{backend} public, numbers", backend, lambda: ops.pgd_step_(x_adv, x_nat, grad, 1, 8 / 255, 2 / 255),
             step_bytes),
        ]
    return rows


def bench_case(n: int, dtype: torch.dtype, device: torch.device, min_run_time: float) -> list[dict]:
    results = []
    for name, backend, fn, nbytes in implementations(n, dtype, device):
        ops.set_backend(backend)
        t = time_s(fn, min_run_time)
        host = host_time_s(fn, device)
        results.append(dict(n=n, dtype=str(dtype).removeprefix("torch."), impl=name, us=t * 1e6,
                            host_us=(t if math.isnan(host) else host) * 1e6, gbps=nbytes / t / 1e9))
    ops.set_backend(None)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timing per measurement")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"# bench_ops: {machine(device)}; backends here: {ops.available_backends()}")
    print(f"{'N':>5} {'dtype':>8}  {'implementation':<26} {'time us':>9} {'host us':>8} {'GB/s':>7} {'vs compiled':>11} "
          f"{'of add BW':>9}")
    for dtype in args.dtypes:
        for n in args.sizes:
            rows = bench_case(n, getattr(torch, dtype), device, args.min_run_time)
            compiled = next(r for r in rows if r["impl"].startswith("torch.compile"))
            add = next(r for r in rows if r["impl"].startswith("torch.add"))
            for r in rows:
                speedup = compiled["us"] / r["us"]
                print(f"{r['n']:>5} {r['dtype']:>8}  {r['impl']:<26} {r['us']:>9.1f} {r['host_us']:>8.1f} {r['gbps']:>7.2f} "
                      f"{speedup:>10.2f}x {r['gbps'] / add['gbps']:>8.0%}")


if __name__ == "__main__":
    main()
