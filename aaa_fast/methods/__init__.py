"""Training methods as plug-ins: one file per method, registered with @register_method; the
registry (method_names, get_method) is the only list of methods the CLI, the run, the
benchmarks, the tests and the study report read. See base.py for what a method file contains."""
from .base import (DEFAULTS, Batch, Method, Plan, StepLoss, WeightedObjectiveMethod,  # noqa: F401
                   defaults_help, get_method, method_names, register_method, step_stat_names)
# the built-in methods, in the order the CLI lists them
from . import erm, pgd_at, trades, frl, aaa, mart  # noqa: E402,F401  (registers them)
