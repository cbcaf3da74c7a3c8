"""The front of the data layer: :func:`build_loader` checks the arguments once (a :class:`LoaderSpec`),
and hands the spec to the loader's builder (torch, dali, nvjpeg or resident).

Every loader delivers :mod:`deepsim.data.convention`'s batches in :mod:`deepsim.data.sampling`'s order, so a
checkpoint's cursor resumes on any of them, at any world size.
"""

from __future__ import annotations

import os

import torch

from .dali import build_dali_loader
from .errors import DataError
from .images import DEFAULT_MAX_IMAGE_PIXELS
from .interrupt import interruptible
from .nvjpeg import build_nvjpeg_loader
from .resident import build_resident_loader
from .sampling import LOADERS
from .spec import LoaderSpec
from .stores import DEFAULT_CACHE_BYTES
from .torch_loader import build_torch_loader

__all__ = ["build_loader"]


def build_loader(
    source: str | os.PathLike,
    *,
    batch_size: int,
    crop_size: int = 64,
    mode: str = "crop",
    mirror: bool = True,
    loader: str = "torch",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    start_step: int = 0,
    start_sample: int | None = None,
    shard_id: int = 0,
    num_shards: int = 1,
    num_workers: int = 0,
    channels_last: bool = False,
    on_bad: str = "error",
    split: str | None = None,
    resize_size: int = 256,
    cache: bool | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    static: bool = False,
    pad_channels: int = 3,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
):
    """Build an infinite, deterministic, sharded, resumable stream of training batches.

    Args:
        source: ``"photos"`` (bundled photographs), a folder of images (flat or ImageNet
            ``train/<wnid>/*.JPEG``, searched recursively), or an STL-10 binary folder.
        loader: ``"torch"`` (PIL decode in DataLoader workers), ``"dali"`` (NVIDIA DALI, nvJPEG on CUDA),
            ``"nvjpeg"`` (torchvision's ``decode_jpeg`` on the device) or ``"resident"`` (the decoded data
            set kept as uint8 on ``device``); docs/loaders.md says which to use when.
        cache, cache_bytes: torch only: force (True) or forbid (False) decoding everything into memory; None
            decides by size against ``cache_bytes``.
        static: DALI only: return the same preallocated tensor each step (for CUDA graphs).
        the others: the fields of :class:`~deepsim.data.spec.LoaderSpec` (documented there).

    Returns:
        a stream (:class:`~deepsim.data.sampling.ScheduledStream`): ``next(stream)`` -> tensor (B, 3, crop,
        crop), RGB, values in [-1, 1] (``pixel / 127.5 - 1``), ``dtype``, on ``device``;
        ``stream.state_dict()`` is its position for a checkpoint; ``stream.close()`` stops its workers.

    Raises:
        DataError: bad arguments, empty folder, unreadable, too-small or too-large file (``on_bad="error"``).
        Interrupted: a stop signal (SIGINT, SIGTERM, SIGHUP) arrived while the source was scanned.
    """
    if loader not in LOADERS:
        raise DataError(f"loader={loader!r}: expected one of {', '.join(LOADERS)}")
    spec = LoaderSpec.from_arguments(locals()).validate()  # every field of it is an argument here
    _check_pad_channels(pad_channels, loader)
    with interruptible():  # a long scan of the source ends on a stop signal
        if loader == "torch":
            return build_torch_loader(source, spec, cache=cache, cache_bytes=cache_bytes)
        if loader == "dali":
            return build_dali_loader(source, spec, static=static)
        if loader == "nvjpeg":
            return build_nvjpeg_loader(source, spec)
        return build_resident_loader(source, spec)


def _check_pad_channels(pad_channels: int, loader: str) -> None:
    """DataError for a channel count the loader cannot deliver (3, 4 or 8; nvjpeg: 3)."""
    if pad_channels not in (3, 4, 8) or (pad_channels > 3 and loader == "nvjpeg"):
        raise DataError(
            f"pad_channels={pad_channels} with loader={loader!r}: expected 3, 4 or 8 (3 for nvjpeg)"
        )
