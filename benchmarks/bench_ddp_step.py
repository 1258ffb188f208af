"""A training step on several data-parallel ranks (as torchrun runs it), one run, three ways:

- "flat": the model's gradients averaged by one all-reduce after the whole backward
  (runtime.Distributed.average; `--grad-bucket-mb 0`);
- "overlapped": averaged in buckets while the backward runs (runtime.OverlappedGradAverage,
  the CLI's default `--grad-bucket-mb 25`);
- "local": no averaging at all (each rank steps alone), the bound neither can beat.

Ranks are spawned here (gloo on CPU, NCCL with one GPU per rank); each step is timed in
interleaved rounds on every rank and the slowest rank's median is reported.

    python benchmarks/bench_ddp_step.py [--ranks 2] [--arch preact-resnet18] [--method trades]
        [--batch 128] [--steps 3] [--threads 1] [--bucket-mb 25]
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_step import INPUTS  # noqa: E402
from timing import timed_round_robin  # noqa: E402

from aaa_fast import AAAConfig, AAATrainer  # noqa: E402
from aaa_fast.methods import get_method  # noqa: E402
from aaa_fast.models import build_model  # noqa: E402
from aaa_fast.runtime import Distributed  # noqa: E402
from aaa_fast.trainer import make_meta_net  # noqa: E402

WAYS = ("flat", "overlapped", "local")


def make_trainer(args, device, ranks: Distributed, way: str) -> AAATrainer:
    channels, size = INPUTS[args.arch]
    torch.manual_seed(0)
    model = build_model(args.arch, in_channels=channels, num_classes=10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, fused=device.type == "cuda")
    config = AAAConfig(method=args.method, num_classes=10, steps=args.steps, meta_every=50)
    meta = meta_opt = None
    if get_method(args.method).uses_meta_net:
        meta = make_meta_net(config, seed=1).to(device)
        meta_opt = torch.optim.Adam(meta.parameters(), lr=1e-3)
    trainer = AAATrainer(model, opt, meta_net=meta, meta_optimizer=meta_opt, config=config)
    if way != "local":
        trainer.grad_sync = ranks.average
    if way == "overlapped":
        trainer.grad_reducer = ranks.overlapped_average(model, args.bucket_mb)
    return trainer


def worker(rank: int, port: int, args, out: dict) -> None:
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= args.ranks
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.ranks)
    ranks = Distributed.__new__(Distributed)  # this script's own process group
    ranks.world, ranks.rank, ranks.host_group = args.ranks, rank, dist.group.WORLD
    channels, size = INPUTS[args.arch]
    g = torch.Generator().manual_seed(rank)
    x = torch.rand(args.batch, channels, size, size, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    trainers = {way: make_trainer(args, device, ranks, way) for way in WAYS}
    times = timed_round_robin({way: (lambda t=t: t.step(x, y)) for way, t in trainers.items()}, device, args.repeats)
    slowest = torch.tensor([times[w] for w in WAYS], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    if rank == 0:
        n_params = sum(p.numel() for p in trainers["flat"].model.parameters())
        out.update(times=dict(zip(WAYS, slowest.tolist())), params=n_params, device=str(device),
                   backend=dist.get_backend())
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--arch", default="preact-resnet18", choices=sorted(INPUTS))
    p.add_argument("--method", default="trades")
    p.add_argument("--batch", type=int, default=128, help="rows per rank")
    p.add_argument("--steps", type=int, default=3, help="attack steps")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--bucket-mb", type=float, default=25.0)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(worker, args=(port, args, out), nprocs=args.ranks, join=True)
    t = out["times"]
    print(f"{args.method} step, {args.arch}, {args.batch} rows/rank, K={args.steps}, {args.ranks} ranks "
          f"({out['backend']}, {out['device']}), {args.threads} thread(s)/rank, {out['params'] / 1e6:.1f}M parameters, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}; slowest rank's median of "
          f"{args.repeats}:")
    for way in WAYS:
        print(f"  {way:<11} {t[way] * 1e3:9.1f} ms   {t['flat'] / t[way]:.2f}x flat")


if __name__ == "__main__":
    main()
