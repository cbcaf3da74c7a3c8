"""Counter-based randomness and vectorised crops shared by the loaders.

:func:`epoch_permutation` ``(seed, epoch, n)`` gives the order of all n samples in an epoch and
:func:`crop_params` ``(seed, positions, ...)`` the crop offsets and mirror flags of global stream positions
(:mod:`deepsim.data.sampling`). Both are pure functions, independent of the worker count and the world size.
"""

from __future__ import annotations

import numpy as np

__all__ = ["splitmix64", "epoch_permutation", "crop_params", "crop_batch", "crop_one", "pad_to"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray | int) -> np.ndarray:
    """The splitmix64 finaliser on uint64 (wrapping arithmetic); vectorised."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _key(*parts: int) -> np.uint64:
    h = np.uint64(0)
    for p in parts:
        h = splitmix64(h ^ splitmix64(np.uint64(p & 0xFFFFFFFFFFFFFFFF)))
    return np.uint64(h)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the n samples in ``epoch`` (int64 array), shared by all shards.

    Uses numpy's PCG64 seeded with (seed, epoch), so it is reproducible across runs and machines.
    """
    return np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, epoch]).permutation(n)


def _uniform_int(u: np.ndarray, high: np.ndarray) -> np.ndarray:
    # Lemire's multiply-shift: floor(u32 * high / 2^32), exact in uint64 for high < 2^32.
    u32 = u >> np.uint64(32)
    return ((u32 * high.astype(np.uint64)) >> np.uint64(32)).astype(np.int64)


def crop_params(
    seed: int,
    positions: np.ndarray,
    heights: np.ndarray,
    widths: np.ndarray,
    crop_size: int,
    random: bool = True,
    mirror: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop offsets and mirror flags for the samples at ``positions`` of the job's sample stream.

    Args:
        seed: the stream's seed.
        positions: int64 (B,) global sample positions (:mod:`deepsim.data.sampling`).
        heights, widths: int64 (B,) sizes of the images drawn at those positions (>= crop_size).
        crop_size: side of the square crop.
        random: False gives the centre crop without mirroring.
        mirror: False never mirrors (the random crop offsets stay as they are).

    Returns:
        (oy, ox, flip): int64 (B,), int64 (B,), bool (B,). Offsets lie in [0, H - crop_size].
    """
    heights = np.asarray(heights, dtype=np.int64)
    widths = np.asarray(widths, dtype=np.int64)
    if not random:
        return (heights - crop_size) // 2, (widths - crop_size) // 2, np.zeros(len(heights), dtype=bool)
    base = splitmix64(np.asarray(positions, dtype=np.uint64) ^ _key(seed))
    with np.errstate(over="ignore"):
        u_y = splitmix64(base + np.uint64(1))
        u_x = splitmix64(base + np.uint64(2))
        u_f = splitmix64(base + np.uint64(3))
    oy = _uniform_int(u_y, heights - crop_size + 1)
    ox = _uniform_int(u_x, widths - crop_size + 1)
    flip = (u_f >> np.uint64(63)).astype(bool) if mirror else np.zeros(len(heights), dtype=bool)
    return oy, ox, flip


def crop_batch(
    images: np.ndarray, idx: np.ndarray, oy: np.ndarray, ox: np.ndarray, flip: np.ndarray, crop_size: int
) -> np.ndarray:
    """Gather crops from a uniform (N, C, H, W) array (or memmap view) in one indexing op.

    Returns:
        uint8 (B, C, crop_size, crop_size), C-contiguous; sample b is
        ``images[idx[b], :, oy[b]:oy[b]+c, ox[b]:ox[b]+c]``, mirrored left-right where ``flip[b]``.
    """
    r = np.arange(crop_size)
    rows = oy[:, None] + r  # (B, c)
    cols = ox[:, None] + np.where(flip[:, None], crop_size - 1 - r, r)  # (B, c)
    ch = np.arange(images.shape[1])
    out = images[
        idx[:, None, None, None], ch[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]
    ]
    return np.ascontiguousarray(out)


def crop_one(image: np.ndarray, oy: int, ox: int, flip: bool, crop_size: int) -> np.ndarray:
    """One crop (C, c, c) from a (C, H, W) array, mirrored left-right when ``flip``."""
    out = image[:, oy : oy + crop_size, ox : ox + crop_size]
    return out[:, :, ::-1] if flip else out


def pad_to(image: np.ndarray, crop_size: int) -> np.ndarray:
    """Reflect-pad a (C, H, W) image, centred, so both sides are at least ``crop_size``."""
    _, h, w = image.shape
    ph, pw = max(0, crop_size - h), max(0, crop_size - w)
    if ph == 0 and pw == 0:
        return image
    mode = "reflect" if min(h, w) > 1 else "edge"
    return np.pad(image, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)), mode=mode)
