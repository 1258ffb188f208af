"""Loads the compiled extension aaa_fast._C and gives its ops fake implementations."""
from __future__ import annotations

import warnings

import torch

try:
    from aaa_fast import _C  # noqa: F401  (loading it registers torch.ops.aaa_fast.*)

    LOAD_ERROR: str | None = None
except ImportError as exc:  # the package still works on the torch/triton backends
    LOAD_ERROR = str(exc)
    warnings.warn(
        "aaa_fast: native extension aaa_fast._C is not built or failed to load "
        f"({exc}); falling back to the 'torch' reference backend on CPU (and 'triton' on GPU). "
        "Build it with `pip install --no-build-isolation .`",
        RuntimeWarning,
        stacklevel=2,
    )


def has_cpu_kernels() -> bool:
    return LOAD_ERROR is None


def has_cuda_kernels() -> bool:
    return LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "aaa_fast::pgd_step_", "CUDA"
    )


def pgd_step_fake(x_adv, x_nat, grad, direction, eps, alpha, norm, lo, hi) -> None:
    """Fake (meta) implementation shared by the native and Triton in-place step ops."""
    n = x_adv.shape[0]
    torch._check(x_nat.shape == x_adv.shape, lambda: "x_nat must have x_adv's shape")
    torch._check(grad.shape == x_adv.shape, lambda: "grad must have x_adv's shape")
    torch._check(x_nat.dtype == x_adv.dtype, lambda: "x_nat must have x_adv's dtype")
    for t in (direction, eps, alpha):
        torch._check(t.shape == (n,), lambda: "direction, eps, alpha must have shape (N,)")
        torch._check(t.dtype == torch.float32, lambda: "direction, eps, alpha must be float32")


if LOAD_ERROR is None:
    torch.library.register_fake("aaa_fast::pgd_step_", pgd_step_fake)
