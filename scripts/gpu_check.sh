#!/usr/bin/env bash
# The one prepared GPU check (issue 11): on a lent GPU machine, in ~6 minutes, build the CUDA
# kernels against the machine's torch, run the tests that exercise CUDA tensors, and measure the
# public op's overhead and the kernels against their baselines. Everything goes to $OUT (or
# runs/gpu_check): versions.txt, tests.log, bench_ops.txt, bench_train_step.txt.
#   bash scripts/gpu_check.sh            # with the device tool: run(command="bash scripts/gpu_check.sh")
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_check}
mkdir -p "$out"
python=${PYTHON:-python3}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$python" -c 'import torch, sys; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda)'
    "$python" -c 'import triton; print("triton", triton.__version__)' 2>&1
} > "$out/versions.txt" 2>&1
cat "$out/versions.txt"
# build against the machine's CUDA torch (setup_env would install the CPU build)
"$python" -m pip install -q --no-build-isolation -e . > "$out/build.log" 2>&1 || { tail -20 "$out/build.log"; exit 1; }
"$python" -c 'import aaa_fast.ops.native as n; print("native:", n.LOAD_ERROR or "ok", "cuda kernels:", n.has_cuda_kernels())' | tee -a "$out/versions.txt"
# the tests that put tensors on CUDA (every backend x device parametrisation), without the interpreter
CUDA_VISIBLE_DEVICES_FOR_TESTS=1 timeout 240 "$python" -m pytest -q -x tests/test_ops.py tests/test_ops_api.py \
    tests/test_attack.py -k "cuda or triton or compile" > "$out/tests.log" 2>&1
echo "tests: exit $? ($(tail -1 "$out/tests.log"))"
timeout 150 "$python" benchmarks/bench_ops.py --sizes 8 128 512 2048 --dtypes float32 bfloat16 --min-run-time 0.2 \
    > "$out/bench_ops.txt" 2>&1
echo "bench_ops: exit $?"; cat "$out/bench_ops.txt"
timeout 120 "$python" benchmarks/bench_train_step.py > "$out/bench_train_step.txt" 2>&1
echo "bench_train_step: exit $?"; tail -15 "$out/bench_train_step.txt"
