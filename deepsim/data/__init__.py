"""Data loading for DeePSiM: bundled photos, image folders (ImageNet layout), STL-10 binaries.

:func:`build_loader` builds an infinite, deterministic, sharded, resumable stream of training batches
(:mod:`deepsim.data.convention`: (B, 3, H, W), RGB, ``pixel / 127.5 - 1``); :func:`iterate_eval` the finite
evaluation batches. docs/loaders.md says which loader to use when and how they are built.
"""

from .check import CheckReport, check_images, format_report
from .convention import to_model_batch
from .errors import DataError
from .evaluation import iterate_eval
from .loader import build_loader
from .photos import bundled_photo_paths
from .sampling import LOADERS, MODES
from .stl10 import load_stl10, stl10_folds
from .torch_loader import BatchStream

__all__ = [
    "DataError",
    "bundled_photo_paths",
    "build_loader",
    "iterate_eval",
    "BatchStream",
    "MODES",
    "LOADERS",
    "to_model_batch",
    "load_stl10",
    "stl10_folds",
    "CheckReport",
    "check_images",
    "format_report",
]
