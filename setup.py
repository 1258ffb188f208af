"""Builds aaa_fast._C: the CPU kernels always, the CUDA kernels where torch has CUDA and nvcc
is found (``AAA_FAST_BUILD_CUDA=0`` or ``=1`` forces them off or on).

``pip install --no-build-isolation .`` compiles against the torch already installed.
``pip install .`` (isolated) compiles against whatever torch pip puts in the build environment;
if that differs from the torch used at run time, the package recompiles the extension for it on
first import (see aaa_fast/ops/native.py). Flags and sources: aaa_fast/ops/build_config.py.
"""
import importlib.util
import json
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

import torch

_spec = importlib.util.spec_from_file_location("build_config", os.path.join("aaa_fast", "ops", "build_config.py"))
build_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_config)
build_config.locate_cuda_home()

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def extension():
    sources = build_config.cpu_sources("csrc")
    if build_config.want_cuda(torch.version.cuda, CUDA_HOME):
        build_config.set_default_cuda_arch_list(torch.cuda.device_count())
        return CUDAExtension(
            "aaa_fast._C",
            sources + build_config.cuda_sources("csrc"),
            extra_compile_args={"cxx": build_config.CXX_FLAGS, "nvcc": build_config.NVCC_FLAGS},
            extra_link_args=build_config.LINK_FLAGS,
        )
    return CppExtension("aaa_fast._C", sources, extra_compile_args=build_config.CXX_FLAGS,
                        extra_link_args=build_config.LINK_FLAGS)


class BuildExtensionWithRecord(BuildExtension):
    """Records the torch the extension was compiled against, so a mismatch is found at import."""

    def run(self):
        super().run()
        for ext in self.extensions:
            record = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), build_config.BUILD_INFO_NAME)
            with open(record, "w") as f:
                json.dump({"torch": torch.__version__, "cuda_kernels": any(s.endswith(".cu") for s in ext.sources)}, f)


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package (aaa_fast/_csrc) so an installed copy can recompile itself."""

    def run(self):
        super().run()
        shutil.copytree("csrc", os.path.join(self.build_lib, "aaa_fast", "_csrc"), dirs_exist_ok=True)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtensionWithRecord, "build_py": BuildPyWithSources},
)
