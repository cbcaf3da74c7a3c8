"""Evaluation of trained DeePSiM generators (``deepsim eval``).

* :mod:`.evaluate` -- the normalized Euclidean reconstruction error on a test set, per checkpoint, and the
  per-layer table for inversion runs.
* :mod:`.svm` -- the linear SVM on autoencoder codes, STL-10's 10 training folds, tested on the test set.
* :mod:`.tables` -- Markdown and JSON tables.
"""

from .evaluate import LAYER_ORDER, evaluate_checkpoint, evaluate_checkpoints, reconstruction_error
from .svm import SVMResult, encode_split, fold_svm_accuracy, stl10_svm_accuracy
from .tables import markdown_table, write_table

__all__ = [
    "LAYER_ORDER",
    "reconstruction_error",
    "evaluate_checkpoint",
    "evaluate_checkpoints",
    "SVMResult",
    "fold_svm_accuracy",
    "encode_split",
    "stl10_svm_accuracy",
    "markdown_table",
    "write_table",
]
