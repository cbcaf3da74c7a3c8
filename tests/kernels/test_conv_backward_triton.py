"""The Triton backward of the conv blocks (kernels/_conv_backward.py): dgrad and wgrad against PyTorch over
odd shapes, every gradient subset and both layouts; no aten convolution in the backward; deterministic
split-K wgrad; the small gaps (double backward, string padding, fp64); OpInfo samples; every config on CUDA.
"""

import importlib
import itertools
import pathlib
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ._common import CUDA, DEVICES, DTYPES, INTERPRET, K, assert_close, skip_unsupported

B = importlib.import_module(f"{K.__name__}._conv_backward")
C = importlib.import_module(f"{K.__name__}._conv_configs")
L = importlib.import_module(f"{K.__name__}.conv_lrelu")  # the modules (the package names their functions)
T = importlib.import_module(f"{K.__name__}.conv_transpose_lrelu")

# (transposed, x shape, weight shape, stride, padding): odd sizes, both K paths of the kernels (C % BLOCK_K
# == 0 or not), output_padding of the conv dgrad (7x6 input, stride 2), non-square kernels, stride 1.
SHAPES = [
    (False, (2, 3, 7, 6), (5, 3, 3, 3), 2, 1),
    (False, (1, 16, 5, 7), (17, 16, 4, 4), 2, 1),
    (False, (2, 4, 5, 6), (3, 4, 2, 3), 1, 0),
    (True, (2, 5, 3, 4), (5, 3, 4, 4), 2, 1),
    (True, (1, 16, 4, 3), (16, 9, 3, 3), 1, 1),
    (False, (1, 16, 9, 8), (8, 16, 3, 3), 2, 0),  # valid and strided: border classes, output_padding
]
SHAPE_IDS = [
    f"{'up' if t else 'conv'}-{'x'.join(map(str, xs))}-k{ws[2]}x{ws[3]}s{s}p{p}" for t, xs, ws, s, p in SHAPES
]
# (x needs grad, W needs grad, bias: None | "frozen" | "trained"); at least one gradient asked for.
NEEDS = [
    (x, w, b)
    for x, w, b in itertools.product((True, False), (True, False), (None, "frozen", "trained"))
    if x or w or b == "trained"
]


def _fn(transposed):
    return (
        (K.conv_transpose_lrelu, K.reference_conv_transpose_lrelu)
        if transposed
        else (K.conv_lrelu, K.reference_conv_lrelu)
    )


def _inputs(device, shape, needs, dtype=torch.float32, channels_last=False, seed=0):
    transposed, xs, ws, _, _ = shape
    need_x, need_w, bias = needs
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(xs, generator=g).to(device, dtype)
    w = (torch.randn(ws, generator=g) / 4).to(device, dtype)
    if channels_last:
        x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    c_out = ws[1] if transposed else ws[0]
    b = (
        None
        if bias is None
        else torch.randn(c_out, generator=g).to(device, dtype).requires_grad_(bias == "trained")
    )
    return x.requires_grad_(need_x), w.requires_grad_(need_w), b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize(
    "needs", NEEDS, ids=lambda n: f"x{'+' if n[0] else '-'}w{'+' if n[1] else '-'}b-{n[2]}"
)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_triton_backward_matches_pytorch(device, shape, needs, channels_last):
    """Every requested gradient of the Triton path (dgrad and wgrad kernels) matches autograd of the
    PyTorch reference; the gradients come back in the inputs' layouts."""
    x, w, b = _inputs(device, shape, needs, channels_last=channels_last)
    transposed, _, _, s, p = shape
    fn, ref = _fn(transposed)
    wanted = [t for t in (x, w, b) if t is not None and t.requires_grad]
    with K.use_backend("triton"):
        y = fn(x, w, b, s, p, 0.3)
    y_ref = ref(x, w, b, s, p, 0.3)
    grad_out = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1)).to(device)
    got = torch.autograd.grad(y, wanted, grad_out)
    want = torch.autograd.grad(y_ref, wanted, grad_out)
    for t, g, e in zip(wanted, got, want):
        assert g.shape == e.shape
        assert_close(g, e, 1e-4, 1e-4, f"gradient of {tuple(t.shape)}")
        if t.dim() == 4:
            assert g.is_contiguous(
                memory_format=torch.channels_last if channels_last else torch.contiguous_format
            )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3]], ids=[SHAPE_IDS[0], SHAPE_IDS[3]])
def test_triton_backward_dtypes(device, dtype, atol, rtol, shape):
    """fp32 / fp16 (bf16 on CUDA) gradients against an fp32 reference on the same rounded values."""
    skip_unsupported(device, dtype)
    x, w, b = _inputs(device, shape, (True, True, "trained"), dtype=dtype, channels_last=True)
    transposed, _, _, s, p = shape
    fn, ref = _fn(transposed)
    with K.use_backend("triton"):
        y = fn(x, w, b, s, p, 0.3)
    ref_in = [t.detach().float().requires_grad_() for t in (x, w, b)]
    y_ref = ref(*ref_in, s, p, 0.3)
    grad_out = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(2)).to(device)
    got = torch.autograd.grad(y, (x, w, b), grad_out.to(dtype))
    want = torch.autograd.grad(y_ref, ref_in, grad_out.to(dtype).float())
    for name, g, e in zip(("grad_x", "grad_W", "grad_b"), got, want):
        assert g.dtype == dtype
        assert_close(g, e, atol * 4, rtol, name)


class _AtenLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(not INTERPRET, reason="CPU Triton needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("impl", ["triton", "cudnn"])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "up"])
def test_no_aten_convolution_in_triton_backward(impl, transposed):
    """With dgrad = wgrad = "triton" the backward op runs no aten convolution at all (and, as a check
    that the log sees them, the "cudnn" implementation does)."""
    shape = SHAPES[3] if transposed else SHAPES[0]
    x, w, b = _inputs("cpu", shape, (True, True, "trained"))
    _, _, _, s, p = shape
    out = _fn(transposed)[1](x, w, b, s, p, 0.3).detach()
    # The op's Python body (a mode does not see inside a custom op's kernel), as the custom op runs it.
    op = T.conv_transpose_lrelu_backward if transposed else L.conv_lrelu_backward
    log = _AtenLog()
    with K.use_backend("triton"), log:
        op(
            torch.randn_like(out),
            out,
            x.detach(),
            w.detach(),
            True,
            s,
            p,
            0.3,
            [True, True, True],
            impl,
            impl,
        )
    convs = [n for n in log.names if "convolution" in n]
    assert (convs == []) == (impl == "triton"), convs


@pytest.mark.skipif(not INTERPRET, reason="CPU Triton needs TRITON_INTERPRET=1")
def test_wgrad_split_k_is_deterministic_and_fixed_order():
    """A wgrad split over several K chunks (fp32 partials, added in split order) gives the reference and
    the same bits on every run; the split count comes from the grid (more splits for fewer tiles)."""
    shape = (False, (4, 8, 9, 9), (8, 8, 3, 3), 1, 1)
    x, w, b = _inputs("cpu", shape, (False, True, "trained"))
    geom = C.ConvGeometry(False, 4, 8, 9, 9, 8, 3, 3, 1, 1)
    config = B.WGRAD_INTERPRETER_CONFIGS[0]
    splits, per_split = B.wgrad_splits(geom, config)
    assert splits > 1 and splits * per_split * config.block_k >= 4 * 81
    out = K.reference_conv_lrelu(x, w, b, 1, 1, 0.3).detach()
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    with C.force_config(config, ops=("wgrad_conv",)):
        runs = [B.conv_wgrad(grad_out, out, x.detach(), geom, 0.3, True) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    gw, gb = torch.autograd.grad(K.reference_conv_lrelu(x, w, b, 1, 1, 0.3), (w, b), grad_out)
    assert_close(runs[0][0], gw, 1e-4, 1e-4, "grad_W")
    assert_close(runs[0][1], gb, 1e-4, 1e-4, "grad_b")


@pytest.mark.skipif(not INTERPRET, reason="CPU Triton needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "up"])
def test_double_backward_names_the_op_and_the_fix(transposed):
    shape = SHAPES[3] if transposed else SHAPES[0]
    x, w, b = _inputs("cpu", shape, (True, True, "trained"))
    fn, _ = _fn(transposed)
    _, _, _, s, p = shape
    with K.use_backend("triton"):
        (gx,) = torch.autograd.grad(fn(x, w, b, s, p, 0.3).square().sum(), x, create_graph=True)
        with pytest.raises(
            RuntimeError,
            match=r"(conv_lrelu|conv_transpose_lrelu): double backward.*"
            r"DEEPSIM_KERNELS=reference",
        ):
            gx.sum().backward()
    with K.use_backend("reference"):  # the fix the message names works
        (gx,) = torch.autograd.grad(fn(x, w, b, s, p, 0.3).square().sum(), x, create_graph=True)
        gx.sum().backward()
    assert w.grad is not None


@pytest.mark.skipif(not INTERPRET, reason="CPU Triton needs TRITON_INTERPRET=1")
def test_string_padding_and_fp64():
    x = torch.randn(1, 3, 6, 5)
    w = torch.randn(4, 3, 3, 3)
    with K.use_backend("triton"):
        for padding, expect in (("valid", 0), ("same", 1)):
            assert_close(
                K.conv_lrelu(x, w, None, 1, padding),
                K.reference_conv_lrelu(x, w, None, 1, expect),
                1e-4,
                1e-4,
                padding,
            )
        with pytest.raises(ValueError, match="conv_lrelu: padding='same' needs stride 1"):
            K.conv_lrelu(x, w, None, 2, "same")
        with pytest.raises(ValueError, match="conv_lrelu: padding='full'"):
            K.conv_lrelu(x, w, None, 1, "full")
        with pytest.raises(ValueError, match="conv_transpose_lrelu: padding='valid'"):
            K.conv_transpose_lrelu(x, torch.randn(3, 4, 3, 3), None, 1, "valid")
        with pytest.raises(
            ValueError, match="float64 is not supported by the triton path.*DEEPSIM_KERNELS=reference"
        ):
            K.conv_lrelu(x.double(), w.double(), None, 1, 1)
    with (
        K.use_backend("cudnn"),
        pytest.raises(ValueError, match="float64 is not supported by the cudnn path"),
    ):
        K.conv_lrelu(x.double(), w.double(), None, 1, 1)
    y = K.conv_lrelu(x.double(), w.double(), None, 1, 1)  # auto: fp64 takes the reference
    assert y.dtype == torch.float64


def test_output_size_formula_lives_in_one_place():
    """The conv output-size formula is written once (kernels/_conv_shape.py): no other kernels/ file nor
    bench/roofline.py spells it out."""
    root = pathlib.Path(__file__).resolve().parents[2]
    patterns = [r"\+ 2 \* \w+ - \w+\) // \w+ \+ 1", r"- 1\) \* \w+ - 2 \* \w+ \+ \w+"]
    files = [*sorted((root / "kernels").glob("*.py")), root / "bench" / "roofline.py"]
    offenders = [
        f.name
        for f in files
        if f.name != "_conv_shape.py"
        for pat in patterns
        if re.search(pat, f.read_text())
    ]
    assert offenders == []
    assert re.search(patterns[0], (root / "kernels" / "_conv_shape.py").read_text())


# ----------------------------------------------------------------------------------------------------------
# PyTorch OpInfo samples that fit the ops' parameters (4-D, groups 1, dilation 1, square stride and
# padding, no output_padding), through both ops in the interpreter.


def _opinfo_samples():
    try:
        from torch.testing._internal.common_methods_invocations import op_db
    except Exception:  # noqa: BLE001 - torch's test helpers need expecttest; skip where missing
        return []
    cases = []
    for info in op_db:
        if info.name not in ("nn.functional.conv2d", "nn.functional.conv_transpose2d"):
            continue
        transposed = info.name.endswith("transpose2d")
        for i, sample in enumerate(info.sample_inputs("cpu", torch.float32, requires_grad=True)):
            kw = dict(sample.kwargs)
            weight = sample.args[0]
            bias = sample.args[1] if len(sample.args) > 1 else kw.get("bias")

            def one(v):
                return v if isinstance(v, (int, str)) else (v[0] if len(set(v)) == 1 else None)

            stride, padding = one(kw.get("stride", 1)), one(kw.get("padding", 0))
            fits = (
                sample.input.dim() == 4
                and kw.get("groups", 1) == 1
                and one(kw.get("dilation", 1)) == 1
                and one(kw.get("output_padding", 0)) == 0
                and stride is not None
                and padding is not None
            )
            if fits:
                cases.append(
                    pytest.param(
                        transposed,
                        sample.input,
                        weight,
                        bias,
                        stride,
                        padding,
                        id=f"{info.name.split('.')[-1]}-{i}",
                    )
                )
    return cases


OPINFO = _opinfo_samples()


@pytest.mark.skipif(not INTERPRET, reason="CPU Triton needs TRITON_INTERPRET=1")
@pytest.mark.skipif(not OPINFO, reason="torch.testing._internal needs expecttest")
@pytest.mark.parametrize("transposed, x, w, b, stride, padding", OPINFO)
def test_opinfo_samples(transposed, x, w, b, stride, padding):
    fn, ref = _fn(transposed)
    inputs = [t.detach().clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    with K.use_backend("triton"):
        y = fn(inputs[0], inputs[1], inputs[2] if b is not None else None, stride, padding, 0.2)
    y_ref = ref(
        ref_inputs[0],
        ref_inputs[1],
        ref_inputs[2] if b is not None else None,
        stride,
        padding if isinstance(padding, int) else {"valid": 0}.get(padding, padding),
        0.2,
    )
    assert_close(y, y_ref, 1e-4, 1e-4, "output")
    grad_out = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(3))
    for g, e in zip(
        torch.autograd.grad(y, inputs, grad_out), torch.autograd.grad(y_ref, ref_inputs, grad_out)
    ):
        assert_close(g, e, 1e-4, 1e-4, "gradient")


# ----------------------------------------------------------------------------------------------------------
# CUDA: every config of every kernel, forced, against the reference.


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "shape",
    SHAPES + [(False, (8, 3, 64, 64), (32, 3, 5, 5), 2, 2), (True, (8, 64, 16, 16), (64, 32, 4, 4), 2, 1)],
    ids=SHAPE_IDS + ["conv-3ch-k5s2", "up-64-k4s2"],
)
def test_every_config_of_every_kernel_on_cuda(shape, dtype):
    """Each forward / dgrad config (GPU_CONFIGS) and each wgrad config (WGRAD_CONFIGS), forced, gives the
    reference's output and gradients (relative L2 error) on the card."""
    x, w, b = _inputs("cuda", shape, (True, True, "trained"), dtype=dtype, channels_last=True)
    transposed, _, _, s, p = shape
    fn, ref = _fn(transposed)
    ref_in = [t.detach().float().requires_grad_() for t in (x, w, b)]
    y_ref = ref(*ref_in, s, p, 0.3)
    grad_out = torch.randn(y_ref.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    want = (y_ref, *torch.autograd.grad(y_ref, ref_in, grad_out))
    kind = "conv_transpose" if transposed else "conv"
    forward_ops = (kind, f"dgrad_{kind}")
    runs = [(c, forward_ops) for c in C.GPU_CONFIGS] + [(c, (f"wgrad_{kind}",)) for c in B.WGRAD_CONFIGS]
    for config, ops in runs:
        with C.force_config(config, ops=ops), K.use_backend("triton"):
            y = fn(x, w, b, s, p, 0.3)
            got = (y, *torch.autograd.grad(y, (x, w, b), grad_out.to(dtype)))
        for name, g, e in zip(("output", "grad_x", "grad_W", "grad_b"), got, want):
            err = ((g.float() - e).norm() / e.norm().clamp_min(1e-12)).item()
            assert err < 2e-2, f"{config.name} on {ops}: {name} relative error {err:.3g}"
