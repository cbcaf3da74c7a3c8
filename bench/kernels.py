"""Kernel benchmarks: the fused conv blocks and their dispatcher vs cuDNN and torch.compile, on the real
layer shapes of the networks, then feature_distance, then (CPU runs) the activation bytes saved for backward.

Design notes: docs/benchmarks.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.cli import group_main
from bench.timelimit import GroupTimeout
from deepsim.applications.generators import InversionGenerator
from deepsim.networks import AutoencoderGenerator, ConvLReLU, Discriminator, UpConvLReLU

try:  # installed package
    import deepsim.kernels as K
except ImportError:  # plain checkout
    import kernels as K

BATCH = 64
ALPHA = 0.3
# Comparator-like taps for feature_distance (batch 64).
FEATURE_TAPS = [(64, 32, 32, 32), (64, 64, 32, 32), (64, 128, 16, 16), (64, 256, 16, 16), (64, 256, 8, 8)]


def network_layers(batch: int = BATCH) -> list[tuple]:
    """(name, C_in, C_out, H_in, kernel, stride, padding, transposed) of every fused conv block of the
    autoencoder G at 64 px, the discriminator at 64 px (first stride 2) and 227 px (first stride 4) and the
    fc6 inversion generator (227 px), in network order, duplicates dropped; found by running each network
    on the meta device with a hook on its ConvLReLU / UpConvLReLU blocks."""

    nets = [
        ("G", AutoencoderGenerator, (batch, 3, 64, 64)),
        ("D64", lambda: Discriminator(first_stride=2), (batch, 3, 64, 64)),
        ("D227", lambda: Discriminator(first_stride=4), (batch, 3, 227, 227)),
        ("fc6-G", lambda: InversionGenerator("fc6", image_size=227), (batch, 4096)),
    ]
    layers, seen = [], set()
    for net_name, build, shape in nets:
        with torch.device("meta"):
            net = build()

        def record(module, args, net_name=net_name):
            transposed = isinstance(module, UpConvLReLU)
            h = args[0].shape[2]
            spec = (
                module.in_channels,
                module.out_channels,
                h,
                module.kernel_size[0],
                module.stride[0],
                module.padding[0],
                transposed,
            )
            if spec not in seen:
                seen.add(spec)
                c_in, c_out, _, k, s, p, _ = spec
                name = f"{net_name} {'up ' if transposed else ''}{c_in}->{c_out} k{k}s{s} {h}"
                layers.append((name, *spec))

        for module in net.modules():
            if isinstance(module, (ConvLReLU, UpConvLReLU)):
                module.register_forward_pre_hook(record)
        with K.use_backend("reference"), torch.no_grad():
            net(torch.empty(shape, device="meta"))
    return layers


# The tables bench/roofline.py reads (by layer name): (name, C_in, C_out, H_in, kernel, stride, padding).
LAYERS = network_layers()
CONV_LAYERS = [entry[:7] for entry in LAYERS if not entry[7]]
UPCONV_LAYERS = [entry[:7] for entry in LAYERS if entry[7]]


def _row(name, variant, baseline, value, unit, base_value, note=None):
    ratio = None if base_value in (None, 0) or value is None else value / base_value
    row = dict(
        group="kernels",
        name=name,
        variant=variant,
        baseline=baseline,
        value=value,
        unit=unit,
        ratio_vs_baseline=ratio,
    )
    if note:
        row["note"] = note
    return row


def time_cuda(fn, warmup: int, iters: int) -> float:
    """Median ms per call of fn() with torch.cuda.Event timing, after warm-up and synchronize."""
    return K.dispatch.time_cuda_ms(fn, warmup, iters)


def saved_bytes(fn, exclude=()) -> int:
    """Bytes of unique storages autograd saves while fn() runs, minus those of the ``exclude`` tensors.

    Storages are told apart by their StorageImpl (not their address), so this also counts meta tensors."""
    storages, skip = {}, {t.untyped_storage()._cdata for t in exclude}

    def pack(t):
        s = t.untyped_storage()
        if s._cdata not in skip:
            storages[s._cdata] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _conv_params(device, dtype, batch, c_in, c_out, h, k, transposed, channels_last=False):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, c_in, h, h, device=device, dtype=dtype).contiguous(memory_format=fmt)
    wshape = (c_in, c_out, k, k) if transposed else (c_out, c_in, k, k)
    w = (torch.randn(wshape, device=device) / (c_in * k * k) ** 0.5).to(dtype).contiguous(memory_format=fmt)
    b = torch.zeros(c_out, device=device, dtype=dtype)
    return x.requires_grad_(), w.requires_grad_(), b.requires_grad_()


def _eager_inplace(transposed):
    conv = F.conv_transpose2d if transposed else F.conv2d

    def block(x, w, b, s, p, alpha):
        return F.leaky_relu(conv(x, w, b, stride=s, padding=p), alpha, inplace=True)

    return block


def _cudnn_epilogue(transposed):
    conv = F.conv_transpose2d if transposed else F.conv2d

    def block(x, w, b, s, p, alpha):
        return K.bias_lrelu(conv(x, w, None, stride=s, padding=p), b, alpha)

    return block


def _block_then_consumer(block, args):
    """block(*args) feeding a consumer that saves its output, as the next layer of a network does."""
    return lambda: block(*args).square().sum()


def bench_saved_bytes(batch: int = BATCH, device: str = "meta") -> list[dict]:
    """Activation bytes saved per block, per layer shape: eager, eager with an in-place LReLU, the fused
    custom op and the cudnn+epilogue path. Counted on ``device`` (meta: no arithmetic; the saved set is
    fixed by each op's setup_context, whatever computes the forward)."""
    rows = []
    for name, c_in, c_out, h, k, s, p, transposed in LAYERS:
        x, w, b = _conv_params(device, torch.float32, batch, c_in, c_out, h, k, transposed)
        variants = {
            "eager": K.reference_conv_transpose_lrelu if transposed else K.reference_conv_lrelu,
            "eager inplace": _eager_inplace(transposed),
            "fused": torch.ops.deepsim.conv_transpose_lrelu if transposed else torch.ops.deepsim.conv_lrelu,
            "cudnn+epilogue": _cudnn_epilogue(transposed),
        }
        op = "conv_transpose_lrelu" if transposed else "conv_lrelu"
        full = f"saved_bytes/{op}/{name}/b{batch}"
        args = (x, w, b, s, p, ALPHA)
        counts = {v: saved_bytes(_block_then_consumer(fn, args), (x, w, b)) for v, fn in variants.items()}
        for variant, value in counts.items():
            note = "in-place LReLU also keeps only the output" if variant == "eager inplace" else None
            rows.append(_row(full, variant, "eager", float(value), "bytes", counts["eager"], note))
    return rows


def bench_conv_timing(
    device: str, batch: int, quick: bool, dtype=torch.bfloat16, rows: list[dict] | None = None
) -> list[dict]:
    """Conv blocks forward + backward in ms, per real layer shape (see the module doc for the variants),
    channels_last; appended to ``rows`` (if given) layer by layer, so a run cut short keeps them."""
    rows = [] if rows is None else rows
    warmup, iters = (3, 10) if quick else (10, 50)
    for name, c_in, c_out, h, k, s, p, transposed in LAYERS:
        x, w, b = _conv_params(device, dtype, batch, c_in, c_out, h, k, transposed, channels_last=True)
        op = "conv_transpose_lrelu" if transposed else "conv_lrelu"
        eager_fn = K.reference_conv_transpose_lrelu if transposed else K.reference_conv_lrelu
        public_fn = K.conv_transpose_lrelu if transposed else K.conv_lrelu
        args = (x, w, b, s, p, ALPHA)
        with torch.no_grad():
            g = torch.randn_like(eager_fn(*args))

        def step(f, args=args, g=g):
            return lambda: torch.autograd.grad(f(*args), args[:3], g)

        full = f"{op}/{name}/b{batch}/{str(dtype).removeprefix('torch.')}/fwd+bwd"
        ms = {}
        for variant, backend in (
            ("eager", "reference"),
            ("triton", "triton"),
            ("cudnn+epilogue", "cudnn"),
            ("dispatched", "auto"),
        ):
            with K.use_backend(backend):
                ms[variant] = time_cuda(step(public_fn), warmup, iters)
        decision = K.dispatch.decision_for(op, x, w, b, s, p)
        choice = decision["choice"] if decision else "?"
        with K.use_backend("reference"):
            ms["torch.compile"] = time_cuda(step(torch.compile(eager_fn, dynamic=False)), warmup, iters)
        best_baseline = min(ms["eager"], ms["torch.compile"])
        for variant, value in ms.items():
            note = None
            if variant == "dispatched":
                note = f"chose {choice}; {best_baseline / value:.3g}x the better of eager and torch.compile"
            rows.append(_row(full, variant, "eager", value, "ms", ms["eager"], note))
    return rows


def dispatch_rows() -> list[dict]:
    """Per dispatcher decision of this process, one row per part it decided (forward, dgrad, wgrad: each
    timed on its own as CUDA-graph replays of both implementations): the chosen one's ms, value = Triton's
    ms with baseline cuDNN's (ratio < 1: Triton faster), exclusions (a mismatch against cuDNN) in the note."""
    rows = []
    for d in K.dispatch.decisions():
        for part, prefix in (("forward", ""), ("dgrad", "dgrad_"), ("wgrad", "wgrad_")):
            times = {p: d.get(f"{prefix}{p}_ms") for p in K.dispatch.PATHS}
            chosen = d["choice"] if part == "forward" else d.get(part, "")
            note = (
                ", ".join(f"{p} {t:.4g} ms" for p, t in times.items() if t is not None) + f" ({d['source']})"
            )
            if d.get("excluded", {}).get(part):
                note += f"; triton excluded: {d['excluded'][part]}"
            rows.append(
                _row(
                    f"dispatch/{part}/{d['key']}",
                    f"chose {chosen}",
                    "cudnn",
                    times.get("triton"),
                    "ms",
                    times.get("cudnn"),
                    note,
                )
            )
    return rows


def measure_copy_bandwidth(device: str, quick: bool) -> float:
    """Bytes/s of a large device-to-device copy (read + write), best of the timed repeats."""
    numel = (256 if quick else 512) * 2**20 // 4
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    ms = min(time_cuda(lambda: dst.copy_(src), 2, 5) for _ in range(3))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def bench_feature_distance(device: str, quick: bool, dtype=torch.bfloat16) -> list[dict]:
    """feature_distance forward + backward: ms vs eager, and achieved bytes/s vs measured copy bandwidth."""
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
    copy = measure_copy_bandwidth(device, quick)
    name = f"feature_distance/{len(fakes)} taps/b64/{str(dtype).removeprefix('torch.')}/fwd+bwd"
    return [
        _row(name, "eager", "eager", eager_ms, "ms", eager_ms),
        _row(name, "triton", "eager", fused_ms, "ms", eager_ms),
        _row(name + "/bandwidth", "copy (same run)", "copy (same run)", copy / 1e9, "GB/s", copy / 1e9),
        _row(
            name + "/bandwidth",
            "triton",
            "copy (same run)",
            moved / (fused_ms * 1e-3) / 1e9,
            "GB/s",
            copy / 1e9,
            "ratio = fraction of the measured copy bandwidth",
        ),
        _row(
            name + "/bandwidth",
            "eager",
            "copy (same run)",
            moved / (eager_ms * 1e-3) / 1e9,
            "GB/s",
            copy / 1e9,
        ),
    ]


def run(device: str = "cuda", quick: bool = False) -> list[dict]:
    """All kernel benchmark rows for ``device``: timings on CUDA, saved bytes on CPU (see the module doc)."""
    device = str(device)
    if not device.startswith("cuda") or not torch.cuda.is_available():
        print(
            "bench.kernels: no CUDA device; timing skipped (Triton on CPU runs only in the interpreter, "
            "so its speed means nothing). Reporting saved-activation bytes only."
        )
        return bench_saved_bytes(batch=BATCH)
    # feature_distance is measured first (seconds) so that a group cut short by --group-timeout during the
    # conv layers (each autotunes and compiles) still has it; its rows are listed after the conv rows.
    feature_rows = bench_feature_distance(device, quick=quick)
    rows: list[dict] = []
    try:
        bench_conv_timing(device, batch=BATCH, quick=quick, rows=rows)
    except GroupTimeout as e:  # keep what was measured; one row says where the group was cut
        rows.append(
            dict(
                group="kernels",
                name="(kernels group)",
                variant="",
                baseline="",
                value=None,
                unit="",
                ratio_vs_baseline=None,
                status=f"partial: {e}",
            )
        )
    return rows + dispatch_rows() + feature_rows


def dispatch_table() -> str:
    """The dispatcher's decisions (this process and the cache file) as text, for ``python -m bench``."""
    return K.dispatch.format_decisions()


def main(argv=None) -> None:
    group_main(run, __doc__.splitlines()[0], "fewer iterations", argv)
    print(dispatch_table())


if __name__ == "__main__":
    main()
