# Sourced by scripts/test.sh and scripts/demo.sh: a ready virtual environment in .venv with
# torch, the test tools and aaa_fast built from this checkout, and Fashion-MNIST (the demo's data,
# and the real data of the attack-strength tests). Safe to run again.
#   TORCH_SPEC   what to install torch as (default torch==2.13.0, the local CPU build here;
#                on a CUDA machine install your CUDA torch first and set TORCH_SPEC=torch)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi
pip_q() { python -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
# numpy with torch, so that torch is never imported without it (torch warns "Failed to initialize NumPy")
python -c "import numpy, torch" 2>/dev/null || pip_q "${TORCH_SPEC:-torch==2.13.0}" "numpy>=1.23"
python -c "import torch" || { echo "setup: torch failed to install" >&2; exit 1; }
pip_q -r requirements-dev.txt
# torchattacks (a test oracle) asks for torchvision, which has no CPU build here and is unused
python -c "import torchattacks" 2>/dev/null || pip_q --no-deps torchattacks requests
# Ray: the study runner's engine (the 'study' extra), tested on a real local and two-node cluster
python -c "import ray" 2>/dev/null || pip_q "ray>=2.9"
# --no-build-isolation: compile against the torch installed above, not a fresh download
so=$(ls aaa_fast/_C*.so 2>/dev/null | head -n 1 || true)
if [ -z "$so" ] || [ -n "$(find csrc setup.py -newer "$so" -print -quit)" ]; then
    echo "setup: building aaa_fast._C"
    python -m pip install -q --disable-pip-version-check --no-build-isolation -e . 2>&1 | grep -v "^WARNING: Location" || true
fi
python -c "import aaa_fast._C" || { echo "setup: the native extension failed to build" >&2; exit 1; }
fmnist=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$fmnist" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: Fashion-MNIST is missing; installing Debian's system package dataset-fashion-mnist (~30 MB) with apt-get"
        { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 ||
            echo "setup: could not install dataset-fashion-mnist; the tests on real data are skipped" >&2
    else
        echo "setup: Fashion-MNIST not found; install Debian's dataset-fashion-mnist (the tests on real data are skipped)" >&2
    fi
fi
