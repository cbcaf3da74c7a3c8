"""The GPU-decode data path (``build_loader(..., loader="nvjpeg")``): JPEGs decoded on the training device
with ``torchvision.io.decode_jpeg`` (nvJPEG on CUDA, libjpeg-turbo on the CPU), resized and cropped there,
on the shared epoch schedule (:mod:`deepsim.data.sampling`).

Files that are not baseline RGB/grayscale JPEGs, and JPEGs the device refuses, are decoded on the CPU
with the torch path's reader (counted in ``.cpu_decoded``, announced once by a warning). STL-10 is refused.
Bad input: files are pre-scanned by header; a file that passed but does not decode raises a
:class:`DataError` naming it (``on_bad="error"``) or is substituted by the next good sample and counted in
``.skipped``; ``"pad"`` reflect-pads too-small images. Design: docs/loaders.md ("nvjpeg").
"""

from __future__ import annotations

import concurrent.futures
import os
import warnings
from collections.abc import Callable

import numpy as np
import torch

from .augment import crop_params
from .convention import to_model_batch
from .errors import DataError
from .images import DEFAULT_MAX_IMAGE_PIXELS, ImageReadError, read_image, scan_image_files
from .sampling import EpochSchedule, ScheduledStream
from .sources import resolve_source
from .spec import LoaderSpec

__all__ = ["NvjpegBatchStream", "DeviceJpegDecoder", "DecodeStreams", "build_nvjpeg_loader", "is_jpeg"]

_DEVICE_MODES = ("RGB", "L")  # JPEG colour modes decoded on the device; others go to the CPU reader


def is_jpeg(data: torch.Tensor | bytes) -> bool:
    """True when the encoded bytes start with a JPEG SOI marker (FF D8 FF)."""
    head = bytes(data[:3].tolist()) if isinstance(data, torch.Tensor) else bytes(data[:3])
    return head == b"\xff\xd8\xff"


def _resize(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, height, width) uint8, bilinear and antialiased, on the image's device."""
    if tuple(img.shape[1:]) == (height, width):
        return img
    x = torch.nn.functional.interpolate(
        img[None].float(), size=(height, width), mode="bilinear", antialias=True, align_corners=False
    )
    return x[0].round_().clamp_(0, 255).to(torch.uint8)


def _pad_index(n: int, before: int, after: int, reflect: bool) -> np.ndarray:
    """Source rows (or columns) of a side of ``n`` padded by ``before``/``after``: numpy's "reflect" (a
    triangle wave of period 2(n-1), so pads wider than the image reflect again) or "edge"."""
    i = np.arange(-before, n + after)
    if not reflect:
        return np.clip(i, 0, n - 1)
    period = 2 * (n - 1)
    i = np.mod(i, period)
    return np.where(i >= n, period - i, i)


def _pad(img: torch.Tensor, crop_size: int) -> torch.Tensor:
    """Reflect-pad an image smaller than the crop as the torch path does
    (:func:`deepsim.data.augment.pad_to`), on the image's device: a gather whose indices come from the
    (host-known) shape, no pixel leaves it."""
    _, h, w = img.shape
    ph, pw = max(0, crop_size - h), max(0, crop_size - w)
    if ph == 0 and pw == 0:
        return img
    reflect = min(h, w) > 1  # pad_to's rule: "edge" for a 1-pixel side
    rows = torch.from_numpy(_pad_index(h, ph // 2, ph - ph // 2, reflect)).to(img.device, non_blocking=True)
    cols = torch.from_numpy(_pad_index(w, pw // 2, pw - pw // 2, reflect)).to(img.device, non_blocking=True)
    return img.index_select(1, rows).index_select(2, cols)


class DecodeStreams:
    """The stream protocol of a batch decoded on a CUDA device, around everything that makes the batch.

    ``torchvision.io.decode_jpeg`` allocates its outputs on the current stream and decodes on a private
    stream that does not wait for it; on the training stream, a block freed by the previous batch can be
    handed out while kernels queued before it still read it. So the batch is made on a side stream:

    1. the host waits until the side stream finished the previous batch (its blocks are free for real);
    2. the side stream waits on the current (training) stream;
    3. decode, resize, pad, crop, stack and convert under the side stream (allocations from its pool);
    4. the current stream waits on the side stream, and the batch is ``record_stream``-ed on it, so the
       allocator keeps its memory until the training stream is done with it.

    Args:
        device: the CUDA device.
        cuda: the ``torch.cuda`` namespace (tests pass a fake with ``current_stream``, ``Stream``, ``Event``
            and ``stream``).
    """

    def __init__(self, device: torch.device, cuda=torch.cuda):
        self.device, self._cuda = device, cuda
        self.side = cuda.Stream(device=device)
        self._done = None  # an event recorded on the side stream after the previous batch

    def run(self, make_batch: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``make_batch()`` under the protocol above; returns its tensor, safe to use on the current
        stream."""
        current = self._cuda.current_stream(self.device)
        if self._done is not None:
            self._done.synchronize()
        self.side.wait_stream(current)
        with self._cuda.stream(self.side):
            batch = make_batch()
            self._done = self._cuda.Event()
            self._done.record(self.side)
        current.wait_stream(self.side)
        batch.record_stream(current)
        return batch


class DeviceJpegDecoder:
    """Encoded files -> (3, H, W) uint8 images on ``device``: baseline JPEGs in one batched ``decode_jpeg``
    call, everything else (and any JPEG the device refuses) with the torch path's CPU reader; a file that
    decodes nowhere is named (``on_bad="error"``) or substituted by the next good sample.

    ``max_pixels`` is the CPU reader's pixel limit (:func:`read_image`): the run's, as in the pre-scan.

    Attributes:
        bad: files that failed to decode; cpu: indices of the files decoded on the CPU.
    """

    def __init__(
        self,
        files: list[str],
        modes: list[str],
        device: torch.device,
        on_bad: str,
        *,
        max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        self.files, self.device, self.on_bad, self.max_pixels = files, device, on_bad, max_pixels
        self.on_device = [m in _DEVICE_MODES for m in modes]
        self.bad: set[str] = set()
        self.cpu: set[int] = set()
        self._warned = False

    def read(self, i: int) -> torch.Tensor:
        """The encoded bytes of file ``i`` (uint8, 1-D, on the CPU)."""
        return torch.from_numpy(np.fromfile(self.files[i], dtype=np.uint8))

    def _decode_jpeg(self, datas: list[torch.Tensor]) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg  # torchvision's decoders: deprecated, may go

        with (
            warnings.catch_warnings()
        ):  # torchvision 0.29 deprecates its decoders (docs/loaders.md, "nvjpeg")
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device)

    def _decode_cpu(self, i: int) -> torch.Tensor:
        hwc = read_image(self.files[i], max_pixels=self.max_pixels)  # ImageReadError names the file
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"loader='nvjpeg': {self.files[i]} is not a baseline RGB/grayscale JPEG (or the device "
                "decoder "
                "refused it); such files are decoded on the CPU (counted in .cpu_decoded)",
                stacklevel=5,
            )
        self.cpu.add(i)
        chw = torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))
        if self.device.type == "cuda":  # page-locked: an asynchronous copy, no stream synchronise per file
            return chw.pin_memory().to(self.device, non_blocking=True)
        return chw.to(self.device)

    def _decode_one(self, i: int, data: torch.Tensor) -> torch.Tensor:
        if self.on_device[i] and is_jpeg(data):
            try:
                return self._decode_jpeg([data])[0]
            except RuntimeError:
                pass
        return self._decode_cpu(i)

    def _decode_or_substitute(self, i: int, data: torch.Tensor) -> tuple[torch.Tensor, int]:
        n = len(self.files)
        for attempt in range(n):
            j = (i + attempt) % n
            try:
                return self._decode_one(j, data if attempt == 0 else self.read(j)), j
            except (ImageReadError, RuntimeError) as error:
                if self.on_bad == "error":
                    raise DataError(
                        f"{self.files[j]}: cannot be decoded ({str(error).strip().splitlines()[-1][:300]}); "
                        "use on_bad='skip', or find every bad file with `deepsim data check`"
                    ) from error
                self.bad.add(self.files[j])
        raise DataError(f"no decodable image left after skipping {len(self.bad)} files")

    def decode(self, idx: np.ndarray, datas: list[torch.Tensor]) -> tuple[list[torch.Tensor], np.ndarray]:
        """The images of samples ``idx`` (encoded ``datas``) and the sample index each one really is."""
        used = np.array(idx, dtype=np.int64)
        out: list[torch.Tensor | None] = [None] * len(idx)
        batch = [b for b, i in enumerate(idx) if self.on_device[i] and is_jpeg(datas[b])]
        if batch:
            try:  # one batched call: nvJPEG decodes the whole batch at once
                for b, img in zip(batch, self._decode_jpeg([datas[b] for b in batch])):
                    out[b] = img
            except RuntimeError:
                pass  # a bad file in the batch: decode one by one below to find it
        for b, i in enumerate(idx):
            if out[b] is None:
                out[b], used[b] = self._decode_or_substitute(int(i), datas[b])
        return out, used


class NvjpegBatchStream(ScheduledStream):
    """An infinite iterator of batches decoded on ``device``; the same interface as ``BatchStream``.

    Attributes:
        cursor, step, epoch, state_dict(), num_samples, samples_per_shard, steps_per_epoch, ignored: as in
            BatchStream.
        skipped: files left out by the pre-scan plus files that failed to decode (substituted).
        cpu_decoded: distinct files decoded on the CPU (not a baseline RGB/grayscale JPEG, or refused by
            the device decoder).
    """

    _REPR = ("num_samples", "batch_size", "device", "cursor", "skipped", "cpu_decoded")

    def __init__(
        self,
        decoder: DeviceJpegDecoder,
        sizes,
        schedule: EpochSchedule,
        spec: LoaderSpec,
        *,
        skipped,
        ignored: int,
        source: str,
    ):
        super().__init__(schedule, spec, source=source, ignored=ignored)
        self._decoder, self._sizes = decoder, sizes
        self._resize_shorter = spec.resize
        self._pool = concurrent.futures.ThreadPoolExecutor(spec.threads)
        self._streams = DecodeStreams(self.device) if self.device.type == "cuda" else None
        self._skipped_at_scan = len(skipped)
        self._ahead = self._read_ahead(0)

    @property
    def skipped(self) -> int:
        return self._skipped_at_scan + len(self._decoder.bad)

    @property
    def cpu_decoded(self) -> int:
        return len(self._decoder.cpu)

    def _read_ahead(self, t: int):
        """Futures of the encoded bytes of batch ``t`` (read while the device decodes batch t-1)."""
        idx = self._schedule.indices(self.positions(t))
        return [self._pool.submit(self._decoder.read, int(i)) for i in idx]

    def _next_batch(self) -> torch.Tensor:
        pos, idx = self._take_positions()
        datas = [future.result() for future in self._ahead]
        self._ahead = self._read_ahead(self._taken)
        if self._streams is None:
            return self._make_batch(pos, idx, datas)
        return self._streams.run(lambda: self._make_batch(pos, idx, datas))

    def _make_batch(self, pos, idx, datas) -> torch.Tensor:
        images, used = self._decoder.decode(idx, datas)
        if self._resize_shorter is not None:
            images = [_resize(img, int(h), int(w)) for img, (h, w) in zip(images, self._sizes[used])]
        images = [_pad(img, self.crop_size) for img in images]
        h = np.array([img.shape[1] for img in images], dtype=np.int64)
        w = np.array([img.shape[2] for img in images], dtype=np.int64)
        c = self.crop_size
        oy, ox, flip = crop_params(self._seed, pos, h, w, c, self._random, self._mirror)
        crops = []
        for img, y, x, f in zip(images, oy.tolist(), ox.tolist(), flip.tolist()):
            crop = img[:, y : y + c, x : x + c]
            crops.append(crop.flip(-1) if f else crop)
        return to_model_batch(torch.stack(crops), self.device, self.dtype, self.channels_last)  # (B, 3, c, c)

    def _release(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def build_nvjpeg_loader(
    source: str | os.PathLike, spec: LoaderSpec | None = None, **fields
) -> NvjpegBatchStream:
    """The GPU-decode stream of ``spec`` (or of its keyword ``fields``, checked here), arguments as
    :func:`deepsim.data.build_loader`; ``num_workers``: file-reading threads (0 = min(4, cpu count))."""
    spec = LoaderSpec.of(spec, fields)
    if spec.pad_channels != 3:
        raise DataError(f"pad_channels={spec.pad_channels} with loader='nvjpeg': expected 3")
    src = resolve_source(source, spec.split)
    if src.kind == "stl10":
        raise DataError(
            f"{src.location}: loader='nvjpeg' decodes JPEG files, but STL-10 is raw pixels (nothing to "
            "decode); "
            "use --loader torch or dali"
        )
    scan = scan_image_files(
        src.paths,
        crop_size=spec.crop_size,
        resize=spec.resize,
        on_bad=spec.on_bad,
        max_pixels=spec.max_image_pixels,
    )
    if not scan.files:
        raise DataError(
            f"{src.name}: all {len(src.paths)} image files are unusable (corrupt or smaller than the crop)"
        )
    device = torch.device(spec.device)
    decoder = DeviceJpegDecoder(scan.files, scan.modes, device, spec.on_bad, max_pixels=spec.max_image_pixels)
    schedule = EpochSchedule(len(scan.files), spec.seed, src.name)
    return NvjpegBatchStream(
        decoder, scan.sizes, schedule, spec, skipped=scan.bad, ignored=len(src.non_images), source=src.name
    )
