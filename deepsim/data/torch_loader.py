"""The PyTorch data path (``loader="torch"``): in-memory stores cropped in the training process, or files
decoded in DataLoader workers, on the shared epoch schedule (:mod:`deepsim.data.sampling`).

A batch is a pure function of (source, seed, cursor, rank, world size, batch size, crop settings), whatever
``num_workers``. Bad input (``on_bad``): ``"error"`` raises :class:`DataError` naming the file (at build
time in memory, when read for lazy folders); ``"skip"`` drops it (in memory) or substitutes the next good
sample (lazy), counted in ``.skipped``; ``"pad"`` reflect-pads too-small images. Non-image files are
counted in ``.ignored``.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader

from .convention import to_model_batch
from .sampling import EpochSchedule, ScheduledStream
from .sources import resolve_source
from .spec import LoaderSpec
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

    _REPR = ("num_samples", "batch_size", "crop_size", "cursor", "skipped", "ignored")

    def __init__(
        self, store, schedule: EpochSchedule, spec: LoaderSpec, *, skipped, ignored: int, source: str
    ):
        super().__init__(schedule, spec, source=source, ignored=ignored)
        self._store = store
        self._bad: set = set(skipped)
        self._loader_iter = None
        if isinstance(store, LazyFiles):
            self._loader_iter = iter(self._data_loader(store, spec))

    def _data_loader(self, files: LazyFiles, spec: LoaderSpec) -> DataLoader:
        workers = spec.num_workers
        return DataLoader(
            files,
            batch_sampler=BatchIndexSampler(self.rank_schedule),
            num_workers=workers,
            collate_fn=Collate(normalize=self.device.type == "cpu" and workers > 0),
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None,
            worker_init_fn=ignore_stop_signals if workers > 0 else None,
        )

    @property
    def skipped(self) -> int:
        return len(self._bad)

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

    def _next_batch(self) -> torch.Tensor:
        return to_model_batch(
            self._next_raw(), self.device, self.dtype, self.channels_last, self.pad_channels
        )

    def _release(self) -> None:
        it, self._loader_iter = self._loader_iter, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._store = None


def build_torch_loader(
    source: str | os.PathLike,
    spec: LoaderSpec | None = None,
    *,
    cache: bool | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    **fields,
) -> BatchStream:
    """The torch stream of ``spec`` (or of its keyword ``fields``, checked here), arguments as
    :func:`deepsim.data.build_loader`."""
    spec = LoaderSpec.of(spec, fields)
    src = resolve_source(source, spec.split)
    store, bad = build_store(
        src, spec.crop_size, spec.resize, spec.on_bad, cache, cache_bytes, spec.max_image_pixels
    )
    if store is None:
        store = LazyFiles(
            src.paths,
            spec.crop_size,
            spec.resize,
            spec.random,
            spec.seed,
            spec.on_bad,
            spec.mirror,
            spec.max_image_pixels,
        )
    schedule = EpochSchedule(store.n, spec.seed, src.name)
    return BatchStream(store, schedule, spec, skipped=bad, ignored=len(src.non_images), source=src.name)
