#!/usr/bin/env bash
# Sets up everything on a fresh machine (see setup_env.sh), compile-checks the CUDA kernels
# with nvcc, and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
bash scripts/check_cuda_sources.sh
python -m pytest "$@"
