#!/usr/bin/env bash
# The one prepared GPU check (issue 11): on a lent GPU machine, within a time budget, build the
# CUDA kernels against the machine's torch (skipped when a build for it is already there), then,
# in order of value, measure the public op's overhead against the bare kernels, run the tests that
# put tensors on CUDA, and time a training step. Each step's timeout is cut to the time left.
# Everything goes to $OUT (or runs/gpu_check): versions.txt, build.log, bench_ops.txt, tests.log,
# bench_train_step_*.txt, bench_autoattack.txt.
#   GPU_CHECK_SECONDS=300 bash scripts/gpu_check.sh     # with the device tool: run(command=...)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_check}
mkdir -p "$out"
python=${PYTHON:-python3}
budget=${GPU_CHECK_SECONDS:-480}
# run NAME CAP CMD...: CMD under a timeout of min(CAP, seconds left); output to $out/NAME
run() {
    local name=$1 cap=$2 left=$((budget - SECONDS)); shift 2
    if ((left < 15)); then echo "$name: skipped, out of time"; return; fi
    timeout $((left < cap ? left : cap)) "$@" > "$out/$name" 2>&1
    echo "$name: exit $? at ${SECONDS}s"
}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$python" -c 'import torch, sys; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda)'
    "$python" -c 'import triton; print("triton", triton.__version__)' 2>&1
} > "$out/versions.txt" 2>&1
cat "$out/versions.txt"
has_kernels='import aaa_fast.ops.native as n; print("native:", n.LOAD_ERROR or "ok", "cuda kernels:", n.has_cuda_kernels()); raise SystemExit(not n.has_cuda_kernels())'
# build against the machine's CUDA torch (setup_env would install the CPU build)
if ! AAA_FAST_NO_REBUILD=1 "$python" -c "$has_kernels" > /dev/null 2>&1; then
    MAX_JOBS=${MAX_JOBS:-8} run build.log 300 "$python" setup.py build_ext --inplace
fi
export AAA_FAST_NO_REBUILD=1  # a failed build must not make every process below compile again
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the benchmarks import aaa_fast from this checkout
"$python" -c "$has_kernels" 2>&1 | tail -1 | tee -a "$out/versions.txt"
run bench_ops.txt 90 "$python" benchmarks/bench_ops.py --sizes 8 128 2048 --dtypes float32 bfloat16 --min-run-time 0.1
cat "$out/bench_ops.txt"
# the tests that put tensors on CUDA (every backend x device), with Triton compiled for the GPU:
# the newest first (CUDA graphs, the sync-free step), every test named as it runs (-v), so a cut
# run still says what passed and what failed
run tests.log 200 env AAA_FAST_TESTS_ON_GPU=1 "$python" -m pytest -v -p no:cacheprovider --tb=short \
    tests/test_attack.py tests/test_trainer.py tests/test_ops_api.py tests/test_ops.py -k "cuda or triton or compile or graph"
grep -E "FAILED|ERROR" "$out/tests.log" | head -20; tail -1 "$out/tests.log"
for arch in preact-resnet18 wrn28-10; do
    run "bench_train_step_$arch.txt" 90 "$python" benchmarks/bench_train_step.py --arch "$arch" --amp bf16 --channels-last \
        --repeats 2
    tail -28 "$out/bench_train_step_$arch.txt"
done
# standard AutoAttack against torchattacks' APGD/APGDT/FAB/Square on study v3's TRADES model (issue 23)
run bench_autoattack.txt 120 "$python" benchmarks/bench_autoattack.py --device cuda --images 1000
tail -6 "$out/bench_autoattack.txt"
