"""Clean / PGD / class-wise / worst-class metrics (METHOD.md, "Evaluation (FRL protocol)").

Natural error e_c = 1 - clean accuracy of class c; robust error = 1 - PGD accuracy; boundary
error r_c = clean accuracy - PGD accuracy (the share of class c that is correct but not robust).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .attack import autocast, eval_mode, perturb


@dataclass
class ClasswiseResult:
    nat_acc: Tensor  # (C,) clean accuracy per class
    rob_acc: Tensor  # (C,) PGD accuracy per class
    counts: Tensor   # (C,) samples per class

    @property
    def nat_err(self) -> Tensor:
        return 1 - self.nat_acc

    @property
    def rob_err(self) -> Tensor:
        return 1 - self.rob_acc

    @property
    def bdy_err(self) -> Tensor:
        return self.nat_acc - self.rob_acc

    def summary(self) -> dict[str, float]:
        """Averages over classes and worst classes, in percent (as METHOD.md's tables)."""
        present = self.counts > 0
        out = {}
        for name, err in (("nat", self.nat_err), ("bdy", self.bdy_err), ("rob", self.rob_err)):
            e = err[present]
            out[f"avg_{name}_err"] = 100 * e.mean().item()
            out[f"worst_{name}_err"] = 100 * e.max().item()
        total = self.counts.sum().clamp_min(1)
        out["clean_acc"] = 100 * (self.nat_acc * self.counts).sum().item() / total.item()
        out["pgd_acc"] = 100 * (self.rob_acc * self.counts).sum().item() / total.item()
        return out


def classwise_accuracy(model: nn.Module, x: Tensor, y: Tensor, num_classes: int, *, eps: float = 8 / 255,
                       steps: int = 20, alpha: float = 2 / 255, batch_size: int = 256,
                       amp_dtype: torch.dtype | None = None, generator: torch.Generator | None = None,
                       device: torch.device | None = None) -> ClasswiseResult:
    """Clean and PGD-`steps` (CE, uniform random start) accuracy per class over (x, y), in batches.
    x, y may live on the CPU; batches are moved to `device` (default: the model's)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
    device = device or next(model.parameters()).device
    correct_nat = torch.zeros(num_classes, dtype=torch.float64, device=device)
    correct_rob = torch.zeros_like(correct_nat)
    counts = torch.zeros_like(correct_nat)
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device, non_blocking=True)
        yb = y[start:start + batch_size].to(device, non_blocking=True).long()
        if xb.dtype == torch.uint8:
            xb = xb.float() / 255
        with eval_mode(model), torch.no_grad(), autocast(device, amp_dtype):
            nat_ok = model(xb).argmax(1) == yb
        if steps > 0 and eps > 0:
            xa = perturb(model, xb, yb, eps=eps, steps=steps, alpha=alpha, random_start=True,
                         amp_dtype=amp_dtype, generator=generator)
            with eval_mode(model), torch.no_grad(), autocast(device, amp_dtype):
                rob_ok = model(xa).argmax(1) == yb
        else:
            rob_ok = nat_ok
        counts += torch.bincount(yb, minlength=num_classes)
        correct_nat.index_add_(0, yb, nat_ok.double())
        correct_rob.index_add_(0, yb, rob_ok.double())
    denom = counts.clamp_min(1)
    return ClasswiseResult((correct_nat / denom).cpu(), (correct_rob / denom).cpu(), counts.cpu())


def main(argv=None) -> None:
    """python -m aaa_fast.evaluate --checkpoint RUN/best.pt: the FRL table on the test set."""
    import argparse
    import json
    import os

    from .checkpoint import CheckpointError, load_checkpoint
    from .data import DatasetError, load_dataset
    from .train import autoattack_accuracy, evaluate_split, format_final, model_for

    p = argparse.ArgumentParser(prog="python -m aaa_fast.evaluate", description=main.__doc__)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt or best.pt of a run (config.json beside it)")
    p.add_argument("--eval-eps", type=float, default=None, help="default: the run's")
    p.add_argument("--eval-steps", type=int, default=None, help="default: the run's")
    p.add_argument("--autoattack", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    config_path = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "config.json")
    if not os.path.exists(config_path):
        raise SystemExit(f"error: {config_path} not found: the checkpoint must sit in its run directory")
    with open(config_path) as f:
        run = argparse.Namespace(**json.load(f))
    try:
        state = load_checkpoint(args.checkpoint, expected_hash=run.config_hash)
        data = load_dataset(run.dataset, run.data_dir, download_missing=False)
    except (CheckpointError, DatasetError) as exc:
        raise SystemExit(f"error: {exc}") from None
    run.eval_eps = run.eval_eps if args.eval_eps is None else args.eval_eps
    run.eval_steps = run.eval_steps if args.eval_steps is None else args.eval_steps
    device = torch.device(args.device)
    model = model_for(run.arch, data, device)
    model.load_state_dict(state["trainer"]["model"])
    result = evaluate_split(model, data.test_x.to(device), data.test_y.to(device), data.num_classes, run, device,
                            seed=run.seed + 99)
    if args.autoattack:
        result["autoattack_acc"] = autoattack_accuracy(model, data.test_x.to(device), data.test_y.to(device), run)
    result.update(method=run.method, dataset=run.dataset, arch=run.arch, eval_eps=run.eval_eps,
                  eval_steps=run.eval_steps, checkpoint=args.checkpoint, epoch=state.get("epoch"))
    print(format_final(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
