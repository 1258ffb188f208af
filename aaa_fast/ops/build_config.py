"""How the native extension is compiled: the one source of flags and file lists for setup.py
and for the rebuild at import time (aaa_fast/ops/native.py).

setup.py loads this file by path, before the package is importable, so it imports nothing
from aaa_fast and nothing beyond the standard library.
"""
from __future__ import annotations

import glob
import os
import shutil

# No a*b+c contraction: the kernels must round like the plain-PyTorch reference. No -std flag:
# torch's build helpers add the C++ standard its headers need (C++20 from torch 2.13 on).
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
NVCC_FLAGS = ["-O3", "--fmad=false"]
LINK_FLAGS = ["-fopenmp"]

# Used when nvcc is present but no GPU is visible (a build machine) and TORCH_CUDA_ARCH_LIST is
# unset: torch would otherwise derive an empty list from the visible devices and fail. 7.5 is the
# oldest architecture CUDA 13's nvcc accepts; PTX for 9.0 runs on anything newer.
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0+PTX"

# Written next to the built extension: the torch it was compiled against.
BUILD_INFO_NAME = "_C_build.json"


def cpu_sources(root: str) -> list[str]:
    return [os.path.join(root, "ops.cpp"), *sorted(glob.glob(os.path.join(root, "cpu", "*.cpp")))]


def cuda_sources(root: str) -> list[str]:
    return [os.path.join(root, "cuda", "pgd_step_cuda.cu")]


def locate_cuda_home() -> None:
    """Point $CUDA_HOME at a toolkit with headers when it is unset and torch's guess (the parent
    of the directory holding `nvcc`) has none, e.g. /usr/local/bin/nvcc being a wrapper script
    for /usr/local/cuda-X/bin/nvcc. Call before importing torch.utils.cpp_extension."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    guesses = [os.path.dirname(os.path.dirname(p)) for p in (nvcc, os.path.realpath(nvcc))] + ["/usr/local/cuda"]
    for home in guesses:
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            if home != guesses[0]:
                os.environ["CUDA_HOME"] = home
            return


def set_default_cuda_arch_list(visible_devices: int) -> None:
    """Give torch's build helpers an architecture list when no GPU can tell them one."""
    if visible_devices == 0 and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST


def want_cuda(torch_cuda_version: str | None, cuda_home: str | None) -> bool:
    """Build the CUDA kernels? $AAA_FAST_BUILD_CUDA=0/1 forces it; by default when torch has
    CUDA and a CUDA toolkit (nvcc) is found."""
    forced = os.environ.get("AAA_FAST_BUILD_CUDA")
    if forced is not None:
        if forced not in ("0", "1"):
            raise ValueError(f"AAA_FAST_BUILD_CUDA must be 0 or 1, got {forced!r}")
        return forced == "1"
    return torch_cuda_version is not None and cuda_home is not None
