"""The front of the data layer: :func:`build_loader` checks the arguments, places the stream at its cursor
and picks the loader. One way through::

    loader.py  ->  torch_loader.py (stores.py, workers.py)  |  dali.py  |  nvjpeg.py  |  resident.py
                        all four on sampling.py (the epoch schedule) and augment.py (crop parameters)

Every loader delivers the batch convention of :mod:`deepsim.data.convention` and reads the job's sample
stream as :mod:`deepsim.data.sampling` describes, so they are interchangeable mid-run: a checkpoint's
cursor resumes on any of them, at any world size.
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
        batch_size: B, samples per batch (per rank).
        crop_size: side of the square crop (64 for the autoencoder, 227 for inversion).
        mode: ``"crop"`` random crop (+ random horizontal mirror); ``"resize-crop"`` resize the shorter side
            to ``resize_size`` then random crop (+ mirror); ``"center"`` / ``"resize-center"`` the
            deterministic centre crop without mirror.
        mirror: random horizontal mirroring in the random modes (False: never mirror; the derived Caffe
            code does not mirror).
        loader: ``"torch"`` (PIL decode in DataLoader workers, :mod:`.torch_loader`), ``"dali"`` (NVIDIA
            DALI, nvJPEG on CUDA, :mod:`.dali`) or ``"nvjpeg"`` (torchvision's ``decode_jpeg`` on the
            device, :mod:`.nvjpeg`) or ``"resident"`` (the decoded data set kept as uint8 on ``device``,
            cropped there per batch, :mod:`.resident`; docs/loaders.md says which to use when).
        device, dtype, channels_last: where and how batches are delivered.
        seed: stream seed (epoch permutations, crops, mirror flags).
        start_sample: the global sample cursor to start at (a checkpoint's ``state_dict()["cursor"]``): the
            stream goes on exactly there, whatever world size wrote it. Takes precedence over ``start_step``.
        start_step: start at batch k of this world size (cursor k * num_shards * batch_size).
        shard_id, num_shards: this process's rank and the world size (torch.distributed).
        num_workers: DataLoader workers for lazily-decoded folders (torch), DALI threads, or file-reading
            threads (nvjpeg). Results do not depend on it.
        on_bad: ``"error"`` | ``"skip"`` | ``"pad"``: a corrupt or too-small image stops with its name, is
            skipped (counted in ``.skipped``), or (too small) is padded.
        split: STL-10 split (default ``"unlabeled"`` if present, else ``"train"``).
        resize_size: shorter side after resizing in the resize modes.
        cache, cache_bytes: torch only: force (True) or forbid (False) decoding everything into memory; None
            decides by size against ``cache_bytes``.
        static: DALI only: return the same preallocated tensor each step (for CUDA graphs).
        pad_channels: 3, or 4 / 8 to append zero channels (a first conv that streams 8- or 16-byte pixels,
            :class:`deepsim.networks.ConvLReLU`); torch and resident loaders, and DALI for 4.
        max_image_pixels: an image whose header declares more pixels is a bad image (``on_bad``), refused
            before it is decoded.

    Returns:
        a stream (:class:`~deepsim.data.torch_loader.BatchStream`, ``DaliBatchStream`` or
        ``NvjpegBatchStream``): ``next(stream)`` -> tensor (B, 3, crop, crop), RGB, values in [-1, 1]
        (``pixel / 127.5 - 1``), ``dtype``, on ``device``; ``stream.state_dict()`` is its position for a
        checkpoint; ``stream.close()`` stops its workers.

    Raises:
        DataError: bad arguments, empty folder, unreadable, too-small or too-large file with ``on_bad="error"``.
        Interrupted: a stop signal (SIGINT, SIGTERM, SIGHUP) arrived while the source was scanned.
    """
    if loader not in LOADERS:
        raise DataError(f"loader={loader!r}: expected one of {', '.join(LOADERS)}")
    spec = LoaderSpec(
        batch_size=batch_size, crop_size=crop_size, mode=mode, mirror=mirror, device=device, dtype=dtype, seed=seed,
        start_step=start_step, start_sample=start_sample, shard_id=shard_id, num_shards=num_shards,
        num_workers=num_workers, channels_last=channels_last, on_bad=on_bad, split=split, resize_size=resize_size,
        pad_channels=pad_channels, max_image_pixels=max_image_pixels,
    ).validate()  # fmt: skip
    if pad_channels not in (3, 4, 8) or (pad_channels > 3 and loader == "nvjpeg"):
        raise DataError(f"pad_channels={pad_channels} with loader={loader!r}: expected 3, 4 or 8 (3 for nvjpeg)")
    with interruptible():  # a long scan of the source ends on a stop signal
        if loader == "torch":
            return build_torch_loader(source, spec, cache=cache, cache_bytes=cache_bytes)
        if loader == "dali":
            return build_dali_loader(source, spec, static=static)
        if loader == "nvjpeg":
            return build_nvjpeg_loader(source, spec)
        return build_resident_loader(source, spec)
