#!/usr/bin/env bash
# The main job: set up (see setup_env.sh: it also installs Fashion-MNIST, Debian's
# dataset-fashion-mnist package, where it is missing), then train AAA on it for a few minutes on a CPU and print the
# FRL table; plots and metrics go to runs/demo. Extra arguments go to python -m aaa_fast.train.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
out=runs/demo
[ -e "$out/checkpoint.pt" ] && out="runs/demo-$(date +%Y%m%d-%H%M%S)"
python -m aaa_fast.train --dataset fashion-mnist --arch small-cnn --method aaa --epochs 4 --train-subset 4000 \
    --num-meta 500 --steps 3 --eps 0.1 --batch-size 128 --meta-every 10 --eval-subset 500 --test-subset 2000 \
    --out "$out" "$@"
echo "demo: metrics, checkpoints and plots in $out/"
