"""CIFAR-10/100 (official python-pickle layout) and Fashion-MNIST (IDX .gz) as uint8 tensors.

Every loader returns a `Dataset` of uint8 images (N, C, H, W) and int64 labels for the train and
test splits. A missing or malformed directory raises `DatasetError` saying where it looked, what
it expected and how to get the data; `download=True` fetches the official archive and checks its
md5 before using it.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# label names in label order, for plots (CIFAR-100's 100 fine labels are shown as numbers)
CLASS_NAMES = {
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}

CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
                    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    md5="c58f30108f718f92721af3b95e74349a", classes=10, label_key=b"labels",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"]),
    "cifar100": dict(folder="cifar-100-python", archive="cifar-100-python.tar.gz",
                     url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     md5="eb9058c3a382ffc7106e4002c42a8d85", classes=100, label_key=b"fine_labels",
                     train=["train"], test=["test"]),
}
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = {  # file -> md5 of the official download
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
# normalisation constants (a layer inside the model; inputs stay in [0, 1])
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
}
DATASETS = ("cifar10", "cifar100", "fashion-mnist")


class DatasetError(RuntimeError):
    """Data missing or malformed; the message says where it looked and how to get it."""


@dataclass
class Dataset:
    name: str
    train_x: Tensor  # uint8 (N, C, H, W)
    train_y: Tensor  # int64 (N,)
    test_x: Tensor
    test_y: Tensor
    num_classes: int

    @property
    def mean_std(self):
        return STATS[self.name]

    def fingerprint(self) -> str:
        """A digest of the images and labels: what a resumed run must see again, wherever the
        files now live."""
        digest = hashlib.sha256(self.name.encode())
        for t in (self.train_x, self.train_y, self.test_x, self.test_y):
            digest.update(t.contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def md5_of(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: str, md5: str) -> None:
    """Fetch url to dest, rejecting a file whose md5 differs. Nothing is created under dest's
    directory unless the whole, checked file arrived (it is fetched into a temporary file first)."""
    fd, tmp = tempfile.mkstemp(suffix=".part")
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                shutil.copyfileobj(response, out)
        except OSError as exc:  # URLError, timeouts, a connection cut mid-way
            reason = getattr(exc, "reason", None) or exc
            raise DatasetError(f"cannot download {url} ({reason}). Without network, fetch that file elsewhere and "
                               f"put it at {os.path.abspath(dest)}") from None
        got = md5_of(tmp)
        if got != md5:
            raise DatasetError(f"download of {url} has md5 {got}, expected {md5}: corrupt or wrong file, not used")
        os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
        part = dest + ".part"
        shutil.move(tmp, part)  # then an atomic rename on dest's own file system
        os.replace(part, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def extract_safely(archive: str, root: str) -> None:
    """Extract a tar archive under `root`, refusing members that are not plain files or folders
    inside it (tarfile's "data" filter; checked by hand on Pythons before 3.11.4, which lack it)."""
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            try:
                tar.extractall(root, filter="data")
            except tarfile.FilterError as exc:
                raise DatasetError(f"refusing to extract {archive}: {exc}") from None
            return
        base = os.path.realpath(root)
        for member in tar.getmembers():
            target = os.path.realpath(os.path.join(root, member.name))
            if not (member.isfile() or member.isdir()) or os.path.commonpath([base, target]) != base:
                raise DatasetError(f"refusing to extract {archive}: {member.name!r} is not a plain file or "
                                   f"folder inside {root}")
        tar.extractall(root)


def load_cifar(root: str, name: str = "cifar10", *, download_missing: bool = False) -> Dataset:
    """CIFAR-10/100 from `root`/cifar-10-batches-py (or cifar-100-python), the official layout."""
    spec = CIFAR[name]
    folder = os.path.join(root, spec["folder"])
    if not os.path.isdir(folder):
        if not download_missing:
            raise DatasetError(f"{name}: no {spec['folder']}/ under {os.path.abspath(root)}. Put {spec['archive']} "
                               f"(from {spec['url']}) in that directory, or extract it there, or drop --no-download "
                               "to fetch it (md5-checked).")
        archive = os.path.join(root, spec["archive"])
        if not (os.path.exists(archive) and md5_of(archive) == spec["md5"]):
            download(spec["url"], archive, spec["md5"])
        extract_safely(archive, root)

    def read(files):
        xs, ys = [], []
        for f in files:
            path = os.path.join(folder, f)
            try:
                with open(path, "rb") as fh:
                    batch = pickle.load(fh, encoding="bytes")
                data = np.asarray(batch[b"data"], dtype=np.uint8)
                labels = np.asarray(batch[spec["label_key"]], dtype=np.int64)
            except FileNotFoundError:
                raise DatasetError(f"{name}: missing {path}; the directory must hold {files}") from None
            except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
                raise DatasetError(f"{name}: {path} is not a CIFAR python batch ({exc!r}); re-extract the archive") from None
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
                raise DatasetError(f"{name}: {path} holds data of shape {data.shape} and {labels.shape[0]} labels; "
                                   "expected (N, 3072) 32x32 RGB rows and N labels")
            xs.append(data.reshape(-1, 3, 32, 32))
            ys.append(labels)
        x, y = torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))
        check_labels_in_range(name, y, spec["classes"])
        return x, y

    train_x, train_y = read(spec["train"])
    test_x, test_y = read(spec["test"])
    return Dataset(name, train_x, train_y, test_x, test_y, spec["classes"])


def check_labels_in_range(name: str, y: Tensor, classes: int) -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise DatasetError(f"{name}: labels must lie in [0, {classes - 1}], found [{int(y.min())}, {int(y.max())}]")


def read_idx(path: str, expected_dims: int) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy uint8 array."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise
    except (OSError, EOFError) as exc:
        raise DatasetError(f"{path}: unreadable ({exc}); the file is truncated or not gzip") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    dims = raw[3]
    if dims != expected_dims:
        raise DatasetError(f"{path}: IDX file with {dims} dimensions, expected {expected_dims}")
    shape = struct.unpack(">" + "I" * dims, raw[4:4 + 4 * dims])
    body = raw[4 + 4 * dims:]
    if len(body) != int(np.prod(shape)):
        raise DatasetError(f"{path}: header says shape {shape} ({int(np.prod(shape))} bytes), file holds {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def load_fashion_mnist(root: str = FASHION_MNIST_DIR, *, download_missing: bool = False) -> Dataset:
    """Fashion-MNIST from the four IDX .gz files (Debian's dataset-fashion-mnist puts them in
    /usr/share/datasets/fashion-mnist)."""
    missing = [f for f in FASHION_MNIST_FILES if not os.path.exists(os.path.join(root, f))]
    if missing and not download_missing:
        raise DatasetError(f"fashion-mnist: {missing} not found under {os.path.abspath(root)}. Install Debian's "
                           "dataset-fashion-mnist package (files go to /usr/share/datasets/fashion-mnist), or pass "
                           "--download to fetch the official files (md5-checked).")
    for f in missing:
        download(FASHION_MNIST_URL + f, os.path.join(root, f), FASHION_MNIST_FILES[f])
    arrays = {f: read_idx(os.path.join(root, f), 3 if "images" in f else 1) for f in FASHION_MNIST_FILES}
    out = []
    for split in ("train", "t10k"):
        x = arrays[f"{split}-images-idx3-ubyte.gz"]
        y = arrays[f"{split}-labels-idx1-ubyte.gz"].astype(np.int64)
        if x.shape[1:] != (28, 28) or x.shape[0] != y.shape[0]:
            raise DatasetError(f"fashion-mnist {split}: images of shape {x.shape} and {y.shape[0]} labels; "
                               "expected (N, 28, 28) and N labels")
        x_t, y_t = torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y)
        check_labels_in_range("fashion-mnist", y_t, 10)
        out += [x_t, y_t]
    return Dataset("fashion-mnist", *out, num_classes=10)


def load_dataset(name: str, root: str | None = None, *, download_missing: bool = False) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    if name == "fashion-mnist":
        return load_fashion_mnist(root or FASHION_MNIST_DIR, download_missing=download_missing)
    return load_cifar(root or "./data", name, download_missing=download_missing)
