"""The epoch schedule every training loader shares (docs/loaders.md, "The job's sample stream").

Position p of the job's stream holds sample ``epoch_permutation(seed, p // N, N)[p % N]``; with W ranks of
B samples, a step from cursor c gives rank r the positions c + r*B .. c + r*B + B - 1 and moves the cursor
on by W*B. A stream resumed at a checkpoint's cursor, at any W and B, goes on at exactly the next position.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from .augment import epoch_permutation
from .errors import DataError

if TYPE_CHECKING:  # a cycle: spec.py imports MODES and ON_BAD from here
    from .spec import LoaderSpec

__all__ = [
    "MODES",
    "ON_BAD",
    "LOADERS",
    "EpochSchedule",
    "RankSchedule",
    "ScheduledStream",
    "rank_positions",
]

MODES = ("crop", "resize-crop", "center", "resize-center")
ON_BAD = ("error", "skip", "pad")
LOADERS = ("torch", "dali", "nvjpeg", "resident")


def rank_positions(
    start_sample: int, t: int, *, shard_id: int, num_shards: int, batch_size: int
) -> np.ndarray:
    """Global positions (int64, (B,)) of rank ``shard_id``'s ``t``-th batch of a stream started at
    ``start_sample``: ``c + r*B .. c + r*B + B - 1`` with ``c = start_sample + t*W*B``."""
    first = start_sample + (t * num_shards + shard_id) * batch_size
    return np.arange(first, first + batch_size, dtype=np.int64)


class EpochSchedule:
    """Global stream position -> sample index (see the module docstring).

    Args:
        n: N, the number of usable samples.
        seed: the stream seed (epoch permutations are drawn from it).
        name: the source, for error messages.
    """

    def __init__(self, n: int, seed: int, name: str = "dataset"):
        if n < 1:
            raise DataError(f"{name}: no usable sample")
        self.n, self.seed = n, seed
        self._perms: dict[int, np.ndarray] = {}

    def perm(self, epoch: int) -> np.ndarray:
        """The order of all N samples in ``epoch`` (the two most recent epochs are kept)."""
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = epoch_permutation(self.seed, epoch, self.n)
        return self._perms[epoch]

    def indices(self, positions: np.ndarray) -> np.ndarray:
        """Sample indices (int64, same shape) of global stream ``positions``."""
        positions = np.asarray(positions, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.n)
        out = np.empty(len(positions), dtype=np.int64)
        for e in np.unique(epochs):
            m = epochs == e
            out[m] = self.perm(int(e))[offsets[m]]
        return out


@dataclasses.dataclass(frozen=True)
class RankSchedule:
    """One rank's batches of the job's stream started at the cursor ``start_sample``."""

    schedule: EpochSchedule
    start_sample: int
    shard_id: int
    num_shards: int
    batch_size: int

    def positions(self, t: int) -> np.ndarray:
        """Global positions (int64, (B,)) of this rank's ``t``-th batch (:func:`rank_positions`)."""
        return rank_positions(
            self.start_sample,
            t,
            shard_id=self.shard_id,
            num_shards=self.num_shards,
            batch_size=self.batch_size,
        )

    def batch(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions, sample indices) of this rank's ``t``-th batch."""
        positions = self.positions(t)
        return positions, self.schedule.indices(positions)


class ScheduledStream:
    """What every training batch stream shares: its place in the job's sample stream and its lifecycle.

    A loader's stream calls ``super().__init__(schedule, spec, ...)``, implements :meth:`_next_batch` (taking
    its positions with :meth:`_take_positions`) and :meth:`_release`; ``next()`` after :meth:`close` stops.

    Attributes:
        num_samples: N, usable samples in the dataset (all ranks).
        batch_size: B, samples per batch on this rank.
        shard_id, num_shards: this rank and the world size W.
        samples_per_shard: N // W, the share of one epoch each rank reads.
        steps_per_epoch: ceil(N / (W*B)), steps per pass over the dataset.
        start_sample: the cursor the stream started at.
        last_positions, last_indices: global positions and sample indices of the batch delivered last.
        crop_size, device, dtype, channels_last, pad_channels: what a batch is (the spec's).
        source: a human-readable name of the source; ignored: non-image files left out of it.
    """

    _closed = True  # until __init__ ran: close() on a half-built stream does nothing
    _REPR: tuple[str, ...] = ()  # attributes shown after the source
    _REPR_LABELS = {"crop_size": "crop"}

    def __init__(self, schedule: EpochSchedule, spec: LoaderSpec, *, source: str, ignored: int = 0) -> None:
        self._schedule = schedule
        self.num_samples = schedule.n
        self.batch_size, self.shard_id, self.num_shards = spec.batch_size, spec.shard_id, spec.num_shards
        self.samples_per_shard = schedule.n // spec.num_shards
        self.steps_per_epoch = max(1, math.ceil(schedule.n / (spec.num_shards * spec.batch_size)))
        self.start_sample = spec.cursor
        self.rank_schedule = RankSchedule(
            schedule, spec.cursor, spec.shard_id, spec.num_shards, spec.batch_size
        )
        self._taken = 0  # batches delivered
        self.last_positions = np.empty(0, dtype=np.int64)
        self.last_indices = np.empty(0, dtype=np.int64)
        self.crop_size, self.pad_channels = spec.crop_size, spec.pad_channels
        self.device, self.dtype, self.channels_last = (
            torch.device(spec.device),
            spec.dtype,
            spec.channels_last,
        )
        self._random, self._mirror, self._seed = spec.random, spec.mirror, spec.seed
        self.source, self.ignored = source, ignored
        self._closed = False

    def positions(self, t: int) -> np.ndarray:
        """Global positions (int64, (B,)) of this rank's ``t``-th batch counted from the stream's start."""
        return self.rank_schedule.positions(t)

    def _take_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions, sample indices) of the next batch; advances the stream by one step."""
        positions, indices = self.rank_schedule.batch(self._taken)
        self._taken += 1
        self.last_positions, self.last_indices = positions, indices
        return positions, indices

    @property
    def cursor(self) -> int:
        """The global sample cursor after the batches delivered so far (samples read by all ranks)."""
        return self.start_sample + self._taken * self.num_shards * self.batch_size

    @property
    def step(self) -> int:
        """The index of the next batch, counting from cursor 0 at this stream's W*B."""
        return self.cursor // (self.num_shards * self.batch_size)

    @property
    def epoch(self) -> float:
        """Fractional epoch of the next step (cursor / N)."""
        return self.cursor / self.num_samples

    def state_dict(self) -> dict:
        """The stream's position, for a checkpoint: ``build_loader(..., start_sample=state["cursor"])``
        goes on from it at any world size. ``epoch`` and ``offset`` (cursor = epoch * N + offset) are for
        people."""
        cursor = self.cursor
        return {
            "cursor": cursor,
            "num_samples": self.num_samples,
            "epoch": cursor // self.num_samples,
            "offset": cursor % self.num_samples,
        }

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self._closed:
            raise StopIteration
        return self._next_batch()

    def _next_batch(self) -> torch.Tensor:
        raise NotImplementedError

    def _release(self) -> None:
        """Free what the stream holds (workers, threads, pipeline, device data); called once by close()."""

    def close(self) -> None:
        """Release the stream's workers, threads and data; ``next()`` then stops. Idempotent."""
        if not self._closed:
            self._closed = True
            self._release()

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
        fields = "".join(
            f", {self._REPR_LABELS.get(name, name)}={getattr(self, name)}" for name in self._REPR
        )
        return f"{type(self).__name__}(source={self.source!r}{fields})"
