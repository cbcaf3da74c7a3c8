"""The arguments every training loader takes, in one value: :class:`LoaderSpec`."""

from __future__ import annotations

import dataclasses
import os

import torch

from .images import DEFAULT_MAX_IMAGE_PIXELS, check_max_pixels
from .sampling import check_loader_args, start_cursor

__all__ = ["LoaderSpec"]


@dataclasses.dataclass(frozen=True)
class LoaderSpec:
    """What a training stream delivers and where it starts; fields as :func:`deepsim.data.build_loader`'s."""

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

    def validate(self) -> LoaderSpec:
        """Raise a one-line :class:`~deepsim.data.errors.DataError` naming the argument at fault; else self."""
        check_max_pixels(self.max_image_pixels)
        check_loader_args(
            batch_size=self.batch_size, crop_size=self.crop_size, mode=self.mode, on_bad=self.on_bad,
            shard_id=self.shard_id, num_shards=self.num_shards, resize_size=self.resize_size,
        )  # fmt: skip
        self.cursor  # noqa: B018 -- raises on a negative start
        return self

    @property
    def cursor(self) -> int:
        """The global sample cursor the stream starts at (``start_sample``, else ``start_step * W * B``)."""
        return start_cursor(
            start_step=self.start_step,
            start_sample=self.start_sample,
            batch_size=self.batch_size,
            num_shards=self.num_shards,
        )

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
