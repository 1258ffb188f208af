#!/usr/bin/env bash
# Runs a study grid (experiments/grid.py) on one GPU with one runner per (scenario, seed) at once:
# small models leave a GPU mostly idle, parallel runners fill it. Runs of one (scenario, seed)
# depend on nothing else (a hot start's pretraining stage is in the same runner), so this is the
# serial grid's result, only sooner. Resumable: run it again to finish what a stop left.
#   bash scripts/gpu_study.sh experiments/fmnist_v2.json [LOG_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
config=$1
logs=${2:-runs/gpu_study_logs}
mkdir -p "$logs"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
pids=()
while read -r seed scenario; do
    "$python" experiments/grid.py "$config" --seeds "$seed" --scenarios "$scenario" \
        > "$logs/$scenario-seed$seed.log" 2>&1 &
    pids+=("$!")
done < <("$python" -c 'import json, sys
grid = json.load(open(sys.argv[1]))
for seed in grid["seeds"]:
    for scenario in grid["scenarios"]:
        print(seed, scenario)' "$config")
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
echo "gpu_study: ${#pids[@]} runners done (status $status); logs in $logs"
exit $status
