"""Linear-SVM evaluation of learned codes on STL-10 (PAPER.md, "Autoencoder": features).

The protocol of the paper: a linear SVM on the 8-channel autoencoder code, trained on each of STL-10's 10
predefined training folds (``fold_indices.txt``, 1,000 images each) and tested on the 8,000 test images;
the mean and standard deviation of the 10 test accuracies are reported. Features are standardised (zero
mean, unit variance, statistics from the fold's training codes) before scikit-learn's ``LinearSVC``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from deepsim.data import iterate_eval, load_stl10, stl10_folds

__all__ = ["SVMResult", "fold_svm_accuracy", "encode_split", "stl10_svm_accuracy"]


@dataclass
class SVMResult:
    """Test accuracy (fraction in [0, 1]) over the training folds."""

    mean: float
    std: float
    fold_accuracies: list[float] = field(default_factory=list)
    C: float = 1.0
    train_per_fold: list[int] = field(default_factory=list)
    test_images: int = 0
    feature_dim: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def fold_svm_accuracy(
    train_codes: np.ndarray,
    train_labels: np.ndarray,
    folds: Sequence[np.ndarray],
    test_codes: np.ndarray,
    test_labels: np.ndarray,
    *,
    C: float = 1.0,
    max_iter: int = 10_000,
) -> SVMResult:
    """Train a standardised linear SVM on each fold of the training codes; test each on the test codes.

    Args:
        train_codes: (N_train, D) features; train_labels: (N_train,) class labels.
        folds: index arrays into the training codes, one per fold (STL-10: 10 folds of 1,000).
        test_codes: (N_test, D); test_labels: (N_test,).
        C: the SVM's regularisation constant (open; scikit-learn's default 1.0).

    Returns:
        :class:`SVMResult` with the mean and (population) standard deviation of the fold accuracies.
    """
    # lazy, optional dependency: scikit-learn may be absent
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    train_codes = np.asarray(train_codes, dtype=np.float64).reshape(len(train_codes), -1)
    test_codes = np.asarray(test_codes, dtype=np.float64).reshape(len(test_codes), -1)
    if train_codes.shape[1] != test_codes.shape[1]:
        raise ValueError(
            f"SVM: train codes have {train_codes.shape[1]} features, test codes {test_codes.shape[1]}"
        )
    if not folds:
        raise ValueError("SVM: no training folds given")
    accuracies, sizes = [], []
    for i, fold in enumerate(folds):
        fold = np.asarray(fold, dtype=np.int64)
        labels = np.asarray(train_labels)[fold]
        if len(np.unique(labels)) < 2:
            raise ValueError(
                f"SVM: training fold {i} has {len(np.unique(labels))} class(es), needs at least 2"
            )
        model = make_pipeline(StandardScaler(), LinearSVC(C=C, max_iter=max_iter))
        model.fit(train_codes[fold], labels)
        accuracies.append(float((model.predict(test_codes) == np.asarray(test_labels)).mean()))
        sizes.append(len(fold))
    return SVMResult(
        mean=float(np.mean(accuracies)),
        std=float(np.std(accuracies)),
        fold_accuracies=accuracies,
        C=C,
        train_per_fold=sizes,
        test_images=len(test_codes),
        feature_dim=train_codes.shape[1],
    )


@torch.no_grad()
def encode_split(
    encode: Callable[[torch.Tensor], torch.Tensor],
    folder: str | Path,
    split: str,
    *,
    crop_size: int = 96,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Codes of every image of an STL-10 split, in file order, and the split's labels.

    ``encode``: (B, 3, c, c) in [-1, 1] -> codes (B, ...), flattened here. ``crop_size``: the centre crop
    fed to the encoder (96 = the whole image). Returns (codes (N, D) float32, labels (N,) uint8).
    """

    _, labels = load_stl10(folder, split)
    if labels is None:
        raise ValueError(f"STL-10 split {split!r} has no labels; the SVM needs 'train' and 'test'")
    codes = [
        encode(batch).flatten(1).float().cpu()
        for batch in iterate_eval(
            folder, batch_size=batch_size, crop_size=crop_size, device=device, split=split
        )
    ]
    codes = torch.cat(codes).numpy()
    if len(codes) != len(labels):
        raise ValueError(
            f"{folder}: {len(codes)} {split} images were encoded, but there are {len(labels)} labels"
        )
    return codes, np.asarray(labels)


def stl10_svm_accuracy(
    encode: Callable[[torch.Tensor], torch.Tensor],
    folder: str | Path,
    *,
    crop_size: int = 96,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    C: float = 1.0,
) -> SVMResult:
    """The paper's protocol on an STL-10 binary folder (train_X/y.bin, test_X/y.bin, fold_indices.txt)."""

    folds = stl10_folds(folder)
    train_codes, train_labels = encode_split(
        encode, folder, "train", crop_size=crop_size, batch_size=batch_size, device=device
    )
    test_codes, test_labels = encode_split(
        encode, folder, "test", crop_size=crop_size, batch_size=batch_size, device=device
    )
    return fold_svm_accuracy(train_codes, train_labels, folds, test_codes, test_labels, C=C)
