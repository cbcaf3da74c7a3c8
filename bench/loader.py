"""Loader benchmark: images/s of 64x64 random crops + mirror from a folder of JPEGs, delivered to the device.

Design notes: docs/benchmarks.md.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from bench.cli import group_main
from bench.dryrun import dry_run
from deepsim.data import build_loader
from deepsim.data.dali import build_dali_loader

BATCH = 64
CROP = 64
BASELINE = "torchvision+PIL"
LOADER_TIMEOUT_S = 120  # a DataLoader batch that takes longer means a dead worker: fail the variant, not hang


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


def _paths(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder))


class _PILFolder(torch.utils.data.Dataset):
    def __init__(self, folder: str, crop: int):
        self.paths = _paths(folder)
        self.transform = v2.Compose(
            [
                v2.PILToTensor(),
                v2.RandomCrop(crop),
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


class _JpegBytes(torch.utils.data.Dataset):
    """Each sample is the file's bytes (decoding happens on the device). Plain bytes cross from the workers
    through the pipe: small files gain nothing from shared memory, which also failed here for
    torchvision.io.read_file's tensors ("Bad file descriptor" in the worker)."""

    def __init__(self, folder: str):
        self.paths = _paths(folder)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with open(self.paths[i], "rb") as f:
            return f.read()


def _as_tensors(samples: list[bytes]) -> list[torch.Tensor]:
    return [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in samples]


def decode_on_device(
    files: list[torch.Tensor], device: torch.device, crop: int, gen: torch.Generator
) -> torch.Tensor:
    """JPEG bytes -> (B, 3, crop, crop) float32 in [-1, 1] on ``device``: ``decode_jpeg(device=...)`` (nvJPEG
    on CUDA), a random crop and a random horizontal mirror per image (offsets drawn from ``gen``)."""

    images = decode_jpeg(files, mode=ImageReadMode.RGB, device=device)  # list of (3, H, W) uint8
    crops = []
    for img in images:
        h, w = img.shape[-2:]
        y = int(torch.randint(0, h - crop + 1, (1,), generator=gen))
        x = int(torch.randint(0, w - crop + 1, (1,), generator=gen))
        crops.append(img[:, y : y + crop, x : x + crop])
    batch = torch.stack(crops)  # (B, 3, crop, crop) uint8
    mirror = (torch.rand(batch.shape[0], generator=gen) < 0.5).to(device).view(-1, 1, 1, 1)
    batch = torch.where(mirror, batch.flip(-1), batch)
    return batch.float().div_(127.5).sub_(1.0)


def _infinite(loader):
    while True:
        yield from loader


def _children_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process's live child processes (DataLoader workers), from /proc;
    0 where /proc is not there."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0.0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0.0
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids = f.read().split()
        except OSError:
            continue
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14, 15)
            except (OSError, IndexError, ValueError):
                continue
    return total


def _time(
    batches: Iterator[torch.Tensor], device: torch.device, warmup: int, iters: int
) -> tuple[float, float]:
    """(images/s, host CPU microseconds per image) of drawing ``iters`` batches after ``warmup`` batches."""
    for _ in range(warmup):
        next(batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    cpu0 = time.process_time() + _children_cpu_seconds()
    t0 = time.perf_counter()
    n = 0
    for _ in range(iters):
        x = next(batches)
        n += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    cpu = time.process_time() + _children_cpu_seconds() - cpu0
    return n / seconds, 1e6 * cpu / n


def _dali_missing() -> str | None:
    try:
        import nvidia.dali  # noqa: F401 - lazy, optional dependency: DALI may be absent
    except Exception as e:  # noqa: BLE001 - any import failure means no DALI row
        return (
            f"skipped: DALI not importable ({type(e).__name__}); bench/gpu.sh unpacks carried .dali* pieces"
        )
    return None


def run(device: str = "cpu", quick: bool = False, rows: list[dict] | None = None) -> list[dict]:
    """Loader throughput rows (images/s) for ``device``, appended to ``rows`` one by one."""
    device = torch.device(device)
    rows = [] if rows is None else rows
    tiny = dry_run()
    workers = 1 if tiny else max(1, min(8, os.cpu_count() or 1))
    batch, crop = (8, 32) if tiny else (BATCH, CROP)
    warmup, iters = (1, 2) if tiny else ((2, 6) if quick else (4, 30))
    count, size = (32, (64, 48)) if tiny else (128 if quick else 256, (128, 96))
    with tempfile.TemporaryDirectory() as folder:
        write_jpegs(folder, count, size)
        _folder_rows(
            folder,
            device,
            rows,
            tiny=tiny,
            workers=workers,
            batch=batch,
            crop=crop,
            warmup=warmup,
            iters=iters,
            size=size,
        )
    with tempfile.TemporaryDirectory() as folder:
        big = (160, 120) if tiny else (500, 375)
        write_jpegs(folder, 8 if tiny else (32 if quick else 128), big)
        _roi_rows(
            folder,
            device,
            rows,
            tiny=tiny,
            workers=workers,
            batch=batch,
            warmup=warmup,
            iters=iters,
            size=big,
        )
    return rows


def _measure(rows, row, make, device, warmup, iters, base, tiny) -> float | None:
    """Time one variant into ``rows`` (a failed or skipped row when it cannot run); returns its images/s."""
    print(f"bench.loader: {row['variant']} ...", file=sys.stderr, flush=True)
    try:
        batches, closer = make()
        value, cpu_us = _time(batches, device, warmup, iters)
        if closer is not None:
            closer.close()
        del batches  # closes the generator: its DataLoader's workers end now, not at exit
    except Exception as e:  # noqa: BLE001 - reported as the variant's row; the next one runs
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        rows.append(dict(row, value=None, ratio_vs_baseline=None, status=f"failed: {reason}"))
        return None
    note = f"host CPU {cpu_us:.3g} us/image" + ("; dry run: tiny sizes" if tiny else "")
    ratio = None if base is None else value / base
    rows.append(dict(row, value=value, ratio_vs_baseline=ratio, host_cpu_us_per_image=cpu_us, note=note))
    return value


def _roi_rows(folder, device, rows, *, tiny, workers, batch, warmup, iters, size) -> None:
    """DALI full decode (baseline) vs ROI decode, for a 64x64 crop and a resize-256 + 227x227 crop."""
    decode = "mixed" if device.type == "cuda" else "cpu"
    missing = _dali_missing()
    settings = [("crop", 32 if tiny else 64, 96 if tiny else 256)] + [
        ("resize-crop", 80 if tiny else 227, 96 if tiny else 256)
    ]
    for mode, crop, resize in settings:
        what = f"{crop}x{crop}" if mode == "crop" else f"resize {resize} + {crop}x{crop}"
        name = f"DALI random-crop {what} + mirror, JPEG {size[0]}x{size[1]}, batch {batch}, {workers} workers"
        baseline = f"dali full decode ({decode})"
        base = None
        for roi in (False, True):
            variant = f"dali ROI decode ({decode})" if roi else baseline
            row = dict(group="loader", name=name, variant=variant, baseline=baseline, unit="images/s")
            if missing:
                rows.append(dict(row, value=None, ratio_vs_baseline=None, status=missing))
                continue

            def make(roi=roi, mode=mode, crop=crop, resize=resize):
                s = build_dali_loader(
                    folder,
                    batch_size=batch,
                    crop_size=crop,
                    mode=mode,
                    resize_size=resize,
                    device=device,
                    num_workers=workers,
                    roi=roi,
                )
                return s, s

            value = _measure(rows, row, make, device, warmup, iters, base, tiny)
            base = value if not roi else base


def _folder_rows(folder, device, rows, *, tiny, workers, batch, crop, warmup, iters, size) -> None:
    """The small-JPEG workload: PIL (baseline), decode_jpeg, deepsim-torch, DALI, resident."""
    base = None
    pin = device.type == "cuda"

    def pil():
        loader = torch.utils.data.DataLoader(
            _PILFolder(folder, crop),
            batch_size=batch,
            shuffle=True,
            num_workers=workers,
            drop_last=True,
            pin_memory=pin,
            persistent_workers=True,
            timeout=LOADER_TIMEOUT_S,
        )
        return (x.to(device, non_blocking=True) for x in _infinite(loader)), None

    def gpu_decode():
        loader = torch.utils.data.DataLoader(
            _JpegBytes(folder),
            batch_size=batch,
            shuffle=True,
            num_workers=workers,
            drop_last=True,
            collate_fn=list,
            persistent_workers=True,
            timeout=LOADER_TIMEOUT_S,
        )
        gen = torch.Generator().manual_seed(0)
        return (decode_on_device(_as_tensors(files), device, crop, gen) for files in _infinite(loader)), None

    def deepsim_torch():
        s = build_loader(
            folder, batch_size=batch, crop_size=crop, device=device, num_workers=workers, cache=False
        )
        return s, s

    def dali():
        s = build_loader(
            folder, batch_size=batch, crop_size=crop, device=device, loader="dali", num_workers=workers
        )
        return s, s

    def resident():
        s = build_loader(folder, batch_size=batch, crop_size=crop, device=device, loader="resident")
        return s, s

    decode = "mixed" if device.type == "cuda" else "cpu"
    name = f"random-crop {crop}x{crop} + mirror, JPEG {size[0]}x{size[1]}, batch {batch}, {workers} workers"
    variants: list[tuple[str, Callable, str | None]] = [
        (BASELINE, pil, None),
        (f"torchvision decode_jpeg ({device.type})", gpu_decode, None),
        ("deepsim-torch", deepsim_torch, None),
        (f"dali ({decode} decode)", dali, _dali_missing()),
        ("deepsim-resident", resident, None),
    ]
    for variant, make, skipped in variants:
        row = dict(group="loader", name=name, variant=variant, baseline=BASELINE, unit="images/s")
        if skipped:
            rows.append(dict(row, value=None, ratio_vs_baseline=None, status=skipped))
            continue
        n = iters * 10 if variant == "deepsim-resident" else iters  # fast: more batches for a steady figure
        value = _measure(rows, row, make, device, warmup, n, base, tiny)
        if variant == BASELINE:
            base = value


def main(argv=None) -> None:
    group_main(run, __doc__.splitlines()[0], "128 images, fewer batches", argv)


if __name__ == "__main__":
    main()
