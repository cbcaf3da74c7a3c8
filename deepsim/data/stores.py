"""In-memory sample stores: datasets small enough to decode once (or STL-10's memory map), cropped in the
training process. Every store turns sample indices and their stream positions into a uint8 (B, 3, c, c) batch.

Small datasets (decoded size below ``cache_bytes``, 512 MiB by default, e.g. the bundled photos) are decoded
once at build time (in a thread pool); uniform sizes are stacked and cropped in one vectorised gather.
STL-10 is memory-mapped and cropped vectorised. Larger image folders are not stored: they are decoded per
sample in DataLoader workers (:mod:`deepsim.data.workers`).
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Sequence

import numpy as np
import torch

from .augment import crop_batch, crop_one, crop_params, pad_to
from .errors import DataError
from .images import DEFAULT_MAX_IMAGE_PIXELS, ImageReadError, probe_image, read_image_chw
from .sources import ResolvedSource

__all__ = ["ArrayStore", "ListStore", "build_store", "bad_reason", "DEFAULT_CACHE_BYTES", "MAX_PROBE_FILES"]

DEFAULT_CACHE_BYTES = 512 * 2**20
MAX_PROBE_FILES = 20_000  # above this, a folder is read lazily without probing every header


class ArrayStore:
    """A uniform (N, 3, H, W) uint8 array (STL-10 memmap view or stacked cache): vectorised crops."""

    lazy = False

    def __init__(self, array: np.ndarray):
        self.array = array
        self.n = array.shape[0]

    def batch(self, idx, positions, crop_size, seed, random, mirror=True) -> np.ndarray:
        """uint8 (B, 3, c, c): samples ``idx`` cropped as their stream ``positions`` say."""
        n = len(idx)
        h = np.full(n, self.array.shape[2], dtype=np.int64)
        w = np.full(n, self.array.shape[3], dtype=np.int64)
        oy, ox, flip = crop_params(seed, positions, h, w, crop_size, random, mirror)
        return crop_batch(self.array, np.asarray(idx, dtype=np.int64), oy, ox, flip, crop_size)


class ListStore:
    """Decoded images of different sizes, each (3, H, W) uint8."""

    lazy = False

    def __init__(self, images: list[np.ndarray]):
        self.images = images
        self.n = len(images)

    def batch(self, idx, positions, crop_size, seed, random, mirror=True) -> np.ndarray:
        """uint8 (B, 3, c, c): samples ``idx`` cropped as their stream ``positions`` say."""
        imgs = [self.images[i] for i in idx]
        h = np.array([im.shape[1] for im in imgs], dtype=np.int64)
        w = np.array([im.shape[2] for im in imgs], dtype=np.int64)
        oy, ox, flip = crop_params(seed, positions, h, w, crop_size, random, mirror)
        out = np.empty((len(imgs), 3, crop_size, crop_size), dtype=np.uint8)
        for b, im in enumerate(imgs):
            out[b] = crop_one(im, oy[b], ox[b], flip[b], crop_size)
        return out


def bad_reason(height: int, width: int, crop_size: int) -> str | None:
    """Why an image of this size cannot give the crop, or None."""
    if height < crop_size or width < crop_size:
        return f"image is {width}x{height}, expected at least {crop_size}x{crop_size} for the crop"
    return None


def _decode_cached(
    paths: Sequence[os.PathLike], crop_size: int, resize: int | None, on_bad: str, max_pixels: int | None
) -> tuple[list[np.ndarray], list[str]]:
    """Decode all files (thread pool; PIL releases the GIL). Returns (good images, bad file names)."""

    def load(path):
        try:
            return read_image_chw(path, resize_shorter=resize, max_pixels=max_pixels), None
        except ImageReadError as e:
            return None, e

    workers = max(1, min(8, os.cpu_count() or 1))
    pool = concurrent.futures.ThreadPoolExecutor(workers)
    try:
        results = list(pool.map(load, paths))
    finally:  # on a stop signal: the files in flight finish, the queued ones are dropped
        pool.shutdown(wait=True, cancel_futures=True)
    good, bad = [], []
    for path, (img, err) in zip(paths, results):
        if err is not None:
            if on_bad == "error":
                raise DataError(str(err)) from err
            bad.append(str(path))
            continue
        reason = bad_reason(img.shape[1], img.shape[2], crop_size)
        if reason is not None:
            if on_bad == "pad":
                img = pad_to(img, crop_size)
            elif on_bad == "skip":
                bad.append(str(path))
                continue
            else:
                raise DataError(f"{path}: {reason} (use on_bad='skip' or 'pad')")
        good.append(img)
    return good, bad


def _estimate_bytes(paths: Sequence[os.PathLike], resize: int | None, max_pixels: int | None) -> int:
    total = 0
    for p in paths:
        try:
            w, h, _ = probe_image(p, max_pixels)
        except ImageReadError:
            continue
        if resize is not None:
            s = resize / min(w, h)
            w, h = round(w * s), round(h * s)
        total += 3 * w * h
    return total


def build_store(
    src: ResolvedSource,
    crop_size: int,
    resize: int | None,
    on_bad: str,
    cache: bool | None,
    cache_bytes: int,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
):
    """The in-memory store of ``src`` (None when its files are to be decoded lazily). An image of more than
    ``max_pixels`` pixels is a bad image (refused from its header).

    Returns:
        (store or None, names of the bad files dropped at build time).
    """
    if src.kind == "stl10":
        if crop_size > src.array.shape[2]:
            raise DataError(
                f"{src.location}: STL-10 images are 96x96, expected crop_size <= 96 (got {crop_size})"
            )
        if resize is not None:
            # Resizing 96x96 images is rare; do it once, in memory (memory ~ N * 3 * resize^2).
            t = torch.from_numpy(np.ascontiguousarray(src.array))
            t = torch.nn.functional.interpolate(
                t.float(), size=(resize, resize), mode="bilinear", antialias=True, align_corners=False
            )
            return ArrayStore(t.round_().clamp_(0, 255).to(torch.uint8).numpy()), []
        return ArrayStore(src.array), []
    if cache is None:
        cache = src.kind == "photos" or (
            len(src.paths) <= MAX_PROBE_FILES and _estimate_bytes(src.paths, resize, max_pixels) < cache_bytes
        )
    if not cache:
        return None, []
    images, bad = _decode_cached(src.paths, crop_size, resize, on_bad, max_pixels)
    if not images:
        raise DataError(
            f"{src.name}: all {len(src.paths)} image files are unusable (corrupt or smaller than the crop)"
        )
    shapes = {im.shape for im in images}
    if len(shapes) == 1:
        return ArrayStore(np.stack(images)), bad
    return ListStore(images), bad
