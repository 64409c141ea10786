"""Datasets as in-memory float32 NCHW tensors in [0, 1], with fixed seeded train/val/test splits.

Every loader returns a `DatasetSplits`; the test split is the official one where the dataset has
one. Splits never depend on the training seed, so every model of a run sees the same test set.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from orbit.errors import UserError

DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10", "synthetic")
SPLIT_SEED = 20230101  # fixed: the split is part of the dataset's definition, not of a run
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


@dataclass(frozen=True)
class Split:
    """Images x (float32, N x C x H x W, values in [0, 1]) and integer labels y (int64, N)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def dataset(self) -> torch.utils.data.TensorDataset:
        return torch.utils.data.TensorDataset(self.x, self.y)


@dataclass(frozen=True)
class DatasetSplits:
    name: str
    train: Split
    val: Split
    test: Split
    class_names: list[str]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images: the model's normalisation layer."""
        x = self.train.x
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
        return mean.tolist(), std.tolist()

    def fingerprint(self) -> str:
        """SHA-256 of the training images and labels: ties a model to the exact data it saw."""
        h = hashlib.sha256(self.name.encode())
        h.update(self.train.x.contiguous().numpy().tobytes())
        h.update(self.train.y.contiguous().numpy().tobytes())
        return h.hexdigest()


def load_dataset(name: str, data_root: str | os.PathLike | None = None) -> DatasetSplits:
    """Load dataset `name`; IDX/CIFAR files are looked up under data_root, then $ORBIT_DATA_ROOT."""
    loaders: dict[str, Callable[[Path | None], DatasetSplits]] = {
        "digits": lambda _root: _load_digits(),
        "synthetic": lambda _root: _load_synthetic(),
        "fashion-mnist": lambda root: _load_idx("fashion-mnist", root),
        "mnist": lambda root: _load_idx("mnist", root),
        "cifar10": _load_cifar10,
    }
    if name not in loaders:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    root = data_root if data_root is not None else os.environ.get("ORBIT_DATA_ROOT") or None
    if root is not None and name not in ("digits", "synthetic") and not Path(root).is_dir():
        where = "--data-root" if data_root is not None else "$ORBIT_DATA_ROOT"
        raise UserError(f"{where} {root} is not a directory; point it at the {name} files")
    return loaders[name](Path(root) if root is not None else None)


# --- splitting -------------------------------------------------------------------------------


def _permutation(n: int, salt: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(SPLIT_SEED + salt)
    return torch.randperm(n, generator=gen)


def _split_off_val(
    name: str, train: Split, test: Split, names: list[str], n_val: int
) -> DatasetSplits:
    """Official train/test: hold out a seeded validation set from the training split."""
    perm = _permutation(len(train))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    return DatasetSplits(
        name=name,
        train=Split(train.x[train_idx], train.y[train_idx]),
        val=Split(train.x[val_idx], train.y[val_idx]),
        test=test,
        class_names=names,
    )


def _three_way(name: str, x: torch.Tensor, y: torch.Tensor, names: list[str]) -> DatasetSplits:
    """No official test split: 70/10/20 seeded train/val/test."""
    perm = _permutation(len(y))
    n_test, n_val = len(y) // 5, len(y) // 10
    test_idx, val_idx, train_idx = (
        perm[:n_test],
        perm[n_test : n_test + n_val],
        perm[n_test + n_val :],
    )
    return DatasetSplits(
        name=name,
        train=Split(x[train_idx], y[train_idx]),
        val=Split(x[val_idx], y[val_idx]),
        test=Split(x[test_idx], y[test_idx]),
        class_names=names,
    )


# --- digits and synthetic ----------------------------------------------------------------------


def _load_digits() -> DatasetSplits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    return _three_way("digits", x, y, [str(c) for c in bunch.target_names])


def _load_synthetic(n: int = 1500, classes: int = 10, size: int = 8) -> DatasetSplits:
    """Noisy class prototypes: learnable in seconds, no files; for tests and smoke runs."""
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    prototypes = torch.rand(classes, 1, size, size, generator=gen)
    y = torch.arange(n) % classes
    noise = 0.25 * torch.randn(n, 1, size, size, generator=gen)
    x = (prototypes[y] + noise).clamp(0.0, 1.0)
    return _three_way("synthetic", x, y, [f"class{c}" for c in range(classes)])


# --- IDX (MNIST, Fashion-MNIST) ------------------------------------------------------------------

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_FOLDERS = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}


def _idx_search_dirs(name: str, root: Path | None) -> list[Path]:
    roots = [root] if root is not None else []
    if name == "fashion-mnist":
        roots.append(FASHION_MNIST_DEBIAN)
    dirs: list[Path] = []
    for r in roots:
        # the root itself, torchvision's layout (root/FashionMNIST/raw) and root/<dataset name>
        dirs += [r, r / _IDX_FOLDERS[name] / "raw", r / name]
    return dirs


def _find_idx(stem: str, dirs: list[Path]) -> Path | None:
    for d in dirs:
        for candidate in (d / stem, d / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _read_idx(path: Path, kind: str) -> torch.Tensor:
    """Read one IDX file (gzipped or not) with torchvision's reader; corrupt file: user error."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    reader = read_image_file if kind == "images" else read_label_file
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
            with tempfile.NamedTemporaryFile(suffix=".idx") as tmp:
                tmp.write(raw)
                tmp.flush()
                return reader(tmp.name)
        return reader(str(path))
    except (
        OSError, EOFError, zlib.error, AssertionError, RuntimeError, TypeError, ValueError, KeyError
    ) as e:  # fmt: skip
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"{path} is truncated or corrupt ({detail}); replace it with an intact copy"
        ) from None


def _load_idx_split(name: str, split: str, dirs: list[Path], root: Path | None) -> Split:
    paths = []
    for stem in _IDX_FILES[split]:
        p = _find_idx(stem, dirs)
        if p is None:
            searched = ", ".join(str(d) for d in dirs) or "(no directory)"
            how = (
                "install it with `apt-get install dataset-fashion-mnist` or pass --data-root DIR"
                if name == "fashion-mnist"
                else "pass --data-root DIR (or set ORBIT_DATA_ROOT) to a folder with the IDX files"
            )
            raise UserError(f"{name}: {stem}[.gz] not found; searched {searched}; {how}")
        paths.append(p)
    images, labels = _read_idx(paths[0], "images"), _read_idx(paths[1], "labels")
    if images.shape[0] != labels.shape[0]:
        raise UserError(
            f"{paths[0]} has {images.shape[0]} images but {paths[1]} has {labels.shape[0]} labels;"
            " the files do not belong together"
        )
    if labels.numel() and (labels.min() < 0 or labels.max() > 9):
        raise UserError(f"{paths[1]} holds labels outside 0..9; it is not an {name} label file")
    return Split(images.unsqueeze(1).float() / 255.0, labels)


def _load_idx(name: str, root: Path | None) -> DatasetSplits:
    dirs = _idx_search_dirs(name, root)
    train = _load_idx_split(name, "train", dirs, root)
    test = _load_idx_split(name, "test", dirs, root)
    if train.x.shape[1:] != test.x.shape[1:]:
        raise UserError(
            f"{name}: training images are {tuple(train.x.shape[2:])} but test images are"
            f" {tuple(test.x.shape[2:])}; the IDX files do not belong to one dataset"
        )
    names = FASHION_CLASSES if name == "fashion-mnist" else [str(i) for i in range(10)]
    return _split_off_val(name, train, test, names, n_val=min(5000, len(train) // 10))


# --- CIFAR-10 (torchvision's python format) -----------------------------------------------------


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR's python format is a pickle; only let through what that format needs (no code)."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden object {module}.{name} in a CIFAR file")


def _read_cifar_file(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            entry = _CifarUnpickler(f, encoding="latin1").load()
        if not isinstance(entry, dict):
            raise ValueError("not a dictionary")
        return entry
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{path} is not a readable CIFAR-10 batch file ({e})") from None


def _load_cifar10(root: Path | None) -> DatasetSplits:
    from torchvision.datasets import CIFAR10  # file names and layout of the official format

    if root is None:
        raise UserError(
            "cifar10 needs --data-root DIR (or ORBIT_DATA_ROOT) holding"
            f" {CIFAR10.base_folder}/ from {CIFAR10.url}"
        )
    folder = root / CIFAR10.base_folder
    if not folder.is_dir() and (root / CIFAR10.train_list[0][0]).is_file():
        folder = root

    def read(files: list[list[str]]) -> Split:
        xs, ys = [], []
        for file_name, _md5 in files:
            path = folder / file_name
            if not path.is_file():
                raise UserError(
                    f"cifar10: {path} not found; extract {CIFAR10.filename} from {CIFAR10.url}"
                    f" into {root}"
                )
            entry = _read_cifar_file(path)
            data = np.asarray(entry.get("data"))
            labels = entry.get("labels", entry.get("fine_labels"))
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels is None:
                raise UserError(f"{path} does not hold 32x32 RGB CIFAR images with labels")
            if len(labels) != data.shape[0]:
                raise UserError(f"{path} has {data.shape[0]} images but {len(labels)} labels")
            if any(not 0 <= int(v) < len(CIFAR10_CLASSES) for v in labels):
                raise UserError(f"{path} holds labels outside 0..9; it is not a CIFAR-10 batch")
            xs.append(data.reshape(-1, 3, 32, 32))
            ys.extend(int(v) for v in labels)
        x = torch.from_numpy(np.concatenate(xs)).float() / 255.0
        return Split(x, torch.tensor(ys, dtype=torch.int64))

    train, test = read(CIFAR10.train_list), read(CIFAR10.test_list)
    return _split_off_val(
        "cifar10", train, test, CIFAR10_CLASSES, n_val=min(5000, len(train) // 10)
    )
