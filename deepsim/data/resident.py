"""The device-resident data path (``build_loader(..., loader="resident")``): the whole decoded data set as
uint8 on the training device, cropped, mirrored and converted there in one gather per batch.

Each step's sample indices, crop offsets and mirror flags are computed on the device from the stream position
(the epoch permutation is uploaded once per epoch; the splitmix64 hash of :mod:`deepsim.data.augment` runs
on int64 tensors), then one gather of 3-byte pixel rows and the conversion, so a step costs a few kernel launches, no host work per sample and no host sync. The
batches are those of the torch loader for the same arguments (same positions, same crops, bit-exact in
float32): sharding, the global cursor and resume at any world size are :mod:`deepsim.data.sampling`'s.

Storage: one flat uint8 buffer holding every image in HWC order, with per-image offset, height and width
(uniform data sets such as STL-10 are the special case of equal sizes). See docs/loaders.md.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .augment import _key
from .errors import DataError
from .images import DEFAULT_MAX_IMAGE_PIXELS
from .sampling import EpochSchedule, ScheduledStream
from .sources import ResolvedSource, resolve_source
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


def dataset_bytes(src: ResolvedSource, resize: int | None, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> int:
    """Bytes of ``src`` decoded as uint8 RGB (after the resize of the resize modes), from headers only."""
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
    from .dali import dali_available

    names = ["torch"] + (["dali"] if dali_available() else []) + (["nvjpeg"] if kind != "stl10" else [])
    return ", ".join(f"--loader {n}" for n in names)


def check_fits(
    nbytes: int, device: torch.device, *, name: str, kind: str, free_bytes: int | None = None
) -> None:
    """Raise a one-line :class:`DataError` when ``nbytes`` of data do not fit in ``device``'s free memory
    (:func:`device_free_bytes`, or ``free_bytes``) less a reserve for the step, naming the loaders that fit."""
    free = device_free_bytes(device) if free_bytes is None else int(free_bytes)
    reserve = max(RESERVE_MIN_BYTES, int(RESERVE_FRACTION * free))
    if nbytes + reserve > free:
        gib = 2.0**30
        raise DataError(
            f"{name}: --loader resident needs {nbytes / gib:.2f} GiB on {device} for the decoded data set, but "
            f"{max(0, free) / gib:.2f} GiB is free after the model ({reserve / gib:.2f} GiB kept for the step); "
            f"use {_loaders_that_fit(kind)}"
        )


def resident_fits(source: str | os.PathLike, device: torch.device | str, mode: str = "crop") -> bool:
    """Whether ``source`` decoded would fit on ``device`` now (what ``--loader auto`` asks on CUDA)."""
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

    def __init__(
        self, *, data, offsets, heights, widths, schedule, batch_size, crop_size, random, mirror, seed,
        shard_id, num_shards, start_sample, device, dtype, channels_last, pad_channels, skipped, ignored,
        source_name,
    ):  # fmt: skip
        self._init_schedule(
            schedule,
            batch_size=batch_size,
            shard_id=shard_id,
            num_shards=num_shards,
            start_sample=start_sample,
        )
        self.device, self.dtype, self.channels_last = torch.device(device), dtype, channels_last
        self.crop_size, self.pad_channels = crop_size, pad_channels
        self._random, self._mirror, self._key = random, mirror, _signed(int(_key(seed)))
        self._data, self._heights, self._widths = data, heights, widths
        self.nbytes = data.numel()
        self.skipped, self.ignored, self.source = skipped, ignored, source_name
        self._perms: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (device, host) orders
        self.last_device_indices: torch.Tensor | None = None
        self._pixels = data.view(-1, 3)  # (P, 3): one row per pixel, HWC order
        self._pixel_offsets = offsets // 3
        self._arange_b = torch.arange(batch_size, device=self.device)
        self._r = torch.arange(crop_size, device=self.device)

    def __iter__(self):
        return self

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
        """Device tensors (B,) for positions first .. first + B - 1: sample index, crop (oy, ox, flip or None),
        image width."""
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

    def __next__(self) -> torch.Tensor:
        if self._data is None:
            raise StopIteration
        first = self.start_sample + (self._taken * self.num_shards + self.shard_id) * self.batch_size
        idx, oy, ox, flip, w = self._sample_params(first)
        b, c, cp = self.batch_size, self.crop_size, self.pad_channels
        r = self._r
        cols = ox[:, None] + (r if flip is None else torch.where(flip[:, None], c - 1 - r, r))  # (B, c)
        rows = self._pixel_offsets[idx][:, None] + (oy[:, None] + r) * w[:, None]  # (B, c)
        pixels = (rows[:, :, None] + cols[:, None, :]).view(-1)  # (B*c*c,) pixel rows, (y, x) order
        u8 = self._pixels.index_select(0, pixels).view(b, c, c, 3).permute(0, 3, 1, 2)  # (B, 3, c, c), NHWC
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = u8.contiguous(memory_format=fmt).to(torch.float32).div_(127.5).sub_(1.0)  # the convention, in fp32
        if cp > 3:  # zero channels written beside the converted ones
            out = torch.empty((b, cp, c, c), dtype=self.dtype, device=self.device).contiguous(memory_format=fmt)
            out[:, 3:] = 0
            out[:, :3] = x
            x = out
        elif self.dtype != torch.float32:
            x = x.to(self.dtype)
        self._taken += 1
        self.last_device_indices = idx
        return x

    def close(self) -> None:
        """Release the device data. Idempotent."""
        self._data = self._pixels = self._pixel_offsets = self._heights = self._widths = None
        self._perms = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (
            f"ResidentBatchStream(source={self.source!r}, num_samples={self.num_samples}, "
            f"batch_size={self.batch_size}, device={self.device}, nbytes={self.nbytes}, cursor={self.cursor})"
        )


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
    source: str | os.PathLike,
    *,
    batch_size: int,
    crop_size: int,
    mode: str,
    mirror: bool,
    device: torch.device | str,
    dtype: torch.dtype,
    seed: int,
    start_sample: int,
    shard_id: int,
    num_shards: int,
    num_workers: int = 0,
    channels_last: bool,
    on_bad: str,
    split: str | None,
    resize_size: int,
    pad_channels: int = 3,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    free_bytes: int | None = None,
) -> ResidentBatchStream:
    """The resident stream; arguments as :func:`deepsim.data.build_loader` (checked there), plus
    ``free_bytes`` (the memory to count on instead of asking the device: for tests).

    Raises:
        DataError: the decoded data set does not fit (one line naming the loaders that do), or bad input
            (as the torch loader's in-memory path).
    """
    if pad_channels not in PAD_CHANNELS:
        raise DataError(f"pad_channels={pad_channels}: expected one of {', '.join(map(str, PAD_CHANNELS))}")
    device = torch.device(device)
    resize = resize_size if mode.startswith("resize") else None
    src = resolve_source(source, split)
    check_fits(dataset_bytes(src, resize, max_image_pixels), device, name=src.name, kind=src.kind, free_bytes=free_bytes)
    store, bad = build_store(src, crop_size, resize, on_bad, cache=True, cache_bytes=0, max_pixels=max_image_pixels)
    data, offsets, heights, widths = _upload(store, device)
    return ResidentBatchStream(
        data=data, offsets=offsets, heights=heights, widths=widths, schedule=EpochSchedule(store.n, seed, src.name),
        batch_size=batch_size, crop_size=crop_size, random=mode in ("crop", "resize-crop"), mirror=mirror,
        seed=seed, shard_id=shard_id, num_shards=num_shards, start_sample=start_sample, device=device, dtype=dtype,
        channels_last=channels_last, pad_channels=pad_channels, skipped=len(bad), ignored=len(src.non_images),
        source_name=src.name,
    )  # fmt: skip
