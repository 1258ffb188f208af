"""Attack throughput (images/s) against its baselines, all measured in one run.

- PGD-CE: aaa_fast.perturb vs torchattacks.PGD vs a plain loop (same model, batch, steps).
- The AAA pair: aaa_fast.adversarial_pair (one 2N batch: one forward + one backward per step)
  vs two separate attacks the reference way (three forwards and two backwards per step).

    python benchmarks/bench_attack.py [--models small-cnn preact-resnet18] [--batch 128] [--steps 10]
        [--amp bf16] [--channels-last] [--device cuda]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines.reference_attacks import plain_pgd, reference_pair  # noqa: E402
from timing import timed_round_robin  # noqa: E402

import aaa_fast  # noqa: E402
from aaa_fast.models import build_model  # noqa: E402
from aaa_fast.runtime import keep_cpu_memory  # noqa: E402

INPUTS = {"small-cnn": (1, 28), "preact-resnet18": (3, 32), "resnet32": (3, 32), "wrn16-4": (3, 32)}


def run(arch: str, args, device) -> list[tuple[str, str, float]]:
    channels, size = INPUTS[arch]
    torch.manual_seed(0)
    model = build_model(arch, in_channels=channels).to(device).eval()
    x = torch.rand(args.batch, channels, size, size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    eps, alpha, steps = 8 / 255, 2 / 255, args.steps
    try:
        import torchattacks
    except ImportError:
        torchattacks = None
    rows = []

    def autocast():
        return torch.autocast(device.type, dtype=amp) if amp else torch.autocast(device.type, enabled=False)

    def with_amp(fn):
        def call():
            with autocast():
                return fn()
        return call

    groups = {
        "PGD-CE": [
            ("aaa_fast.perturb", lambda: aaa_fast.perturb(model, x, y, eps=eps, alpha=alpha, steps=steps,
                                                          random_start=False, amp_dtype=amp)),
            ("plain loop", with_amp(lambda: plain_pgd(model, x, y, eps, alpha, steps))),
        ],
        "AAA pair": [
            ("aaa_fast.adversarial_pair", lambda: aaa_fast.adversarial_pair(model, x, y, eps=eps, alpha=alpha,
                                                                            steps=steps, amp_dtype=amp)),
            ("two attacks (reference way)", with_amp(lambda: reference_pair(model, x, y, eps, alpha, steps))),
        ],
    }
    if torchattacks is not None:
        ta = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False)
        groups["PGD-CE"].insert(1, ("torchattacks.PGD", with_amp(lambda: ta(x, y))))
    for group, impls in groups.items():
        medians = timed_round_robin(dict(impls), device, args.repeats)
        rows += [(group, name, args.batch / medians[name]) for name, _ in impls]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["small-cnn", "preact-resnet18"], choices=sorted(INPUTS))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    kept = keep_cpu_memory()  # same allocator settings for every implementation (see aaa_fast.runtime)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"# bench_attack: {where}, torch {torch.__version__}; batch {args.batch}, {args.steps} steps, "
          f"amp {args.amp}, channels_last {args.channels_last}, median of {args.repeats}, "
          f"keep_cpu_memory {kept}")
    if importlib.util.find_spec("torchattacks") is None:
        print("# torchattacks is not installed: PGD-CE is compared with the plain loop only")
    print(f"{'model':<16} {'attack':<9} {'implementation':<29} {'images/s':>9} {'ratio':>7}")
    for arch in args.models:
        rows = run(arch, args, device)
        for group in ("PGD-CE", "AAA pair"):
            g = [r for r in rows if r[0] == group]
            baseline = g[1][2]  # torchattacks (else the plain loop) for PGD-CE, the reference way for the pair
            for _, name, ips in g:
                print(f"{arch:<16} {group:<9} {name:<29} {ips:>9.1f} {ips / baseline:>6.2f}x")


if __name__ == "__main__":
    main()
