"""Triton kernels of the fused PGD step (GPU; on CPU tensors under TRITON_INTERPRET=1).

linf: one program per block of one flattened sample, grid (N, cdiv(S, BLOCK)).
l2: one program per sample, three passes over it (|grad|, |delta|, write), so the per-sample
reductions stay inside the kernel and the result does not depend on launch order.
The op is opaque to torch.compile (custom_op + fake), which also works under the interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .native import pgd_step_fake

LINF_BLOCK = 1024
L2_BLOCK = 1024


@triton.jit
def _clamp(v, lo, hi):
    # keeps NaN, like torch.clamp
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))


@triton.jit
def _round_to(v, dtype: tl.constexpr):
    """float32 -> storage dtype, round to nearest even. bfloat16 is rounded with integer ops so
    the Triton interpreter (whose bf16 cast truncates) gives the GPU's result bit for bit."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bf16 = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(v != v, v.to(tl.bfloat16), bf16)  # keep NaN a NaN
    else:
        return v.to(dtype)


@triton.jit
def _pgd_linf_kernel(x_adv_ptr, x_nat_ptr, grad_ptr, dir_ptr, eps_ptr, alpha_ptr, S, lo, hi,
                     BLOCK: tl.constexpr):
    n = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < S
    base = n.to(tl.int64) * S
    step = tl.load(dir_ptr + n) * tl.load(alpha_ptr + n)
    e = tl.load(eps_ptr + n)
    xa = tl.load(x_adv_ptr + base + offs, mask=mask).to(tl.float32)
    xn = tl.load(x_nat_ptr + base + offs, mask=mask).to(tl.float32)
    g = tl.load(grad_ptr + base + offs, mask=mask).to(tl.float32)
    sign = (g > 0).to(tl.float32) - (g < 0).to(tl.float32)  # sign(NaN) = 0, like torch.sign
    delta = _clamp(xa + step * sign - xn, -e, e)
    out = _clamp(xn + delta, lo, hi)
    tl.store(x_adv_ptr + base + offs, _round_to(out, x_adv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pgd_l2_kernel(x_adv_ptr, x_nat_ptr, grad_ptr, dir_ptr, eps_ptr, alpha_ptr, S, lo, hi,
                   BLOCK: tl.constexpr):
    n = tl.program_id(0)
    base = n.to(tl.int64) * S
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, S, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        g = tl.load(grad_ptr + base + offs, mask=offs < S, other=0.0).to(tl.float32)
        acc += g * g
    g_norm = tl.sqrt(tl.sum(acc, axis=0))
    # a zero gradient gives no move (and no 0/0)
    step = tl.where(g_norm > 0, tl.load(dir_ptr + n) * tl.load(alpha_ptr + n), 0.0)
    g_div = tl.where(g_norm > 0, g_norm, 1.0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, S, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < S
        xa = tl.load(x_adv_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        xn = tl.load(x_nat_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        delta = xa + step * (g / g_div) - xn
        acc += delta * delta
    d_norm = tl.sqrt(tl.sum(acc, axis=0))
    e = tl.load(eps_ptr + n)
    scale = tl.where(d_norm > e, e / tl.where(d_norm > e, d_norm, 1.0), 1.0)
    for start in range(0, S, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < S
        xa = tl.load(x_adv_ptr + base + offs, mask=mask).to(tl.float32)
        xn = tl.load(x_nat_ptr + base + offs, mask=mask).to(tl.float32)
        g = tl.load(grad_ptr + base + offs, mask=mask).to(tl.float32)
        delta = xa + step * (g / g_div) - xn
        out = _clamp(xn + delta * scale, lo, hi)
        tl.store(x_adv_ptr + base + offs, _round_to(out, x_adv_ptr.dtype.element_ty), mask=mask)


def launch_pgd_step(x_adv, x_nat, grad, direction, eps, alpha, norm: str, lo: float, hi: float) -> None:
    """Launch the kernel on validated arguments. Eager callers use this directly: the custom op
    below adds ~90 us of dispatch per call on torch 2.13; torch.compile traces the op."""
    n = x_adv.shape[0]
    if x_adv.numel() == 0:
        return
    s = x_adv.numel() // n
    if triton.cdiv(s, LINF_BLOCK) > 65535:
        raise ValueError(f"triton backend: a sample has {s} elements, more than {65535 * LINF_BLOCK}")
    args = (x_adv, x_nat, grad, direction, eps, alpha, s, lo, hi)
    if norm == "linf":
        _pgd_linf_kernel[(n, triton.cdiv(s, LINF_BLOCK))](*args, BLOCK=LINF_BLOCK)
    else:
        _pgd_l2_kernel[(n,)](*args, BLOCK=L2_BLOCK)


@torch.library.custom_op("aaa_fast::pgd_step_triton_", mutates_args={"x_adv"})
def pgd_step_triton_(
    x_adv: torch.Tensor,
    x_nat: torch.Tensor,
    grad: torch.Tensor,
    direction: torch.Tensor,
    eps: torch.Tensor,
    alpha: torch.Tensor,
    norm: str,
    lo: float,
    hi: float,
) -> None:
    launch_pgd_step(x_adv, x_nat, grad, direction, eps, alpha, norm, lo, hi)


pgd_step_triton_.register_fake(pgd_step_fake)
