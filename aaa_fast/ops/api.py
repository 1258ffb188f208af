"""Public face of the fused PGD step: argument checks, layout handling, backend dispatch."""
from __future__ import annotations

import functools
import math
import weakref
from numbers import Real

import torch
from torch import Tensor

from .backends import get_backend, triton_module
from .reference import pgd_step_reference

STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
NORMS = ("linf", "l2")


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_norm_bounds(norm: str, lo: float, hi: float) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    for name, v in (("lo", lo), ("hi", hi)):
        if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite float, got {v!r}")
    if lo > hi:
        raise ValueError(f"lo must be <= hi, got lo={lo}, hi={hi}")


class _ValidatedTensors:
    """Tensors whose values already passed a check, by identity and version counter: a tensor
    reused across calls unchanged (the usual eps/alpha/direction of an attack loop) is checked
    once, not with a few kernels and a host synchronisation on every call. An in-place change
    bumps the version and brings the check back."""

    def __init__(self):
        self._seen: dict[int, tuple[weakref.ref, int, int, str]] = {}

    def _key(self, t: Tensor, check: str):
        return t._version, t.data_ptr(), check

    def known(self, t: Tensor, check: str) -> bool:
        entry = self._seen.get(id(t))
        return entry is not None and entry[0]() is t and entry[1:] == self._key(t, check)

    def add(self, t: Tensor, check: str) -> None:
        ident = id(t)
        self._seen[ident] = (weakref.ref(t, lambda _, ident=ident: self._seen.pop(ident, None)), *self._key(t, check))


VALIDATED = _ValidatedTensors()


@functools.lru_cache(maxsize=256)
def _constant(value: float, n: int, device: torch.device) -> Tensor:
    """A float32 (n,) tensor of `value`, made once: the kernels only read it."""
    return torch.full((n,), value, dtype=torch.float32, device=device)


def per_sample(name: str, value, n: int, device: torch.device, *, nonneg: bool) -> tuple[Tensor, Tensor | None]:
    """`value` (a number, a 0-d or an (N,) tensor) as a float32 (N,) tensor on `device`.

    Returns the tensor and, for tensor input not validated before, a boolean 0-d tensor flagging
    bad values, so callers can check all flags with a single device synchronisation
    (prepare_step_args then records the tensor in VALIDATED). Numbers are checked on the host and
    become cached constant tensors.
    """
    if isinstance(value, Tensor):
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != n):
            raise ValueError(f"{name} must be a number, a 0-d tensor or shape ({n},), got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the inputs are on {device}")
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real (integer or float) tensor, got {value.dtype}")
        ready = value.dtype == torch.float32 and value.dim() == 1 and value.is_contiguous()
        v = value if ready else value.to(torch.float32).expand(n).contiguous()
        check = "nonneg" if nonneg else "sign"
        if not torch.compiler.is_compiling() and VALIDATED.known(value, check):
            return v, None
        bad = ~torch.isfinite(v) | (v < 0) if nonneg else (v != 0) & (v != 1) & (v != -1)
        return v, bad.any()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    value = float(value)
    if nonneg and not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    if not nonneg and value not in (-1.0, 0.0, 1.0):
        raise ValueError(f"{name} must be -1, 0 or +1, got {value}")
    if torch.compiler.is_compiling():
        return torch.full((n,), value, dtype=torch.float32, device=device), None
    return _constant(value, n, device), None


def raise_on_flags(flags: dict[str, Tensor | None], expected: dict[str, str]) -> None:
    """Check the bad-value flags of per_sample() with one synchronisation (skipped when compiling)."""
    named = [(k, f) for k, f in flags.items() if f is not None]
    if not named or torch.compiler.is_compiling():
        return
    values = torch.stack([f for _, f in named]).tolist()
    for (name, _), bad in zip(named, values):
        if bad:
            raise ValueError(f"{name} must be {expected[name]}")


def _batch_major(t: Tensor) -> bool:
    """Each sample is one dense block of numel/N elements: true for the layouts the kernels take."""
    if t.is_contiguous():
        return True
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    return t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)


def _in_layout_of(ref: Tensor, t: Tensor) -> Tensor:
    return t if t.stride() == ref.stride() else torch.empty_like(ref, dtype=t.dtype).copy_(t)


def _memory_span(t: Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 0)
    return start, start + extent * t.element_size()


def _partially_overlaps(written: Tensor, read: Tensor) -> bool:
    """True when `read` shares memory with `written` other than element for element: the in-place
    kernels would then read values they already overwrote."""
    if written.numel() == 0 or read.numel() == 0:
        return False
    if written.untyped_storage().data_ptr() != read.untyped_storage().data_ptr():
        return False
    (a0, a1), (b0, b1) = _memory_span(written), _memory_span(read)
    if a1 <= b0 or b1 <= a0:
        return False
    return not (a0 == b0 and written.stride() == read.stride() and written.dtype == read.dtype)


def prepare_step_args(x_adv, x_nat, grad, direction, eps, alpha, norm, lo, hi):
    """Validate the public arguments; returns float32 (N,) direction, eps, alpha."""
    for name, t in (("x_adv", x_adv), ("x_nat", x_nat), ("grad", grad)):
        _check_tensor(name, t)
    if x_adv.dim() < 1:
        raise ValueError("x_adv must have a leading batch dimension, got a 0-d tensor")
    if x_adv.dtype not in STORAGE_DTYPES:
        raise TypeError(f"x_adv must be float32, float16, bfloat16 or float64, got {x_adv.dtype}")
    if x_nat.dtype != x_adv.dtype:
        raise TypeError(f"x_nat dtype {x_nat.dtype} must equal x_adv dtype {x_adv.dtype}")
    if grad.dtype not in STORAGE_DTYPES:
        raise TypeError(f"grad must be a floating tensor (float32/16, bfloat16, float64), got {grad.dtype}")
    for name, t in (("x_nat", x_nat), ("grad", grad)):
        if t.shape != x_adv.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal x_adv shape {tuple(x_adv.shape)}")
        if t.device != x_adv.device:
            raise ValueError(f"{name} is on {t.device} but x_adv is on {x_adv.device}")
        if not torch.compiler.is_compiling() and _partially_overlaps(x_adv, t):
            raise ValueError(f"{name} overlaps x_adv's memory at a different offset or layout (views of one buffer); "
                             "the in-place step would read values it already wrote: pass separate tensors")
    _check_norm_bounds(norm, lo, hi)
    n, device = x_adv.shape[0], x_adv.device
    d, d_bad = per_sample("direction", direction, n, device, nonneg=False)
    e, e_bad = per_sample("eps", eps, n, device, nonneg=True)
    a, a_bad = per_sample("alpha", alpha, n, device, nonneg=True)
    raise_on_flags(
        {"direction": d_bad, "eps": e_bad, "alpha": a_bad},
        {"direction": "-1, 0 or +1 in every row", "eps": "finite and >= 0 in every row",
         "alpha": "finite and >= 0 in every row"},
    )
    if not torch.compiler.is_compiling():
        for value, bad, check in ((direction, d_bad, "sign"), (eps, e_bad, "nonneg"), (alpha, a_bad, "nonneg")):
            if bad is not None:
                VALIDATED.add(value, check)
    return d, e, a


def launch_pgd_step_(x_adv, x_nat, grad, direction, eps, alpha, norm, lo, hi) -> Tensor:
    """The step on already validated arguments (direction/eps/alpha float32 (N,) on x_adv's device).

    The attack engine validates once per attack and calls this on every step.
    """
    backend = get_backend(x_adv.device)
    with torch.no_grad():
        if backend == "torch":
            return x_adv.copy_(pgd_step_reference(x_adv, x_nat, grad, direction, eps, alpha, norm, lo, hi))
        work = x_adv if _batch_major(x_adv) else x_adv.contiguous()
        x_nat, grad = _in_layout_of(work, x_nat), _in_layout_of(work, grad)
        if backend == "triton" and torch.compiler.is_compiling():  # the custom op, which the compiler traces
            torch.ops.aaa_fast.pgd_step_triton_.default(work, x_nat, grad, direction, eps, alpha, norm, lo, hi)
        elif backend == "triton":  # eager: launch directly, without the custom op's dispatch cost
            triton_module().launch_pgd_step(work, x_nat, grad, direction, eps, alpha, norm, lo, hi)
        else:
            torch.ops.aaa_fast.pgd_step_.default(work, x_nat, grad, direction, eps, alpha, norm, lo, hi)
        return x_adv if work is x_adv else x_adv.copy_(work)


def pgd_step_(x_adv: Tensor, x_nat: Tensor, grad: Tensor, direction=1, eps=8 / 255, alpha=2 / 255,
              *, norm: str = "linf", lo: float = 0.0, hi: float = 1.0) -> Tensor:
    """Fused per-sample signed, bounded PGD step; updates `x_adv` in place and returns it.

    linf: ``x_adv <- clamp(x_nat + clamp(x_adv + d*alpha*sign(g) - x_nat, -eps, eps), lo, hi)``.
    l2: ``v = x_adv + d*alpha*g/|g|``; ``delta = v - x_nat`` shrunk to ``|delta| <= eps``;
    ``x_adv <- clamp(x_nat + delta, lo, hi)`` (norms per sample; zero gradient -> no move).
    `direction` (+1 ascend, -1 descend, 0 keep), `eps`, `alpha`: numbers or (N,) tensors.
    Arithmetic in float32, rounded once to x_adv's dtype. Not differentiable.
    """
    d, e, a = prepare_step_args(x_adv, x_nat, grad, direction, eps, alpha, norm, lo, hi)
    return launch_pgd_step_(x_adv, x_nat, grad, d, e, a, norm, lo, hi)


def pgd_step(x_adv: Tensor, x_nat: Tensor, grad: Tensor, direction=1, eps=8 / 255, alpha=2 / 255,
             *, norm: str = "linf", lo: float = 0.0, hi: float = 1.0) -> Tensor:
    """Out-of-place `pgd_step_`: returns a new tensor, `x_adv` is left unchanged."""
    _check_tensor("x_adv", x_adv)
    return pgd_step_(x_adv.detach().clone(), x_nat, grad, direction, eps, alpha, norm=norm, lo=lo, hi=hi)


def random_init(x_nat: Tensor, eps, *, norm: str = "linf", lo: float = 0.0, hi: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """A uniform random point in each sample's eps-ball around `x_nat`, clamped to [lo, hi].

    linf: uniform in the cube; l2: uniform in the ball (Gaussian direction, radius eps*U^(1/D)).
    The noise is drawn in logical (contiguous) order, so a generator gives the same result for
    contiguous and channels_last inputs. Result has x_nat's dtype and memory format.
    """
    _check_tensor("x_nat", x_nat)
    if x_nat.dim() < 1:
        raise ValueError("x_nat must have a leading batch dimension, got a 0-d tensor")
    if x_nat.dtype not in STORAGE_DTYPES:
        raise TypeError(f"x_nat must be float32, float16, bfloat16 or float64, got {x_nat.dtype}")
    _check_norm_bounds(norm, lo, hi)
    e, e_bad = per_sample("eps", eps, x_nat.shape[0], x_nat.device, nonneg=True)
    raise_on_flags({"eps": e_bad}, {"eps": "finite and >= 0 in every row"})
    if e_bad is not None:
        VALIDATED.add(eps, "nonneg")
    return uniform_start(x_nat, e, norm, lo, hi, generator)


def uniform_start(x_nat: Tensor, e: Tensor, norm: str, lo: float, hi: float,
                  generator: torch.Generator | None) -> Tensor:
    """random_init on validated arguments (float32 (N,) eps on x_nat's device): no checks."""
    n = x_nat.shape[0]
    per_row = (-1,) + (1,) * (x_nat.dim() - 1)
    opts = dict(dtype=torch.float32, device=x_nat.device, generator=generator)
    if norm == "linf":
        delta = (torch.rand(x_nat.shape, **opts) * 2 - 1) * e.view(per_row)
    else:
        direction = torch.randn(x_nat.shape, **opts)
        direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(per_row)
        dims = x_nat[0].numel()
        radius = torch.rand(n, **opts).pow(1.0 / max(dims, 1)) * e
        delta = direction * radius.view(per_row)
    start = torch.clamp(x_nat.detach().float() + delta, lo, hi)
    return torch.empty_like(x_nat, dtype=x_nat.dtype).copy_(start)
