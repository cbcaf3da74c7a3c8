"""LPIPS benchmark: deepsim.metrics.LPIPS (fused distance) against the lpips package, AlexNet, same backbone.

Rows (``run(device, quick, rows)``), group="lpips", per image size and direction ("forward": no graph;
"forward+backward": the gradient with respect to the first input, the second needing none, as in a loss):

  * images/s of ``lpips package`` (the baseline: ``lpips.LPIPS(net="alex", pnet_rand=True)``) and of
    ``deepsim LPIPS`` (``LPIPS("alex", backbone_weights="random")``: the same random backbone loaded in both,
    the lpips package's shipped linear weights);
  * memory (MiB) of each: on CUDA the peak allocated during one call above what was allocated before it
    (``torch.cuda.max_memory_allocated``); on CPU, where torch keeps no peak, the bytes saved for backward
    (distinct storages other than the weights, via ``torch.autograd.graph.saved_tensors_hooks``), the part of
    the peak the two differ in.

Sizes: batch 64 at 64x64 and 256x256 on CUDA (bf16 autocast for both, as the targets ask). On CPU the
PyTorch reference of the fused op runs (Triton needs CUDA), in fp32, with batch 64 at 64x64 and batch 8 at
256x256 (a 2-core CPU needs minutes for batch 64 there). Each variant is warmed up, then timed with a CUDA
synchronize before the clock stops; the two alternate for two rounds and each keeps its best (one round in
a dry run). Where lpips is not installed its rows say "skipped". A dry run: batch
2 at 32x32 and 64x64, one iteration.

    python3 -m bench.lpips [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings

import torch

from bench.cli import group_main
from bench.dryrun import dry_run
from deepsim.metrics import LPIPS

BASELINE = "lpips package"
OURS = "deepsim LPIPS"


def _plan(device: torch.device, quick: bool) -> list[tuple[int, int, int]]:
    """(side, batch, timed iterations) per size."""
    if dry_run():
        return [(32, 2, 1), (64, 2, 1)]
    if device.type == "cuda":
        return [(64, 64, 10 if quick else 30), (256, 64, 5 if quick else 15)]
    return [(64, 16 if quick else 64, 2), (256, 4 if quick else 8, 2)]


def _models(device: torch.device):
    ours = LPIPS("alex", backbone_weights="random").to(device)
    try:
        # lazy, optional dependency: lpips may be absent
        import lpips
    except ImportError:
        return ours, None
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        theirs = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    slices = [theirs.net.slice1, theirs.net.slice2, theirs.net.slice3, theirs.net.slice4, theirs.net.slice5]
    convs = [m for m in ours.comparator.layers if isinstance(m, torch.nn.Conv2d)]
    theirs_convs = [m for s in slices for m in s if isinstance(m, torch.nn.Conv2d)]
    for a, b in zip(convs, theirs_convs):  # the same backbone in both
        b.weight.data.copy_(a.weight.data)
        b.bias.data.copy_(a.bias.data)
    return ours, theirs.to(device).eval()


def _call(model, x, y, backward: bool):
    if backward:
        x = x.detach().requires_grad_()
        model(x, y).sum().backward()
        return x.grad
    with torch.no_grad():
        return model(x, y)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _time(model, x, y, backward: bool, device: torch.device, iters: int) -> float:
    with _autocast(device):
        _call(model, x, y, backward)  # warm-up (Triton compile, cuDNN choice)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            _call(model, x, y, backward)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return iters * x.shape[0] / (time.perf_counter() - start)


def _memory_mib(model, x, y, backward: bool, device: torch.device) -> float:
    """CUDA: peak allocated during one call above the allocation before it. CPU: bytes saved for backward
    (forward+backward only; 0 for the forward, which saves nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with _autocast(device):
            _call(model, x, y, backward)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    storages: dict[int, int] = {}
    resident = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in resident:  # weights are held anyway
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _call(model, x, y, backward)
    return sum(storages.values()) / 2**20


def run(device: str = "cpu", quick: bool = False, rows: list[dict] | None = None) -> list[dict]:
    """LPIPS rows (images/s and MiB, ours against the lpips package), appended to ``rows`` one by one."""
    device = torch.device(device)
    rows = [] if rows is None else rows
    ours, theirs = _models(device)
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    note = (
        "dry run: tiny sizes"
        if dry_run()
        else (None if device.type == "cuda" else "CPU: the fused op's PyTorch reference (Triton needs CUDA)")
    )
    memory_unit = "MiB" if device.type == "cuda" else "MiB saved for backward"
    rounds = 1 if dry_run() else 2  # baseline and ours alternate; the best round of each counts (shared CPUs)
    for side, batch, iters in _plan(device, quick):
        g = torch.Generator().manual_seed(0)
        x = (torch.rand(batch, 3, side, side, generator=g) * 2 - 1).to(device)
        y = (torch.rand(batch, 3, side, side, generator=g) * 2 - 1).to(device)
        for backward in (False, True):
            direction = "forward+backward" if backward else "forward"
            name = f"alex {direction} {side}x{side} batch {batch} {precision}"
            variants = [(BASELINE, theirs), (OURS, ours)]
            rates: dict[str, float] = {}
            mems: dict[str, float | None] = {}
            failed: dict[str, str] = {}
            for _ in range(rounds):
                for variant, model in variants:
                    if model is None or variant in failed:
                        continue
                    print(f"bench.lpips: {name}: {variant} ...", file=sys.stderr, flush=True)
                    try:
                        rates[variant] = max(
                            rates.get(variant, 0.0), _time(model, x, y, backward, device, iters)
                        )
                        if variant not in mems:
                            mems[variant] = (
                                _memory_mib(model, x, y, backward, device)
                                if backward or device.type == "cuda"
                                else None
                            )
                    except Exception as e:  # noqa: BLE001 - reported as the variant's rows; the next one runs
                        failed[variant] = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            for variant, model in variants:
                rate_row = dict(group="lpips", name=name, variant=variant, baseline=BASELINE, unit="images/s")
                mem_row = dict(
                    group="lpips", name=f"{name} memory", variant=variant, baseline=BASELINE, unit=memory_unit
                )
                status = (
                    "skipped: the lpips package is not installed (pip install lpips)"
                    if model is None
                    else f"failed: {failed[variant]}"
                    if variant in failed
                    else None
                )
                if status is not None:
                    rows.append(dict(rate_row, value=None, ratio_vs_baseline=None, status=status))
                    if backward or device.type == "cuda":
                        rows.append(dict(mem_row, value=None, ratio_vs_baseline=None, status=status))
                    continue
                base_rate, base_mem = rates.get(BASELINE), mems.get(BASELINE)
                rows.append(
                    dict(
                        rate_row,
                        value=rates[variant],
                        note=note,
                        ratio_vs_baseline=None if not base_rate else rates[variant] / base_rate,
                    )
                )
                if mems[variant] is not None:  # a CPU forward saves nothing: no memory row
                    rows.append(
                        dict(
                            mem_row,
                            value=mems[variant],
                            note=note,
                            ratio_vs_baseline=None if not base_mem else mems[variant] / base_mem,
                        )
                    )
    return rows


def main(argv=None) -> None:
    group_main(run, __doc__.splitlines()[0], "fewer iterations, smaller CPU batches", argv)


if __name__ == "__main__":
    main()
