"""Loader benchmark: images/s of 64x64 random crops + mirror from a folder of JPEGs.

Rows (``run(device, quick)``) have keys group="loader", name, variant, baseline, value, unit="images/s",
ratio_vs_baseline. Variants, all decoding every sample from JPEG (no in-memory cache):
  * ``torchvision+PIL`` (the baseline): a Dataset opening each file with PIL, torchvision.transforms.v2
    RandomCrop + RandomHorizontalFlip + ToDtype/Normalize to [-1, 1], in a DataLoader with workers;
  * ``deepsim-torch``: ``build_loader(..., loader="torch", cache=False)`` with the same workers;
  * ``dali``: ``build_loader(..., loader="dali")``: CPU decoders in CPU mode, nvJPEG ("mixed") on CUDA.
The folder (256 JPEGs of 128x96, or 128 in quick mode) is generated in a temporary directory. Each
variant is warmed up (its workers/pipeline started, a few batches drawn) before timing; batches are
delivered to ``device`` (with a CUDA synchronize before the clock stops).

    python3 -m bench.loader [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from bench.common import group_main
from deepsim.data import build_loader

BATCH = 64
CROP = 64


def write_jpegs(folder: str, n: int, size=(128, 96)) -> None:
    """n smooth-noise RGB JPEGs (quality 90) of ``size`` (W, H): realistic entropy, not flat colour."""
    rng = np.random.default_rng(0)
    w, h = size
    for i in range(n):
        small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        noise = rng.integers(-12, 13, (h, w, 3))
        arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, f"img_{i:04d}.jpg"), quality=90)


class _PILFolder(torch.utils.data.Dataset):
    def __init__(self, folder):
        from torchvision.transforms import v2

        self.paths = sorted(os.path.join(folder, f) for f in os.listdir(folder))
        self.transform = v2.Compose(
            [
                v2.PILToTensor(),
                v2.RandomCrop(CROP),
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize([0.5] * 3, [0.5] * 3),
            ]
        )

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB"))


def _infinite(loader):
    while True:
        yield from loader


def _time(batches, device, warmup: int, iters: int) -> float:
    """images/s of drawing ``iters`` batches after ``warmup`` batches."""
    for _ in range(warmup):
        x = next(batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 0
    for _ in range(iters):
        x = next(batches)
        n += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    """Loader throughput rows (images/s) for ``device``."""
    device = torch.device(device)
    workers = max(1, min(8, os.cpu_count() or 1))
    warmup, iters = (2, 6) if quick else (4, 30)
    rows, base = [], None
    with tempfile.TemporaryDirectory() as folder:
        write_jpegs(folder, 128 if quick else 256)

        def baseline():
            loader = torch.utils.data.DataLoader(
                _PILFolder(folder), batch_size=BATCH, shuffle=True, num_workers=workers, drop_last=True,
                pin_memory=device.type == "cuda", persistent_workers=True,
            )  # fmt: skip
            it = _infinite(loader)
            return (x.to(device, non_blocking=True) for x in it), None

        def deepsim_torch():
            s = build_loader(
                folder, batch_size=BATCH, crop_size=CROP, device=device, num_workers=workers, cache=False
            )
            return s, s

        def dali():
            s = build_loader(folder, batch_size=BATCH, crop_size=CROP, device=device, loader="dali",
                             num_workers=workers)  # fmt: skip
            return s, s

        name = f"random-crop {CROP}x{CROP} + mirror, JPEG 128x96, batch {BATCH}, {workers} workers"
        for variant, make in [
            ("torchvision+PIL", baseline),
            ("deepsim-torch", deepsim_torch),
            ("dali", dali),
        ]:
            try:
                batches, closer = make()
                value = _time(batches, device, warmup, iters)
                if closer is not None:
                    closer.close()
            except Exception as e:  # e.g. DALI not installed: report and go on
                print(f"bench.loader: {variant} skipped: {type(e).__name__}: {e}")
                continue
            if variant == "torchvision+PIL":
                base = value
            label = (
                f"{variant} ({'mixed' if device.type == 'cuda' else 'cpu'} decode)"
                if variant == "dali"
                else variant
            )
            rows.append(
                dict(group="loader", name=name, variant=label, baseline="torchvision+PIL", value=value,
                     unit="images/s", ratio_vs_baseline=None if base is None else value / base)
            )  # fmt: skip
    return rows


def main(argv=None) -> None:
    group_main(run, __doc__.splitlines()[0], "128 images, fewer batches", argv)


if __name__ == "__main__":
    main()
