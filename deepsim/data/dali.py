"""NVIDIA DALI data path (``build_loader(..., loader="dali")``).

Batches follow the library convention: torch.Tensor (B, 3, c, c), RGB, float32 (or the requested dtype;
bfloat16 is a cast after DALI's float output), values in [-1, 1] = (pixel - 127.5) / 127.5 computed by
DALI's fused ``crop_mirror_normalize``, contiguous or channels_last (DALI writes HWC, which *is*
channels_last once viewed as NCHW), on the training device: CUDA when a GPU is used (JPEG decoding with
``fn.decoders.image(device="mixed")``, i.e. nvJPEG), the CPU in CPU mode (``device="cpu"``: the pipeline
is built with ``device_id=None`` and CPU decoders; this is how the tests run on machines without a GPU).

Pipelines:
  * image folders and the bundled photos: ``fn.readers.file`` over an explicit file list (sharded with
    ``shard_id``/``num_shards``, ``random_shuffle`` with a seeded shuffle buffer, ``pad_last_batch=False``:
    the reader wraps into the next epoch, so the infinite training stream has no partial batch) ->
    decode -> [``fn.resize(resize_shorter=...)``] -> ``crop_mirror_normalize`` with
    ``crop_pos_x/y = fn.random.uniform`` and ``mirror = fn.random.coin_flip``.
  * STL-10: ``fn.external_source`` yielding whole batches (one (B, 3, 96, 96) uint8 array plus the crop
    positions and mirror flags per batch; no per-image Python work) -> ``crop_mirror_normalize``. The
    sample order and crop parameters are the torch path's (:mod:`deepsim.data.augment`), so STL-10
    batches equal the torch loader's up to float rounding, and ``start_step`` is exact.

Determinism and resume. For STL-10, as above. For files, DALI's reader shuffles with a buffer (not the
torch path's full permutation) and DALI draws the crops, so batches differ from the torch path; a given
seed and thread count repeat the same stream. ``start_step=k`` cannot fast-forward DALI's reader without
decoding, so it re-seeds the reader and the augmentation with (seed, k): a resumed run sees a fresh,
reproducible stream, not the exact continuation. Use ``loader="torch"`` for bit-exact resume.

Bad input. DALI cannot skip a corrupt file inside the pipeline cheaply (a decode error stops it), so
the file list is pre-scanned before the pipeline starts: headers only, with PIL (format, size), or a
full decode when ``full_check=True`` (catches truncated data too; slower, same as ``deepsim data check``).
Per ``on_bad``: ``"error"`` raises :class:`DataError` naming the first bad file; ``"skip"`` drops bad files
and counts them in ``.skipped``; ``"pad"`` keeps images smaller than the crop and lets DALI zero-pad them
(``out_of_bounds_policy="pad"``). Grayscale, CMYK and alpha images are decoded to RGB by DALI.
Non-image files are ignored and counted in ``.ignored``.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from .augment import crop_params, splitmix64
from .errors import DataError
from .images import ImageReadError, probe_image, read_image
from .sources import resolve_source
from .torch_loader import MODES, ON_BAD, _Schedule

__all__ = ["DaliUnavailableError", "DaliBatchStream", "build_dali_loader", "prescan_files", "dali_available"]

_INSTALL_HINT = (
    "loader='dali' needs NVIDIA DALI: `pip install nvidia-dali-cuda130` (the PyPI name `nvidia-dali` is "
    "only a placeholder and does not install DALI); or use the PyTorch loader (`--loader torch`)"
)


class DaliUnavailableError(DataError, ImportError):
    """NVIDIA DALI cannot be imported."""


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _import_dali():
    try:
        import nvidia.dali as dali
        import nvidia.dali.plugin.pytorch as dali_torch
    except ImportError as e:
        raise DaliUnavailableError(f"{_INSTALL_HINT} ({e})") from e
    return dali, dali_torch


def prescan_files(
    paths, *, crop_size: int, resize: int | None, on_bad: str, full_check: bool = False
) -> tuple[list[str], list[str]]:
    """Sort files into (usable, bad) before a DALI pipeline starts.

    Headers only (PIL) unless ``full_check``. An image smaller than the crop (after the resize, if any)
    is bad unless ``on_bad="pad"``.

    Raises:
        DataError: with ``on_bad="error"``, naming the first bad file and what was expected.
    """
    good, bad = [], []
    for p in paths:
        try:
            w, h, _ = probe_image(p)
            if full_check:
                read_image(p)
        except ImageReadError as e:
            if on_bad == "error":
                raise DataError(str(e)) from e
            bad.append(str(p))
            continue
        if resize is not None:
            s = resize / min(w, h)
            w, h = round(w * s), round(h * s)
        if (w < crop_size or h < crop_size) and on_bad != "pad":
            if on_bad == "error":
                raise DataError(
                    f"{p}: image is {w}x{h}, expected at least {crop_size}x{crop_size} for the crop "
                    "(use on_bad='skip' or 'pad')"
                )
            bad.append(str(p))
            continue
        good.append(str(p))
    return good, bad


def _derived_seed(seed: int, start_step: int) -> int:
    if start_step == 0:
        return seed & 0x7FFFFFFF
    return int(splitmix64(np.uint64(seed) ^ splitmix64(np.uint64(start_step)))) & 0x7FFFFFFF


class _Stl10BatchSource:
    """external_source callback: batch ``start_step + iteration`` as one array plus crop parameters."""

    def __init__(self, array, schedule, batch_size, crop_size, seed, shard_id, start_step, random):
        self.array, self.schedule = array, schedule
        self.batch_size, self.crop_size = batch_size, crop_size
        self.seed, self.shard_id, self.start_step, self.random = seed, shard_id, start_step, random

    def __call__(self, info):
        t = self.start_step + info.iteration
        b = self.batch_size
        pos = np.arange(t * b, (t + 1) * b, dtype=np.int64)
        idx = self.schedule.indices(pos)
        order = np.argsort(idx, kind="stable")  # read the memmap in file order, then restore batch order
        images = np.empty((b, *self.array.shape[1:]), dtype=np.uint8)
        images[order] = self.array[idx[order]]  # (B, 3, 96, 96)
        _, _, h, w = self.array.shape
        hh = np.full(b, h, dtype=np.int64)
        ww = np.full(b, w, dtype=np.int64)
        oy, ox, flip = crop_params(self.seed, self.shard_id, pos, hh, ww, self.crop_size, self.random)
        # DALI's anchor is crop_pos * (extent - crop): pass the exact fractions.
        px = (ox / max(1, w - self.crop_size)).astype(np.float32)
        py = (oy / max(1, h - self.crop_size)).astype(np.float32)
        return images, px, py, flip.astype(np.int32)


class DaliBatchStream:
    """An infinite iterator of batches from a DALI pipeline; the same interface as ``BatchStream``.

    Attributes:
        steps_per_epoch, num_samples, samples_per_shard, skipped, ignored, step: as in BatchStream.
        static: when True, ``next()`` copies into one preallocated tensor and returns that same tensor
            object every step (for CUDA graphs); the caller must use it before the next call.
    """

    def __init__(
        self,
        pipe,
        *,
        batch_size,
        device,
        dtype,
        channels_last,
        static,
        num_samples,
        samples_per_shard,
        skipped,
        ignored,
        start_step,
        source_name,
    ):
        _, dali_torch = _import_dali()
        self._feed_ndarray = dali_torch.feed_ndarray
        self._pipe = pipe
        self.batch_size = batch_size
        self.device, self.dtype, self.channels_last, self.static = (
            torch.device(device),
            dtype,
            channels_last,
            static,
        )
        self.num_samples, self.samples_per_shard = num_samples, samples_per_shard
        self.steps_per_epoch = max(1, math.ceil(samples_per_shard / batch_size))
        self.skipped, self.ignored = skipped, ignored
        self.step = start_step
        self.source = source_name
        self._raw = None  # float32 buffer in DALI's layout (B, 3, c, c) or (B, c, c, 3)
        self._out = None  # the tensor returned when static

    @property
    def epoch(self) -> float:
        return self.step * self.batch_size / max(1, self.samples_per_shard)

    def __iter__(self):
        return self

    def _raw_buffer(self, shape):
        if self._raw is None or tuple(self._raw.shape) != tuple(shape) or not self.static:
            self._raw = torch.empty(shape, dtype=torch.float32, device=self.device)
        return self._raw

    def __next__(self) -> torch.Tensor:
        if self._pipe is None:
            raise StopIteration
        try:
            (out,) = self._pipe.run()
        except RuntimeError as e:
            # A file that passed the header-only pre-scan failed to decode (e.g. truncated data).
            raise DataError(
                f"{self.source}: the DALI pipeline failed to decode a file (files are pre-scanned by header "
                "only; run `deepsim data check` on the folder, or build with full_check=True): "
                + str(e).strip().splitlines()[-1][:500]
            ) from e
        dense = out.as_tensor()  # (B, 3, c, c) or (B, c, c, 3), float32
        raw = self._raw_buffer(dense.shape())
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else None
        self._feed_ndarray(dense, raw, cuda_stream=stream)
        x = raw.permute(0, 3, 1, 2) if self.channels_last else raw  # HWC buffer == channels_last NCHW
        self.step += 1
        if not self.static:
            return x if self.dtype == torch.float32 else x.to(self.dtype)
        if self._out is None:
            if self.dtype == torch.float32:
                self._out = x  # the raw buffer itself: fixed storage, one tensor object
            else:
                fmt = torch.channels_last if self.channels_last else torch.contiguous_format
                self._out = torch.empty(x.shape, dtype=self.dtype, device=self.device, memory_format=fmt)
        if self._out.data_ptr() != x.data_ptr():  # fp32: x is a new view of the same buffer, no copy
            self._out.copy_(x)
        return self._out

    def close(self) -> None:
        """Release the pipeline (and its threads / GPU memory). Idempotent."""
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            del pipe

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (
            f"DaliBatchStream(source={self.source!r}, num_samples={self.num_samples}, "
            f"batch_size={self.batch_size}, device={self.device}, step={self.step}, skipped={self.skipped})"
        )


def build_dali_loader(
    source,
    *,
    batch_size: int,
    crop_size: int = 64,
    mode: str = "crop",
    device="cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    start_step: int = 0,
    shard_id: int = 0,
    num_shards: int = 1,
    num_workers: int = 0,
    channels_last: bool = False,
    on_bad: str = "error",
    split: str | None = None,
    resize_size: int = 256,
    static: bool = False,
    full_check: bool = False,
    prefetch: int = 2,
) -> DaliBatchStream:
    """Build a DALI batch stream; arguments as :func:`deepsim.data.build_loader`, plus:

    Args:
        num_workers: DALI CPU threads (0 = min(4, cpu count)).
        static: return one preallocated tensor every step (CUDA graphs).
        full_check: pre-scan by fully decoding every file instead of reading headers.
        prefetch: DALI prefetch queue depth.

    Returns:
        :class:`DaliBatchStream` yielding (B, 3, c, c) tensors in [-1, 1] on ``device``.

    Raises:
        DaliUnavailableError: DALI is not installed (says what to pip install).
        DataError: bad arguments or bad input (see the module docstring).
    """
    dali, _ = _import_dali()
    from nvidia.dali import fn, pipeline_def, types

    if mode not in MODES:
        raise DataError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
    if on_bad not in ON_BAD:
        raise DataError(f"on_bad={on_bad!r}: expected one of {', '.join(ON_BAD)}")
    if not 0 <= shard_id < num_shards:
        raise DataError(f"shard_id={shard_id}, num_shards={num_shards}: expected 0 <= shard_id < num_shards")
    device = torch.device(device)
    if device.type == "cuda":
        device_id = device.index if device.index is not None else torch.cuda.current_device()
        device = torch.device("cuda", device_id)
    elif device.type == "cpu":
        device_id = None
    else:
        raise DataError(f"device={device}: the DALI loader delivers to 'cpu' or 'cuda[:i]'")
    gpu = device_id is not None
    resize = resize_size if mode.startswith("resize") else None
    random = mode in ("crop", "resize-crop")
    threads = num_workers if num_workers > 0 else max(1, min(4, os.cpu_count() or 1))
    layout = "HWC" if channels_last else "CHW"
    norm = dict(mean=[127.5] * 3, std=[127.5] * 3, dtype=types.FLOAT, output_layout=layout)
    src = resolve_source(source, split)
    pipe_seed = _derived_seed(seed + 7919 * shard_id, start_step)
    pipeline_options = dict(
        batch_size=batch_size,
        num_threads=threads,
        device_id=device_id,
        seed=pipe_seed,
        prefetch_queue_depth=prefetch,
    )

    if src.kind == "stl10":
        if resize is not None:
            raise DataError(
                f"{src.location}: mode {mode!r} is not offered for STL-10 on the DALI path; use 'crop'/'center'"
            )
        if crop_size > src.array.shape[2]:
            raise DataError(
                f"{src.location}: STL-10 images are 96x96, expected crop_size <= 96 (got {crop_size})"
            )
        schedule = _Schedule(src.array.shape[0], seed, shard_id, num_shards, src.name)
        feed = _Stl10BatchSource(
            src.array, schedule, batch_size, crop_size, seed, shard_id, start_step, random
        )

        @pipeline_def(**pipeline_options)
        def stl10_pipeline():
            images, px, py, mirror = fn.external_source(
                source=feed,
                num_outputs=4,
                batch=True,
                batch_info=True,
                layout=["CHW", "", "", ""],
                dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT32],
            )
            if gpu:
                images = images.gpu()
            return fn.crop_mirror_normalize(
                images, crop=(crop_size, crop_size), crop_pos_x=px, crop_pos_y=py, mirror=mirror, **norm
            )

        pipe = stl10_pipeline()
        num_samples, per_shard, skipped, ignored = schedule.n, schedule.per_shard, 0, 0
    else:
        files, bad = prescan_files(
            src.paths, crop_size=crop_size, resize=resize, on_bad=on_bad, full_check=full_check
        )
        if not files:
            raise DataError(
                f"{src.name}: all {len(src.paths)} image files are unusable (corrupt or smaller than the crop)"
            )
        if len(files) < num_shards:
            raise DataError(
                f"{src.name}: {len(files)} usable images cannot be split over {num_shards} shards"
            )

        @pipeline_def(**pipeline_options)
        def file_pipeline():
            encoded, _ = fn.readers.file(
                files=files,
                shard_id=shard_id,
                num_shards=num_shards,
                random_shuffle=random,
                seed=pipe_seed,
                pad_last_batch=False,
                stick_to_shard=False,
                name="Reader",
            )
            images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
            if resize is not None:
                images = fn.resize(images, resize_shorter=resize, antialias=True)
            if random:
                pos = dict(
                    crop_pos_x=fn.random.uniform(range=(0.0, 1.0)),
                    crop_pos_y=fn.random.uniform(range=(0.0, 1.0)),
                    mirror=fn.random.coin_flip(probability=0.5),
                )
            else:
                pos = dict(crop_pos_x=0.5, crop_pos_y=0.5, mirror=0)
            return fn.crop_mirror_normalize(
                images,
                crop=(crop_size, crop_size),
                out_of_bounds_policy="pad" if on_bad == "pad" else "error",
                fill_values=0.0,
                **pos,
                **norm,
            )

        pipe = file_pipeline()
        num_samples = len(files)
        # DALI shards are contiguous chunks of the list: shard s holds N*(s+1)//S - N*s//S files.
        per_shard = num_samples * (shard_id + 1) // num_shards - num_samples * shard_id // num_shards
        skipped, ignored = len(bad), len(src.non_images)
    pipe.build()
    return DaliBatchStream(
        pipe,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        channels_last=channels_last,
        static=static,
        num_samples=num_samples,
        samples_per_shard=per_shard,
        skipped=skipped,
        ignored=ignored,
        start_step=start_step,
        source_name=src.name,
    )
