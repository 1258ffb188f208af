"""Training methods as plug-ins: one file per method, registered with @register_method; the
registry (method_names, get_method) is the only list of methods the CLI, the run, the
benchmarks, the tests and the study report read. See base.py for what a method file contains."""
from .base import (Batch, Method, Plan, StepLoss, WeightedObjectiveMethod, defaults_help, get_method,  # noqa: F401
                   method_names, register_method)
# the built-in methods, in the order the CLI lists them
from . import erm, pgd_at, trades, frl, aaa, mart  # noqa: E402,F401  (registers them)
