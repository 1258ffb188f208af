"""Every backend of the fused PGD step against the plain-PyTorch reference and hand values."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from aaa_fast import ops
from aaa_fast.ops import pgd_step, pgd_step_, pgd_step_reference, random_init

from helpers import BACKEND_DEVICE_IDS, BACKEND_DEVICES

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# one unit in the last place at 1.0: the most two roundings of the same fp32 value can differ
ULP = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float64: 2**-23}


def make_case(shape, dtype=torch.float32, device="cpu", seed=0, directions=None):
    g = torch.Generator().manual_seed(seed)
    n = shape[0]
    x_nat = torch.rand(shape, generator=g)
    x_adv = (x_nat + 0.05 * torch.randn(shape, generator=g)).clamp(0, 1)
    grad = torch.randn(shape, generator=g)
    if directions is None:
        directions = torch.tensor([1.0, -1.0, 0.0]).repeat(n)[:n]
    eps = torch.rand(n, generator=g) * 0.06
    alpha = torch.rand(n, generator=g) * 0.03
    to = dict(device=device)
    return (x_adv.to(dtype=dtype, **to), x_nat.to(dtype=dtype, **to), grad.to(**to),
            directions.to(**to), eps.to(**to), alpha.to(**to))


def run(backend, case, norm, **kw):
    ops.set_backend(backend)
    x_adv, x_nat, grad, d, e, a = case
    return pgd_step(x_adv, x_nat, grad, d, e, a, norm=norm, **kw)


def reference(case, norm, lo=0.0, hi=1.0):
    x_adv, x_nat, grad, d, e, a = case
    return pgd_step_reference(x_adv, x_nat, grad, d.float(), e.float(), a.float(), norm, lo, hi)


def assert_matches(out, ref, norm):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if norm == "linf":
        assert torch.equal(out, ref), (out.float() - ref.float()).abs().max()
    else:
        torch.testing.assert_close(out.float(), ref.float(), atol=4 * ULP[out.dtype], rtol=0)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("shape", [(1, 3, 4, 4), (5, 3, 7, 9), (3, 2, 33, 33), (4, 1025), (2, 3, 2, 2, 2)])
def test_matches_reference(backend, device, dtype, norm, shape):
    case = make_case(shape, dtype, device)
    assert_matches(run(backend, case, norm), reference(case, norm), norm)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_channels_last(backend, device, dtype, norm):
    case = make_case((3, 3, 6, 5), dtype, device)
    cl = tuple(t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in case)
    out = run(backend, cl, norm)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_matches(out, reference(case, norm), norm)
    # mixed layouts: gradient contiguous, inputs channels_last
    mixed = (cl[0], cl[1], case[2], *case[3:])
    assert_matches(run(backend, mixed, norm), reference(case, norm), norm)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("grad_dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_gradient_dtype_differs_from_storage(backend, device, grad_dtype):
    x_adv, x_nat, grad, d, e, a = make_case((4, 3, 5, 5), torch.float32, device)
    case = (x_adv, x_nat, grad.to(grad_dtype), d, e, a)
    for norm in ("linf", "l2"):
        assert_matches(run(backend, case, norm), reference(case, norm), norm)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_in_place_and_out_of_place(backend, device):
    x_adv, x_nat, grad, d, e, a = make_case((6, 3, 4, 4), device=device)
    ops.set_backend(backend)
    before = x_adv.clone()
    out = pgd_step(x_adv, x_nat, grad, d, e, a)
    assert torch.equal(x_adv, before)
    same = pgd_step_(x_adv, x_nat, grad, d, e, a)
    assert same is x_adv and torch.equal(x_adv, out)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_non_batch_major_input_is_updated_in_place(backend, device):
    x_adv, x_nat, grad, d, e, a = make_case((4, 6, 5), device=device)
    ref = reference((x_adv, x_nat, grad, d, e, a), "linf")
    strided = x_adv.transpose(0, 2).contiguous().transpose(0, 2)  # batch dim innermost in memory
    ops.set_backend(backend)
    assert pgd_step_(strided, x_nat, grad, d, e, a) is strided
    assert torch.equal(strided, ref)


def test_hand_computed_linf():
    # x_nat = 0.5, x_adv = 0.52, eps = 0.03, alpha = 0.02: ascend to 0.53 (bound), descend to 0.50,
    # direction 0 stays, a zero gradient does not move, and the box clamps at hi = 0.51.
    x_nat = torch.full((5, 1), 0.5, dtype=torch.float64)
    x_adv = torch.full((5, 1), 0.52, dtype=torch.float64)
    grad = torch.tensor([[2.0], [2.0], [2.0], [0.0], [2.0]], dtype=torch.float64)
    d = torch.tensor([1, -1, 0, 1, 1])
    hi = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.51])
    for backend in ops.available_backends():
        ops.set_backend(backend)
        rows = [pgd_step(x_adv[i:i + 1], x_nat[i:i + 1], grad[i:i + 1], d[i:i + 1], 0.03, 0.02,
                         hi=float(hi[i])) for i in range(5)]
        got = torch.cat(rows).squeeze(1)
        torch.testing.assert_close(got, torch.tensor([0.53, 0.50, 0.52, 0.52, 0.51], dtype=torch.float64),
                                   atol=1e-7, rtol=0, msg=backend)


def test_hand_computed_l2():
    # gradient (3, 4) has unit (0.6, 0.8); alpha = 0.5 moves x_adv = x_nat = (0.2, 0.2) to
    # (0.5, 0.6), delta norm 0.5 > eps = 0.25 so delta halves: (0.35, 0.4). Direction -1 goes
    # to (-0.1, -0.2) -> halved (0.05, 0.0) -> clamped at lo = 0.02: (0.05, 0.02).
    x = torch.full((2, 2), 0.2)
    grad = torch.tensor([[3.0, 4.0], [3.0, 4.0]])
    for backend in ops.available_backends():
        ops.set_backend(backend)
        out = pgd_step(x, x, grad, torch.tensor([1, -1]), 0.25, 0.5, norm="l2", lo=0.02)
        torch.testing.assert_close(out, torch.tensor([[0.35, 0.4], [0.05, 0.02]]), atol=1e-6, rtol=0,
                                   msg=backend)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_edge_cases(backend, device, norm):
    x_adv, x_nat, grad, d, e, a = make_case((6, 3, 5, 5), device=device)
    ops.set_backend(backend)
    # eps = 0: every row collapses onto (clamped) x_nat
    out = pgd_step(x_adv, x_nat, grad, d, 0.0, a, norm=norm)
    assert torch.equal(out, x_nat.clamp(0, 1))
    # zero gradients: no move beyond the projection, never NaN
    zero = torch.zeros_like(grad)
    out = pgd_step(x_adv, x_nat, zero, d, e, a, norm=norm)
    assert torch.isfinite(out).all()
    assert_matches(out, reference((x_adv, x_nat, zero, d, e, a), norm), norm)
    proj_only = pgd_step(x_adv, x_nat, grad, torch.zeros(6, device=device), e, a, norm=norm)
    torch.testing.assert_close(out, proj_only, atol=ULP[torch.float32], rtol=0)
    # alpha = 0 with x_adv inside the ball: unchanged up to the rounding of x_nat + (x_adv - x_nat)
    inside = pgd_step(x_nat, x_nat, grad, d, e, 0.0, norm=norm)
    assert torch.equal(inside, x_nat)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_sample_on_boundary_stays_on_boundary(backend, device):
    n = 4
    x_nat = torch.full((n, 3, 4, 4), 0.5, device=device)
    eps = torch.tensor([0.0, 0.01, 0.02, 0.03], device=device)
    x_adv = x_nat + eps.view(-1, 1, 1, 1)  # on the +eps face
    grad = torch.ones_like(x_nat)  # pushes further out
    ops.set_backend(backend)
    out = pgd_step(x_adv, x_nat, grad, 1, eps, 0.05)
    assert torch.equal(out, x_adv)
    back = pgd_step(x_adv, x_nat, grad, -1, eps, 0.1)  # descending crosses to the -eps face
    torch.testing.assert_close(back, x_nat - eps.view(-1, 1, 1, 1), atol=ULP[torch.float32], rtol=0)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_rows_stay_in_their_ball_and_box(backend, device, norm):
    x_adv, x_nat, grad, d, e, a = make_case((9, 3, 8, 8), device=device)
    ops.set_backend(backend)
    x = x_nat.clone()
    for _ in range(5):
        x = pgd_step(x, x_nat, torch.randn_like(x), d, e, a * 4, norm=norm)
    delta = (x - x_nat).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= e + 1e-6).all()
    assert x.min() >= 0 and x.max() <= 1


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 9),
    trailing=st.lists(st.integers(1, 7), min_size=1, max_size=3),
    norm=st.sampled_from(["linf", "l2"]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    lo_hi=st.sampled_from([(0.0, 1.0), (-1.0, 1.0), (0.1, 0.7)]),
)
def test_random_shapes_native_cpu(n, trailing, norm, dtype, seed, lo_hi):
    if "cpu" not in ops.available_backends():
        pytest.skip("native extension not built")
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randint(-1, 2, (n,), generator=gen)
    case = make_case((n, *trailing), dtype, seed=seed, directions=directions)
    ops.set_backend("cpu")
    out = pgd_step(*case[:3], *case[3:], norm=norm, lo=lo_hi[0], hi=lo_hi[1])
    assert_matches(out, reference(case, norm, *lo_hi), norm)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_init_in_ball_box_and_reproducible(norm, dtype):
    x = torch.rand(16, 3, 8, 8).to(dtype)
    eps = torch.linspace(0, 0.3, 16)
    a = random_init(x, eps, norm=norm, generator=torch.Generator().manual_seed(1))
    b = random_init(x, eps, norm=norm, generator=torch.Generator().manual_seed(1))
    c = random_init(x, eps, norm=norm, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == dtype and a.min() >= 0 and a.max() <= 1
    delta = (a.double() - x.double()).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    # rounding to the storage type may add half a unit in the last place per coordinate
    slack = ULP[dtype] * (1 if norm == "linf" else delta.shape[1] ** 0.5)
    assert (size <= eps.double() + slack).all()
    assert torch.equal(a[0], x[0])  # eps = 0 row untouched


def test_random_init_fills_the_ball():
    x = torch.full((2000, 4), 0.5)
    linf = random_init(x, 0.1, generator=torch.Generator().manual_seed(0)) - 0.5
    assert linf.abs().max() > 0.099 and abs(linf.mean()) < 0.005  # uniform on [-eps, eps]
    l2 = (random_init(x, 0.1, norm="l2", generator=torch.Generator().manual_seed(0)) - 0.5).norm(dim=1)
    # radius of a uniform point in a 4-ball: P(r <= t*eps) = t^4, so the median is eps * 0.5^(1/4)
    assert abs(l2.median().item() - 0.1 * 0.5 ** 0.25) < 0.003


def test_random_init_layout_independent():
    x = torch.rand(3, 3, 5, 5)
    a = random_init(x, 0.1, generator=torch.Generator().manual_seed(0))
    b = random_init(x.contiguous(memory_format=torch.channels_last), 0.1,
                    generator=torch.Generator().manual_seed(0))
    assert b.is_contiguous(memory_format=torch.channels_last) and torch.equal(a, b)


ISA_CHECK = """
import torch
from aaa_fast import ops
from test_ops import DTYPES, assert_matches, make_case, reference
ops.set_backend("cpu")
for dtype in DTYPES:
    for grad_dtype in (torch.float32, torch.bfloat16):
        for norm in ("linf", "l2"):
            for shape in ((3, 3, 7, 9), (2, 1500)):
                x_adv, x_nat, grad, d, e, a = make_case(shape, dtype)
                case = (x_adv, x_nat, grad.to(grad_dtype), d, e, a)
                assert_matches(ops.pgd_step(*case, norm=norm), reference(case, norm), norm)
print("ok")
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_cpu_instruction_set_variant(isa):
    """The C++ kernel is compiled once per instruction set; each must match the reference."""
    import os
    import pathlib
    import subprocess
    import sys

    if "cpu" not in ops.available_backends():
        pytest.skip("native extension not built")
    flags = pathlib.Path("/proc/cpuinfo").read_text() if pathlib.Path("/proc/cpuinfo").exists() else ""
    if isa != "baseline" and f" {isa}" not in flags and f" {isa}f" not in flags:
        pytest.skip(f"this CPU has no {isa}")
    env = dict(os.environ, AAA_FAST_CPU_ISA=isa, PYTHONPATH=str(pathlib.Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", ISA_CHECK], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
