"""What several test files share: small fake datasets written in the real on-disk formats
(CIFAR pickle batches, IDX .gz), the quick CLI settings and environment of the end-to-end runs,
and the (backend, device) pairs this machine can test."""
import gzip
import os
import pickle
import struct

import numpy as np
import torch

from aaa_fast import ops

# a 2-epoch CLI run on the fake Fashion-MNIST of conftest's data_dir: seconds on one CPU thread
QUICK = ["--dataset", "fashion-mnist", "--arch", "small-cnn", "--epochs", "2", "--batch-size", "64",
         "--steps", "2", "--num-meta", "50", "--meta-batch-size", "20", "--meta-every", "2", "--eval-steps", "2",
         "--eval-subset", "50", "--lr", "0.05", "--progress", "lines", "--device", "cpu"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def devices_for(backend: str) -> list[torch.device]:
    devs = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [d for d in devs if ops.backends.backend_supports(backend, d)]


BACKEND_DEVICES = [(b, d) for b in ops.available_backends() for d in devices_for(b)]
BACKEND_DEVICE_IDS = [f"{b}-{d.type}" for b, d in BACKEND_DEVICES]


def write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def fake_fashion_mnist(root, n_train=300, n_test=100, seed=0):
    """Learnable fake: class c has a bright horizontal band at rows 2c..2c+3."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = np.arange(n) % 10
        rng.shuffle(y)
        x = rng.integers(0, 60, size=(n, 28, 28))
        for i, c in enumerate(y):
            x[i, 2 * c + 2:2 * c + 6, :] += 180
        write_idx(os.path.join(root, f"{split}-images-idx3-ubyte.gz"), x.clip(0, 255))
        write_idx(os.path.join(root, f"{split}-labels-idx1-ubyte.gz"), y)
    return root


def fake_cifar(root, name="cifar10", per_batch=40, seed=0):
    rng = np.random.default_rng(seed)
    classes = 10 if name == "cifar10" else 100
    folder = os.path.join(root, "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    key = b"labels" if name == "cifar10" else b"fine_labels"
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if name == "cifar10" else ["train", "test"]
    for f in files:
        y = (np.arange(per_batch) % classes).tolist()
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        with open(os.path.join(folder, f), "wb") as fh:
            pickle.dump({b"data": data, key: y, b"batch_label": f.encode()}, fh)
    return root
