"""Wall-clock timing shared by the benchmark scripts (CUDA work is synchronised around a call)."""
import time

import torch


def time_once(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def timed_round_robin(fns: dict, device: torch.device, repeats: int) -> dict:
    """Median wall time of each function. All are warmed up, then timed in interleaved rounds
    (rotating the order), so drift of the machine does not favour whichever runs first."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(time_once(fns[name], device))
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}
