"""Finite evaluation batches: every sample exactly once, in source order (no schedule, no augmentation)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from .convention import to_model_batch
from .sources import resolve_source
from .spec import LoaderSpec
from .stores import DEFAULT_CACHE_BYTES, build_store
from .workers import Collate, LazyFiles, ignore_stop_signals

__all__ = ["iterate_eval"]


def iterate_eval(
    source: str | os.PathLike,
    *,
    batch_size: int,
    crop_size: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    mode: str = "center",
    split: str | None = None,
    shard_id: int = 0,
    num_shards: int = 1,
    num_workers: int = 0,
    channels_last: bool = False,
    on_bad: str = "error",
    resize_size: int = 256,
    cache: bool | None = None,
) -> Iterator[torch.Tensor]:
    """Finite, deterministic evaluation batches: every sample exactly once, in source order.

    Shard s of S takes samples s, s+S, s+2S, ... (no sample dropped). The last batch may be partial.
    Bad files with ``on_bad="skip"`` are left out (so a lazily-read batch can be short).

    Args:
        mode: ``"center"`` (centre crop) or ``"resize-center"`` (shorter side to ``resize_size``, then
            centre crop); random modes are accepted too but evaluation normally wants a centre crop.
        Others: as :func:`deepsim.data.build_loader`.

    Yields:
        tensors (b, 3, crop_size, crop_size), b <= batch_size, in the library's batch convention.
    """
    spec = LoaderSpec.from_arguments(locals()).validate()
    resize, random = spec.resize, spec.random
    src = resolve_source(source, split)
    store, _ = build_store(src, crop_size, resize, on_bad, cache, DEFAULT_CACHE_BYTES)
    n = store.n if store is not None else len(src.paths)
    order = np.arange(shard_id, n, num_shards, dtype=np.int64)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if store is not None:
        for idx in batches:
            u8 = torch.from_numpy(store.batch(idx, idx, crop_size, 0, random))
            yield to_model_batch(u8, device, dtype, channels_last)
        return
    yield from _decoded_batches(LazyFiles(src.paths, crop_size, resize, random, 0, on_bad), batches, spec)


def _decoded_batches(files: LazyFiles, batches: list[np.ndarray], spec: LoaderSpec) -> Iterator[torch.Tensor]:
    """The eval batches of a lazily read folder, decoded in DataLoader workers (empty ones left out)."""
    device, workers = torch.device(spec.device), spec.num_workers
    loader = DataLoader(
        files,
        batch_sampler=[[(int(i), int(i), False) for i in idx] for idx in batches],
        num_workers=workers,
        collate_fn=Collate(normalize=device.type == "cpu" and workers > 0),
        pin_memory=device.type == "cuda",
        worker_init_fn=ignore_stop_signals if workers > 0 else None,
    )
    for u8, _bad in loader:
        if len(u8):
            yield to_model_batch(u8, spec.device, spec.dtype, spec.channels_last)
