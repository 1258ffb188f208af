"""Standard AutoAttack throughput: aaa_fast.autoattack against torchattacks' APGD / APGDT / FAB /
Square at the same standard settings, same model, same images, in one run.

Both sides run the same pipeline (aaa_fast.autoattack.run_attacks: each attack on the points every
earlier one left robust, a point robust only if it survives all four); only the attacks differ:
ours are APGD-CE and APGD-T on the fused projection, with APGD-T's 9 targets stacked into one
batch and rows leaving once misclassified; torchattacks' APGD(steps=100, n_restarts=1) and
APGDT(steps=100, n_restarts=1, 9 targets) run as they come. FAB-T and Square are torchattacks' on
both sides (the same code), so their rows show the pipeline's cost only.

    python benchmarks/bench_autoattack.py [--checkpoint RUN/model.pt] [--images 100] [--device cpu]

Default model: study v3's TRADES run on uniform-40 (a small CNN on Fashion-MNIST, eps 0.05).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from aaa_fast.autoattack import (ATTACKS, STEPS, TARGETS, apgd, run_attacks,  # noqa: E402
                                 torchattacks_attack)
from aaa_fast.checkpoint import load_checkpoint  # noqa: E402
from aaa_fast.data import class_balanced_subset, load_dataset  # noqa: E402
from aaa_fast.evaluation import model_for  # noqa: E402

DEFAULT = os.path.join(ROOT, "experiments", "results", "fmnist_v3", "uniform-40", "TRADES", "seed0", "model.pt")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=DEFAULT, help="a run's model.pt / checkpoint.pt (config.json beside it)")
    p.add_argument("--images", type=int, default=100, help="class-balanced test images")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    import torchattacks

    with open(os.path.join(os.path.dirname(args.checkpoint), "config.json")) as f:
        config = json.load(f)
    device = torch.device(args.device)
    data = load_dataset(config["dataset"], None if config["dataset"] == "fashion-mnist" else config["data_dir"],
                        download_missing=False)
    model = model_for(config["arch"], data, device)
    model.load_state_dict(load_checkpoint(args.checkpoint)["trainer"]["model"])
    model.eval()
    keep = class_balanced_subset(data.test_y, args.images, data.num_classes, torch.Generator().manual_seed(0))
    x, y = data.test_x[keep], data.test_y[keep].long()
    eps, c = config["eval_eps"], data.num_classes

    def ours(loss):
        return lambda xb, yb, _r: apgd(model, xb, yb, eps=eps, loss=loss, generator=torch.Generator(device).manual_seed(0))[1]

    def theirs(name):
        if name == "apgd-ce":
            attack = torchattacks.APGD(model, norm="Linf", eps=eps, steps=STEPS, n_restarts=1, seed=0, loss="ce")
        else:
            attack = torchattacks.APGDT(model, norm="Linf", eps=eps, steps=STEPS, n_restarts=1, seed=0, n_classes=c)
            attack.n_target_classes = TARGETS
        return lambda xb, yb, _r: attack(xb, yb)

    shared = {name: torchattacks_attack(name, model, eps, "linf", c, 0, device) for name in ("fab-t", "square")}
    sides = {"aaa_fast.autoattack": {"apgd-ce": ours("ce"), "apgd-t": ours("dlr-targeted"), **shared},
             "torchattacks APGD/APGDT/FAB/Square": {"apgd-ce": theirs("apgd-ce"), "apgd-t": theirs("apgd-t"), **shared}}
    results = {}
    for side, attacks in sides.items():
        t0 = time.time()
        res = run_attacks(model, x, y, attacks, eps=eps, norm="linf", batch_size=500, device=device)
        results[side] = dict(seconds=res.seconds, total=time.time() - t0, acc=res.accuracy,
                             after={k: int(v.sum()) for k, v in res.robust_after.items()})
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    print(f"AutoAttack standard (linf, eps {eps:.4g}), {config['arch']} ({config['method']}, {config['dataset']}), "
          f"{args.images} test images, fp32, {where}, torch {torch.__version__}")
    print(f"{'side':<38}" + "".join(f"{a:>10}" for a in ATTACKS) + f"{'total s':>10}{'robust %':>10}")
    for side, r in results.items():
        print(f"{side:<38}" + "".join(f"{r['seconds'][a]:>10.1f}" for a in ATTACKS) + f"{r['total']:>10.1f}"
              f"{r['acc']:>10.1f}")
    a, b = results["aaa_fast.autoattack"], results["torchattacks APGD/APGDT/FAB/Square"]
    ratios = {k: b["seconds"][k] / max(a["seconds"][k], 1e-9) for k in ("apgd-ce", "apgd-t")}
    ratios["total"] = b["total"] / a["total"]
    print("speed-up (torchattacks time / ours): " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(results=results, ratios=ratios, where=where, images=args.images, eps=eps), f, indent=2)


if __name__ == "__main__":
    main()
