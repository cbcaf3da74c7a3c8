"""Kernel benchmarks: fused ops vs eager PyTorch and torch.compile, on the network's layer shapes.

Rows (``run(device, quick)``) have keys group="kernels", name, variant, baseline, value, unit,
ratio_vs_baseline. On CUDA (bf16, batch 64): conv_lrelu / conv_transpose_lrelu forward+backward vs eager
(cuDNN conv + bias + leaky_relu) and torch.compile of the eager block; feature_distance forward+backward
with achieved bytes/s vs the card's bandwidth. Everywhere (CPU too): activation bytes saved for backward.

Saved-bytes definition: a block whose output feeds a consumer that saves it (as the next layer does);
unique storages that autograd saves, minus parameters and the block's input (alive anyway). Eager keeps
pre-activation + output, the fused block only the output.

    python3 -m bench.kernels [--quick] [--device cuda|cpu]
"""

from __future__ import annotations

import torch

from bench.common import GroupTimeout, group_main

try:  # installed package
    import deepsim.kernels as K
except ImportError:  # plain checkout
    import kernels as K

# (name, C_in, C_out, H_in, kernel, stride, padding); autoencoder at 64x64 input, discriminator at 64x64.
CONV_LAYERS = [
    ("enc1 3->32 k5s2 64", 3, 32, 64, 5, 2, 2),
    ("enc2 32->64 k5s2 32", 32, 64, 32, 5, 2, 2),
    ("enc3 64->128 k3s2 16", 64, 128, 16, 3, 2, 1),
    ("dec 8->128 k3s1 8", 8, 128, 8, 3, 1, 1),
    ("dec 64->64 k3s1 16", 64, 64, 16, 3, 1, 1),
    ("D1 3->32 k7s2 64", 3, 32, 64, 7, 2, 3),
    ("D2 32->64 k5s1 32", 32, 64, 32, 5, 1, 2),
    ("D3 64->128 k3s2 32", 64, 128, 32, 3, 2, 1),
    ("D4 128->256 k3s1 16", 128, 256, 16, 3, 1, 1),
    ("D5 256->256 k3s2 16", 256, 256, 16, 3, 2, 1),
]
UPCONV_LAYERS = [
    ("up1 128->64 k4s2 8", 128, 64, 8, 4, 2, 1),
    ("up2 64->32 k4s2 16", 64, 32, 16, 4, 2, 1),
]
# Comparator-like taps for feature_distance (batch 64).
FEATURE_TAPS = [(64, 32, 32, 32), (64, 64, 32, 32), (64, 128, 16, 16), (64, 256, 16, 16), (64, 256, 8, 8)]
# Peak DRAM bandwidth (bytes/s) by device-name fragment, for the roofline fraction.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12, "L4": 3.0e11}


def _row(name, variant, baseline, value, unit, base_value):
    ratio = None if base_value in (None, 0) or value is None else value / base_value
    return dict(group="kernels", name=name, variant=variant, baseline=baseline, value=value, unit=unit,
                ratio_vs_baseline=ratio)  # fmt: skip


def time_cuda(fn, warmup: int, iters: int) -> float:
    """Median ms per call of fn() with torch.cuda.Event timing, after warm-up and synchronize."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def saved_bytes(fn, exclude=()) -> int:
    """Bytes of unique storages autograd saves while fn() runs, minus those of the ``exclude`` tensors."""
    storages, skip = {}, {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _conv_params(device, dtype, batch, c_in, c_out, h, k, transposed):
    x = torch.randn(batch, c_in, h, h, device=device, dtype=dtype, requires_grad=True)
    wshape = (c_in, c_out, k, k) if transposed else (c_out, c_in, k, k)
    w = (torch.randn(wshape, device=device) / (c_in * k * k) ** 0.5).to(dtype).requires_grad_()
    b = torch.zeros(c_out, device=device, dtype=dtype, requires_grad=True)
    return x, w, b


def _block_then_consumer(block, args):
    """block(*args) feeding a consumer that saves its output, as the next layer of a network does."""
    return lambda: block(*args).square().sum()


def bench_saved_bytes(device: str, batch: int) -> list[dict]:
    """Activation bytes saved per block (fused custom op vs eager), per layer shape; CPU-measurable.

    The fused side calls ``torch.ops.deepsim.*`` directly: the saved set is fixed by the op's
    setup_context whichever implementation computes the forward (on CPU without the Triton
    interpreter the op falls back to the reference forward but saves the same tensors).
    """
    rows = []
    layers = [(n, ci, co, h, k, s, p, False) for n, ci, co, h, k, s, p in CONV_LAYERS]
    layers += [(n, ci, co, h, k, s, p, True) for n, ci, co, h, k, s, p in UPCONV_LAYERS]
    for name, c_in, c_out, h, k, s, p, transposed in layers:
        x, w, b = _conv_params(device, torch.float32, batch, c_in, c_out, h, k, transposed)
        eager_fn = K.reference_conv_transpose_lrelu if transposed else K.reference_conv_lrelu
        fused_fn = torch.ops.deepsim.conv_transpose_lrelu if transposed else torch.ops.deepsim.conv_lrelu
        args = (x, w, b, s, p, 0.3)
        eager = saved_bytes(_block_then_consumer(eager_fn, args), (x, w, b))
        fused = saved_bytes(_block_then_consumer(fused_fn, args), (x, w, b))
        op = "conv_transpose_lrelu" if transposed else "conv_lrelu"
        rows.append(_row(f"saved_bytes/{op}/{name}/b{batch}", "eager", "eager", float(eager), "bytes", eager))
        rows.append(_row(f"saved_bytes/{op}/{name}/b{batch}", "fused", "eager", float(fused), "bytes", eager))
    return rows


def bench_conv_timing(device: str, batch: int, quick: bool, dtype=torch.bfloat16,
                      rows: list[dict] | None = None) -> list[dict]:  # fmt: skip
    """conv blocks forward+backward: fused Triton vs eager (cuDNN) vs torch.compile(eager), in ms; appended
    to ``rows`` (if given) layer by layer."""
    rows = [] if rows is None else rows
    warmup, iters = (3, 10) if quick else (10, 50)
    layers = [(n, ci, co, h, k, s, p, False) for n, ci, co, h, k, s, p in CONV_LAYERS]
    layers += [(n, ci, co, h, k, s, p, True) for n, ci, co, h, k, s, p in UPCONV_LAYERS]
    for name, c_in, c_out, h, k, s, p, transposed in layers:
        x, w, b = _conv_params(device, dtype, batch, c_in, c_out, h, k, transposed)
        eager_fn = K.reference_conv_transpose_lrelu if transposed else K.reference_conv_lrelu
        fused_fn = K.conv_transpose_lrelu if transposed else K.conv_lrelu
        compiled_fn = torch.compile(eager_fn, dynamic=False)
        args = (x, w, b, s, p, 0.3)
        with torch.no_grad():
            g = torch.randn_like(eager_fn(*args))

        def step(f, args=args, g=g):
            return lambda: torch.autograd.backward(f(*args), g)

        op = "conv_transpose_lrelu" if transposed else "conv_lrelu"
        full = f"{op}/{name}/b{batch}/{str(dtype).removeprefix('torch.')}/fwd+bwd"
        with K.use_backend("reference"):
            eager_ms = time_cuda(step(eager_fn), warmup, iters)
            compile_ms = time_cuda(step(compiled_fn), warmup, iters)
        with K.use_backend("triton"):
            fused_ms = time_cuda(step(fused_fn), warmup, iters)
        rows.append(_row(full, "eager", "eager", eager_ms, "ms", eager_ms))
        rows.append(_row(full, "torch.compile", "eager", compile_ms, "ms", eager_ms))
        rows.append(_row(full, "triton", "eager", fused_ms, "ms", eager_ms))
    return rows


def bench_feature_distance(device: str, quick: bool, dtype=torch.bfloat16) -> list[dict]:
    """feature_distance forward+backward: ms vs eager, and achieved bytes/s vs the card's peak."""
    warmup, iters = (3, 10) if quick else (10, 50)
    fakes = [torch.randn(s, device=device, dtype=dtype, requires_grad=True) for s in FEATURE_TAPS]
    reals = [torch.randn(s, device=device, dtype=dtype) for s in FEATURE_TAPS]
    weights = [1.0] * len(fakes)

    def step(f):
        return lambda: f(fakes, reals, weights, "mean").backward()

    with K.use_backend("reference"):
        eager_ms = time_cuda(step(K.reference_feature_distance), warmup, iters)
    with K.use_backend("triton"):
        fused_ms = time_cuda(step(K.feature_distance), warmup, iters)
    # fwd reads fake + real and writes dL/dfake; bwd reads it and writes the gradient: 5 passes.
    moved = 5 * sum(f.numel() * f.element_size() for f in fakes)
    device_name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BANDWIDTH.items() if k in device_name), None)
    name = f"feature_distance/{len(fakes)} taps/b64/{str(dtype).removeprefix('torch.')}/fwd+bwd"
    achieved = moved / (fused_ms * 1e-3)
    return [
        _row(name, "eager", "eager", eager_ms, "ms", eager_ms),
        _row(name, "triton", "eager", fused_ms, "ms", eager_ms),
        _row(name + "/bandwidth", "triton", f"peak {device_name}", achieved / 1e9, "GB/s",
             peak / 1e9 if peak else None),
    ]  # fmt: skip


def run(device: str = "cuda", quick: bool = False) -> list[dict]:
    """All kernel benchmark rows for ``device``. On CPU: saved-bytes only (timing needs CUDA)."""
    device = str(device)
    if not device.startswith("cuda") or not torch.cuda.is_available():
        print("bench.kernels: no CUDA device; timing skipped (Triton on CPU runs only in the interpreter, "
              "so its speed means nothing). Reporting saved-activation bytes only.")  # fmt: skip
        return bench_saved_bytes("cpu", batch=4 if quick else 64)
    rows = bench_saved_bytes(device, batch=64)
    try:  # feature_distance first: it is quick; the conv layers autotune and compile, one by one
        rows += bench_feature_distance(device, quick=quick)
        bench_conv_timing(device, batch=64, quick=quick, rows=rows)
    except GroupTimeout as e:  # keep what was measured; one row says where the group was cut
        rows.append(dict(group="kernels", name="(kernels group)", variant="", baseline="", value=None, unit="",
                         ratio_vs_baseline=None, status=f"partial: {e}"))  # fmt: skip
    return rows


def main(argv=None) -> None:
    group_main(run, __doc__.splitlines()[0], "fewer iterations (and batch 4 on CPU)", argv)


if __name__ == "__main__":
    main()
