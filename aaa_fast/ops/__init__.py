"""The fused kernels' Python face: per-sample signed, bounded PGD step and random starts.

Backends: 'triton', 'cuda', 'cpu' (C++/OpenMP), 'torch' (plain reference). The default is
the fastest available for the tensors' device; `set_backend` or $AAA_FAST_BACKEND forces one.

The validated tier, for engines that check their arguments once and then call in a loop (the
attack engine, the trainer): `prepare_step_args` checks and converts direction/eps/alpha to
float32 (N,) tensors; `launch_pgd_step_` and `uniform_start` take exactly those and check
nothing, so they add no host synchronisation; `unprojected_step` and `project` are the step's
two halves in plain PyTorch (`project` is differentiable in eps).
"""
from .api import launch_pgd_step_, per_sample, pgd_step, pgd_step_, prepare_step_args, random_init, uniform_start
from .backends import BACKENDS, available_backends, get_backend, set_backend
from .reference import pgd_step_reference, project, unprojected_step

__all__ = [
    "BACKENDS",
    "available_backends",
    "get_backend",
    "launch_pgd_step_",
    "per_sample",
    "pgd_step",
    "pgd_step_",
    "pgd_step_reference",
    "prepare_step_args",
    "project",
    "random_init",
    "set_backend",
    "uniform_start",
    "unprojected_step",
]
