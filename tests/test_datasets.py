"""Dataset loaders on real embedded data and on small IDX / CIFAR files written here."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from orbit.errors import UserError
from training.datasets import FASHION_MNIST_DEBIAN, load_dataset


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    """An IDX file (big-endian header, unsigned bytes) as MNIST distributes them."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += b"".join(struct.pack(">I", s) for s in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def write_mnist_like(root: Path, n_train: int = 60, n_test: int = 20, compress: bool = False):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    train_x = rng.integers(0, 256, (n_train, 28, 28))
    test_x = rng.integers(0, 256, (n_test, 28, 28))
    train_y, test_y = np.arange(n_train) % 10, np.arange(n_test) % 10
    write_idx(root / "train-images-idx3-ubyte", train_x, compress)
    write_idx(root / "train-labels-idx1-ubyte", train_y, compress)
    write_idx(root / "t10k-images-idx3-ubyte", test_x, compress)
    write_idx(root / "t10k-labels-idx1-ubyte", test_y, compress)
    return train_x, test_x


def check_splits(splits, shape):
    for split in (splits.train, splits.val, splits.test):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert tuple(split.x.shape[1:]) == shape
        assert float(split.x.min()) >= 0.0 and float(split.x.max()) <= 1.0
        assert len(split.x) == len(split.y) > 0


def test_digits_splits_are_fixed_disjoint_and_in_range():
    a, b = load_dataset("digits"), load_dataset("digits")
    check_splits(a, (1, 8, 8))
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert torch.equal(a.test.x, b.test.x) and a.fingerprint() == b.fingerprint()
    rows = {tuple(r.tolist()) for r in a.train.x.flatten(1)}
    overlap = sum(tuple(r.tolist()) in rows for r in a.test.x.flatten(1))
    assert overlap < 5  # digits has a few duplicate images; the index split is disjoint
    assert a.class_names == [str(i) for i in range(10)]


def test_synthetic_is_generated_in_memory():
    s = load_dataset("synthetic")
    check_splits(s, (1, 8, 8))
    assert s.num_classes == 10


@pytest.mark.parametrize("compress", [False, True])
def test_idx_loader_reads_written_files(tmp_path, compress):
    train_x, test_x = write_mnist_like(tmp_path, compress=compress)
    s = load_dataset("mnist", tmp_path)
    check_splits(s, (1, 28, 28))
    assert len(s.test) == 20 and len(s.train) + len(s.val) == 60
    # official test split, in file order, scaled to [0, 1]
    np.testing.assert_allclose(s.test.x[:, 0].numpy() * 255, test_x, atol=1e-3)


def test_idx_loader_finds_torchvision_layout_and_env_root(tmp_path, monkeypatch):
    write_mnist_like(tmp_path / "FashionMNIST" / "raw")
    monkeypatch.setenv("ORBIT_DATA_ROOT", str(tmp_path))
    s = load_dataset("fashion-mnist")
    assert s.class_names[0] == "T-shirt/top" and len(s.test) == 20


def test_truncated_idx_is_a_user_error(tmp_path):
    write_mnist_like(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_dataset("mnist", tmp_path)


def test_corrupt_gzip_idx_is_a_user_error(tmp_path):
    write_mnist_like(tmp_path, compress=True)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_dataset("mnist", tmp_path)


def test_gzip_corrupt_in_the_middle_is_a_user_error(tmp_path):
    write_mnist_like(tmp_path, compress=True)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[15:21] = bytes(b ^ 0xFF for b in data[15:21])  # zlib.error, not an EOFError
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_dataset("mnist", tmp_path)


def test_train_and_test_images_of_different_sizes_are_a_user_error(tmp_path):
    write_mnist_like(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((20, 32, 32)))
    with pytest.raises(UserError, match="do not belong to one dataset"):
        load_dataset("mnist", tmp_path)


def test_mismatched_idx_counts_are_a_user_error(tmp_path):
    write_mnist_like(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(59))
    with pytest.raises(UserError, match="do not belong together"):
        load_dataset("mnist", tmp_path)


def test_missing_files_name_the_searched_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("ORBIT_DATA_ROOT", raising=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as err:
        load_dataset("mnist", tmp_path / "empty")
    assert "searched" in str(err.value) and "empty" in str(err.value)
    assert "--data-root" in str(err.value)


def test_a_named_root_is_the_only_place_searched(tmp_path, monkeypatch):
    # An empty --data-root does not quietly fall back to Debian's real Fashion-MNIST.
    import training.datasets as ds

    debian = tmp_path / "debian"
    write_mnist_like(debian)
    monkeypatch.setattr(ds, "FASHION_MNIST_DEBIAN", debian)
    monkeypatch.delenv("ORBIT_DATA_ROOT", raising=False)
    (tmp_path / "mine").mkdir()
    with pytest.raises(UserError, match="not found; searched .*mine") as err:
        load_dataset("fashion-mnist", tmp_path / "mine")
    assert str(debian) not in str(err.value)
    assert len(load_dataset("fashion-mnist").test) > 0  # without a root, Debian's folder


def test_the_four_idx_files_come_from_one_folder(tmp_path):
    # A training pair in the root and a test pair elsewhere is refused, not mixed.
    write_mnist_like(tmp_path / "MNIST" / "raw")
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / "MNIST" / "raw" / name).rename(tmp_path / name)
    with pytest.raises(UserError, match="holds only some of the IDX files"):
        load_dataset("mnist", tmp_path)


def test_a_data_root_that_is_not_a_directory_is_named(tmp_path, monkeypatch):
    # No silent fallback to /usr/share/datasets when the folder the user named is a typo.
    with pytest.raises(UserError, match=r"--data-root .*nowhere is not a directory"):
        load_dataset("fashion-mnist", tmp_path / "nowhere")
    monkeypatch.setenv("ORBIT_DATA_ROOT", str(tmp_path / "gone"))
    with pytest.raises(UserError, match=r"\$ORBIT_DATA_ROOT .*gone is not a directory"):
        load_dataset("mnist")
    assert len(load_dataset("digits").test) == 359  # datasets without files ignore the root


def test_missing_fashion_mnist_says_how_to_install(tmp_path, monkeypatch):
    import training.datasets as ds

    monkeypatch.setattr(ds, "FASHION_MNIST_DEBIAN", tmp_path / "debian")
    monkeypatch.delenv("ORBIT_DATA_ROOT", raising=False)
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


def test_unknown_dataset():
    with pytest.raises(UserError, match="unknown dataset"):
        load_dataset("imagenet")


def write_cifar(root: Path, n: int = 6, payload: dict | None = None) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        entry = payload or {
            "data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
            "labels": [int(v) for v in rng.integers(0, 10, n)],
        }
        (folder / name).write_bytes(pickle.dumps(entry))


def test_cifar10_reads_the_python_format(tmp_path):
    write_cifar(tmp_path)
    s = load_dataset("cifar10", tmp_path)
    check_splits(s, (3, 32, 32))
    assert len(s.test) == 6 and len(s.train) + len(s.val) == 30


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar10_refuses_pickled_code(tmp_path):
    write_cifar(tmp_path, payload={"data": _Evil(), "labels": [0]})
    with pytest.raises(UserError, match="forbidden object"):
        load_dataset("cifar10", tmp_path)


def test_cifar10_labels_outside_the_classes_are_a_user_error(tmp_path):
    data = np.zeros((4, 3072), np.uint8)
    write_cifar(tmp_path, payload={"data": data, "labels": [0, 1, 12, -3]})
    with pytest.raises(UserError, match="labels outside 0..9"):
        load_dataset("cifar10", tmp_path)


def test_cifar10_without_root_says_what_to_do(monkeypatch):
    monkeypatch.delenv("ORBIT_DATA_ROOT", raising=False)
    with pytest.raises(UserError, match="--data-root"):
        load_dataset("cifar10")


def test_real_fashion_mnist_from_debian_package():
    """CI installs Debian's dataset-fashion-mnist (.ci/run); this reads the real gzipped files."""
    assert FASHION_MNIST_DEBIAN.is_dir(), "apt-get install dataset-fashion-mnist"
    s = load_dataset("fashion-mnist")
    assert len(s.train) + len(s.val) == 60000 and len(s.test) == 10000
    assert tuple(s.test.x.shape[1:]) == (1, 28, 28)
    assert torch.bincount(s.test.y).tolist() == [1000] * 10
