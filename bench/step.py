"""Full training-step benchmark: images/s of one DeePSiM iteration (G, C, D, both backwards, both Adams).

Design notes: docs/benchmarks.md.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch._dynamo
import torch._inductor.config as inductor_config
from deepsim.kernels import fp32_uses_tf32, use_backend
from torch._dynamo.utils import counters
from torch.utils.flop_counter import FlopCounterMode

from bench.cli import group_main
from bench.dryrun import dry_run
from bench.timelimit import seconds_left
from deepsim.config import get_preset
from deepsim.tasks import TASKS
from deepsim.train.compiled import CompiledStep
from deepsim.train.factory import build_trainer

# Dense peak TFLOPS by device-name fragment and math mode (NVIDIA data sheets, SXM parts).
PEAK_TFLOPS = {
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0},
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
}
# Seconds that compile-modules-max-autotune is expected to need per workload (autotuning every conv and
# matmul of G, D and C, forward and backward); it runs only where the group's limit leaves that much.
MAX_AUTOTUNE_NEEDS_S = {"cuda": 180.0, "cpu": 900.0, "dry-run": 2.0}


def _peak_tflops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    mode = precision if precision == "bf16" else ("tf32" if fp32_uses_tf32() else "fp32")
    for fragment, peaks in PEAK_TFLOPS.items():
        if fragment in name:
            return peaks[mode]
    return None


def _workloads(device: torch.device, quick: bool) -> list[tuple[str, object]]:
    cpu, tiny = device.type == "cpu", dry_run()
    suffix = f" ({torch.get_num_threads()} cpu thread(s))" if cpu else ""
    # 40 px on a CPU: the smallest multiple of 8 that the derived code's unpadded D takes (35)
    autoencoder = get_preset("autoencoder-photos").replace(
        batch_size=4 if cpu and quick else 64, image_size=40 if cpu and quick else 64, device=str(device)
    )
    if tiny:
        autoencoder = autoencoder.replace(batch_size=2, comparator="alexnet-random:conv2")
    size = f"{autoencoder.image_size}x{autoencoder.image_size}"
    items = [(f"autoencoder b{autoencoder.batch_size} {size}{suffix}", autoencoder)]
    invert = get_preset("invert-fc6").replace(
        invert_network="alexnet-random",
        comparator="alexnet-random:pool5",
        device=str(device),
        batch_size=2 if cpu else 64,
        fc_width=1024 if cpu and quick else 4096,
    )
    if tiny:  # 64x64: the smallest size at which the comparator's pool5 is defined; Phi still sees 227x227
        invert = invert.replace(image_size=64, fc_width=64, batch_size=1)
    size = f"{invert.image_size}x{invert.image_size}"
    width = f" fc{invert.fc_width}" if invert.fc_width != 4096 else ""
    items.append((f"invert-fc6 b{invert.batch_size} {size}{width}{suffix}", invert))
    return items


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(step, batches, device, warmup: int, iters: int) -> tuple[float, float]:
    """(seconds of the first call, seconds per step over ``iters`` after ``warmup`` calls in all)."""
    t0 = time.perf_counter()
    step(batches[0])
    _sync(device)
    first = time.perf_counter() - t0
    for i in range(1, warmup):
        step(batches[i % len(batches)])
    _sync(device)
    start = time.perf_counter()
    for i in range(iters):
        step(batches[i % len(batches)])
    _sync(device)
    return first, (time.perf_counter() - start) / iters


def _count_flops(trainer, batch) -> int:
    probe = copy.deepcopy(trainer)
    with use_backend("reference"), FlopCounterMode(display=False) as counter:
        probe.step(batch)
    return int(counter.get_total_flops())


def _compile_modules(trainer, mode: str, backend: str = "inductor"):
    """torch.compile each network (G, D and the comparator) in place; the step stays eager."""
    options = dict(mode=mode) if backend == "inductor" else dict(backend=backend)
    trainer.generator.compile(**options)
    if trainer.discriminator is not None:
        trainer.discriminator.compile(**options)
    if trainer.loss.comparator is not None:
        trainer.loss.comparator.compile(**options)
    return trainer.step


class Variant:
    """One way to run the step: its kernel backend and how to build the step from a fresh trainer.

    ``stand_in`` (dry runs and CPU runs of a CUDA-only variant) says what runs instead, for the row's note.
    """

    def __init__(self, name: str, kernels: str, make: Callable, stand_in: str | None = None):
        self.name, self.kernels, self.make, self.stand_in = name, kernels, make, stand_in


def _variants(device: torch.device, quick: bool) -> list[Variant]:
    """The main variants, in the order they run (max-autotune is separate: see :func:`run`)."""
    if dry_run():  # every variant, each through a stand-in that keeps its code path but compiles nothing
        uncompiled = "the functional step uncompiled (CompiledStep mode 'eager') instead of inductor"
        return [
            Variant("eager", "reference", lambda t: t.step),
            Variant(
                "eager-fused", "auto", lambda t: t.step, "fused kernels run their reference on CPU tensors"
            ),
            Variant("compiled-step", "reference", lambda t: CompiledStep(t, "eager"), uncompiled),
            Variant("compiled-step-fused", "auto", lambda t: CompiledStep(t, "eager"), uncompiled),
            Variant(
                "compiled-step-cudagraphs",
                "auto",
                lambda t: CompiledStep(t, "eager"),
                uncompiled + "; no CUDA graphs on a CPU",
            ),
        ]
    variants = [Variant("eager", "reference", lambda t: t.step)]
    if device.type == "cuda":
        variants.append(Variant("eager-fused", "auto", lambda t: t.step))
    variants.append(Variant("compiled-step", "reference", lambda t: CompiledStep(t, "default")))
    if device.type == "cuda":
        variants += [
            Variant("compiled-step-fused", "auto", lambda t: CompiledStep(t, "default")),
            Variant("compiled-step-cudagraphs", "auto", lambda t: CompiledStep(t, "reduce-overhead")),
        ]
    return variants


def _max_autotune_variant() -> Variant:
    if dry_run():
        return Variant(
            "compile-modules-max-autotune",
            "reference",
            lambda t: t.step,
            "the eager step instead of compiling and autotuning each module",
        )
    return Variant(
        "compile-modules-max-autotune",
        "reference",
        lambda t: _compile_modules(t, "max-autotune-no-cudagraphs"),
    )


class Workload:
    """One workload's shared state: initial trainer, batches, FLOPs per step, baseline, timing counts."""

    def __init__(self, name: str, config, device: torch.device, quick: bool):
        self.name, self.config, self.device = name, config, device
        torch.manual_seed(0)
        self.reference = build_trainer(config, device, TASKS)
        gen = torch.Generator(device="cpu").manual_seed(1)
        self.batches = [
            (
                torch.rand(config.batch_size, 3, config.image_size, config.image_size, generator=gen) * 2 - 1
            ).to(device)
            for _ in range(2)
        ]
        self.flops = _count_flops(self.reference, self.batches[0])
        self.peak = _peak_tflops(device, config.precision)
        cpu_quick = device.type == "cpu" and quick
        if dry_run():  # the first call, then one timed call
            self.warmup, self.iters = 1, 1
        elif device.type == "cpu":
            self.warmup, self.iters = (3, 5) if cpu_quick else (3, 10)
        else:  # a few calls for CUDA-graph trees to warm up, record and replay
            self.warmup, self.iters = 5, 30 if quick else 50
        self.base: float | None = None  # the eager row's images/s

    def row(self, variant: str, **values) -> dict:
        return {"group": "step", "name": self.name, "variant": variant, "baseline": "eager", **values}

    def measure(self, variant: Variant) -> dict:
        """Time ``variant`` on a fresh copy of the initial trainer; returns its row."""
        device, cuda = self.device, self.device.type == "cuda"
        left = seconds_left()
        print(
            f"bench.step: {self.name}: {variant.name} ..."
            + ("" if left is None else f" ({left:.0f} s left)"),
            file=sys.stderr,
            flush=True,
        )
        t0 = time.perf_counter()
        trainer = copy.deepcopy(self.reference)
        torch._dynamo.reset()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        with use_backend(variant.kernels):
            step = variant.make(trainer)
            warmup = 1 if variant.name == "eager" and device.type == "cpu" else self.warmup
            first, seconds = _time(step, self.batches, device, warmup, self.iters)
        images_per_s = self.config.batch_size / seconds
        print(
            f"bench.step: {self.name}: {variant.name}: {images_per_s:.4g} img/s, first call {first:.1f} s, "
            f"{time.perf_counter() - t0:.1f} s in all",
            file=sys.stderr,
            flush=True,
        )
        if variant.name == "eager":
            self.base = images_per_s
        achieved = self.flops / seconds / 1e12
        return self.row(
            variant.name,
            value=images_per_s,
            unit="img/s",
            ratio_vs_baseline=None if self.base is None else images_per_s / self.base,
            flops=self.flops,
            tflops=achieved,
            peak_fraction=None if self.peak is None else achieved / self.peak,
            peak_memory=torch.cuda.max_memory_allocated(device) if cuda else None,
            first_call_s=first,
            wall_s=time.perf_counter() - t0,
            note=None if variant.stand_in is None else f"stand-in: {variant.stand_in}",
        )


def _graph_break_row(workload: Workload, breaks: int, graphs: int, stand_in: str | None) -> dict:
    note = (
        f"{graphs} graph(s) compiled with fullgraph=True"
        if stand_in is None
        else "stand-in: nothing compiled"
    )
    return workload.row(
        "graph breaks in the compiled step",
        value=breaks,
        unit="breaks",
        baseline="0",
        ratio_vs_baseline=None,
        graphs=graphs,
        note=note,
    )


ESTIMATES = Path(__file__).with_name("step_estimates.json")  # bench.time_model's, written on a CPU machine


def _with_estimate(workload: Workload, row: dict) -> dict:
    """Measured against estimated seconds per step (bench.time_model's estimate for the same workload and
    batch, from ESTIMATES), so the model can be corrected: ``estimated_step_s``,
    ``measured_over_estimate``."""
    try:
        estimates = json.loads(ESTIMATES.read_text())
    except (OSError, ValueError):
        return row
    task = "invert-fc6" if workload.config.task == "invert" else workload.config.task
    for e in estimates:
        if (
            e.get("workload") == task
            and e.get("batch") == workload.config.batch_size
            and e.get("kernels") == "auto"
        ):
            measured = workload.config.batch_size / row["value"] if row.get("value") else None
            row["estimated_step_s"] = e["estimated_step_s"]
            row["measured_step_s"] = measured
            row["measured_over_estimate"] = None if measured is None else measured / e["estimated_step_s"]
            break
    return row


def _measure_cudagraphs(workload: Workload, variant: Variant, rows: list[dict]) -> None:
    """The cudagraphs variant, compiled with cudagraph_or_error so that a silent fallback fails the check
    row; after a failure it is timed again the way inductor falls back. Appends the check row, then the
    timing row (with ``cudagraph_skips``: inductor's skip counter over the variant)."""
    skips = counters["inductor"]["cudagraph_skips"]
    check = workload.row("cudagraphs OR_ERROR check", baseline="0", unit="skips", ratio_vs_baseline=None)
    try:
        with inductor_config.patch({"triton.cudagraph_or_error": True}):
            row = workload.measure(variant)
        check.update(
            value=counters["inductor"]["cudagraph_skips"] - skips,
            note="compiled with TORCHINDUCTOR_CUDAGRAPH_OR_ERROR's setting: no fallback",
        )
    except Exception as e:  # noqa: BLE001 - inductor's reason for the fallback is the finding
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        check.update(value=counters["inductor"]["cudagraph_skips"] - skips, status=f"failed: {reason}")
        rows.append(check)
        row = workload.measure(variant)
        row["note"] = "; ".join(filter(None, [row.get("note"), "CUDA graphs fell back (see the check row)"]))
        row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips
        rows.append(_with_estimate(workload, row))
        return
    row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips
    rows.append(check)
    rows.append(_with_estimate(workload, row))


def _failed(workload: Workload, variant: str, error: Exception) -> dict:
    reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
    return workload.row(variant, value=None, unit="img/s", ratio_vs_baseline=None, status=f"failed: {reason}")


def bench_workload(workload: Workload, quick: bool, rows: list[dict]) -> None:
    """The main variants of one workload, each row appended to ``rows`` as it is measured. A variant that
    fails becomes a failed row and the next one runs (a time limit still stops the group)."""
    invert_on_cpu = workload.config.task == "invert" and workload.device.type == "cpu"
    for variant in _variants(workload.device, quick):
        if invert_on_cpu and variant.name != "eager":
            continue  # compiling the 227x227 step on a CPU takes many minutes and says nothing about a GPU
        try:
            if variant.name == "compiled-step-cudagraphs":
                _measure_cudagraphs(workload, variant, rows)
                continue
            breaks, graphs = sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]
            rows.append(workload.measure(variant))
            if variant.name == "compiled-step":
                rows.append(
                    _graph_break_row(
                        workload,
                        sum(counters["graph_break"].values()) - breaks,
                        counters["stats"]["unique_graphs"] - graphs,
                        variant.stand_in,
                    )
                )
        except Exception as e:  # noqa: BLE001 - one broken variant must not hide the others
            rows.append(_failed(workload, variant.name, e))


def _max_autotune(workload: Workload, rows: list[dict]) -> None:
    """compile-modules-max-autotune where the group's time limit leaves room, else a row saying why not."""
    variant = _max_autotune_variant()
    kind = "dry-run" if dry_run() else workload.device.type
    needs, left = MAX_AUTOTUNE_NEEDS_S[kind], seconds_left()
    if workload.config.task == "invert" and workload.device.type == "cpu":
        return
    if left is not None and left < needs:
        rows.append(
            workload.row(
                variant.name,
                value=None,
                unit="img/s",
                ratio_vs_baseline=None,
                status=f"skipped: needs about {needs:.0f} s, {max(left, 0):.0f} s left in the group's limit",
            )
        )
        return
    try:
        row = workload.measure(variant)
    except Exception as e:  # noqa: BLE001 - reported as the variant's row
        rows.append(_failed(workload, variant.name, e))
        return
    rows.append(row)
    for r in rows:
        if (
            r.get("name") == workload.name
            and str(r.get("variant")).startswith("compiled-step")
            and r.get("value")
        ):
            r["ratio_vs_compile_modules_max_autotune"] = r["value"] / row["value"]


def run(device: str = "cuda", quick: bool = False, rows: list[dict] | None = None) -> list[dict]:
    """Every step-benchmark row for ``device`` (see the module docstring), appended to ``rows`` one by one.

    On CPU quick mode skips max-autotune; elsewhere it runs last and only with time left in the limit.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench.step: --device cuda asked for, but torch sees no CUDA device")
    rows = [] if rows is None else rows
    threads = torch.get_num_threads()
    if device.type == "cpu" and (quick or dry_run()):
        # One intra-op thread: reproducible on shared CI runners, where OpenMP threads spinning against other
        # processes can make a step 50x slower. The row names say so.
        torch.set_num_threads(1)
    try:
        workloads = []
        for name, config in _workloads(device, quick):
            try:
                workload = Workload(name, config, device, quick)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory building it: the next workload runs
                rows.append(
                    dict(
                        group="step",
                        name=name,
                        variant="",
                        baseline="",
                        value=None,
                        unit="",
                        ratio_vs_baseline=None,
                        status=f"failed: {type(e).__name__}: {e}"[:300],
                    )
                )
                continue
            workloads.append(workload)
            bench_workload(workload, quick, rows)
        if device.type == "cuda" or not quick or dry_run():
            for workload in workloads:
                _max_autotune(workload, rows)
        return rows
    finally:
        torch.set_num_threads(threads)


def main(argv=None) -> None:
    group_main(run, __doc__.splitlines()[0], "fewer iterations (CPU: a reduced version, ~2 min)", argv)


if __name__ == "__main__":
    main()
