"""STL-10 binary format reader (https://cs.stanford.edu/~acoates/stl10/).

Files in the folder (any subset):
    unlabeled_X.bin   N x 3 x 96 x 96 uint8 (N = 100,000 in the release)
    train_X.bin, train_y.bin   5,000 images, labels 1..10 (uint8)
    test_X.bin,  test_y.bin    8,000 images, labels 1..10 (uint8)
    fold_indices.txt  10 lines of space-separated 0-based indices into train

Each image is stored column-major (MATLAB order): 3 planes of 96 x 96 in Fortran order, so the
row-major view is ``raw.reshape(N, 3, 96, 96).transpose(0, 1, 3, 2)`` (a view, no copy).
Files are memory-mapped; nothing is decoded per image.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from .errors import DataError

__all__ = ["STL10_SIZE", "STL10_SPLITS", "is_stl10_folder", "load_stl10", "stl10_folds"]

STL10_SIZE = 96
_IMAGE_BYTES = 3 * STL10_SIZE * STL10_SIZE  # 27,648
STL10_SPLITS = ("unlabeled", "train", "test")
_RELEASE_COUNTS = {"unlabeled": 100_000, "train": 5_000, "test": 8_000}


def is_stl10_folder(folder: os.PathLike | str) -> bool:
    """True when ``folder`` holds ``unlabeled_X.bin`` or ``train_X.bin``."""
    folder = pathlib.Path(folder)
    return folder.is_dir() and any((folder / f"{s}_X.bin").is_file() for s in ("unlabeled", "train"))


def default_split(folder: os.PathLike | str) -> str:
    """``"unlabeled"`` when present (the paper's autoencoder training set), else ``"train"``."""
    return "unlabeled" if (pathlib.Path(folder) / "unlabeled_X.bin").is_file() else "train"


def load_stl10(folder: os.PathLike | str, split: str = "unlabeled") -> tuple[np.ndarray, np.ndarray | None]:
    """Memory-map one STL-10 split.

    Args:
        folder: the folder holding the ``*_X.bin`` files.
        split: ``"unlabeled"``, ``"train"`` or ``"test"``.

    Returns:
        (images, labels): images is a read-only uint8 view of shape (N, 3, 96, 96) in (C, H, W) order
        (not contiguous: it is the transposed memory map); labels is a uint8 array (N,) with values
        1..10, or None for ``"unlabeled"``.

    Raises:
        DataError: unknown split, missing file, or a file whose size does not match the format
            (a truncated download); the message names the file and the expected size.
    """
    if split not in STL10_SPLITS:
        raise DataError(f"STL-10 split {split!r}: expected one of {', '.join(STL10_SPLITS)}")
    folder = pathlib.Path(folder)
    x_path = folder / f"{split}_X.bin"
    if not x_path.is_file():
        raise DataError(f"{x_path}: file not found, expected the STL-10 {split} images")
    nbytes = x_path.stat().st_size
    if nbytes == 0 or nbytes % _IMAGE_BYTES:
        raise DataError(
            f"{x_path}: {nbytes} bytes, expected a non-zero multiple of {_IMAGE_BYTES} "
            f"(N x 3 x 96 x 96 uint8; the release has N = {_RELEASE_COUNTS[split]}, "
            f"{_RELEASE_COUNTS[split] * _IMAGE_BYTES} bytes): truncated or not an STL-10 file"
        )
    n = nbytes // _IMAGE_BYTES
    raw = np.memmap(x_path, dtype=np.uint8, mode="r", shape=(n, 3, STL10_SIZE, STL10_SIZE))
    images = raw.transpose(0, 1, 3, 2)  # Fortran order per plane -> (N, C, H, W) view
    labels = None
    if split != "unlabeled":
        y_path = folder / f"{split}_y.bin"
        if not y_path.is_file():
            raise DataError(f"{y_path}: file not found, expected {n} STL-10 labels (uint8, 1..10)")
        if y_path.stat().st_size != n:
            raise DataError(
                f"{y_path}: {y_path.stat().st_size} bytes, expected {n} (one uint8 label per image "
                f"in {x_path.name})"
            )
        labels = np.fromfile(y_path, dtype=np.uint8)
        if labels.min() < 1 or labels.max() > 10:
            raise DataError(f"{y_path}: labels in [{labels.min()}, {labels.max()}], expected 1..10")
    return images, labels


def stl10_folds(folder: os.PathLike | str) -> list[np.ndarray]:
    """The 10 predefined training folds from ``fold_indices.txt``.

    Returns:
        list of 10 int64 arrays of 0-based indices into the ``train`` split.

    Raises:
        DataError: missing file, not 10 lines, a non-integer, or an index outside the train split.
    """
    path = pathlib.Path(folder) / "fold_indices.txt"
    if not path.is_file():
        raise DataError(f"{path}: file not found, expected 10 lines of 0-based train indices")
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if len(lines) != 10:
        raise DataError(f"{path}: {len(lines)} non-empty lines, expected 10 (one fold per line)")
    try:
        folds = [np.array(ln.split(), dtype=np.int64) for ln in lines]
    except ValueError as e:
        raise DataError(f"{path}: expected space-separated integers ({e})") from e
    train_x = pathlib.Path(folder) / "train_X.bin"
    if train_x.is_file():
        n_train = train_x.stat().st_size // _IMAGE_BYTES
        for i, f in enumerate(folds):
            if f.size and (f.min() < 0 or f.max() >= n_train):
                raise DataError(f"{path}: fold {i} has indices outside [0, {n_train}) of {train_x.name}")
    return folds
