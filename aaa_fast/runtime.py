"""Process-level settings that make CPU training faster. Opt-in: the library never calls these
by itself; the CLI and the benchmarks do."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt parameters from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


@functools.cache
def keep_cpu_memory() -> bool:
    """Stop glibc from returning large freed buffers to the OS.

    By default glibc serves every allocation above 32 MB with a fresh mmap and gives it back
    on free, so each big activation of a CPU forward/backward faults in zeroed pages again
    (a 2N-row batch is hit far harder than two N-row ones). Serving them from the heap and
    never trimming it keeps the pages: the process holds on to its peak memory instead.
    Returns True when applied (Linux with glibc), False elsewhere.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
