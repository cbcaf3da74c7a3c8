"""Data loading for DeePSiM: bundled photos, image folders (ImageNet layout), STL-10 binaries.

Every loader delivers batches as torch.Tensor (B, 3, H, W), RGB, contiguous (or channels_last when
asked), float32 (or the requested dtype, e.g. bfloat16), values in [-1, 1] = ``pixel / 127.5 - 1``, on
the requested device. See :mod:`deepsim.data.torch_loader` for the deterministic sample schedule and
:mod:`deepsim.data.dali` for the NVIDIA DALI path (``loader="dali"``).
"""

from .check import CheckReport, check_images, format_report
from .errors import DataError
from .photos import bundled_photo_paths
from .stl10 import load_stl10, stl10_folds
from .torch_loader import MODES, BatchStream, build_loader, iterate_eval, to_model_batch

__all__ = [
    "DataError",
    "bundled_photo_paths",
    "build_loader",
    "iterate_eval",
    "BatchStream",
    "MODES",
    "to_model_batch",
    "load_stl10",
    "stl10_folds",
    "CheckReport",
    "check_images",
    "format_report",
]
