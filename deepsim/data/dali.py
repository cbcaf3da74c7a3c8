"""The NVIDIA DALI data path (``build_loader(..., loader="dali")``), on the shared epoch schedule.

Batches follow :mod:`deepsim.data.convention` on the CPU (CPU decoders, ``device_id=None``) or on CUDA
(nvJPEG). Sample order, crops and resume points are the torch path's; on PNG files and STL-10 the batches
equal the torch loader's. Files are pre-scanned by header before the pipeline starts
(:func:`deepsim.data.images.scan_image_files`; ``full_check=True`` decodes them fully): ``on_bad="error"``
raises :class:`DataError` naming the first bad file, ``"skip"`` drops bad files (``.skipped``), ``"pad"``
zero-pads images smaller than the crop, centred. A file that passes the header scan but fails to decode
stops the stream with a :class:`DataError`. EXIF orientation is ignored. Design: docs/loaders.md ("DALI").
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib.metadata
import warnings

import numpy as np
import torch

from .augment import crop_params
from .errors import DataError
from .images import scan_image_files
from .sampling import EpochSchedule, RankSchedule, ScheduledStream
from .sources import resolve_source
from .spec import LoaderSpec

__all__ = [
    "DaliUnavailableError",
    "DaliBatchStream",
    "build_dali_loader",
    "dali_available",
    "gpu_roi_decode_ok",
    "nvimgcodec_version",
    "roi_windows",
    "use_roi_decode",
]

HW_DECODER_LOAD = 0.65  # share of JPEGs the A100/H100 hardware decoder takes (DALI's default and sweet spot)

_INSTALL_HINT = (
    "loader='dali' needs NVIDIA DALI: `pip install nvidia-dali-cuda130` (the PyPI name `nvidia-dali` is "
    "only a placeholder and does not install DALI); or use the PyTorch loader (`--loader torch`)"
)


class DaliUnavailableError(DataError, ImportError):
    """NVIDIA DALI cannot be imported."""


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401 -- optional dependency: DALI
    except ImportError:
        return False
    return True


def _import_dali():
    try:  # optional dependency: DALI
        import nvidia.dali as dali
        import nvidia.dali.plugin.pytorch as dali_torch
    except ImportError as e:
        raise DaliUnavailableError(f"{_INSTALL_HINT} ({e})") from e
    return dali, dali_torch


def crop_anchors(offsets: np.ndarray, extents: np.ndarray, crop_size: int) -> np.ndarray:
    """DALI's ``crop_pos`` (anchor = crop_pos * (extent - crop)) for integer ``offsets``: float32 fractions
    nudged by a quarter pixel, so that DALI lands on the same pixel whether it rounds or truncates. An image
    no larger than the crop (padded) is centred."""
    room = extents - crop_size
    frac = np.minimum(1.0, (offsets + 0.25) / np.maximum(room, 1))
    return np.where(room > 0, frac, 0.5).astype(np.float32)


def nvimgcodec_version() -> str | None:
    """The installed nvImageCodec wheel's version (DALI decodes through it), or None."""
    for dist in importlib.metadata.distributions():
        if (dist.metadata["Name"] or "").lower().startswith("nvidia-nvimgcodec"):
            return dist.version
    return None


def gpu_roi_decode_ok(version: str | None) -> bool:
    """False for nvImageCodec 0.9.0.*, whose GPU JPEG ROI decode fails on in-bounds windows (INTERNAL_ERROR or
    SIGSEGV; a bug of that release, NVIDIA/nvImageCodec#55; 0.8.0 works)."""
    return not (version or "").startswith("0.9.0")


def use_roi_decode(roi: bool, gpu: bool) -> bool:
    """Whether to decode crops only: ``roi``, unless the GPU decoder is nvImageCodec 0.9.0 (a warning says so
    and the whole images are decoded)."""
    version = nvimgcodec_version()
    if roi and gpu and not gpu_roi_decode_ok(version):
        warnings.warn(
            f"nvImageCodec {version}: its GPU ROI decode fails in 0.9.0 (NVIDIA/nvImageCodec#55); the "
            "DALI loader "
            "decodes whole images and crops them (install another nvImageCodec version to decode only the "
            "crops)",
            stacklevel=3,
        )
        return False
    return roi


def roi_windows(oy, ox, heights, widths, source_heights, source_widths, crop_size: int):
    """The part of each file to decode for a crop at (oy, ox) of the (resized) image.

    Without a resize (source size == size) the window is the crop itself, clipped to an image smaller than the
    crop (which the crop step then pads, centred). With one, it is the crop mapped back to the file's pixels,
    widened by the antialiasing filter's reach, and ``roi`` is the crop's exact sub-pixel extent inside it.

    Returns:
        (anchor, shape, roi_start, roi_end): int32 (B, 2) and float32 (B, 2), each (y, x) / (h, w).
    """
    size = np.stack([heights, widths], 1).astype(np.int64)  # (B, 2)
    source = np.stack([source_heights, source_widths], 1).astype(np.int64)
    offset = np.stack([oy, ox], 1).astype(np.int64)
    if (size == source).all():
        start = np.where(size < crop_size, 0, offset)
        shape = np.minimum(size, crop_size)
        return (
            start.astype(np.int32),
            shape.astype(np.int32),
            np.zeros_like(start, np.float32),
            shape.astype(np.float32),
        )
    # fn.resize(resize_shorter=r) scales both axes by r / shorter side; the longer side's output is rounded
    # and
    # the input extent shrunk (or grown) to match, centred (DALI's subpixel_scale)
    scale = np.repeat((size.min(1) / source.min(1))[:, None], 2, axis=1)  # resized pixels per file pixel
    origin = (source - size / scale) / 2  # (B, 2) file coordinate of the resized image's corner
    lo, hi = origin + offset / scale, origin + (offset + crop_size) / scale
    reach = np.ceil(1.0 / np.minimum(scale, 1.0)).astype(np.int64) + 1
    start = np.maximum(0, np.floor(lo).astype(np.int64) - reach)
    end = np.minimum(source, np.ceil(hi).astype(np.int64) + reach)
    return (
        start.astype(np.int32),
        (end - start).astype(np.int32),
        (lo - start).astype(np.float32),
        (hi - start).astype(np.float32),
    )


class _Feed:
    """The schedule part every external_source callback shares: positions and sample indices of batch t."""

    def __init__(self, *, schedule: EpochSchedule, spec: LoaderSpec):
        self.plan = RankSchedule(schedule, spec.cursor, spec.shard_id, spec.num_shards, spec.batch_size)
        self.crop_size, self.seed, self.random, self.mirror = (
            spec.crop_size,
            spec.seed,
            spec.random,
            spec.mirror,
        )

    def positions(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        return self.plan.batch(t)

    def anchors(self, pos, heights, widths):
        """(crop_pos_x, crop_pos_y, mirror) for DALI, from the shared crop parameters."""
        c = self.crop_size
        oy, ox, flip = crop_params(
            self.seed, pos, np.maximum(heights, c), np.maximum(widths, c), c, self.random, self.mirror
        )
        return crop_anchors(ox, widths, c), crop_anchors(oy, heights, c), flip.astype(np.int32)


class _Stl10Feed(_Feed):
    """external_source callback: batch t as one (B, 3, 96, 96) array plus its crop anchors."""

    def __init__(self, array, **kw):
        super().__init__(**kw)
        self.array = array

    def __call__(self, info):
        pos, idx = self.positions(info.iteration)
        order = np.argsort(idx, kind="stable")  # read the memmap in file order, then restore batch order
        images = np.empty((len(idx), *self.array.shape[1:]), dtype=np.uint8)
        images[order] = self.array[idx[order]]  # (B, 3, 96, 96)
        _, _, h, w = self.array.shape
        px, py, mirror = self.anchors(pos, np.full(len(idx), h), np.full(len(idx), w))
        return images, px, py, mirror


class _FileFeed(_Feed):
    """external_source callback: the encoded bytes of batch t's files plus their crop anchors; with
    ``source_sizes`` (ROI decode) also each file's decode window (:func:`roi_windows`).

    DALI calls it on the thread that runs the pipeline (the training loop's): the files of the next
    ``ahead`` batches are read by a thread pool meanwhile, so the call only collects reads already done.
    """

    def __init__(self, files, sizes, threads, source_sizes=None, resize=False, ahead: int = 2, **kw):
        super().__init__(**kw)
        self.resize = resize  # ROI decode: also give the window's resampling extent
        self.files, self.sizes = files, sizes  # sizes: (N, 2) (height, width) after the resize
        self.source_sizes = source_sizes  # (N, 2) in the files, or None: decode whole files
        self.pool = concurrent.futures.ThreadPoolExecutor(max(1, threads))
        self.ahead = ahead
        self._reads: dict[int, list[concurrent.futures.Future]] = {}  # iteration -> its files' reads

    def _read(self, i: int) -> np.ndarray:
        return np.fromfile(self.files[i], dtype=np.uint8)

    def _submit(self, t: int) -> None:
        if t not in self._reads:
            _, idx = self.positions(t)
            self._reads[t] = [self.pool.submit(self._read, int(i)) for i in idx]

    def __call__(self, info):
        t = info.iteration
        pos, idx = self.positions(t)
        for later in range(t, t + 1 + self.ahead):
            self._submit(later)
        encoded = [future.result() for future in self._reads.pop(t)]
        for stale in [k for k in self._reads if k < t]:  # an iteration DALI will not ask for again
            del self._reads[stale]
        h, w = self.sizes[idx, 0], self.sizes[idx, 1]
        if self.source_sizes is None:
            px, py, mirror = self.anchors(pos, h, w)
            return encoded, px, py, mirror
        c = self.crop_size
        oy, ox, flip = crop_params(
            self.seed, pos, np.maximum(h, c), np.maximum(w, c), c, self.random, self.mirror
        )
        anchor, shape, roi_start, roi_end = roi_windows(
            oy, ox, h, w, self.source_sizes[idx, 0], self.source_sizes[idx, 1], c
        )
        centre = np.full(
            len(idx), 0.5, dtype=np.float32
        )  # the window is the crop (or smaller: pad it, centred)
        resampled = (roi_start, roi_end) if self.resize else ()
        return (encoded, anchor, shape, *resampled, centre, centre, flip.astype(np.int32))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class DaliBatchStream(ScheduledStream):
    """An infinite iterator of batches from a DALI pipeline; the same interface as ``BatchStream``.

    Attributes:
        cursor, step, epoch, state_dict(), num_samples, samples_per_shard, steps_per_epoch, skipped,
            ignored: as in BatchStream.
        static: when True, ``next()`` copies into one preallocated tensor and returns that same tensor
            object every step (for CUDA graphs); the caller must use it before the next call.
    """

    _REPR = ("num_samples", "batch_size", "device", "cursor", "skipped")

    def __init__(
        self,
        pipe,
        feed,
        schedule: EpochSchedule,
        spec: LoaderSpec,
        *,
        static: bool,
        skipped: int,
        ignored: int,
        source: str,
    ):
        _, dali_torch = _import_dali()
        super().__init__(schedule, spec, source=source, ignored=ignored)
        self._feed_ndarray = dali_torch.feed_ndarray
        self._pipe, self._feed = pipe, feed
        self.static, self.skipped = static, skipped
        self._raw = None  # float32 buffer in DALI's layout (B, 3, c, c) or (B, c, c, 3)
        self._out = None  # the tensor returned when static

    def _raw_buffer(self, shape):
        if self._raw is None or tuple(self._raw.shape) != tuple(shape) or not self.static:
            self._raw = torch.empty(shape, dtype=torch.float32, device=self.device)
        return self._raw

    def _next_batch(self) -> torch.Tensor:
        try:
            (out,), stream = self._run_pipe()
        except RuntimeError as e:
            # A file that passed the header-only pre-scan failed to decode (e.g. truncated data).
            raise DataError(
                f"{self.source}: the DALI pipeline failed to decode a file (files are pre-scanned by header "
                "only; run `deepsim data check` on the folder, or build with full_check=True): "
                + str(e).strip().splitlines()[-1][:500]
            ) from e
        self._take_positions()  # the feed computed the same positions for this iteration
        dense = out.as_tensor()  # (B, 3, c, c) or (B, c, c, 3), float32
        raw = self._raw_buffer(dense.shape())
        self._feed_ndarray(dense, raw, cuda_stream=stream)
        x = raw.permute(0, 3, 1, 2) if self.channels_last else raw  # HWC buffer == channels_last NCHW
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

    def _run_pipe(self):
        """One pipeline run, its outputs ordered on the current CUDA stream (no host wait on DALI's event);
        the CPU: host-synchronous. Returns (outputs, the stream handle or None)."""
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else None
        return self._pipe.run(stream), stream

    def _release(self) -> None:
        self._pipe = None  # its threads and GPU memory go with it
        feed, self._feed = self._feed, None
        if feed is not None and hasattr(feed, "close"):
            feed.close()


def build_dali_loader(
    source,
    spec: LoaderSpec | None = None,
    *,
    static: bool = False,
    full_check: bool = False,
    prefetch: int = 2,
    roi: bool = True,
    hw_decoder_load: float = HW_DECODER_LOAD,
    **fields,
) -> DaliBatchStream:
    """Build a DALI batch stream of ``spec`` (or of its keyword ``fields``, checked here); arguments as
    :func:`deepsim.data.build_loader`, plus:

    Args:
        num_workers: DALI CPU threads and file-reading threads (0 = min(4, cpu count)).
        static: return one preallocated tensor every step (CUDA graphs).
        full_check: pre-scan by fully decoding every file instead of reading headers.
        prefetch: DALI prefetch queue depth.
        roi: image files: decode only each crop's window (``fn.decoders.image_slice``), not the whole file.
            Off on the GPU with nvImageCodec 0.9.0 (:func:`gpu_roi_decode_ok`; a warning says so). In the
            resize modes the window is resized to the crop, which gives pixels close to but not equal to
            resizing the whole image first (docs/loaders.md).
        hw_decoder_load: share of JPEGs sent to the GPU's hardware JPEG decoder (mixed backend only).
        pad_channels: 3, or 4 for a batch with a zero fourth channel (``crop_mirror_normalize(pad_output)``).

    Returns:
        :class:`DaliBatchStream` yielding (B, 3, c, c) tensors in [-1, 1] on ``device``.

    Raises:
        DaliUnavailableError: DALI is not installed (says what to pip install).
        DataError: bad input (see the module docstring).
    """
    spec = LoaderSpec.of(spec, fields)
    _import_dali()
    spec = dataclasses.replace(spec, device=_dali_device(spec.device))
    gpu = spec.device.type == "cuda"
    if spec.pad_channels not in (3, 4):
        raise DataError(
            f"pad_channels={spec.pad_channels}: the DALI loader pads to 4 channels only (or 3: none)"
        )
    if not 0.0 <= hw_decoder_load <= 1.0:
        raise DataError(f"hw_decoder_load={hw_decoder_load}: expected a share in [0, 1]")
    roi = use_roi_decode(roi, gpu)
    src = resolve_source(source, spec.split)
    feed, skipped, ignored = _feed(src, spec, roi=roi, full_check=full_check)
    encoded = src.kind != "stl10"
    roi = roi and encoded
    options = _pipeline_options(spec, prefetch)
    if roi:
        pipe = _roi_pipeline(feed, spec, options, hw_decoder_load=hw_decoder_load if gpu else None)
    else:
        pipe = _full_pipeline(feed, spec, options, encoded=encoded)
    pipe.build()
    stream = DaliBatchStream(
        pipe, feed, feed.plan.schedule, spec, static=static, skipped=skipped, ignored=ignored, source=src.name
    )
    stream.roi_decode = roi
    return stream


def _dali_device(device) -> torch.device:
    """``device`` as DALI takes it: the CPU, or a CUDA device with its index."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    if device.type != "cpu":
        raise DataError(f"device={device}: the DALI loader delivers to 'cpu' or 'cuda[:i]'")
    return device


def _feed(src, spec: LoaderSpec, *, roi: bool, full_check: bool) -> tuple[_Feed, int, int]:
    """(the external_source callback of ``src``, files skipped by the pre-scan, non-image files ignored)."""
    if src.kind == "stl10":
        if spec.resize is not None:
            raise DataError(
                f"{src.location}: mode {spec.mode!r} is not offered for STL-10 on the DALI path; use "
                "'crop'/'center'"
            )
        if spec.crop_size > src.array.shape[2]:
            raise DataError(
                f"{src.location}: STL-10 images are 96x96, expected crop_size <= 96 (got {spec.crop_size})"
            )
        schedule = EpochSchedule(src.array.shape[0], spec.seed, src.name)
        return _Stl10Feed(src.array, schedule=schedule, spec=spec), 0, 0
    scan = scan_image_files(
        src.paths,
        crop_size=spec.crop_size,
        resize=spec.resize,
        on_bad=spec.on_bad,
        full_check=full_check,
        max_pixels=spec.max_image_pixels,
    )
    if not scan.files:
        raise DataError(
            f"{src.name}: all {len(src.paths)} image files are unusable (corrupt or smaller than the crop)"
        )
    schedule = EpochSchedule(len(scan.files), spec.seed, src.name)
    feed = _FileFeed(
        scan.files,
        scan.sizes,
        spec.threads,
        source_sizes=scan.source_sizes if roi else None,
        resize=spec.resize is not None,
        schedule=schedule,
        spec=spec,
    )
    return feed, len(scan.bad), len(src.non_images)


def _pipeline_options(spec: LoaderSpec, prefetch: int) -> dict:
    """``pipeline_def``'s arguments: batch, threads, device, seed, prefetch depth, executor."""
    return dict(
        batch_size=spec.batch_size,
        num_threads=spec.threads,
        device_id=spec.device.index if spec.device.type == "cuda" else None,
        seed=spec.seed & 0x7FFFFFFF,
        prefetch_queue_depth=prefetch,
        exec_dynamic=True,  # (the executor that returns outputs on a CUDA stream)
    )


def _crop(fn, types, images, px, py, flip, spec: LoaderSpec, out_of_bounds_policy: str):
    """``crop_mirror_normalize`` into the batch convention: the crop at the anchors, mirrored where ``flip``,
    (pixel - 127.5) / 127.5, CHW or HWC, a zero fourth channel for ``pad_channels=4``."""
    c = spec.crop_size
    return fn.crop_mirror_normalize(
        images,
        crop=(c, c),
        crop_pos_x=px,
        crop_pos_y=py,
        mirror=flip,
        out_of_bounds_policy=out_of_bounds_policy,
        fill_values=0.0,
        mean=[127.5] * 3,
        std=[127.5] * 3,
        dtype=types.FLOAT,
        output_layout="HWC" if spec.channels_last else "CHW",
        pad_output=spec.pad_channels == 4,
    )


def _roi_pipeline(feed: _FileFeed, spec: LoaderSpec, options: dict, *, hw_decoder_load: float | None):
    """Files -> each crop's window decoded (``image_slice``) [-> resized on the resize's grid] -> crop."""
    from nvidia.dali import fn, pipeline_def, types  # optional dependency: DALI

    c, resize = spec.crop_size, spec.resize
    decoder = dict(
        device="cpu" if hw_decoder_load is None else "mixed", output_type=types.RGB, adjust_orientation=False
    )
    if hw_decoder_load is not None:
        decoder["hw_decoder_load"] = hw_decoder_load

    @pipeline_def(**options)
    def roi_pipeline():
        resampled = [types.FLOAT, types.FLOAT] if resize is not None else []
        encoded, anchor, shape, *roi_extent, px, py, flip = fn.external_source(
            source=feed,
            num_outputs=6 + len(resampled),
            batch=True,
            batch_info=True,
            dtype=[types.UINT8, types.INT32, types.INT32, *resampled, types.FLOAT, types.FLOAT, types.INT32],
        )
        # only the window is decoded
        images = fn.decoders.image_slice(encoded, anchor, shape, axis_names="HW", **decoder)
        if resize is not None:
            roi_start, roi_end = roi_extent
            images = fn.resize(
                images, size=[c, c], roi_start=roi_start, roi_end=roi_end, roi_relative=False, antialias=True
            )
        return _crop(fn, types, images, px, py, flip, spec, "pad")

    return roi_pipeline()


def _full_pipeline(feed: _Feed, spec: LoaderSpec, options: dict, *, encoded: bool):
    """Whole files decoded [-> resized] -> crop; or STL-10's raw pixels -> crop."""
    from nvidia.dali import fn, pipeline_def, types  # optional dependency: DALI

    resize, gpu = spec.resize, spec.device.type == "cuda"

    @pipeline_def(**options)
    def pipeline():
        images, px, py, flip = fn.external_source(
            source=feed,
            num_outputs=4,
            batch=True,
            batch_info=True,
            layout=["" if encoded else "CHW", "", "", ""],
            dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT32],
        )
        if encoded:
            images = fn.decoders.image(
                images, device="mixed" if gpu else "cpu", output_type=types.RGB, adjust_orientation=False
            )  # EXIF orientation ignored, as by the header pre-scan and the other loaders
            if resize is not None:
                images = fn.resize(images, resize_shorter=resize, antialias=True)
        elif gpu:
            images = images.gpu()
        return _crop(fn, types, images, px, py, flip, spec, "pad" if spec.on_bad == "pad" else "error")

    return pipeline()
