import os

# Triton kernels run on CPU tensors through the interpreter; must be set before triton loads.
if not os.environ.get("CUDA_VISIBLE_DEVICES_FOR_TESTS"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from aaa_fast import ops  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A small learnable fake Fashion-MNIST in the real IDX .gz format, for CLI runs."""
    from fake_data import fake_fashion_mnist

    return fake_fashion_mnist(str(tmp_path_factory.mktemp("fmnist")), n_train=300, n_test=100)


@pytest.fixture(autouse=True)
def _default_backend():
    """Every test starts and ends with the default backend choice."""
    ops.set_backend(None)
    yield
    ops.set_backend(None)


def backends_here() -> list[str]:
    return ops.available_backends()


def devices_for(backend: str) -> list[torch.device]:
    devs = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [d for d in devs if ops.backends.backend_supports(backend, d)]


BACKEND_DEVICES = [(b, d) for b in backends_here() for d in devices_for(b)]
BACKEND_DEVICE_IDS = [f"{b}-{d.type}" for b, d in BACKEND_DEVICES]
