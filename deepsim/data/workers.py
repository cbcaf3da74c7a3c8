"""Image folders too large to hold in memory: one file decoded per sample, in DataLoader worker processes.

The sampler turns the stream's batches into (position, sample index, substitute) items, each worker decodes
and crops its items, the collate function stacks them; results do not depend on the number of workers. Bad
files (``on_bad``): ``"error"`` raises :class:`DataError` naming the file, ``"skip"`` substitutes the next
good sample (i -> i+1, ... mod N), ``"pad"`` reflect-pads too-small images. Workers ignore the stop signals
(SIGINT, SIGTERM, SIGUSR1, SIGUSR2): the training process alone stops, then shuts its workers down.
"""

from __future__ import annotations

import signal

import numpy as np
import torch
from torch.utils.data import Dataset

from .augment import crop_params, pad_to
from .convention import to_model_batch
from .errors import DataError
from .images import DEFAULT_MAX_IMAGE_PIXELS, ImageReadError, read_image
from .sampling import RankSchedule
from .stores import bad_reason

__all__ = ["LazyFiles", "Collate", "BatchIndexSampler", "ignore_stop_signals"]

_WORKER_IGNORED_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2")


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: the training process alone reacts to stop signals."""
    for name in _WORKER_IGNORED_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


class LazyFiles(Dataset):
    """Map-style dataset over (position, sample index, substitute) items: decodes one file per item."""

    def __init__(
        self, paths, crop_size, resize, random, seed, on_bad, mirror=True, max_pixels=DEFAULT_MAX_IMAGE_PIXELS
    ):
        self.paths = [str(p) for p in paths]
        self.max_pixels = max_pixels
        self.n = len(self.paths)
        self.crop_size, self.resize, self.random, self.mirror = crop_size, resize, random, mirror
        self.seed, self.on_bad = seed, on_bad

    def __len__(self):
        return self.n

    def _read(self, i: int) -> tuple[np.ndarray | None, str | None]:
        """(H, W, 3) image or (None, error message). HWC: only the crop is transposed, not the image."""
        path = self.paths[i]
        try:
            img = read_image(path, resize_shorter=self.resize, max_pixels=self.max_pixels)
        except ImageReadError as e:
            return None, str(e)
        reason = bad_reason(img.shape[0], img.shape[1], self.crop_size)
        if reason is not None:
            if self.on_bad == "pad":
                return pad_to(img.transpose(2, 0, 1), self.crop_size).transpose(1, 2, 0), None
            return None, f"{path}: {reason} (use on_bad='skip' or 'pad')"
        return img, None

    def __getitem__(self, item):
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
            np.array([pos]),
            np.array([img.shape[0]]),
            np.array([img.shape[1]]),
            self.crop_size,
            self.random,
            self.mirror,
        )
        oy, ox, c = int(oy[0]), int(ox[0]), self.crop_size
        crop = img[oy : oy + c, ox : ox + c]  # (c, c, 3)
        if flip[0]:
            crop = crop[:, ::-1]
        crop = np.ascontiguousarray(crop.transpose(2, 0, 1))
        return torch.from_numpy(crop), bad


class Collate:
    """Stack a batch in the worker; with ``normalize``, also convert to float32 [-1, 1] there (CPU
    targets: the conversion then runs in parallel in the workers instead of in the training process)."""

    def __init__(self, normalize: bool = False):
        self.normalize = normalize

    def __call__(self, items):
        tensors = [t for t, _ in items if t is not None]
        bad = [i for _, b in items for i in b]
        u8 = torch.stack(tensors) if tensors else torch.empty(0, dtype=torch.uint8)
        return (to_model_batch(u8) if self.normalize else u8), bad


class BatchIndexSampler:
    """Infinite iterable of per-batch lists of (position, sample index, substitute) for a DataLoader: the
    batches of ``plan`` from its start (those :class:`deepsim.data.sampling.ScheduledStream` takes)."""

    def __init__(self, plan: RankSchedule):
        self.plan = plan

    def __iter__(self):
        t = 0
        while True:
            pos, idx = self.plan.batch(t)
            yield [(int(p), int(i), True) for p, i in zip(pos, idx)]
            t += 1
