"""The PyTorch data path: deterministic, resumable, sharded batch streams.

Batch conventions (the rest of the library relies on them): a batch is a ``torch.Tensor`` of shape
(B, 3, H, W), RGB, contiguous (or channels_last if asked), float32 (or the requested dtype, e.g.
bfloat16), values in [-1, 1] computed as ``pixel / 127.5 - 1`` in float32, on the requested device.

Sample schedule. Let N be the number of usable samples, S = num_shards, P = N // S (the N - S*P
remainder samples of each epoch's permutation are dropped so that every shard has the same length).
The shard's stream is the concatenation of epochs 0, 1, 2, ...; epoch e is
``epoch_permutation(seed, e, N)[shard_id*P : (shard_id+1)*P]`` (contiguous chunks of one shared
permutation, so shards are disjoint within an epoch). Batch t holds stream positions t*B .. t*B+B-1
(batches span epoch boundaries, so the training stream has no partial batch). The crop offsets and the
mirror flag of position p come from a hash of (seed, shard_id, p). Hence batch t is a pure function of
(source, seed, shard_id, num_shards, batch_size, crop settings, t): independent of num_workers, and
``start_step=k`` starts at batch k without decoding batches 0..k-1.

Storage. Small datasets (decoded size below ``cache_bytes``, 512 MiB by default, e.g. the bundled
photos) are decoded once at build time (in a thread pool) and cropped in the main process; uniform sizes
are stacked and cropped in one vectorised gather. STL-10 is memory-mapped and cropped vectorised in the
main process. Larger image folders are decoded per sample in DataLoader workers (``num_workers``).

Bad input (``on_bad``): grayscale, CMYK, palette and alpha images are always converted to RGB; non-image
files are ignored and counted in ``.ignored``. Corrupt/truncated files and images smaller than the crop:
``"error"`` raises :class:`DataError` naming the file (at build time for cached datasets, when the
sample is read for lazy ones); ``"skip"`` drops them (cached) or substitutes the next good sample
deterministically (lazy: sample index i -> i+1, i+2, ... mod N), counting distinct bad files in
``.skipped``; ``"pad"`` reflect-pads too-small images up to the crop and skips corrupt ones.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .augment import crop_batch, crop_one, crop_params, epoch_permutation, pad_to
from .errors import DataError
from .images import ImageReadError, probe_image, read_image, read_image_chw
from .sources import ResolvedSource, resolve_source

__all__ = ["BatchStream", "build_loader", "iterate_eval", "to_model_batch", "MODES"]

MODES = ("crop", "resize-crop", "center", "resize-center")
ON_BAD = ("error", "skip", "pad")
DEFAULT_CACHE_BYTES = 512 * 2**20
_MAX_PROBE_FILES = 20_000  # above this, a folder is read lazily without probing every header


def to_model_batch(
    u8: torch.Tensor,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> the library's batch convention: ``pixel / 127.5 - 1`` in [-1, 1].

    The uint8 tensor is moved first (4x fewer bytes over PCIe), then converted on the device. A float32
    input is taken as already normalised and only moved / cast.
    """
    device = torch.device(device)
    if u8.dtype == torch.uint8:
        if device.type == "cuda" and not u8.is_pinned():
            u8 = u8.pin_memory()
        x = u8.to(device, non_blocking=True).to(torch.float32).div_(127.5).sub_(1.0)
    else:  # already normalised float32 (converted in a DataLoader worker)
        x = u8.to(device, non_blocking=True)
    if dtype != torch.float32:
        x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _check_args(batch_size, crop_size, mode, on_bad, shard_id, num_shards, resize_size):
    if mode not in MODES:
        raise DataError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
    if on_bad not in ON_BAD:
        raise DataError(f"on_bad={on_bad!r}: expected one of {', '.join(ON_BAD)}")
    if batch_size < 1 or crop_size < 1:
        raise DataError(f"batch_size={batch_size}, crop_size={crop_size}: expected positive integers")
    if not 0 <= shard_id < num_shards:
        raise DataError(f"shard_id={shard_id}, num_shards={num_shards}: expected 0 <= shard_id < num_shards")
    if mode.startswith("resize") and crop_size > resize_size:
        raise DataError(f"crop_size={crop_size} > resize_size={resize_size} in mode {mode!r}")


# ---------------------------------------------------------------------------------------------------
# Sample stores: all produce uint8 (B, 3, c, c) numpy batches for given sample indices and positions.


class _ArrayStore:
    """A uniform (N, 3, H, W) uint8 array (STL-10 memmap view or stacked cache): vectorised crops."""

    lazy = False

    def __init__(self, array: np.ndarray):
        self.array = array
        self.n = array.shape[0]

    def batch(self, idx, positions, crop_size, seed, shard_id, random):
        n = len(idx)
        h = np.full(n, self.array.shape[2], dtype=np.int64)
        w = np.full(n, self.array.shape[3], dtype=np.int64)
        oy, ox, flip = crop_params(seed, shard_id, positions, h, w, crop_size, random)
        return crop_batch(self.array, np.asarray(idx, dtype=np.int64), oy, ox, flip, crop_size)


class _ListStore:
    """Decoded images of different sizes, each (3, H, W) uint8."""

    lazy = False

    def __init__(self, images: list[np.ndarray]):
        self.images = images
        self.n = len(images)

    def batch(self, idx, positions, crop_size, seed, shard_id, random):
        imgs = [self.images[i] for i in idx]
        h = np.array([im.shape[1] for im in imgs], dtype=np.int64)
        w = np.array([im.shape[2] for im in imgs], dtype=np.int64)
        oy, ox, flip = crop_params(seed, shard_id, positions, h, w, crop_size, random)
        out = np.empty((len(imgs), 3, crop_size, crop_size), dtype=np.uint8)
        for b, im in enumerate(imgs):
            out[b] = crop_one(im, oy[b], ox[b], flip[b], crop_size)
        return out


def _bad_reason(img: np.ndarray, crop_size: int) -> str | None:
    if img.shape[1] < crop_size or img.shape[2] < crop_size:
        return (
            f"image is {img.shape[2]}x{img.shape[1]}, expected at least {crop_size}x{crop_size} for the crop"
        )
    return None


def _decode_cached(
    paths: Sequence[os.PathLike], crop_size: int, resize: int | None, on_bad: str
) -> tuple[list[np.ndarray], list[str]]:
    """Decode all files (thread pool; PIL releases the GIL). Returns (good images, bad file names)."""

    def load(path):
        try:
            return read_image_chw(path, resize_shorter=resize), None
        except ImageReadError as e:
            return None, e

    workers = max(1, min(8, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(load, paths))
    good, bad = [], []
    for path, (img, err) in zip(paths, results):
        if err is not None:
            if on_bad == "error":
                raise DataError(str(err)) from err
            bad.append(str(path))
            continue
        reason = _bad_reason(img, crop_size)
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


def _estimate_bytes(paths: Sequence[os.PathLike], resize: int | None) -> int:
    total = 0
    for p in paths:
        try:
            w, h, _ = probe_image(p)
        except ImageReadError:
            continue
        if resize is not None:
            s = resize / min(w, h)
            w, h = round(w * s), round(h * s)
        total += 3 * w * h
    return total


class _LazyFiles(Dataset):
    """Map-style dataset over (position, sample index) pairs: decodes one file per item in a worker."""

    def __init__(self, paths, crop_size, resize, random, seed, shard_id, on_bad):
        self.paths = [str(p) for p in paths]
        self.n = len(self.paths)
        self.crop_size, self.resize, self.random = crop_size, resize, random
        self.seed, self.shard_id, self.on_bad = seed, shard_id, on_bad

    def __len__(self):
        return self.n

    def _read(self, i: int) -> tuple[np.ndarray | None, str | None]:
        """(H, W, 3) image or (None, error message). HWC: only the crop is transposed, not the image."""
        path = self.paths[i]
        try:
            img = read_image(path, resize_shorter=self.resize)
        except ImageReadError as e:
            return None, str(e)
        reason = _bad_reason(img.transpose(2, 0, 1), self.crop_size)
        if reason is not None:
            if self.on_bad == "pad":
                return pad_to(img.transpose(2, 0, 1), self.crop_size).transpose(1, 2, 0), None
            return None, f"{path}: {reason} (use on_bad='skip' or 'pad')"
        return img, None

    def __getitem__(self, item):
        # item = (position in the stream, sample index, substitute?)
        pos, idx, substitute = item
        bad = []
        img = None
        for attempt in range(self.n if substitute else 1):
            i = (idx + attempt) % self.n
            img, err = self._read(i)
            if img is not None:
                break
            if self.on_bad == "error":
                raise DataError(err)  # plain DataError: DataLoader re-raises it with the same type
            bad.append(i)
        if img is None:
            if not substitute:
                return None, bad
            raise DataError(
                f"{self.paths[idx]}: no decodable image left in the dataset after skipping {len(bad)}"
            )
        oy, ox, flip = crop_params(
            self.seed,
            self.shard_id,
            np.array([pos]),
            np.array([img.shape[0]]),
            np.array([img.shape[1]]),
            self.crop_size,
            self.random,
        )
        oy, ox, c = int(oy[0]), int(ox[0]), self.crop_size
        crop = img[oy : oy + c, ox : ox + c]  # (c, c, 3)
        if flip[0]:
            crop = crop[:, ::-1]
        crop = np.ascontiguousarray(crop.transpose(2, 0, 1))
        return torch.from_numpy(crop), bad


class _Collate:
    """Stack a batch in the worker; with ``normalize``, also convert to float32 [-1, 1] there (CPU
    targets: the conversion then runs in parallel in the workers instead of in the training process)."""

    def __init__(self, normalize: bool = False):
        self.normalize = normalize

    def __call__(self, items):
        tensors = [t for t, _ in items if t is not None]
        bad = [i for _, b in items for i in b]
        u8 = torch.stack(tensors) if tensors else torch.empty(0, dtype=torch.uint8)
        return (to_model_batch(u8) if self.normalize else u8), bad


class _Schedule:
    """Stream position -> sample index for one shard (see the module docstring)."""

    def __init__(self, n: int, seed: int, shard_id: int, num_shards: int, name: str):
        self.n, self.seed, self.shard_id = n, seed, shard_id
        self.per_shard = n // num_shards
        if self.per_shard == 0:
            raise DataError(f"{name}: {n} usable samples cannot be split over {num_shards} shards")
        self._perms: dict[int, np.ndarray] = {}

    def perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            full = epoch_permutation(self.seed, epoch, self.n)
            self._perms[epoch] = full[self.shard_id * self.per_shard : (self.shard_id + 1) * self.per_shard]
        return self._perms[epoch]

    def indices(self, positions: np.ndarray) -> np.ndarray:
        epochs, offsets = np.divmod(positions, self.per_shard)
        out = np.empty(len(positions), dtype=np.int64)
        for e in np.unique(epochs):
            m = epochs == e
            out[m] = self.perm(int(e))[offsets[m]]
        return out


class _BatchIndexSampler:
    """Infinite iterable of per-batch lists of (position, sample index, substitute) for DataLoader."""

    def __init__(self, schedule: _Schedule, batch_size: int, start_step: int):
        self.schedule, self.batch_size, self.start_step = schedule, batch_size, start_step

    def __iter__(self):
        t = self.start_step
        while True:
            pos = np.arange(t * self.batch_size, (t + 1) * self.batch_size, dtype=np.int64)
            idx = self.schedule.indices(pos)
            yield [(int(p), int(i), True) for p, i in zip(pos, idx)]
            t += 1


class BatchStream:
    """An infinite iterator of training batches: ``next(stream)`` -> (B, 3, c, c) tensor.

    Batches follow the library convention (RGB, [-1, 1] as ``pixel / 127.5 - 1``, float32 unless another
    dtype was asked, contiguous or channels_last, on the requested device).

    Attributes:
        steps_per_epoch: ceil(samples_per_shard / batch_size): batches per pass over the shard.
        num_samples: usable samples in the dataset (all shards; bad files dropped at build time excluded).
        samples_per_shard: N // num_shards, the samples each shard sees per epoch.
        skipped: distinct bad files skipped so far (at build time for cached datasets, as they are
            drawn for lazily-read ones).
        ignored: non-image files ignored in the source folder.
        step: the index of the next batch.
        source: a human-readable name of the source.
    """

    def __init__(
        self,
        *,
        store,
        schedule,
        batch_size,
        crop_size,
        random,
        seed,
        shard_id,
        start_step,
        device,
        dtype,
        channels_last,
        num_workers,
        skipped,
        ignored,
        source_name,
    ):
        self._store = store
        self._schedule = schedule
        self.batch_size, self.crop_size = batch_size, crop_size
        self._random, self._seed, self._shard_id = random, seed, shard_id
        self.device, self.dtype, self.channels_last = torch.device(device), dtype, channels_last
        self.num_samples = schedule.n
        self.samples_per_shard = schedule.per_shard
        self.steps_per_epoch = max(1, math.ceil(schedule.per_shard / batch_size))
        self.step = start_step
        self.ignored = ignored
        self.source = source_name
        self._bad: set = set(skipped)
        self._loader_iter = None
        if isinstance(store, _LazyFiles):
            loader = DataLoader(
                store,
                batch_sampler=_BatchIndexSampler(schedule, batch_size, start_step),
                num_workers=num_workers,
                collate_fn=_Collate(normalize=self.device.type == "cpu" and num_workers > 0),
                pin_memory=self.device.type == "cuda",
                persistent_workers=False,
                prefetch_factor=4 if num_workers > 0 else None,
            )
            self._loader_iter = iter(loader)

    @property
    def skipped(self) -> int:
        return len(self._bad)

    @property
    def epoch(self) -> float:
        """Fractional epoch of the next batch (samples consumed / samples per shard)."""
        return self.step * self.batch_size / self.samples_per_shard

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def _next_raw(self) -> torch.Tensor:
        """The next batch on the CPU: uint8 (B, 3, c, c), or float32 already normalised by a worker."""
        if self._loader_iter is not None:
            u8, bad = next(self._loader_iter)
            self._bad.update(bad)
        else:
            pos = np.arange(self.step * self.batch_size, (self.step + 1) * self.batch_size, dtype=np.int64)
            idx = self._schedule.indices(pos)
            u8 = torch.from_numpy(
                self._store.batch(idx, pos, self.crop_size, self._seed, self._shard_id, self._random)
            )
        self.step += 1
        return u8

    def __next__(self) -> torch.Tensor:
        return to_model_batch(self._next_raw(), self.device, self.dtype, self.channels_last)

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
            f"crop={self.crop_size}, step={self.step}, skipped={self.skipped}, ignored={self.ignored})"
        )


def _build_store(src: ResolvedSource, crop_size, resize, on_bad, cache, cache_bytes):
    """Returns (store, bad file names at build time)."""
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
            return _ArrayStore(t.round_().clamp_(0, 255).to(torch.uint8).numpy()), []
        return _ArrayStore(src.array), []
    if cache is None:
        cache = src.kind == "photos" or (
            len(src.paths) <= _MAX_PROBE_FILES and _estimate_bytes(src.paths, resize) < cache_bytes
        )
    if not cache:
        return None, []
    images, bad = _decode_cached(src.paths, crop_size, resize, on_bad)
    if not images:
        raise DataError(
            f"{src.name}: all {len(src.paths)} image files are unusable (corrupt or smaller than the crop)"
        )
    shapes = {im.shape for im in images}
    if len(shapes) == 1:
        return _ArrayStore(np.stack(images)), bad
    return _ListStore(images), bad


def build_loader(
    source: str | os.PathLike,
    *,
    batch_size: int,
    crop_size: int = 64,
    mode: str = "crop",
    loader: str = "torch",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    start_step: int = 0,
    shard_id: int = 0,
    num_shards: int = 1,
    num_workers: int = 0,
    channels_last: bool = False,
    on_bad: str = "error",
    split: str | None = None,
    resize_size: int = 256,
    cache: bool | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    static: bool = False,
):
    """Build an infinite, deterministic, sharded stream of training batches.

    Args:
        source: ``"photos"`` (bundled photographs), a folder of images (flat or ImageNet
            ``train/<wnid>/*.JPEG``, searched recursively), or an STL-10 binary folder.
        batch_size: B, samples per batch (per shard).
        crop_size: side of the square crop (64 for the autoencoder, 227 for inversion).
        mode: ``"crop"`` random crop + random horizontal mirror; ``"resize-crop"`` resize the shorter
            side to ``resize_size`` then random crop + mirror; ``"center"`` / ``"resize-center"`` the
            deterministic centre crop without mirror.
        loader: ``"torch"`` (this module) or ``"dali"`` (:mod:`deepsim.data.dali`).
        device, dtype, channels_last: where and how batches are delivered.
        seed: stream seed; shard_id, num_shards: this process's shard (torch.distributed rank/world).
        start_step: start at batch k exactly as if k batches had been consumed (nothing is decoded for them).
        num_workers: DataLoader workers for lazily-decoded folders (ignored for cached data and STL-10,
            which are cropped vectorised in the main process). Results do not depend on it.
        on_bad: ``"error"`` | ``"skip"`` | ``"pad"`` (see the module docstring).
        split: STL-10 split (default ``"unlabeled"`` if present, else ``"train"``).
        resize_size: shorter side after resizing in the resize modes.
        cache: force (True) or forbid (False) decoding everything into memory; None decides by size.
        cache_bytes: the in-memory threshold when ``cache`` is None.
        static: DALI only: return the same preallocated tensor each step (for CUDA graphs).

    Returns:
        :class:`BatchStream` (or the DALI equivalent): ``next(stream)`` -> tensor (B, 3, crop, crop),
        RGB, values in [-1, 1] (``pixel / 127.5 - 1``), ``dtype``, on ``device``.

    Raises:
        DataError: bad arguments, empty folder, unreadable or too-small file with ``on_bad="error"``.
    """
    if loader == "dali":
        from .dali import build_dali_loader

        return build_dali_loader(
            source,
            batch_size=batch_size,
            crop_size=crop_size,
            mode=mode,
            device=device,
            dtype=dtype,
            seed=seed,
            start_step=start_step,
            shard_id=shard_id,
            num_shards=num_shards,
            num_workers=num_workers,
            channels_last=channels_last,
            on_bad=on_bad,
            split=split,
            resize_size=resize_size,
            static=static,
        )
    if loader != "torch":
        raise DataError(f"loader={loader!r}: expected 'torch' or 'dali'")
    _check_args(batch_size, crop_size, mode, on_bad, shard_id, num_shards, resize_size)
    if start_step < 0:
        raise DataError(f"start_step={start_step}: expected >= 0")
    resize = resize_size if mode.startswith("resize") else None
    random = mode in ("crop", "resize-crop")
    src = resolve_source(source, split)
    store, bad = _build_store(src, crop_size, resize, on_bad, cache, cache_bytes)
    if store is None:
        store = _LazyFiles(src.paths, crop_size, resize, random, seed, shard_id, on_bad)
    schedule = _Schedule(store.n, seed, shard_id, num_shards, src.name)
    return BatchStream(
        store=store,
        schedule=schedule,
        batch_size=batch_size,
        crop_size=crop_size,
        random=random,
        seed=seed,
        shard_id=shard_id,
        start_step=start_step,
        device=device,
        dtype=dtype,
        channels_last=channels_last,
        num_workers=num_workers,
        skipped=bad,
        ignored=len(src.non_images),
        source_name=src.name,
    )


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
        Others: as :func:`build_loader`.

    Yields:
        tensors (b, 3, crop_size, crop_size), b <= batch_size, in the library's batch convention.
    """
    _check_args(batch_size, crop_size, mode, on_bad, shard_id, num_shards, resize_size)
    resize = resize_size if mode.startswith("resize") else None
    random = mode in ("crop", "resize-crop")
    src = resolve_source(source, split)
    store, _ = _build_store(src, crop_size, resize, on_bad, cache, DEFAULT_CACHE_BYTES)
    n = store.n if store is not None else len(src.paths)
    order = np.arange(shard_id, n, num_shards, dtype=np.int64)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if store is not None:
        for idx in batches:
            u8 = torch.from_numpy(store.batch(idx, idx, crop_size, 0, shard_id, random))
            yield to_model_batch(u8, device, dtype, channels_last)
        return
    files = _LazyFiles(src.paths, crop_size, resize, random, 0, shard_id, on_bad)
    loader = DataLoader(
        files,
        batch_sampler=[[(int(i), int(i), False) for i in idx] for idx in batches],
        num_workers=num_workers,
        collate_fn=_Collate(normalize=torch.device(device).type == "cpu" and num_workers > 0),
        pin_memory=torch.device(device).type == "cuda",
    )
    for u8, _bad in loader:
        if len(u8):
            yield to_model_batch(u8, device, dtype, channels_last)
