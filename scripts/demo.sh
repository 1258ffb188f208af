#!/usr/bin/env bash
# The main job: set up (see setup_env.sh), then benchmark the fused PGD step against its
# baselines on this machine. Extra arguments go to benchmarks/bench_ops.py.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
python benchmarks/bench_ops.py "$@"
