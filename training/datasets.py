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
    """Load dataset `name`; IDX/CIFAR files are looked up under data_root if given, else under
    $ORBIT_DATA_ROOT if set, else (fashion-mnist only) in Debian's folder."""
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
    """Folders that may hold the four IDX files: under the root the user named (--data-root or
    $ORBIT_DATA_ROOT) and nowhere else; only without one, Debian's folder for fashion-mnist."""
    if root is not None:
        roots = [root]
    else:
        roots = [FASHION_MNIST_DEBIAN] if name == "fashion-mnist" else []
    dirs: list[Path] = []
    for r in roots:
        # the root itself, torchvision's layout (root/FashionMNIST/raw) and root/<dataset name>
        dirs += [r, r / _IDX_FOLDERS[name] / "raw", r / name]
    return dirs


def _idx_file(stem: str, folder: Path) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _find_idx_folder(name: str, dirs: list[Path]) -> dict[str, Path]:
    """The four IDX files, all from the first folder that holds every one of them, so that a
    training split is never scored on another folder's test split."""
    stems = [stem for pair in _IDX_FILES.values() for stem in pair]
    best: tuple[Path, list[str]] | None = None
    for folder in dirs:
        found = {stem: _idx_file(stem, folder) for stem in stems}
        missing = [stem for stem, path in found.items() if path is None]
        if not missing:
            return found  # type: ignore[return-value]
        if len(missing) < len(stems) and best is None:
            best = (folder, missing)
    if best is not None:
        folder, missing = best
        raise UserError(
            f"{name}: {folder} holds only some of the IDX files (missing"
            f" {', '.join(m + '[.gz]' for m in missing)}); put all four in one folder"
        )
    searched = ", ".join(str(d) for d in dirs) or "(no folder: no --data-root given)"
    how = (
        "install it with `apt-get install dataset-fashion-mnist` or pass --data-root DIR"
        if name == "fashion-mnist"
        else "pass --data-root DIR (or set ORBIT_DATA_ROOT) to a folder with the IDX files"
    )
    raise UserError(
        f"{name}: IDX files {', '.join(stems)}[.gz] not found; searched {searched}; {how}"
    )


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


def _load_idx_split(name: str, images_path: Path, labels_path: Path) -> Split:
    images, labels = _read_idx(images_path, "images"), _read_idx(labels_path, "labels")
    if images.shape[0] != labels.shape[0]:
        raise UserError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has"
            f" {labels.shape[0]} labels; the files do not belong together"
        )
    if labels.numel() and (labels.min() < 0 or labels.max() > 9):
        raise UserError(f"{labels_path} holds labels outside 0..9; it is not an {name} label file")
    return Split(images.unsqueeze(1).float() / 255.0, labels)


def _load_idx(name: str, root: Path | None) -> DatasetSplits:
    files = _find_idx_folder(name, _idx_search_dirs(name, root))
    train = _load_idx_split(name, *(files[stem] for stem in _IDX_FILES["train"]))
    test = _load_idx_split(name, *(files[stem] for stem in _IDX_FILES["test"]))
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
