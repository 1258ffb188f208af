"""Bad input raises the documented error; custom-op registration; backend choice; torch.compile."""
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import BACKEND_DEVICE_IDS, BACKEND_DEVICES

from aaa_fast import ops
from aaa_fast.ops import pgd_step, pgd_step_, random_init


def good(n=3):
    x = torch.rand(n, 3, 4, 4)
    return dict(x_adv=x.clone(), x_nat=x, grad=torch.randn_like(x))


BAD_INPUTS = [
    # (overrides, error type, text the message must contain)
    (dict(x_adv=[1.0]), TypeError, "x_adv"),
    (dict(grad=None), TypeError, "grad"),
    (dict(x_nat=torch.rand(3, 3, 4, 5)), ValueError, "x_nat shape"),
    (dict(grad=torch.rand(2, 3, 4, 4)), ValueError, "grad shape"),
    (dict(x_nat=torch.rand(3, 3, 4, 4, dtype=torch.float64)), TypeError, "x_nat dtype"),
    (dict(x_adv=torch.zeros(3, 3, 4, 4, dtype=torch.int32)), TypeError, "x_adv must be float"),
    (dict(grad=torch.zeros(3, 3, 4, 4, dtype=torch.int64)), TypeError, "grad must be a floating"),
    (dict(x_adv=torch.tensor(0.5), x_nat=torch.tensor(0.5), grad=torch.tensor(1.0)), ValueError, "batch dimension"),
    (dict(x_nat=torch.rand(3, 3, 4, 4, device="meta")), ValueError, "x_nat is on meta"),
    (dict(direction=2), ValueError, "direction must be -1, 0 or +1"),
    (dict(direction=torch.tensor([1, 0, 3])), ValueError, "direction must be -1, 0 or +1"),
    (dict(direction=torch.tensor([1.0, 0.5, -1.0])), ValueError, "direction"),
    (dict(direction=torch.ones(4)), ValueError, "direction must be a number, a 0-d tensor or shape (3,)"),
    (dict(direction="up"), TypeError, "direction must be a number"),
    (dict(direction=True), TypeError, "direction"),
    (dict(eps=-0.1), ValueError, "eps must be finite and >= 0"),
    (dict(eps=math.nan), ValueError, "eps must be finite and >= 0"),
    (dict(eps=math.inf), ValueError, "eps must be finite and >= 0"),
    (dict(eps=torch.tensor([0.1, -0.1, 0.1])), ValueError, "eps must be finite and >= 0"),
    (dict(eps=torch.tensor([0.1, math.nan, 0.1])), ValueError, "eps must be finite and >= 0"),
    (dict(eps=torch.ones(3, 1)), ValueError, "eps must be a number"),
    (dict(eps=torch.ones(3, device="meta")), ValueError, "eps is on meta"),
    (dict(eps=torch.ones(3, dtype=torch.complex64)), TypeError, "eps must be a real"),
    (dict(alpha=-1.0), ValueError, "alpha must be finite and >= 0"),
    (dict(alpha=torch.tensor([math.inf, 0.0, 0.0])), ValueError, "alpha must be finite and >= 0"),
    (dict(norm="l1"), ValueError, "norm must be one of"),
    (dict(lo=2.0), ValueError, "lo must be <= hi"),
    (dict(hi=math.nan), ValueError, "hi must be a finite float"),
]


@pytest.mark.parametrize("backend", ops.available_backends())
@pytest.mark.parametrize("overrides,error,text", BAD_INPUTS, ids=[f"{i}" for i in range(len(BAD_INPUTS))])
def test_bad_input_raises_named_error(backend, overrides, error, text):
    ops.set_backend(backend)
    args = dict(good(), direction=1, eps=0.03, alpha=0.01, norm="linf", lo=0.0, hi=1.0)
    args.update(overrides)
    x_adv = args.pop("x_adv")
    before = x_adv.clone() if isinstance(x_adv, torch.Tensor) else None
    with pytest.raises(error, match=text.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        pgd_step_(x_adv, args.pop("x_nat"), args.pop("grad"), args["direction"], args["eps"], args["alpha"],
                  norm=args["norm"], lo=args["lo"], hi=args["hi"])
    if before is not None and before.device.type != "meta":
        assert torch.equal(x_adv, before)  # a rejected call writes nothing


@pytest.mark.parametrize("bad,error,text", [
    (dict(eps=-1.0), ValueError, "eps must be finite"),
    (dict(eps=torch.tensor([0.1, math.nan])), ValueError, "eps must be finite"),
    (dict(norm="l3"), ValueError, "norm must be one of"),
    (dict(x_nat=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "x_nat must be float"),
])
def test_random_init_bad_input(bad, error, text):
    args = dict(x_nat=torch.rand(2, 3), eps=0.1)
    args.update(bad)
    with pytest.raises(error, match=text):
        random_init(args.pop("x_nat"), args.pop("eps"), **args)


def test_failed_validation_leaves_x_adv_untouched():
    args = good()
    before = args["x_adv"].clone()
    with pytest.raises(ValueError):
        pgd_step_(args["x_adv"], args["x_nat"], args["grad"], torch.tensor([1, 1, 5]), 0.1, 0.1)
    assert torch.equal(args["x_adv"], before)


def test_native_op_rejects_unsafe_layouts_directly():
    if "cpu" not in ops.available_backends():
        pytest.skip("native extension not built")
    x = torch.rand(3, 3, 4, 4)
    f = torch.ones(3)
    op = torch.ops.aaa_fast.pgd_step_.default
    with pytest.raises(RuntimeError, match="share strides"):
        op(x.clone(), x.contiguous(memory_format=torch.channels_last), x.clone(), f, f, f, "linf", 0.0, 1.0)
    with pytest.raises(ValueError, match=r"shape \(N,\)"):
        op(x.clone(), x, x.clone(), torch.ones(2), f, f, "linf", 0.0, 1.0)
    with pytest.raises(TypeError, match="float32"):
        op(x.clone(), x, x.clone(), f.double(), f, f, "linf", 0.0, 1.0)
    with pytest.raises(ValueError, match="norm must be"):
        op(x.clone(), x, x.clone(), f, f, f, "l7", 0.0, 1.0)


def op_samples():
    x = torch.rand(4, 3, 5, 5)
    f = lambda v: torch.full((4,), v)  # noqa: E731
    for norm in ("linf", "l2"):
        for layout in (torch.contiguous_format, torch.channels_last):
            xa = (x + 0.01).contiguous(memory_format=layout)
            yield (xa, x.contiguous(memory_format=layout), torch.randn_like(xa), torch.tensor([1.0, -1.0, 0.0, 1.0]),
                   f(0.03), f(0.01), norm, 0.0, 1.0)


@pytest.mark.parametrize("op_name", ["pgd_step_", "pgd_step_triton_"])
def test_opcheck(op_name):
    backend = {"pgd_step_": "cpu", "pgd_step_triton_": "triton"}[op_name]
    if backend not in ops.available_backends():
        pytest.skip(f"{backend} backend not available")
    ops.backends.get_backend(torch.device("cpu"))  # imports the Triton op when usable
    op = getattr(torch.ops.aaa_fast, op_name).default
    for args in op_samples():
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_DEVICE_IDS)
def test_torch_compile_fullgraph(backend, device):
    ops.set_backend(backend)
    torch._dynamo.reset()

    def attack_steps(x_adv, x_nat, grad, direction, eps):
        for _ in range(2):
            x_adv = pgd_step(x_adv, x_nat, grad * 3, direction, eps, 0.01)
        pgd_step_(x_adv, x_nat, -grad, direction, eps, 0.02, norm="l2")
        return x_adv + 0

    x = torch.rand(4, 3, 6, 6, device=device)  # each backend on its own device (triton: cuda, or cpu interpreted)
    args = (x.clone(), x, torch.randn_like(x), torch.tensor([1.0, -1.0, 0.0, 1.0], device=device),
            torch.full((4,), 0.05, device=device))
    compiled = torch.compile(attack_steps, fullgraph=True)
    if backend == "torch":  # inductor fuses the reference and may contract a*b+c into an FMA
        torch.testing.assert_close(compiled(*args), attack_steps(*args), atol=1e-6, rtol=0)
    else:  # native kernels are opaque to the compiler: same bits
        assert torch.equal(compiled(*args), attack_steps(*args))


def test_backend_selection(monkeypatch):
    here = ops.available_backends()
    assert "torch" in here
    cpu = torch.device("cpu")
    assert ops.get_backend(cpu) == ("cpu" if "cpu" in here else "torch")
    ops.set_backend("torch")
    assert ops.get_backend(cpu) == "torch"
    ops.set_backend(None)
    monkeypatch.setenv("AAA_FAST_BACKEND", "torch")
    assert ops.get_backend(cpu) == "torch"
    monkeypatch.setenv("AAA_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="AAA_FAST_BACKEND must be one of"):
        ops.get_backend(cpu)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.set_backend("fortran")
    if "cuda" not in here:
        with pytest.raises(ValueError, match="not available here"):
            ops.set_backend("cuda")


def test_env_var_selects_backend_in_fresh_process():
    code = "import torch, aaa_fast.ops as o; print(o.get_backend(torch.device('cpu')))"
    env = dict(os.environ, AAA_FAST_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"


def test_a_tensor_argument_is_checked_again_after_an_in_place_change():
    kw = good(4)
    eps = torch.full((4,), 0.05)
    pgd_step_(kw["x_adv"], kw["x_nat"], kw["grad"], 1, eps, 0.01)  # valid: remembered
    pgd_step_(kw["x_adv"], kw["x_nat"], kw["grad"], 1, eps, 0.01)  # served from the cache
    eps[2] = float("nan")  # bumps the version counter
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        pgd_step_(kw["x_adv"], kw["x_nat"], kw["grad"], 1, eps, 0.01)
    direction = torch.ones(4)
    pgd_step_(kw["x_adv"], kw["x_nat"], kw["grad"], direction, 0.05, 0.01)
    with torch.no_grad():
        direction.mul_(2)
    with pytest.raises(ValueError, match="direction must be -1, 0 or \\+1"):
        pgd_step_(kw["x_adv"], kw["x_nat"], kw["grad"], direction, 0.05, 0.01)


def test_a_validated_tensor_as_another_argument_is_checked_for_that_role():
    kw = good(2)
    signs = torch.tensor([-1.0, 1.0])
    pgd_step_(kw["x_adv"], kw["x_nat"], kw["grad"], signs, 0.05, 0.01)  # valid as a direction
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        pgd_step_(kw["x_adv"], kw["x_nat"], kw["grad"], 1, signs, 0.01)  # not as a bound


def test_backend_cache_follows_set_backend_and_the_environment(monkeypatch):
    cpu = torch.device("cpu")
    default = ops.get_backend(cpu)
    ops.set_backend("torch")
    assert ops.get_backend(cpu) == "torch"
    ops.set_backend(None)
    assert ops.get_backend(cpu) == default
    monkeypatch.setenv("AAA_FAST_BACKEND", "torch")
    assert ops.get_backend(cpu) == "torch"
