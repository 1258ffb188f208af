"""Loaders on fake data in the real on-disk formats; scenario builders; batched augmentation."""
import io
import os
import tarfile

import pytest
import torch

from aaa_fast.data import (DatasetError, build_scenario, class_balanced_subset, corrupt_labels, load_cifar,
                           load_fashion_mnist, make_long_tailed, random_crop_flip, split_meta)
from aaa_fast.data import datasets as ds
from aaa_fast.data.datasets import Dataset

from helpers import fake_cifar, fake_fashion_mnist, write_idx


def test_fashion_mnist_reads_idx_gz(tmp_path):
    root = fake_fashion_mnist(str(tmp_path), n_train=50, n_test=20)
    data = load_fashion_mnist(root)
    assert data.train_x.shape == (50, 1, 28, 28) and data.train_x.dtype == torch.uint8
    assert data.test_y.shape == (20,) and data.num_classes == 10
    assert int(data.train_x[0].float().mean()) > 0


@pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    data = load_fashion_mnist()
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.train_y).tolist() == [6000] * 10


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reads_pickle_batches(tmp_path, name):
    data = load_cifar(fake_cifar(str(tmp_path), name), name)
    n_train = 200 if name == "cifar10" else 40
    assert data.train_x.shape == (n_train, 3, 32, 32) and data.test_x.shape == (40, 3, 32, 32)
    assert data.num_classes == (10 if name == "cifar10" else 100)


def test_missing_data_says_where_and_how(tmp_path):
    with pytest.raises(DatasetError, match=r"no cifar-10-batches-py/ under .*Put cifar-10-python.tar.gz .*drop --no-download"):
        load_cifar(str(tmp_path), "cifar10")
    with pytest.raises(DatasetError, match="dataset-fashion-mnist"):
        load_fashion_mnist(str(tmp_path))


def test_corrupt_files_are_rejected(tmp_path):
    root = fake_fashion_mnist(str(tmp_path / "f"), n_train=20, n_test=10)
    path = os.path.join(root, "train-images-idx3-ubyte.gz")
    with open(path, "rb") as f:
        blob = f.read()
    with open(path, "wb") as f:
        f.write(blob[: len(blob) // 2])
    with pytest.raises(DatasetError, match="truncated|holds"):
        load_fashion_mnist(root)
    write_idx(path, torch.zeros(20, 32, 32, dtype=torch.uint8).numpy())  # wrong image size
    with pytest.raises(DatasetError, match=r"expected \(N, 28, 28\)"):
        load_fashion_mnist(root)
    write_idx(os.path.join(root, "train-labels-idx1-ubyte.gz"), [12] * 20)
    write_idx(path, torch.zeros(20, 28, 28, dtype=torch.uint8).numpy())
    with pytest.raises(DatasetError, match=r"labels must lie in \[0, 9\]"):
        load_fashion_mnist(root)
    croot = fake_cifar(str(tmp_path / "c"))
    with open(os.path.join(croot, "cifar-10-batches-py", "data_batch_3"), "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(DatasetError, match="data_batch_3 is not a CIFAR python batch"):
        load_cifar(croot)


def _archive_of(tmp_path):
    src = fake_cifar(str(tmp_path / "src"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(os.path.join(src, "cifar-10-batches-py"), arcname="cifar-10-batches-py")
    return buf.getvalue()


def test_download_checks_md5(tmp_path, monkeypatch):
    blob = _archive_of(tmp_path)
    archive = tmp_path / "served.tar.gz"
    archive.write_bytes(blob)
    monkeypatch.setitem(ds.CIFAR["cifar10"], "url", archive.as_uri())
    monkeypatch.setitem(ds.CIFAR["cifar10"], "md5", ds.md5_of(str(archive)))
    data = load_cifar(str(tmp_path / "dl"), "cifar10", download_missing=True)
    assert data.train_x.shape[0] == 200
    monkeypatch.setitem(ds.CIFAR["cifar10"], "md5", "0" * 32)
    with pytest.raises(DatasetError, match="md5 .* expected 0000"):
        load_cifar(str(tmp_path / "dl2"), "cifar10", download_missing=True)
    assert not os.path.exists(tmp_path / "dl2" / "cifar-10-python.tar.gz")  # a bad download is not kept


@pytest.mark.parametrize("has_data_filter", [True, False], ids=["tarfile-filter", "checked-by-hand"])
@pytest.mark.parametrize("member", ["../outside.txt", "link"])
def test_archive_members_outside_the_data_dir_are_refused(tmp_path, monkeypatch, has_data_filter, member):
    """Python < 3.11.4 lacks tarfile's "data" filter: the hand check refuses what the filter does."""
    if not has_data_filter:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    elif not hasattr(tarfile, "data_filter"):
        pytest.skip("this Python's tarfile has no data filter")
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tar:
        if member == "link":
            info = tarfile.TarInfo("link")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            info = tarfile.TarInfo(member)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(DatasetError, match="refusing to extract"):
        ds.extract_safely(str(archive), str(root))
    assert not (tmp_path / "outside.txt").exists() and not (root / "link").exists()


def test_archive_extracts_without_the_data_filter(tmp_path, monkeypatch):
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    archive = tmp_path / "good.tar.gz"
    archive.write_bytes(_archive_of(tmp_path))
    ds.extract_safely(str(archive), str(tmp_path / "out"))
    assert load_cifar(str(tmp_path / "out")).train_x.shape[0] == 200


def synthetic(n_per_class=100, classes=10):
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = torch.randint(0, 255, (y.shape[0], 1, 4, 4), dtype=torch.uint8)
    return Dataset("fashion-mnist", x, y, x[:10], y[:10], classes)


def test_meta_split_is_balanced_and_disjoint():
    y = torch.arange(10).repeat_interleave(50)
    meta, rest = split_meta(y, 100, 10, torch.Generator().manual_seed(0))
    assert torch.bincount(y[meta]).tolist() == [10] * 10
    assert set(meta.tolist()).isdisjoint(rest.tolist()) and len(meta) + len(rest) == 500


def test_long_tail_exact_counts():
    y = torch.arange(10).repeat_interleave(500)
    kept = make_long_tailed(y, 100.0, 10, torch.Generator().manual_seed(0))
    counts = sorted(torch.bincount(y[kept], minlength=10).tolist(), reverse=True)
    assert counts == [int(500 / 100 ** (r / 9)) for r in range(10)]  # 500, 299, ..., 5


def test_noise_transition_frequencies():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(10).repeat_interleave(4000)
    noisy, _ = corrupt_labels(y, "uniform", 0.4, 10, g)
    assert abs((noisy != y).float().mean().item() - 0.4 * 0.9) < 0.01  # a redraw can land on the true class
    flipped, targets = corrupt_labels(y, "flip1", 0.3, 10, g)
    changed = flipped != y
    assert abs(changed.float().mean().item() - 0.3) < 0.01
    assert torch.equal(flipped[changed], targets[y[changed], 0])
    two, targets2 = corrupt_labels(y, "flip2", 0.2, 10, g)
    for c in range(10):
        rows = two[y == c]
        for t in targets2[c].tolist():
            assert abs((rows == t).float().mean().item() - 0.1) < 0.02
        assert ((rows != c) & (rows != targets2[c, 0]) & (rows != targets2[c, 1])).sum() == 0
    with pytest.raises(ValueError, match=r"noise rate must be in \[0, 1\)"):
        corrupt_labels(y, "uniform", 1.0, 10, g)


def test_scenario_meta_untouched_by_noise_and_tail():
    data = synthetic()
    sc = build_scenario(data, num_meta=100, imbalance_factor=10, noise="uniform", noise_rate=0.5, seed=3)
    assert torch.bincount(sc.meta_y, minlength=10).tolist() == [10] * 10
    meta_rows = {tuple(r.flatten().tolist()) for r in sc.meta_x}
    assert not any(tuple(r.flatten().tolist()) in meta_rows for r in sc.train_x[:50])
    assert sc.info["actual_noise_rate"] > 0.3 and max(sc.info["true_class_counts"]) == 90
    again = build_scenario(data, num_meta=100, imbalance_factor=10, noise="uniform", noise_rate=0.5, seed=3)
    assert torch.equal(again.train_y, sc.train_y) and torch.equal(again.meta_x, sc.meta_x)


def test_class_balanced_subset_counts_and_determinism():
    y = torch.tensor([0] * 30 + [1] * 5 + [2] * 20)
    idx = class_balanced_subset(y, 30, 3, torch.Generator().manual_seed(1))
    assert torch.equal(idx, idx.sort().values) and idx.unique().numel() == idx.numel()
    assert torch.bincount(y[idx], minlength=3).tolist() == [10, 5, 10]  # class 1 has only 5: all kept
    assert torch.equal(idx, class_balanced_subset(y, 30, 3, torch.Generator().manual_seed(1)))
    assert not torch.equal(idx, class_balanced_subset(y, 30, 3, torch.Generator().manual_seed(2)))


def test_random_crop_flip_against_a_per_image_loop():
    x = torch.randint(0, 255, (6, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(x, pad=2, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # replay the draws: offsets y, offsets x, flips
    oy, ox = torch.randint(0, 5, (6,), generator=g), torch.randint(0, 5, (6,), generator=g)
    flips = torch.rand(6, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):
        crop = padded[i, :, oy[i]:oy[i] + 8, ox[i]:ox[i] + 8]
        assert torch.equal(out[i], crop.flip(2) if flips[i] else crop)
