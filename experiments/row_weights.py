"""How many attack rows `--min-row-weight TAU` would keep, read off a run's checkpoint: the
meta-network's weights (a_i, b_i) for every training row at that point of the run, and for each
TAU the share of the 2N attack rows a plain step would attack (a row whose b_i < TAU gets no
anti-adversarial example; under the paper objective one whose a_i < TAU gets no adversarial
one), overall and on corrupted-label vs clean rows, with the mean weight left out per row:

    python experiments/row_weights.py --checkpoint RUN/checkpoint.pt -- TRAINING ARGUMENTS OF THE RUN

The training arguments rebuild the run's data and scenario (the same --seed, noise, subset).
The shares are before the trainer rounds kept counts up to its shape buckets (a multiple of
ceil(N/8) per batch), so a run's logged `rows_attacked` is a little higher.
"""
from __future__ import annotations

import argparse
import sys

import torch

from aaa_fast.checkpoint import load_checkpoint
from aaa_fast.objective import sample_features
from aaa_fast.run import build_trainer, load_run_data
from aaa_fast.runtime import Distributed
from aaa_fast.train import build_parser, resolve_defaults

TAUS = (0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4)


def row_weights(checkpoint: str, train_argv: list[str], chunk: int = 500):
    """(a, b, corrupted, whether skipping can drop adversarial rows: the paper objective) for every
    training row, from the checkpoint's model, meta-network and class statistics."""
    args = resolve_defaults(build_parser().parse_args(train_argv))
    ranks = Distributed("cpu")
    data, scenario = load_run_data(args, ranks)
    trainer = build_trainer(args, data, scenario, torch.device("cpu"), ranks)
    if trainer.meta_net is None:
        raise SystemExit(f"error: --method {args.method} has no meta-network: its weights are not per row")
    state = load_checkpoint(checkpoint)["trainer"]
    trainer.model.load_state_dict(state["model"])
    trainer.meta_net.load_state_dict(state["meta_net"])
    trainer.class_loss_avg.copy_(state["class_loss_avg"])
    trainer.meta_net.train()  # as on a training step (its BatchNorm on the batch's statistics)
    a, b = [], []
    with torch.no_grad():
        for i in range(0, scenario.train_x.shape[0], chunk):
            x, y = trainer.inputs(scenario.train_x[i:i + chunk], scenario.train_y[i:i + chunk], "batch")
            features = sample_features(trainer.clean_logits(x), y, trainer.class_loss_avg, trainer.class_share)
            ai, bi, _ = trainer.meta_net(features)
            a.append(ai)
            b.append(bi)
    # the method's rule, not the flag's: a_i weights the adversarial rows only where a_boundary is
    # None (the paper objective), so only there can skipping drop them
    skips_adversarial = trainer.method.a_boundary is None
    return torch.cat(a), torch.cat(b), scenario.train_y != scenario.train_y_clean, skips_adversarial


def kept(a, b, tau: float, paper: bool):
    """(share of the 2N attack rows attacked, mean weight left out per row)."""
    dropped_adv = (a < tau) if paper else torch.zeros_like(a, dtype=torch.bool)
    dropped_anti = b < tau
    attacked = 1 - (dropped_adv.double().mean() + dropped_anti.double().mean()).item() / 2
    left_out = (a * dropped_adv + b * dropped_anti).double().mean().item()
    return attacked, left_out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, train_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="the run's checkpoint.pt (or best.pt)")
    p.add_argument("--tau", type=float, nargs="+", default=list(TAUS), help="thresholds to report")
    args = p.parse_args(ours)
    a, b, corrupted, paper = row_weights(args.checkpoint, train_argv)
    quartiles = torch.quantile(b.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    print(f"{a.shape[0]} training rows ({int(corrupted.sum())} with corrupted labels), "
          f"{'paper' if paper else 'kl-all'} objective; b_i > a_i for {100 * (b > a).double().mean():.1f}%; "
          f"b_i quartiles {', '.join(f'{q:.3g}' for q in quartiles)}")
    print("tau      rows attacked  (corrupted / clean rows)  weight left out per row")
    for tau in args.tau:
        everyone, left_out = kept(a, b, tau, paper)
        groups = [f"{100 * kept(a[m], b[m], tau, paper)[0]:5.1f}%" if m.any() else "    –"
                  for m in (corrupted, ~corrupted)]
        print(f"{tau:<8g} {100 * everyone:6.1f}%        ({groups[0]} / {groups[1]})          {left_out:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
