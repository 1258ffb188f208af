#!/usr/bin/env bash
# The main job: set up (see setup_env.sh), make sure Fashion-MNIST is there (Debian's
# dataset-fashion-mnist package), then train AAA on it for a few minutes on a CPU and print the
# FRL table; plots and metrics go to runs/demo. Extra arguments go to python -m aaa_fast.train.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
fmnist=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$fmnist" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "demo: Fashion-MNIST is missing; installing Debian's system package dataset-fashion-mnist (~30 MB) with apt-get"
        apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null
        echo "demo: Fashion-MNIST installed under /usr/share/datasets/fashion-mnist"
    else
        echo "demo: Fashion-MNIST not found; install Debian's dataset-fashion-mnist, or add --download" >&2
    fi
fi
out=runs/demo
[ -e "$out/checkpoint.pt" ] && out="runs/demo-$(date +%Y%m%d-%H%M%S)"
python -m aaa_fast.train --dataset fashion-mnist --arch small-cnn --method aaa --epochs 4 --train-subset 4000 \
    --num-meta 500 --steps 3 --eps 0.1 --batch-size 128 --meta-every 10 --eval-subset 500 --test-subset 2000 \
    --out "$out" "$@"
echo "demo: metrics, checkpoints and plots in $out/"
