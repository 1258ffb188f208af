#!/usr/bin/env bash
# Set up (see setup_env.sh), then run the benchmarks: the fused step, the attacks and the
# training step, each against its baselines in the same run (see benchmarks/RESULTS.md).
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
python benchmarks/bench_ops.py
python benchmarks/bench_attack.py
python benchmarks/bench_train_step.py
