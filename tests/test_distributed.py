"""Gradient averaging across torchrun ranks (2 gloo ranks on CPU, spawned here): the bucketed
all-reduce overlapped with the backward (runtime.OverlappedGradAverage) against the one flat
all-reduce after it (runtime.Distributed.average), the reference."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from aaa_fast import AAAConfig, AAATrainer
from aaa_fast.methods import get_method
from aaa_fast.models import build_model
from aaa_fast.runtime import Distributed, OverlappedGradAverage
from aaa_fast.trainer import make_meta_net

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, *args):
    mp.spawn(worker, args=(free_port(), *args), nprocs=WORLD, join=True)


def init(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)


def rank_batch(rank: int, n: int = 24, classes: int = 4):
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
    return torch.rand(n, 1, 14, 14, generator=g), torch.randint(0, classes, (n,), generator=g)


def trainer_for(method: str, bucket_mb: float, channels_last: bool) -> AAATrainer:
    torch.manual_seed(0)
    model = build_model("small-cnn", in_channels=1, num_classes=4)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    config = AAAConfig(method=method, num_classes=4, steps=2, meta_every=2, channels_last=channels_last)
    meta_net = meta_opt = None
    if get_method(method).uses_meta_net:
        meta_net = make_meta_net(config, seed=100)
        meta_opt = torch.optim.Adam(meta_net.parameters(), lr=1e-3)
    trainer = AAATrainer(model, opt, meta_net=meta_net, meta_optimizer=meta_opt, config=config)
    ranks = Distributed.__new__(Distributed)  # the process group is this test's own
    ranks.world, ranks.rank, ranks.host_group = WORLD, dist.get_rank(), dist.group.WORLD
    trainer.grad_sync = ranks.average
    if bucket_mb > 0:
        trainer.grad_reducer = ranks.overlapped_average(model, bucket_mb)
    return trainer


def _train_worker(rank, port, method, channels_last, out):
    init(rank, port)
    x, y = rank_batch(rank)
    x_meta, y_meta = rank_batch(10 + rank, n=8)
    results = {}
    # 0: today's flat all-reduce after the backward; 25 MiB: one bucket; 0.004 MiB: a bucket per
    # parameter or two, launched while the backward runs
    for bucket_mb in (0.0, 25.0, 0.004):
        trainer = trainer_for(method, bucket_mb, channels_last)
        for _ in range(3):  # with a meta step (meta_every 2): the lookahead and the meta-net's average
            trainer.step(x, y, x_meta, y_meta)
        results[bucket_mb] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        if trainer.meta_net is not None:
            results[bucket_mb].update({f"meta.{k}": v.clone() for k, v in trainer.meta_net.state_dict().items()})
    results["parameters"] = [n for n, _ in trainer.model.named_parameters()]  # BN buffers stay per rank here
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("method,channels_last", [("aaa", False), ("trades", True), ("frl", False)])
def test_overlapped_average_trains_exactly_as_the_flat_average(tmp_path, method, channels_last):
    """Same parameters (model and meta-net) after three steps on 2 gloo ranks: with two ranks a
    sum has one order, so the buckets change nothing, bit for bit."""
    spawn(_train_worker, method, channels_last, str(tmp_path))
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        reference = results[0.0]
        for bucket_mb in (25.0, 0.004):
            for name, value in results[bucket_mb].items():  # parameters, BN buffers, the meta-net
                assert torch.equal(value, reference[name]), (rank, bucket_mb, name)
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    assert all(torch.equal(first[0.004][k], second[0.004][k]) for k in first["parameters"])  # the ranks agree


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        # no gradient: it must stay None, not become a zero. Registered first, so its buckets come
        # last (a bucket that never fills holds back the later ones until the backward ends)
        self.unused = nn.Linear(4, 4)
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _reducer_worker(rank, port, out):
    init(rank, port)
    torch.manual_seed(0)
    model = WithUnused()
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    reducer = OverlappedGradAverage(model.parameters(), WORLD, bucket_mb=1e-5)  # one parameter per bucket
    launched_before_last = []
    first = model.a.weight  # its gradient comes last in the backward
    first.register_post_accumulate_grad_hook(lambda _p: launched_before_last.append(len(reducer._works)))
    log = {}
    for step in range(2):  # the buffers are reused: a stale value must not leak into step 2
        for p in model.parameters():
            p.grad = None
        with reducer.during_backward():
            F.cross_entropy(model(x * (step + 1)), y).backward()
        log[step] = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
        for p in model.parameters():  # the reference: local gradients, one flat all-reduce
            p.grad = None
        F.cross_entropy(model(x * (step + 1)), y).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([t.reshape(-1) for t in grads])
        dist.all_reduce(flat)
        log[f"ref{step}"] = flat / WORLD
    # outside during_backward nothing is reduced (the attacks' and lookahead's backwards)
    for p in model.parameters():
        p.grad = None
    F.cross_entropy(model(x), y).backward()
    log["outside"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    log["launched_before_last"] = launched_before_last
    log["buckets"] = len(reducer.buckets)
    torch.save(log, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_reducer_overlaps_the_backward_keeps_unused_grads_none_and_leaves_other_backwards_alone(tmp_path):
    spawn(_reducer_worker, str(tmp_path))
    logs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for log in logs:
        assert log["buckets"] == 8  # weights and biases of a, b, c, unused: one bucket each
        # when the first layer's gradient arrived, the later layers' buckets were already on the wire
        assert all(n >= 4 for n in log["launched_before_last"])
        for step in range(2):
            grads = log[step]
            assert grads["unused.weight"] is None and grads["unused.bias"] is None
            got = torch.cat([g.reshape(-1) for g in grads.values() if g is not None])
            assert torch.equal(got, log[f"ref{step}"])
    assert all(torch.equal(logs[0][0][k], logs[1][0][k]) for k in ("a.weight", "c.bias"))
    # the backward outside the context kept each rank's own gradient
    assert not torch.equal(logs[0]["outside"]["a.weight"], logs[1]["outside"]["a.weight"])


def test_reducer_refuses_a_bucket_size_that_is_not_positive():
    with pytest.raises(ValueError, match="bucket_mb must be > 0"):
        OverlappedGradAverage(nn.Linear(2, 2).parameters(), WORLD, bucket_mb=0)
