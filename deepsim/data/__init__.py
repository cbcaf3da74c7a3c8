"""Data loading for DeePSiM: bundled photos, image folders (ImageNet layout), STL-10 binaries.

Every loader delivers batches as torch.Tensor (B, 3, H, W), RGB, contiguous (or channels_last when
asked), float32 (or the requested dtype, e.g. bfloat16), values in [-1, 1] = ``pixel / 127.5 - 1``, on
the requested device (:mod:`deepsim.data.convention`). :func:`build_loader` (:mod:`deepsim.data.loader`)
picks the loader: the PyTorch path (:mod:`deepsim.data.torch_loader`), NVIDIA DALI (:mod:`deepsim.data.dali`),
GPU JPEG decoding (:mod:`deepsim.data.nvjpeg`) or the data set resident on the device
(:mod:`deepsim.data.resident`); all four follow the epoch schedule of
:mod:`deepsim.data.sampling` (deterministic, sharded, resumable at a sample cursor at any world size).
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
