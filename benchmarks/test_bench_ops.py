"""pytest-benchmark suite of the fused step against its baselines, grouped by batch size.

    pytest benchmarks/test_bench_ops.py --benchmark-group-by=param:n

Not part of the test suite (tests/ is); ratios are in each group's table.
"""
import pytest
import torch

from aaa_fast import ops
from aaa_fast.ops.api import launch_pgd_step_
from aaa_fast.ops.backends import backend_supports

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS = ["eager-reference", "compiled-reference", "add-ceiling"] + [
    b for b in ("cpu", "cuda", "triton") if backend_supports(b, DEVICE)
]
_compiled = torch.compile(ops.pgd_step_reference)


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [128, 512, 2048])
@pytest.mark.parametrize("impl", IMPLS)
def test_pgd_step(benchmark, impl, n, dtype):
    x_nat = torch.rand(n, 3, 32, 32, device=DEVICE).to(dtype)
    x_adv, grad = x_nat.clone(), torch.randn_like(x_nat)
    d = (torch.arange(n, device=DEVICE) % 3 - 1).float()
    e, a = torch.full((n,), 8 / 255, device=DEVICE), torch.full((n,), 2 / 255, device=DEVICE)
    args = (x_adv, x_nat, grad, d, e, a, "linf", 0.0, 1.0)
    if impl == "eager-reference":
        fn = lambda: ops.pgd_step_reference(*args)  # noqa: E731
    elif impl == "compiled-reference":
        fn = lambda: _compiled(*args)  # noqa: E731
    elif impl == "add-ceiling":
        out = torch.empty_like(x_nat)
        fn = lambda: torch.add(x_nat, grad, out=out)  # noqa: E731
    else:
        ops.set_backend(impl)
        fn = lambda: launch_pgd_step_(*args)  # noqa: E731
    fn()
    benchmark(lambda: (fn(), sync()))
    benchmark.extra_info["bytes_per_call"] = (3 if impl == "add-ceiling" else 4) * x_nat.numel() * x_nat.element_size()
