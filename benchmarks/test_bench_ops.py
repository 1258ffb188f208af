"""pytest-benchmark suite of the fused step against its baselines, grouped by batch size: the
implementations of bench_ops.py, timed by pytest-benchmark.

    pytest benchmarks/test_bench_ops.py --benchmark-group-by=param:n

Not part of the test suite (tests/ is); ratios are in each group's table.
"""
import pytest
import torch

from bench_ops import implementations
from aaa_fast import ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NAMES = [row[0] for row in implementations(8, torch.float32, DEVICE)]


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [128, 512, 2048])
@pytest.mark.parametrize("impl", NAMES)
def test_pgd_step(benchmark, impl, n, dtype):
    _, backend, fn, nbytes = next(row for row in implementations(n, dtype, DEVICE) if row[0] == impl)
    ops.set_backend(backend)
    try:
        fn()
        benchmark(lambda: (fn(), sync()))
    finally:
        ops.set_backend(None)
    benchmark.extra_info["bytes_per_call"] = nbytes
