"""Kernel micro-benchmarks under pytest-benchmark: ``pytest bench --benchmark-only``.

Each case times forward + backward of one op on a network layer shape, for two implementations:
``eager`` (the plain PyTorch reference, cuDNN on CUDA) and ``deepsim`` (the public op: the fused Triton
kernel on CUDA; on CPU the same custom op running its PyTorch fallback, so only its overhead and saved
tensors differ). CUDA: batch 64, bf16; CPU: batch 8, fp32. Every case records its FLOP and byte counts
(bench/roofline.py) and, after timing, its FLOP floor, byte floor and fraction of the roofline at the peaks
measured once per session (bench/peaks.py) in ``extra_info``
(see them with ``--benchmark-json out.json`` or ``--benchmark-columns``).
"""

from __future__ import annotations

import pytest
import torch

from bench.peaks import measure_peaks
from bench.roofline import add_roofline, conv_work, feature_distance_work

try:  # installed package
    import deepsim.kernels as K
except ImportError:  # plain checkout
    import kernels as K

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
BATCH = 64 if CUDA else 8

# (id, C_in, C_out, H_in, kernel, stride, padding, transposed): a subset of bench/kernels.py's layers.
LAYERS = [
    ("enc2 32->64 k5s2 32", 32, 64, 32, 5, 2, 2, False),
    ("D4 128->256 k3s1 16", 128, 256, 16, 3, 1, 1, False),
    ("up1 128->64 k4s2 8", 128, 64, 8, 4, 2, 1, True),
]
FEATURE_TAPS = [(BATCH, 64, 32, 32), (BATCH, 128, 16, 16), (BATCH, 256, 8, 8)]
IMPLS = ["eager", "deepsim"]
# Warm-up rounds first: Triton compiles and autotunes on the first calls, and oneDNN settles its kernels.
pytestmark = pytest.mark.benchmark(warmup=True, warmup_iterations=5, min_rounds=5)


@pytest.fixture(scope="session")
def peaks():
    return measure_peaks(DEVICE, quick=True)


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _record(benchmark, peaks, flops, nbytes):
    info = benchmark.extra_info
    info.update(
        device=DEVICE,
        dtype=str(DTYPE).removeprefix("torch."),
        batch=BATCH,
        flops=flops,
        bytes=nbytes,
        card=torch.cuda.get_device_name() if CUDA else "none (CPU)",
    )
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None:  # None under --benchmark-disable
        row = add_roofline({"value": stats.median, "unit": "s", "flops": flops, "bytes": nbytes}, peaks)
        info.update(
            flop_floor_s=row["flop_floor_s"],
            byte_floor_s=row["byte_floor_s"],
            roofline_fraction=row["roofline_fraction"],
        )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layer", LAYERS, ids=[entry[0] for entry in LAYERS])
def test_conv_block_fwd_bwd(benchmark, peaks, layer, impl):
    _, c_in, c_out, h, k, s, p, transposed = layer
    wshape = (c_in, c_out, k, k) if transposed else (c_out, c_in, k, k)
    x = torch.randn(BATCH, c_in, h, h, device=DEVICE, dtype=DTYPE, requires_grad=True)
    w = (torch.randn(wshape, device=DEVICE) / (c_in * k * k) ** 0.5).to(DTYPE).requires_grad_()
    b = torch.zeros(c_out, device=DEVICE, dtype=DTYPE, requires_grad=True)
    if impl == "eager":
        fn = K.reference_conv_transpose_lrelu if transposed else K.reference_conv_lrelu
    else:
        fn = K.conv_transpose_lrelu if transposed else K.conv_lrelu
    with torch.no_grad():
        grad = torch.randn_like(fn(x, w, b, s, p, 0.3))

    def step():
        torch.autograd.backward(fn(x, w, b, s, p, 0.3), grad)
        _sync()

    benchmark.group = f"{'conv_transpose_lrelu' if transposed else 'conv_lrelu'} {layer[0]} fwd+bwd"
    benchmark(step)
    _record(benchmark, peaks, *conv_work(BATCH, c_in, c_out, h, k, s, p, transposed, x.element_size()))


@pytest.mark.parametrize("impl", IMPLS)
def test_feature_distance_fwd_bwd(benchmark, peaks, impl):
    fakes = [torch.randn(t, device=DEVICE, dtype=DTYPE, requires_grad=True) for t in FEATURE_TAPS]
    reals = [torch.randn(t, device=DEVICE, dtype=DTYPE) for t in FEATURE_TAPS]
    fn = K.reference_feature_distance if impl == "eager" else K.feature_distance

    def step():
        fn(fakes, reals, [1.0] * len(fakes), "mean").backward()
        _sync()

    benchmark.group = f"feature_distance {len(FEATURE_TAPS)} taps fwd+bwd"
    benchmark(step)
    _record(benchmark, peaks, *feature_distance_work(FEATURE_TAPS, fakes[0].element_size()))
