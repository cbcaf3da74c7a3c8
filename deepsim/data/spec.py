"""The arguments every training loader takes, in one value: :class:`LoaderSpec`."""

from __future__ import annotations

import dataclasses
import os

import torch

from .errors import DataError
from .images import DEFAULT_MAX_IMAGE_PIXELS, check_max_pixels
from .sampling import MODES, ON_BAD

__all__ = ["LoaderSpec"]


@dataclasses.dataclass(frozen=True)
class LoaderSpec:
    """What a training stream delivers and where it starts: the arguments every loader takes.

    Attributes:
        batch_size: B, samples per batch (per rank).
        crop_size: side of the square crop (64 for the autoencoder, 227 for inversion).
        mode: ``"crop"`` random crop (+ random horizontal mirror); ``"resize-crop"`` resize the shorter side
            to ``resize_size`` then random crop (+ mirror); ``"center"`` / ``"resize-center"`` the
            deterministic centre crop without mirror.
        mirror: random horizontal mirroring in the random modes (False: never mirror; the derived Caffe
            code does not mirror).
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
        pad_channels: 3, or 4 / 8 to append zero channels (a first conv that streams 8- or 16-byte pixels,
            :class:`deepsim.networks.ConvLReLU`); torch and resident loaders, and DALI for 4.
        max_image_pixels: an image whose header declares more pixels is a bad image (``on_bad``), refused
            before it is decoded.
    """

    batch_size: int
    crop_size: int = 64
    mode: str = "crop"
    mirror: bool = True
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32
    seed: int = 0
    start_step: int = 0
    start_sample: int | None = None
    shard_id: int = 0
    num_shards: int = 1
    num_workers: int = 0
    channels_last: bool = False
    on_bad: str = "error"
    split: str | None = None
    resize_size: int = 256
    pad_channels: int = 3
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    @classmethod
    def of(cls, spec: LoaderSpec | None, fields: dict) -> LoaderSpec:
        """``spec`` itself (already checked), or a checked spec built from keyword ``fields``."""
        if spec is None:
            return cls(**fields).validate()
        if fields:
            raise TypeError(f"pass a LoaderSpec or its fields, not both (got {', '.join(fields)})")
        return spec

    @classmethod
    def from_arguments(cls, arguments: dict) -> LoaderSpec:
        """The spec whose fields are the entries of ``arguments`` (a function's ``locals()``) of the same
        names; fields not there keep their defaults. Not checked (see :meth:`validate`)."""
        return cls(**{f.name: arguments[f.name] for f in dataclasses.fields(cls) if f.name in arguments})

    def validate(self) -> LoaderSpec:
        """Raise a one-line :class:`~deepsim.data.errors.DataError` naming the argument at fault, or return
        self."""
        check_max_pixels(self.max_image_pixels)
        if self.mode not in MODES:
            raise DataError(f"mode={self.mode!r}: expected one of {', '.join(MODES)}")
        if self.on_bad not in ON_BAD:
            raise DataError(f"on_bad={self.on_bad!r}: expected one of {', '.join(ON_BAD)}")
        if self.batch_size < 1 or self.crop_size < 1:
            raise DataError(
                f"batch_size={self.batch_size}, crop_size={self.crop_size}: expected positive integers"
            )
        if not 0 <= self.shard_id < self.num_shards:
            raise DataError(
                f"shard_id={self.shard_id}, num_shards={self.num_shards}: expected 0 <= shard_id < num_shards"
            )
        if self.mode.startswith("resize") and self.crop_size > self.resize_size:
            raise DataError(
                f"crop_size={self.crop_size} > resize_size={self.resize_size} in mode {self.mode!r}"
            )
        _ = self.cursor  # raises on a negative start
        return self

    @property
    def cursor(self) -> int:
        """The global sample cursor the stream starts at (``start_sample``, else ``start_step * W * B``)."""
        if self.start_sample is not None:
            if self.start_sample < 0:
                raise DataError(f"start_sample={self.start_sample}: expected >= 0")
            return int(self.start_sample)
        if self.start_step < 0:
            raise DataError(f"start_step={self.start_step}: expected >= 0")
        return int(self.start_step) * self.num_shards * self.batch_size

    @property
    def random(self) -> bool:
        """Random crops (and mirror flags) rather than the centre crop."""
        return self.mode in ("crop", "resize-crop")

    @property
    def resize(self) -> int | None:
        """The shorter side images are resized to first, or None (the crop modes)."""
        return self.resize_size if self.mode.startswith("resize") else None

    @property
    def threads(self) -> int:
        """Host threads to read files with: ``num_workers``, or min(4, cpu count) for 0."""
        return self.num_workers if self.num_workers > 0 else max(1, min(4, os.cpu_count() or 1))
