"""The fused kernels' Python face: per-sample signed, bounded PGD step and random starts.

Backends: 'triton', 'cuda', 'cpu' (C++/OpenMP), 'torch' (plain reference). The default is
the fastest available for the tensors' device; `set_backend` or $AAA_FAST_BACKEND forces one.
"""
from .api import pgd_step, pgd_step_, random_init
from .backends import BACKENDS, available_backends, get_backend, set_backend
from .reference import pgd_step_reference

__all__ = [
    "BACKENDS",
    "available_backends",
    "get_backend",
    "pgd_step",
    "pgd_step_",
    "pgd_step_reference",
    "random_init",
    "set_backend",
]
