"""Achievable peaks of the benchmark device, measured at the start of a run (the roofline's ceilings).

FLOP/s: a large ``torch.matmul`` in the benchmark dtype (fp32 on CPU, bf16 on CUDA). Bytes/s: a large tensor
copy (bytes read + bytes written, over the time). Each is the best of a few repeats after a warm-up, so
they are achievable peaks, not the datasheet's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from bench.dryrun import dry_run

__all__ = ["measure_peaks"]


def _timer(device: str) -> Callable[[Callable[[], Any]], float]:
    cuda = str(device).startswith("cuda")

    def once(fn) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return once


def _best(once, fn, repeats: int, min_time: float) -> float:
    """Shortest of at least ``repeats`` timed calls, going on until ``min_time`` s have passed (at most
    4x repeats): a shared or boosting machine shows its peak only in some windows."""
    t0, times = time.perf_counter(), []
    while len(times) < repeats or (time.perf_counter() - t0 < min_time and len(times) < 4 * repeats):
        times.append(once(fn))
    return min(times)


def measure_peaks(device: str, quick: bool = False) -> dict:
    """Achievable peaks on ``device``: matmul FLOP/s in the benchmark dtype and copy bandwidth in bytes/s.

    CPU: fp32 matmul (n = 2048 quick, 3072 full), 128/256 MiB copy. CUDA: bf16 matmul (n = 4096 / 8192),
    0.5/1 GiB copy. Each is the best of several repeats after a warm-up (repeating for at least 1 s /
    3 s on CPU, 0.5 s / 1 s on CUDA). A dry run (bench/dryrun.py) measures n = 256 and 8 MiB, briefly.

    Returns:
        {"device", "dtype", "flops_per_s", "bytes_per_s", "matmul_n", "copy_bytes", "method"}.
    """

    cuda = str(device).startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    n = (4096 if quick else 8192) if cuda else (2048 if quick else 3072)
    copy_mib = (512 if quick else 1024) if cuda else (128 if quick else 256)
    repeats = (5 if quick else 10) if cuda else (3 if quick else 5)
    min_time = (0.5 if quick else 1.0) if cuda else (1.0 if quick else 3.0)  # seconds of repeats, at least
    if dry_run():
        n, copy_mib, repeats, min_time = 256, 8, 2, 0.0
    once = _timer(device)

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    once(lambda: torch.matmul(a, b))
    best_mm = _best(once, lambda: torch.matmul(a, b), repeats, min_time)

    numel = copy_mib * 2**20 // 4
    src = torch.empty(numel, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    once(lambda: dst.copy_(src))
    best_copy = _best(once, lambda: dst.copy_(src), repeats, min_time)
    moved = 2 * src.numel() * src.element_size()  # read src + write dst
    name = str(dtype).removeprefix("torch.")
    return {
        "device": str(device),
        "dtype": name,
        "flops_per_s": 2 * n**3 / best_mm,
        "bytes_per_s": moved / best_copy,
        "matmul_n": n,
        "copy_bytes": moved,
        "method": f"best of >= {repeats} repeats and >= {min_time:g} s: torch.matmul {n}x{n} {name}; "
        f"tensor copy {copy_mib} MiB (read + write)",
    }
