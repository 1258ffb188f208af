#!/usr/bin/env bash
# CIFAR-10 with the paper's settings, for a GPU machine: runs the grid of
# experiments/cifar10_<preact|wrn>.json (resumable: rerun to continue), then puts the tables in
# docs/RESULTS.md and the plots in docs/figures. CIFAR-10 is downloaded to ./data (md5-checked) or
# taken from there. Extra arguments go to experiments/grid.py, e.g. the headline subset:
#   experiments/cifar10.sh preact --scenarios clean --methods PGD-AT TRADES AAA-remargin
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${1:-preact}
[ $# -gt 0 ] && shift
config=experiments/cifar10_${arch}.json
[ -f "$config" ] || { echo "cifar10.sh: no $config (first argument: preact or wrn)" >&2; exit 2; }
source scripts/setup_env.sh
python experiments/grid.py "$config" "$@"
python experiments/report.py "$config" --markdown docs/RESULTS.md --figures docs/figures
