import os

# Triton kernels run on CPU tensors through the interpreter; must be set before triton loads.
# On a GPU machine AAA_FAST_TESTS_ON_GPU=1 compiles them for the GPU instead (scripts/gpu_check.sh).
if not os.environ.get("AAA_FAST_TESTS_ON_GPU"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from aaa_fast import ops  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A small learnable fake Fashion-MNIST in the real IDX .gz format, for CLI runs."""
    from helpers import fake_fashion_mnist

    return fake_fashion_mnist(str(tmp_path_factory.mktemp("fmnist")), n_train=300, n_test=100)


@pytest.fixture(autouse=True)
def _default_backend():
    """Every test starts and ends with the default backend choice."""
    ops.set_backend(None)
    yield
    ops.set_backend(None)
