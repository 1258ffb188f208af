"""Which implementation of the fused step runs: 'triton', 'cuda', 'cpu' (C++) or 'torch'."""
from __future__ import annotations

import functools
import os

import torch

from . import native

BACKENDS = ("triton", "cuda", "cpu", "torch")
ENV_VAR = "AAA_FAST_BACKEND"
_chosen: str | None = None


@functools.cache
def triton_module():
    """aaa_fast.ops.triton_kernels (importing it registers the Triton op), or None without Triton."""
    try:
        from . import triton_kernels
    except Exception:  # noqa: BLE001 - any import failure means the backend is unusable
        return None
    return triton_kernels


def triton_usable() -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    if triton_module() is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def backend_supports(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if name == "cpu":
        return device.type == "cpu" and native.has_cpu_kernels()
    if name == "cuda":
        return device.type == "cuda" and native.has_cuda_kernels()
    if name == "triton":
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        return triton_usable() and (device.type == "cuda" or (device.type == "cpu" and interpret))
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def available_backends() -> list[str]:
    """The backends that work on this machine, for its CPU or its GPU."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [b for b in BACKENDS if any(backend_supports(b, d) for d in devices)]


def set_backend(name: str | None) -> None:
    """Force a backend for every later call; None returns to $AAA_FAST_BACKEND or the default."""
    global _chosen
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    if name is not None and name not in available_backends():
        raise ValueError(
            f"backend {name!r} is not available here; available: {available_backends()}"
            + (f" (native extension: {native.LOAD_ERROR})" if native.LOAD_ERROR else "")
        )
    _chosen = name
    _backend_for.cache_clear()


@torch.compiler.assume_constant_result
def get_backend(device: torch.device) -> str:
    """The backend a call on `device` uses: the forced one, else the fastest available. Cached per
    (device, forced choice, $AAA_FAST_BACKEND, $TRITON_INTERPRET); set_backend clears the cache."""
    return _backend_for(device, _chosen or os.environ.get(ENV_VAR) or None, os.environ.get("TRITON_INTERPRET"))


@functools.lru_cache(maxsize=64)
def _backend_for(device: torch.device, name: str | None, _interpret: str | None) -> str:
    if name is not None:
        if name not in BACKENDS:
            raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {name!r}")
        if not backend_supports(name, device):
            raise ValueError(
                f"backend {name!r} cannot run on {device.type} tensors; "
                f"available here: {available_backends()}"
            )
        return name
    preference = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
    return next(b for b in preference if backend_supports(b, device))
