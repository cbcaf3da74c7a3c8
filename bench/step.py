"""Full training-step benchmark: images/s of one DeePSiM iteration (G, C, D, both backwards, both Adams).

Rows (``run(device, quick)``): group="step", name (workload), variant, baseline, value, unit,
ratio_vs_baseline, and where known flops (per step), tflops, peak_fraction, peak_memory (bytes).

Workloads: the autoencoder (batch 64, 64x64, comparator AlexNet conv3 with random weights: same FLOPs as
the trained one) and the fc6 inversion (batch 64, 227x227, Phi and comparator AlexNet with random weights).
Variants, each on a fresh trainer with the same initial weights, synthetic batches already on the device
(the loader is bench/loader.py's business):

    eager                      DeePSiMTrainer.step, plain aten ops (DEEPSIM_KERNELS=reference)   <- baseline
    eager-fused                DeePSiMTrainer.step with the fused Triton kernels (CUDA only)
    compile-modules            torch.compile(G), (D), (C) ("default" mode), plain aten ops, eager step around
    compile-modules-max-autotune   the same with mode="max-autotune-no-cudagraphs"
    compiled-step              the whole step as one graph (deepsim.train.compiled), plain aten ops
    compiled-step-fused        the same with the fused kernels (CUDA only)
    compiled-step-cudagraphs   the fused compiled step under CUDA graphs ("reduce-overhead", CUDA only)

FLOPs per step are counted once with torch.utils.flop_counter.FlopCounterMode on the eager step (matmuls and
convolutions, forward and backward); the fraction of peak uses the card's dense peak for the precision the
convolutions run in (TF32 when cudnn.allow_tf32, PyTorch's default). Peak memory is
torch.cuda.max_memory_allocated over the timed iterations. Also reported (any device): graph breaks in the
compiled step, from torch._dynamo.explain.

On CPU, ``quick`` runs a reduced version (autoencoder batch 4 at 40x40, eager vs compiled step, and the
inversion eager step with a narrower generator) in about two minutes: CPU numbers say nothing about a GPU.
Targets on an H100 (issue 5): compiled-step-cudagraphs >= 3x eager, >= 1.3x compile-modules-max-autotune,
>= 40,000 images/s for the autoencoder.

    python3 -m bench.step [--quick] [--device cuda|cpu]
"""

from __future__ import annotations

import copy
import time

import torch
import torch._dynamo
from deepsim.kernels import use_backend

from bench.common import GroupTimeout, group_main
from deepsim.config import get_preset
from deepsim.train.compiled import CompiledStep, count_graph_breaks
from deepsim.train.factory import build_trainer

# Dense peak TFLOPS by device-name fragment and math mode (NVIDIA data sheets, SXM parts).
PEAK_TFLOPS = {
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0},
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
}


def _peak_tflops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    mode = precision if precision == "bf16" else ("tf32" if torch.backends.cudnn.allow_tf32 else "fp32")
    for fragment, peaks in PEAK_TFLOPS.items():
        if fragment in name:
            return peaks[mode]
    return None


def _workloads(device: torch.device, quick: bool) -> list[tuple[str, object]]:
    cpu = device.type == "cpu"
    autoencoder = get_preset("autoencoder-photos").replace(
        batch_size=4 if cpu and quick else 64, image_size=40 if cpu and quick else 64, device=str(device)
    )
    suffix = f" ({torch.get_num_threads()} cpu thread(s))" if cpu else ""
    items = [(f"autoencoder b{autoencoder.batch_size} {autoencoder.image_size}x{autoencoder.image_size}{suffix}", autoencoder)]
    try:
        import deepsim.applications  # noqa: F401 - the inversion trainer lives there
    except ImportError:
        return items
    invert = get_preset("invert-fc6").replace(
        invert_network="alexnet-random", comparator="alexnet-random:pool5", device=str(device),
        batch_size=2 if cpu else 64, fc_width=1024 if cpu and quick else 4096,
    )
    items.append((f"invert-fc6 b{invert.batch_size} 227x227" + (f" fc{invert.fc_width}" if invert.fc_width != 4096 else "") + suffix, invert))
    return items


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(step, batches, device, warmup: int, iters: int) -> float:
    """Seconds per step (mean over ``iters`` after ``warmup``), synchronised at both ends."""
    for i in range(warmup):
        step(batches[i % len(batches)])
    _sync(device)
    start = time.perf_counter()
    for i in range(iters):
        step(batches[i % len(batches)])
    _sync(device)
    return (time.perf_counter() - start) / iters


def _count_flops(trainer, batch) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    probe = copy.deepcopy(trainer)
    with use_backend("reference"), FlopCounterMode(display=False) as counter:
        probe.step(batch)
    return int(counter.get_total_flops())


def _compile_modules(trainer, mode: str):
    """torch.compile each network (G, D and the comparator) in place; the step stays eager."""
    options = dict(mode=mode)
    trainer.generator.compile(**options)
    if trainer.discriminator is not None:
        trainer.discriminator.compile(**options)
    if trainer.loss.comparator is not None:
        trainer.loss.comparator.compile(**options)
    return trainer.step


def _variants(device: torch.device, quick: bool):
    cuda = device.type == "cuda"
    # (variant, kernel backend, how to make the step from a fresh trainer)
    # On CUDA the headline variants come first and max-autotune (minutes of autotuning) last, so a group
    # cut short by --group-timeout still reports them (run() keeps the rows measured before the cut).
    variants = [("eager", "reference", lambda t: t.step)]
    if cuda:
        variants += [
            ("eager-fused", "auto", lambda t: t.step),
            ("compiled-step-cudagraphs", "auto", lambda t: CompiledStep(t, "reduce-overhead")),
            ("compiled-step-fused", "auto", lambda t: CompiledStep(t, "default")),
        ]
    variants.append(("compiled-step", "reference", lambda t: CompiledStep(t, "default")))
    if cuda or not quick:
        variants += [
            ("compile-modules", "reference", lambda t: _compile_modules(t, "default")),
            ("compile-modules-max-autotune", "reference", lambda t: _compile_modules(t, "max-autotune-no-cudagraphs")),
        ]
    return variants


def bench_workload(name: str, config, device: torch.device, quick: bool, rows: list[dict] | None = None) -> list[dict]:
    """The rows of one workload, appended to ``rows`` (if given) as each is measured; returns them."""
    torch.manual_seed(0)
    reference = build_trainer(config, device)
    gen = torch.Generator(device="cpu").manual_seed(1)
    batches = [
        (torch.rand(config.batch_size, 3, config.image_size, config.image_size, generator=gen) * 2 - 1).to(device)
        for _ in range(2)
    ]
    flops = _count_flops(reference, batches[0])
    peak = _peak_tflops(device, config.precision)
    cuda, cpu_quick = device.type == "cuda", device.type == "cpu" and quick
    warmup, iters = (3, 5) if cpu_quick else ((3, 10) if device.type == "cpu" else (10, 30 if quick else 100))
    invert_on_cpu = config.task == "invert" and device.type == "cpu"
    rows, base = ([] if rows is None else rows), None
    first = len(rows)
    for variant, kernels, make in _variants(device, quick):
        if invert_on_cpu and variant != "eager":
            continue  # compiling the 227x227 step on a CPU takes many minutes and says nothing about a GPU
        trainer = copy.deepcopy(reference)
        torch._dynamo.reset()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        with use_backend(kernels):
            step = make(trainer)
            seconds = _time(step, batches, device, warmup if variant != "eager" or not cpu_quick else 1, iters)
        images_per_s = config.batch_size / seconds
        if base is None:
            base = images_per_s
        achieved = flops / seconds / 1e12
        rows.append(
            dict(
                group="step", name=name, variant=variant, baseline="eager", value=images_per_s, unit="img/s",
                ratio_vs_baseline=images_per_s / base, flops=flops, tflops=achieved,
                peak_fraction=None if peak is None else achieved / peak,
                peak_memory=torch.cuda.max_memory_allocated(device) if cuda else None,
            )
        )
        del trainer, step
    by_variant = {r["variant"]: r["value"] for r in rows[first:]}
    autotuned = by_variant.get("compile-modules-max-autotune")
    for r in rows[first:]:
        if autotuned and r["variant"].startswith("compiled-step"):
            r["ratio_vs_compile_modules_max_autotune"] = r["value"] / autotuned
    if config.task != "invert" or not invert_on_cpu:
        graphs, breaks, _ = count_graph_breaks(copy.deepcopy(reference), batches[0])
        rows.append(
            dict(group="step", name=name, variant="graph breaks in the compiled step", baseline="0", value=breaks,
                 unit="breaks", ratio_vs_baseline=None, graphs=graphs)  # fmt: skip
        )
    return rows


def run(device: str = "cuda", quick: bool = False) -> list[dict]:
    """Every step-benchmark row for ``device`` (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench.step: --device cuda asked for, but torch sees no CUDA device")
    threads = torch.get_num_threads()
    if device.type == "cpu" and quick:
        # One intra-op thread: reproducible on shared CI runners, where OpenMP threads spinning against other
        # processes can make a step 50x slower. The row names say so.
        torch.set_num_threads(1)
    try:
        rows = []
        try:
            for name, config in _workloads(device, quick):
                bench_workload(name, config, device, quick, rows)
                if device.type == "cpu":
                    for r in rows:
                        r["cpu_threads"] = torch.get_num_threads()
        except GroupTimeout as e:  # keep what was measured; one row says where the group was cut
            rows.append(dict(group="step", name="(step group)", variant="", baseline="", value=None, unit="",
                             ratio_vs_baseline=None, status=f"partial: {e}"))  # fmt: skip
        return rows
    finally:
        torch.set_num_threads(threads)


def main(argv=None) -> None:
    group_main(run, __doc__.splitlines()[0], "fewer iterations (CPU: a reduced version, ~2 min)", argv)


if __name__ == "__main__":
    main()
