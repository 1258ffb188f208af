"""Does `torch.compile` pay for AAA's step? Plain AAA iterations (the attack loop and the real
step; the lookahead stays eager whatever `compile` says) of AAATrainer with `compile=False` and
`compile=True`, per architecture and precision, measured in one run:

- the compile cost: the compiled trainer's first two iterations (where inductor traces, compiles
  and, with a second batch shape, recompiles) minus the eager trainer's;
- the steady state: the median of interleaved rounds after that, and the ratio eager / compiled.

    python benchmarks/bench_compile.py [--archs small-cnn preact-resnet18] [--amps none bf16]
        [--batch 64] [--steps 3] [--repeats 3] [--device cpu]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_step import INPUTS  # noqa: E402
from timing import time_once, timed_round_robin  # noqa: E402

from aaa_fast import AAAConfig, AAATrainer, MetaNet  # noqa: E402
from aaa_fast.models import build_model  # noqa: E402
from aaa_fast.runtime import keep_cpu_memory  # noqa: E402


def trainer_for(arch: str, amp: str, compiled: bool, steps: int, device: torch.device) -> AAATrainer:
    torch.manual_seed(0)
    model = build_model(arch, in_channels=INPUTS[arch][0]).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    meta = MetaNet().to(device)
    config = AAAConfig(method="aaa", steps=steps, amp=amp, channels_last=amp != "none", compile=compiled,
                       meta_every=10**9)  # iteration 0 is the only meta step: part of the warm-up
    return AAATrainer(model, opt, meta_net=meta, meta_optimizer=torch.optim.Adam(meta.parameters(), lr=1e-4),
                      config=config)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["small-cnn", "preact-resnet18"], choices=sorted(INPUTS))
    p.add_argument("--amps", nargs="+", default=["none", "bf16"], choices=["none", "bf16"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    kept = keep_cpu_memory()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"# bench_compile: {where}, torch {torch.__version__}; plain AAA iterations, batch {args.batch}, "
          f"{args.steps} attack steps, median of {args.repeats}, keep_cpu_memory {kept}")
    print(f"{'arch':<16} {'amp':<5} {'eager s/iter':>12} {'compiled s/iter':>15} {'speed-up':>9} {'compile s':>10}")
    for arch in args.archs:
        channels, size = INPUTS[arch]
        g = torch.Generator().manual_seed(0)
        x = torch.rand(args.batch, channels, size, size, generator=g).to(device)
        y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
        xm = torch.rand(100, channels, size, size, generator=g).to(device)
        ym = (torch.arange(100) % 10).to(device)
        for amp in args.amps:
            fns, first = {}, {}
            for compiled in (False, True):
                t = trainer_for(arch, amp, compiled, args.steps, device)
                fn = fns[compiled] = lambda t=t: t.step(x, y, xm, ym)
                first[compiled] = time_once(fn, device) + time_once(fn, device)
            times = timed_round_robin(fns, device, args.repeats)
            eager, compiled = times[False], times[True]
            print(f"{arch:<16} {amp:<5} {eager:>12.3f} {compiled:>15.3f} {eager / compiled:>8.2f}x "
                  f"{first[True] - first[False]:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
