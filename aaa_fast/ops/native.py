"""Loads the compiled extension aaa_fast._C and gives its ops fake implementations.

An extension built against another torch than the one running (pip's isolated build fetches its
own torch; a later `pip install -U torch`) cannot be loaded safely. Its build record
(_C_build.json, written by setup.py) tells; the same sources, shipped in the package, are then
compiled for the running torch into a cache ($AAA_FAST_CACHE, default ~/.cache/aaa_fast) once,
with a message. $AAA_FAST_NO_REBUILD=1 turns that off. Without kernels the package still works
on the 'torch' reference backend (and 'triton' on GPU), and the warning says why and how to fix it.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import warnings
from pathlib import Path

import torch

from . import build_config

PACKAGE_DIR = Path(__file__).resolve().parents[1]
FIX = ("reinstall against the torch you run: `pip install --no-build-isolation --force-reinstall .` "
       "in the aaa_fast source directory")


def built_for_other_torch() -> str | None:
    """Why the installed binary must not be loaded, or None (no record: built by hand; trust it)."""
    try:
        record = json.loads((PACKAGE_DIR / build_config.BUILD_INFO_NAME).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return "its build record is unreadable"
    if record.get("torch") != torch.__version__:
        return f"it was built for torch {record.get('torch')}, and this is torch {torch.__version__}"
    return None


def source_dir() -> Path | None:
    """csrc/ as shipped in an installed package, or the checkout's own."""
    for candidate in (PACKAGE_DIR / "_csrc", PACKAGE_DIR.parent / "csrc"):
        if (candidate / "ops.cpp").is_file():
            return candidate
    return None


def cache_dir() -> Path:
    root = os.environ.get("AAA_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "aaa_fast")
    version = f"torch-{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
    return Path(root) / version.replace("+", "_")


def rebuild(reason: str) -> str | None:
    """Compile the kernels for the running torch and load them; the error, or None on success."""
    if os.environ.get("AAA_FAST_NO_REBUILD") == "1":
        return f"{reason}; not rebuilt because AAA_FAST_NO_REBUILD=1"
    sources = source_dir()
    if sources is None:
        return f"{reason}; its C++ sources are not installed, so it cannot be rebuilt"
    build_config.locate_cuda_home()
    from torch.utils import cpp_extension

    with_cuda = build_config.want_cuda(torch.version.cuda, cpp_extension.CUDA_HOME)
    files = build_config.cpu_sources(str(sources)) + (build_config.cuda_sources(str(sources)) if with_cuda else [])
    build_dir = cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    if not (build_dir / "aaa_fast_C.so").is_file():  # said once, when it compiles
        print(f"aaa_fast: the native extension cannot be used ({reason}); compiling it for this torch "
              f"into {build_dir} (once; ~1 min{', more for the CUDA kernels' if with_cuda else ''})",
              file=sys.stderr, flush=True)
    if with_cuda:
        build_config.set_default_cuda_arch_list(torch.cuda.device_count())
    try:
        cpp_extension.load(
            name="aaa_fast_C", sources=files, build_directory=str(build_dir), with_cuda=with_cuda,
            extra_cflags=build_config.CXX_FLAGS, extra_cuda_cflags=build_config.NVCC_FLAGS,
            extra_ldflags=build_config.LINK_FLAGS, is_python_module=False, verbose=False,
        )
    except Exception as exc:  # noqa: BLE001  (a compiler failure has many types; report it)
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        return f"{reason}; rebuilding it in {build_dir} failed: {lines[-1]}"
    return None


def load() -> str | None:
    """Register torch.ops.aaa_fast.* from the installed binary or a rebuild; the error, or None."""
    reason = built_for_other_torch()
    if reason is None:
        try:
            importlib.import_module("aaa_fast._C")  # loading it registers torch.ops.aaa_fast.*
            return None
        except ImportError as exc:
            reason = f"importing aaa_fast._C failed: {exc}"
    return rebuild(reason)


LOAD_ERROR = load()
if LOAD_ERROR is not None:
    warnings.warn(
        f"aaa_fast: native kernels unavailable ({LOAD_ERROR}). Falling back to the 'torch' reference "
        f"backend on CPU (and 'triton' on GPU), which is slower. To fix, {FIX}.",
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
