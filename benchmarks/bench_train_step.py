"""Training-step throughput (iterations/s) of every method, measured in one run.

- ERM, PGD-AT, TRADES and AAA steps of aaa_fast.AAATrainer;
- AAA with a meta step every 50 iterations and every iteration: a meta iteration and a plain
  one are timed separately and combined as (meta + (k-1) * plain) / k;
- the straightforward reference implementation (benchmarks/baselines/reference_aaa.py) at the
  same precision (under autocast, channels_last as asked) and, with --amp, also in fp32, its
  own default;
- the forward/backward passes an AAA iteration minimally needs, timed bare: the clean eval
  forward, K attack steps of forward + input-gradient backward on 2N rows, and the train
  forward + backward on 3N rows;
- attack only what has weight (min_row_weight): plain AAA steps whose anti-adversarial rows
  are those of a clean-label run (none) and of a 40%-label-noise run (40% of the rows; study
  v2's last-epoch shares), with every row attacked and with min_row_weight 0.5 (the aaa-oracle
  control fixes b_i in {0, 1}, so the share is exact), in fp32 and (with --amp) at the asked
  precision, each combined with its meta step into an iteration with meta every 50, against
  fp32 with every row attacked: a candidate default against today's in one run;
- on CUDA: AAA with its attacks run eagerly instead of replayed from CUDA graphs, the FLOPs of
  the minimal passes (torch.utils.flop_counter) and what an AAA iteration achieves with them
  (TFLOP/s, and MFU against --peak-tflops, default the GPU's dense bf16/fp16 peak when known),
  and the peak GPU memory.

    python benchmarks/bench_train_step.py [--arch preact-resnet18] [--batch 128] [--steps 10]
        [--amp bf16] [--channels-last] [--compile] [--device cuda] [--only-defaults]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines.reference_aaa import reference_iteration  # noqa: E402
from timing import timed_round_robin  # noqa: E402

from aaa_fast import AAAConfig, AAATrainer, MetaNet  # noqa: E402
from aaa_fast.methods import get_method  # noqa: E402
from aaa_fast.models import build_model  # noqa: E402
from aaa_fast.runtime import keep_cpu_memory  # noqa: E402

INPUTS = {"small-cnn": (1, 28), "preact-resnet18": (3, 32), "resnet32": (3, 32), "wrn16-4": (3, 32),
          "wrn28-10": (3, 32)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="preact-resnet18", choices=sorted(INPUTS))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--meta-batch", type=int, default=100)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for aaa_fast's steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--only-defaults", action="store_true",
                   help="time only the candidate defaults (precision x skipping against fp32 with every row "
                        "attacked): for a model whose full table takes hours on a CPU")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak TFLOP/s for MFU (default: dense bf16/fp16 peak of a known GPU with --amp)")
    args = p.parse_args()
    device = torch.device(args.device)
    kept = keep_cpu_memory()
    channels, size = INPUTS[args.arch]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"# bench_train_step: {where}, torch {torch.__version__}; {args.arch}, batch {args.batch}, meta batch "
          f"{args.meta_batch}, {args.steps} attack steps, amp {args.amp}, channels_last {args.channels_last}, "
          f"compile {args.compile}, median of {args.repeats}, keep_cpu_memory {kept}")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, channels, size, size, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    xm = torch.rand(args.meta_batch, channels, size, size, generator=g).to(device)
    ym = (torch.arange(args.meta_batch) % 10).to(device)

    fused = device.type == "cuda"  # as the CLI: the sync-free step

    def fresh(method, **cfg):
        torch.manual_seed(0)
        model = build_model(args.arch, in_channels=channels).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, fused=fused)
        meta = MetaNet().to(device) if get_method(method).uses_meta_net else None
        meta_opt = torch.optim.Adam(meta.parameters(), lr=1e-4, fused=fused) if meta is not None else None
        config = AAAConfig(**{"method": method, "steps": args.steps, "amp": args.amp,
                              "channels_last": args.channels_last, "compile": args.compile, **cfg})
        return AAATrainer(model, opt, meta_net=meta, meta_optimizer=meta_opt, config=config)

    if not args.only_defaults:
        time_steps(args, fresh, channels, (x, y, xm, ym), device)
    time_candidate_defaults(args, fresh, (x, y, xm, ym), device)


def time_steps(args, fresh, channels, data, device):
    """Every method's step, AAA at meta every 1 and 50 against the reference, the bare passes."""
    x, y, xm, ym = data
    baselines = {m: fresh(m) for m in ("erm", "pgd-at", "trades", "mart")}
    rows = timed_round_robin({m: (lambda t=t: t.step(x, y)) for m, t in baselines.items()}, device, args.repeats)
    aaa = fresh("aaa", meta_every=1)
    plain = fresh("aaa", meta_every=10**9)

    # the passes an AAA iteration (no meta step) minimally needs, bare
    model = fresh("erm").model
    x2, x3 = torch.cat([x, x]), torch.cat([x, x, x])
    y2, y3 = torch.cat([y, y]), torch.cat([y, y, y])
    amp_ctx = (lambda: torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[args.amp])) \
        if args.amp != "none" else (lambda: torch.autocast(device.type, enabled=False))

    def minimal():
        model.eval()
        with torch.no_grad(), amp_ctx():
            model(x)
        xa = x2.clone()
        for _ in range(args.steps):
            xa.requires_grad_(True)
            with amp_ctx():
                loss = F.cross_entropy(model(xa).float(), y2, reduction="sum")
            torch.autograd.backward(loss, inputs=[xa])  # as autograd.grad, which the FLOP counter cannot hook
            xa = (xa.detach() + 0.001 * xa.grad.sign()).clamp(0, 1)
        model.train()
        with amp_ctx():
            loss = F.cross_entropy(model(x3).float(), y3)
        loss.backward()

    plain_fns = {"aaa": lambda: plain.step(x, y, xm, ym), "minimal": minimal}
    if device.type == "cuda":
        eager = fresh("aaa", meta_every=10**9, cuda_graphs=False)
        plain_fns["aaa, no CUDA graphs"] = lambda: eager.step(x, y, xm, ym)
    meta_fns = {"aaa": lambda: aaa.step(x, y, xm, ym)}
    # the reference at the same precision (wrapped in autocast, as a user of it would) and, with
    # --amp, also at its own default (fp32), so that both sides are compared at their defaults
    references = {} if args.skip_reference else {"reference": (amp_ctx, args.channels_last)}
    if references and args.amp != "none":
        references["reference fp32"] = (lambda: torch.autocast(device.type, enabled=False), False)
    for ref_name, (ref_ctx, ref_channels_last) in references.items():
        torch.manual_seed(0)
        ref_model = build_model(args.arch, in_channels=channels).to(device)
        if ref_channels_last:
            ref_model = ref_model.to(memory_format=torch.channels_last)
        ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        ref_meta = MetaNet().to(device)
        ref_meta_opt = torch.optim.Adam(ref_meta.parameters(), lr=1e-4)
        common = dict(eps=10 / 255, alpha=2 / 255, steps=args.steps, lam=1.5,
                      class_loss_avg=torch.full((10,), 5.0, device=device),
                      class_share=torch.full((10,), 0.1, device=device))
        ref_x, ref_xm = ((x.contiguous(memory_format=torch.channels_last), xm.contiguous(memory_format=torch.channels_last))
                         if ref_channels_last else (x, xm))
        for fns, meta_step in ((plain_fns, False), (meta_fns, True)):
            def ref_step(meta_step=meta_step, ctx=ref_ctx, parts=(ref_model, ref_opt, ref_meta, ref_meta_opt),
                         inputs=(ref_x, y, ref_xm, ym), common=common):
                with ctx():
                    reference_iteration(*parts, *inputs, meta_step=meta_step, **common)
            fns[ref_name] = ref_step
    # plain iterations and meta iterations are each timed in interleaved rounds
    t_plain = timed_round_robin(plain_fns, device, args.repeats)
    t_meta = timed_round_robin(meta_fns, device, args.repeats)
    t_min = t_plain["minimal"]
    for name in ("aaa", *references):
        rows[f"{name} (meta every 50)"] = (t_meta[name] + 49 * t_plain[name]) / 50
        rows[f"{name} (meta every 1)"] = t_meta[name]
    if "aaa, no CUDA graphs" in t_plain:
        rows["aaa (no meta step)"] = t_plain["aaa"]
        rows["aaa (no meta step), eager"] = t_plain["aaa, no CUDA graphs"]

    baseline_of = {f"aaa (meta every {k})": f"reference (meta every {k})" for k in (1, 50)}
    fp32_of = {f"aaa (meta every {k})": f"reference fp32 (meta every {k})" for k in (1, 50)}
    print(f"{'step':<32} {'s/iter':>8} {'iter/s':>8} {'vs reference':>12} {'vs reference fp32':>17}")
    for name, t in rows.items():
        ratios = [f"{rows[of[name]] / t:.2f}x" if of.get(name) in rows else "" for of in (baseline_of, fp32_of)]
        print(f"{name:<32} {t:>8.3f} {1 / t:>8.3f} {ratios[0]:>12} {ratios[1]:>17}")
    print(f"{'minimal fwd/bwd passes':<32} {t_min:>8.3f} {1 / t_min:>8.3f}")
    print(f"aaa (no meta step) / minimal passes: {t_plain['aaa'] / t_min:.3f}x")
    with FlopCounterMode(display=False) as counter:
        minimal()
    tflop = counter.get_total_flops() / 1e12
    achieved = tflop / t_plain["aaa"]
    known = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" and args.amp != "none" else None
    peak = args.peak_tflops or known
    mfu = f", MFU {100 * achieved / peak:.1f}% of {peak:g} TFLOP/s" if peak else " (MFU: pass --peak-tflops)"
    print(f"minimal passes: {tflop * 1e3:.1f} GFLOP per iteration; aaa (no meta step) achieves "
          f"{achieved:.3g} TFLOP/s{mfu}")
    if device.type == "cuda":
        print(f"peak GPU memory (all rows): {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


def time_candidate_defaults(args, fresh, data, device):
    """Skipping at fp32 and (with --amp) at the asked precision too, each with its meta step, so
    that a candidate default (precision x skipping) is timed against fp32 in the same run."""
    x, y, xm, ym = data
    precisions = {"fp32": dict(amp="none", channels_last=False)}
    if args.amp != "none":
        precisions[args.amp + (" + channels_last" if args.channels_last else "")] = {}
    skipping = {}
    for precision, settings in precisions.items():
        skipping[(precision, "meta")] = lambda t=fresh("aaa", meta_every=1, **settings): t.step(x, y, xm, ym)
        for share in (0.0, 0.4):
            corrupted = (torch.arange(args.batch) < round(share * args.batch)).to(device)
            for tau in (0.0, 0.5):
                trainer = fresh("aaa-oracle", min_row_weight=tau, meta_every=10**9, **settings)
                if tau:  # iteration 0 attacks every row: take it here, so that the warm-up meets the kept shape
                    trainer.step(x, y, corrupted=corrupted)
                skipping[(precision, share, tau)] = lambda t=trainer, c=corrupted: t.step(x, y, corrupted=c)
    t_skip = timed_round_robin(skipping, device, args.repeats)
    for precision in precisions:
        for share in (0.0, 0.4):
            full, skip = t_skip[(precision, share, 0.0)], t_skip[(precision, share, 0.5)]
            print(f"plain step, {precision}, {share:.0%} anti rows: every row {full:.3f} s, min_row_weight 0.5 "
                  f"{skip:.3f} s: {full / skip:.2f}x")
    print("iteration with a meta step every 50 ((meta + 49 plain) / 50), against fp32 with every row attacked:")
    for share in (0.0, 0.4):
        iteration = {(precision, tau): (t_skip[(precision, "meta")] + 49 * t_skip[(precision, share, tau)]) / 50
                     for precision in precisions for tau in (0.0, 0.5)}
        today = iteration[("fp32", 0.0)]
        for (precision, tau), t in iteration.items():
            rows_note = "every row" if tau == 0 else "min_row_weight 0.5"
            print(f"  {share:.0%} anti rows, {precision}, {rows_note}: {t:.3f} s/iter, {today / t:.2f}x")


def peak_tflops(name: str) -> float | None:
    """Dense bf16/fp16 tensor-core peak (vendor data sheets, SXM parts) of GPUs we have run on."""
    for key, value in (("H200", 989.4), ("H100", 989.4), ("A100", 312.0)):
        if key in name:
            return value
    return None


if __name__ == "__main__":
    main()
