"""The PyTorch data path (``loader="torch"``): in-memory stores cropped in the training process, or files
decoded in DataLoader workers, on the shared epoch schedule (:mod:`deepsim.data.sampling`).

Batch t of rank r holds the global positions of :func:`deepsim.data.sampling.rank_positions`; each position's
sample comes from the epoch permutation and its crop offsets and mirror flag from a hash of (seed, position).
Hence a batch is a pure function of (source, seed, cursor, rank, world size, batch size, crop settings):
independent of ``num_workers``, and a stream started at a cursor decodes nothing before it.

Bad input (``on_bad``): grayscale, CMYK, palette and alpha images are always converted to RGB; non-image
files are ignored and counted in ``.ignored``. Corrupt/truncated files and images smaller than the crop:
``"error"`` raises :class:`DataError` naming the file (at build time for in-memory datasets, when the sample
is read for lazy ones); ``"skip"`` drops them (in memory) or substitutes the next good sample
deterministically (lazy), counting distinct bad files in ``.skipped``; ``"pad"`` reflect-pads too-small
images up to the crop and skips corrupt ones.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from .convention import to_model_batch
from .images import DEFAULT_MAX_IMAGE_PIXELS
from .sampling import EpochSchedule, ScheduledStream
from .sources import resolve_source
from .stores import DEFAULT_CACHE_BYTES, build_store
from .workers import BatchIndexSampler, Collate, LazyFiles, ignore_stop_signals

__all__ = ["BatchStream", "build_torch_loader"]


class BatchStream(ScheduledStream):
    """An infinite iterator of training batches: ``next(stream)`` -> (B, 3, c, c) tensor.

    Batches follow the library convention (RGB, [-1, 1] as ``pixel / 127.5 - 1``, float32 unless another
    dtype was asked, contiguous or channels_last, on the requested device).

    Attributes:
        cursor, step, epoch, state_dict(), num_samples, samples_per_shard, steps_per_epoch: the stream's
            place in the job's sample stream (:class:`deepsim.data.sampling.ScheduledStream`).
        skipped: distinct bad files skipped so far (at build time for in-memory datasets, as they are
            drawn for lazily-read ones).
        ignored: non-image files ignored in the source folder.
        source: a human-readable name of the source.
    """

    def __init__(
        self, *, store, schedule, batch_size, crop_size, random, mirror, seed, shard_id, num_shards, start_sample,
        device, dtype, channels_last, num_workers, skipped, ignored, source_name, pad_channels=3,
    ):  # fmt: skip
        self._init_schedule(
            schedule,
            batch_size=batch_size,
            shard_id=shard_id,
            num_shards=num_shards,
            start_sample=start_sample,
        )
        self._store = store
        self.crop_size = crop_size
        self._random, self._mirror, self._seed = random, mirror, seed
        self.device, self.dtype, self.channels_last = torch.device(device), dtype, channels_last
        self.pad_channels = pad_channels
        self.ignored = ignored
        self.source = source_name
        self._bad: set = set(skipped)
        self._loader_iter = None
        if isinstance(store, LazyFiles):
            loader = DataLoader(
                store,
                batch_sampler=BatchIndexSampler(
                    schedule,
                    start_sample=start_sample,
                    shard_id=shard_id,
                    num_shards=num_shards,
                    batch_size=batch_size,
                ),  # fmt: skip
                num_workers=num_workers,
                collate_fn=Collate(normalize=self.device.type == "cpu" and num_workers > 0),
                pin_memory=self.device.type == "cuda",
                persistent_workers=False,
                prefetch_factor=4 if num_workers > 0 else None,
                worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
            )
            self._loader_iter = iter(loader)

    @property
    def skipped(self) -> int:
        return len(self._bad)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def _next_raw(self) -> torch.Tensor:
        """The next batch on the CPU: uint8 (B, 3, c, c), or float32 already normalised by a worker."""
        pos, idx = self._take_positions()
        if self._loader_iter is not None:
            u8, bad = next(self._loader_iter)  # the sampler yields the same positions, in the same order
            self._bad.update(bad)
            return u8
        return torch.from_numpy(
            self._store.batch(idx, pos, self.crop_size, self._seed, self._random, self._mirror)
        )

    def __next__(self) -> torch.Tensor:
        return to_model_batch(self._next_raw(), self.device, self.dtype, self.channels_last, self.pad_channels)

    def close(self) -> None:
        """Stop the DataLoader workers, if any. Idempotent."""
        it, self._loader_iter = self._loader_iter, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._store = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (
            f"BatchStream(source={self.source!r}, num_samples={self.num_samples}, batch_size={self.batch_size}, "
            f"crop={self.crop_size}, cursor={self.cursor}, skipped={self.skipped}, ignored={self.ignored})"
        )


def build_torch_loader(
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
    num_workers: int,
    channels_last: bool,
    on_bad: str,
    split: str | None,
    resize_size: int,
    cache: bool | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    pad_channels: int = 3,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> BatchStream:
    """The torch stream; arguments as :func:`deepsim.data.build_loader` (checked there)."""
    resize = resize_size if mode.startswith("resize") else None
    random = mode in ("crop", "resize-crop")
    src = resolve_source(source, split)
    store, bad = build_store(src, crop_size, resize, on_bad, cache, cache_bytes, max_image_pixels)
    if store is None:
        store = LazyFiles(src.paths, crop_size, resize, random, seed, on_bad, mirror, max_image_pixels)
    return BatchStream(
        store=store, schedule=EpochSchedule(store.n, seed, src.name), batch_size=batch_size, crop_size=crop_size,
        random=random, mirror=mirror, seed=seed, shard_id=shard_id, num_shards=num_shards,
        start_sample=start_sample, device=device, dtype=dtype, channels_last=channels_last,
        num_workers=num_workers, skipped=bad, ignored=len(src.non_images), source_name=src.name,
        pad_channels=pad_channels,
    )  # fmt: skip
