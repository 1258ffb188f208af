#!/usr/bin/env bash
# Sets up everything on a fresh machine (see setup_env.sh), compile-checks the CUDA kernels
# with nvcc, and runs the test suite: the fast tests by default (-m "not slow": every test but
# the end-to-end command-line runs), all of them with --all (what CI runs). Other arguments go to
# pytest.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
bash scripts/check_cuda_sources.sh
if [[ "${1:-}" == "--all" ]]; then
    shift
    python -m pytest "$@"
else
    python -m pytest -m "not slow" "$@"
fi
