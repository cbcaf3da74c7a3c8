"""The device-resident data path (``build_loader(..., loader="resident")``): the whole decoded data set as
uint8 on the training device, cropped, mirrored and converted there in one gather per batch.

Its batches equal the torch loader's for the same arguments (bit-exact in float32). The data set must fit
in the device's free memory less a reserve (:func:`check_fits`). Design: docs/loaders.md ("The resident
loader").
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .augment import _key
from .dali import dali_available
from .errors import DataError
from .images import DEFAULT_MAX_IMAGE_PIXELS
from .sampling import EpochSchedule, ScheduledStream
from .sources import ResolvedSource, resolve_source
from .spec import LoaderSpec
from .stores import MAX_PROBE_FILES, ArrayStore, _estimate_bytes, build_store

__all__ = [
    "PAD_CHANNELS",
    "ResidentBatchStream",
    "build_resident_loader",
    "check_fits",
    "dataset_bytes",
    "device_free_bytes",
    "resident_fits",
]

PAD_CHANNELS = (3, 4, 8)  # channel counts a batch may be delivered with (extra channels are zeros)
RESERVE_FRACTION = 0.10  # of the free memory, kept for the step's activations and the allocator
RESERVE_MIN_BYTES = 512 * 2**20
_UPLOAD_CHUNK = 4096  # images per host -> device copy while building

_GOLDEN, _M1, _M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _signed(u: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    u &= 0xFFFFFFFFFFFFFFFF
    return u - (1 << 64) if u >= 1 << 63 else u


def _srl(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` on int64 is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def splitmix64_device(z: torch.Tensor) -> torch.Tensor:
    """:func:`deepsim.data.augment.splitmix64` on int64 tensors (wrapping arithmetic, same bits)."""
    z = z + _signed(_GOLDEN)
    z = (z ^ _srl(z, 30)) * _signed(_M1)
    z = (z ^ _srl(z, 27)) * _signed(_M2)
    return z ^ _srl(z, 31)


def _uniform_int(u: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """floor(u32 * high / 2^32) with u32 the top 32 bits of ``u`` (Lemire), as in :mod:`.augment`."""
    return _srl(_srl(u, 32) * high, 32)


def device_free_bytes(device: torch.device) -> int:
    """Memory free for new tensors on ``device``: the CUDA driver's free bytes, or the host's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def dataset_bytes(
    src: ResolvedSource, resize: int | None, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> int:
    """Bytes of ``src`` decoded as uint8 RGB (after the resize of the resize modes), from headers only; an
    image over ``max_pixels`` (a bad image) counts nothing."""
    if src.kind == "stl10":
        n, c, h, w = src.array.shape
        return n * c * (resize * resize if resize else h * w)
    paths = src.paths
    if len(paths) <= MAX_PROBE_FILES:
        return _estimate_bytes(paths, resize, max_pixels)
    step = len(paths) / MAX_PROBE_FILES  # a regular sample of the headers, scaled up
    sample = [paths[int(i * step)] for i in range(MAX_PROBE_FILES)]
    return int(_estimate_bytes(sample, resize, max_pixels) * len(paths) / MAX_PROBE_FILES)


def _loaders_that_fit(kind: str) -> str:
    names = ["torch"] + (["dali"] if dali_available() else []) + (["nvjpeg"] if kind != "stl10" else [])
    return ", ".join(f"--loader {n}" for n in names)


def check_fits(
    nbytes: int, device: torch.device, *, name: str, kind: str, free_bytes: int | None = None
) -> None:
    """Raise a one-line :class:`DataError` when ``nbytes`` of data do not fit in ``device``'s free memory
    (:func:`device_free_bytes`, or ``free_bytes``) less a reserve for the step, naming the loaders that
    fit."""
    free = device_free_bytes(device) if free_bytes is None else int(free_bytes)
    reserve = max(RESERVE_MIN_BYTES, int(RESERVE_FRACTION * free))
    if nbytes + reserve > free:
        gib = 2.0**30
        raise DataError(
            f"{name}: --loader resident needs {nbytes / gib:.2f} GiB on {device} for the decoded data "
            "set, but "
            f"{max(0, free) / gib:.2f} GiB is free after the model ({reserve / gib:.2f} GiB kept for the "
            "step); "
            f"use {_loaders_that_fit(kind)}"
        )


def resident_fits(source: str | os.PathLike, device: torch.device | str, mode: str = "crop") -> bool:
    """Whether ``source`` decoded fits in ``device``'s free memory at the call (what ``--loader auto`` asks
    on CUDA)."""
    resize = 256 if mode.startswith("resize") else None
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return False
    try:
        src = resolve_source(source)
        check_fits(dataset_bytes(src, resize), device, name=src.name, kind=src.kind)
    except (DataError, RuntimeError):  # RuntimeError: the device cannot be asked
        return False
    return True


class ResidentBatchStream(ScheduledStream):
    """An infinite iterator of batches gathered on the device; the interface of ``BatchStream``.

    ``next(stream)`` -> (B, C, c, c) on ``device``, values ``pixel / 127.5 - 1`` in ``dtype``, C = 3 or the
    ``pad_channels`` asked (channels 3.. are zeros), channels_last or contiguous. ``last_positions`` and
    ``last_indices`` stay empty: positions live on the device (``last_device_indices``).

    Attributes:
        cursor, step, epoch, state_dict(), num_samples, samples_per_shard, steps_per_epoch, skipped, ignored:
            as in BatchStream.
        nbytes: bytes of the resident uint8 data.
    """

    _REPR = ("num_samples", "batch_size", "device", "nbytes", "cursor")

    def __init__(
        self,
        data,
        offsets,
        heights,
        widths,
        schedule: EpochSchedule,
        spec: LoaderSpec,
        *,
        skipped: int,
        ignored: int,
        source: str,
    ):
        super().__init__(schedule, spec, source=source, ignored=ignored)
        self._key = _signed(int(_key(spec.seed)))
        self._data, self._heights, self._widths = data, heights, widths
        self.nbytes = data.numel()
        self.skipped = skipped
        self._perms: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (device, host) orders
        self.last_device_indices: torch.Tensor | None = None
        self._pixels = data.view(-1, 3)  # (P, 3): one row per pixel, HWC order
        self._pixel_offsets = offsets // 3
        self._arange_b = torch.arange(spec.batch_size, device=self.device)
        self._r = torch.arange(spec.crop_size, device=self.device)

    def _table(self, e0: int, e1: int) -> torch.Tensor:
        """The sample order of epochs e0..e1 concatenated, on the device (built once per epoch span)."""
        key = (e0, e1)
        if key not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            host = torch.from_numpy(np.concatenate([self._schedule.perm(e) for e in range(e0, e1 + 1)]))
            if self.device.type == "cuda":
                host = host.pin_memory()  # an asynchronous copy; kept alive beside its device copy
            self._perms[key] = (host.to(self.device, non_blocking=True), host)
        return self._perms[key][0]

    def _sample_params(self, first: int):
        """Device tensors (B,) for positions first .. first + B - 1: sample index, crop (oy, ox, flip or
        None), image width."""
        n, c = self.num_samples, self.crop_size
        e0, e1 = first // n, (first + self.batch_size - 1) // n
        pos = self._arange_b + first  # (B,) global positions, int64 on the device
        idx = self._table(e0, e1)[pos - e0 * n]
        h, w = self._heights[idx], self._widths[idx]
        if not self._random:
            return idx, (h - c) // 2, (w - c) // 2, None, w
        base = splitmix64_device(pos ^ self._key)
        oy = _uniform_int(splitmix64_device(base + 1), h - c + 1)
        ox = _uniform_int(splitmix64_device(base + 2), w - c + 1)
        flip = splitmix64_device(base + 3) < 0 if self._mirror else None  # the hash's top bit
        return idx, oy, ox, flip, w

    def _next_batch(self) -> torch.Tensor:
        first = int(self.positions(self._taken)[0])  # the batch's positions are first .. first + B - 1
        idx, oy, ox, flip, w = self._sample_params(first)
        b, c, cp = self.batch_size, self.crop_size, self.pad_channels
        r = self._r
        cols = ox[:, None] + (r if flip is None else torch.where(flip[:, None], c - 1 - r, r))  # (B, c)
        rows = self._pixel_offsets[idx][:, None] + (oy[:, None] + r) * w[:, None]  # (B, c)
        pixels = (rows[:, :, None] + cols[:, None, :]).view(-1)  # (B*c*c,) pixel rows, (y, x) order
        u8 = self._pixels.index_select(0, pixels).view(b, c, c, 3).permute(0, 3, 1, 2)  # (B, 3, c, c), NHWC
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = (
            u8.contiguous(memory_format=fmt).to(torch.float32).div_(127.5).sub_(1.0)
        )  # the convention, in fp32
        if cp > 3:  # zero channels written beside the converted ones
            out = torch.empty((b, cp, c, c), dtype=self.dtype, device=self.device).contiguous(
                memory_format=fmt
            )
            out[:, 3:] = 0
            out[:, :3] = x
            x = out
        elif self.dtype != torch.float32:
            x = x.to(self.dtype)
        self._taken += 1
        self.last_device_indices = idx
        return x

    def _release(self) -> None:
        self._data = self._pixels = self._pixel_offsets = self._heights = self._widths = None
        self._perms = {}


def _upload(store, device: torch.device):
    """(flat uint8 data, offsets, heights, widths) on ``device`` from an ArrayStore or ListStore."""
    if isinstance(store, ArrayStore):
        array = store.array  # (N, 3, H, W), possibly a transposed memmap view
        n, _, h, w = array.shape
        data = torch.empty((n, h, w, 3), dtype=torch.uint8, device=device)
        for i in range(0, n, _UPLOAD_CHUNK):
            chunk = np.ascontiguousarray(array[i : i + _UPLOAD_CHUNK].transpose(0, 2, 3, 1))  # (n, H, W, 3)
            data[i : i + len(chunk)].copy_(torch.from_numpy(chunk))
        heights = torch.full((n,), h, dtype=torch.int64)
        widths = torch.full((n,), w, dtype=torch.int64)
        offsets = torch.arange(n, dtype=torch.int64) * (3 * h * w)
        data = data.view(-1)
    else:
        sizes = np.array([im.shape[1:] for im in store.images], dtype=np.int64)  # (N, 2) (H, W)
        lengths = 3 * sizes[:, 0] * sizes[:, 1]
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        data = torch.empty(int(lengths.sum()), dtype=torch.uint8, device=device)
        for im, s, n in zip(store.images, starts, lengths):
            data[s : s + n].copy_(torch.from_numpy(np.ascontiguousarray(im.transpose(1, 2, 0)).reshape(-1)))
        heights, widths = torch.from_numpy(sizes[:, 0].copy()), torch.from_numpy(sizes[:, 1].copy())
        offsets = torch.from_numpy(starts)
    return data, offsets.to(device), heights.to(device), widths.to(device)


def build_resident_loader(
    source: str | os.PathLike, spec: LoaderSpec | None = None, *, free_bytes: int | None = None, **fields
) -> ResidentBatchStream:
    """The resident stream of ``spec`` (or of its keyword ``fields``, checked here), arguments as
    :func:`deepsim.data.build_loader`, plus ``free_bytes`` (the memory to count on instead of asking the
    device: for tests).

    Raises:
        DataError: the decoded data set does not fit (one line naming the loaders that do), or bad input
            (as the torch loader's in-memory path).
    """
    spec = LoaderSpec.of(spec, fields)
    if spec.pad_channels not in PAD_CHANNELS:
        raise DataError(
            f"pad_channels={spec.pad_channels}: expected one of {', '.join(map(str, PAD_CHANNELS))}"
        )
    device = torch.device(spec.device)
    src = resolve_source(source, spec.split)
    check_fits(
        dataset_bytes(src, spec.resize, spec.max_image_pixels),
        device,
        name=src.name,
        kind=src.kind,
        free_bytes=free_bytes,
    )
    store, bad = build_store(
        src,
        spec.crop_size,
        spec.resize,
        spec.on_bad,
        cache=True,
        cache_bytes=0,
        max_pixels=spec.max_image_pixels,
    )
    data, offsets, heights, widths = _upload(store, device)
    schedule = EpochSchedule(store.n, spec.seed, src.name)
    return ResidentBatchStream(
        data,
        offsets,
        heights,
        widths,
        schedule,
        spec,
        skipped=len(bad),
        ignored=len(src.non_images),
        source=src.name,
    )
