#!/usr/bin/env bash
# The main job: set up (see setup_env.sh: it also installs Fashion-MNIST, Debian's
# dataset-fashion-mnist package, where it is missing), then train AAA on it for a few minutes on a CPU
# with 40% of the training labels replaced by random ones, where the method's mechanism shows: the
# epoch lines and the summary say what share of the corrupted-label and of the clean rows the
# meta-network sent to the anti-adversarial term (and how well b_i ranks them, AUROC), and
# runs/demo/mechanism.png plots it beside the FRL table's curves. It is study v3's uniform-40 AAA
# command (experiments/fmnist_v3.json) cut to 2 epochs, with --amp auto: bf16 autocast where the CPU or
# GPU computes bf16 natively (1.85x faster on an AMX CPU, README "Results"), fp32 elsewhere; evaluation
# is fp32 either way. Extra arguments go to python -m aaa_fast.train (--amp none: the fp32 demo).
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
out=runs/demo
[ -e "$out/checkpoint.pt" ] && out="runs/demo-$(date +%Y%m%d-%H%M%S)"
python -m aaa_fast.train --dataset fashion-mnist --arch small-cnn --method aaa --objective paper --lam 6 \
    --train-subset 11000 --label-noise uniform --noise-rate 0.4 --num-meta 1000 --epochs 2 --batch-size 128 \
    --schedule cosine --eps 0.05 --alpha 0.025 --steps 3 --eval-eps 0.05 --eval-every 2 --eval-subset 1000 \
    --meta-every 5 --meta-lr 1e-3 --meta-batch-size 100 --test-subset 2000 --amp auto --out "$out" "$@"
echo "demo: metrics, checkpoints and plots (curves.png, mechanism.png) in $out/"
