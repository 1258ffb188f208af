"""Builds aaa_fast._C: the CPU kernels always, the CUDA kernels where torch has CUDA.

Build with ``pip install --no-build-isolation .`` so the extension is compiled against the
torch that is installed (an isolated build would fetch another torch and break the ABI).
``AAA_FAST_BUILD_CUDA=0`` or ``=1`` forces the CUDA part off or on.
"""
import glob
import os

from setuptools import setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME


def want_cuda() -> bool:
    forced = os.environ.get("AAA_FAST_BUILD_CUDA")
    if forced is not None:
        if forced not in ("0", "1"):
            raise ValueError(f"AAA_FAST_BUILD_CUDA must be 0 or 1, got {forced!r}")
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # no a*b+c contraction: the kernels must round like the plain-PyTorch reference
    cxx = ["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=off"]
    if want_cuda():
        sources.append("csrc/cuda/pgd_step_cuda.cu")
        return CUDAExtension(
            "aaa_fast._C",
            sources,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--fmad=false"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("aaa_fast._C", sources, extra_compile_args=cxx, extra_link_args=["-fopenmp"])


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})
