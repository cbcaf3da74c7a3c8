"""The conv blocks' backward: every combination of requested gradients (the aliasing bug), under
torch.compile too, a full-size layer in the interpreter, and every real layer shape on CUDA.

The bug: when two or more of (grad_x, grad_W, grad_b) were not needed, the backward op returned one empty
tensor in two output slots, and torch.library's aliasing check raised (real and fake backward alike): a
frozen layer fed an input that needs a gradient, a bias-free conv on a fixed input.
"""

import itertools

import pytest
import torch

from bench.kernels import LAYERS

from ._common import DEVICES, INTERPRET, K, assert_close

# (op, reference, x shape, weight shape, stride, padding): small shapes with odd sizes.
OPS = {
    "conv_lrelu": (K.conv_lrelu, K.reference_conv_lrelu, (2, 3, 7, 6), (5, 3, 3, 3), 2, 1),
    "conv_transpose_lrelu": (
        K.conv_transpose_lrelu,
        K.reference_conv_transpose_lrelu,
        (2, 5, 3, 4),
        (5, 3, 4, 4),
        2,
        1,
    ),
}
# (x needs grad, W needs grad, bias: None | "frozen" | "trained"); at least one gradient is asked for.
NEEDS = [
    (x, w, b)
    for x, w, b in itertools.product((True, False), (True, False), (None, "frozen", "trained"))
    if x or w or b == "trained"
]


def _ids(needs):
    x, w, b = needs
    return f"x{'+' if x else '-'}-w{'+' if w else '-'}-bias-{b or 'none'}"


def _inputs(device, op, needs, seed=0):
    _, _, xs, ws, _, _ = OPS[op]
    need_x, need_w, bias = needs
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(xs, generator=g).to(device).requires_grad_(need_x)
    w = (torch.randn(ws, generator=g) / 4).to(device).requires_grad_(need_w)
    c_out = ws[1] if op == "conv_transpose_lrelu" else ws[0]
    b = None if bias is None else torch.randn(c_out, generator=g).to(device).requires_grad_(bias == "trained")
    return x, w, b


def _check_against_reference(y, op, x, w, b, grad_out):
    fn, ref, _, _, s, p = OPS[op]
    wanted = [t for t in (x, w, b) if t is not None and t.requires_grad]
    y_ref = ref(x, w, b, s, p, 0.3)
    assert_close(y, y_ref, 1e-4, 1e-4, "output")
    grads = torch.autograd.grad(y, wanted, grad_out)
    grads_ref = torch.autograd.grad(y_ref, wanted, grad_out)
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        assert g.shape == g_ref.shape, f"gradient {i}"
        assert_close(g, g_ref, 1e-4, 1e-4, f"gradient {i} of {len(wanted)}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["triton", "cudnn"])
@pytest.mark.parametrize("needs", NEEDS, ids=_ids)
@pytest.mark.parametrize("op", list(OPS))
def test_every_combination_of_requested_gradients(device, path, needs, op):
    """Frozen weights with an input that needs a gradient, a bias-free block on a fixed input, a trained
    bias alone...: the output and each requested gradient match the reference, on both paths."""
    x, w, b = _inputs(device, op, needs)
    fn, _, _, _, s, p = OPS[op]
    with K.use_backend(path):
        y = fn(x, w, b, s, p, 0.3)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device)  # not all ones
    _check_against_reference(y, op, x, w, b, grad_out)


@pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs Triton runnable")
@pytest.mark.parametrize("needs", [(True, False, "frozen"), (False, True, None)], ids=_ids)
@pytest.mark.parametrize("op", list(OPS))
def test_requested_gradients_under_torch_compile(needs, op):
    """The two cases of the bug under torch.compile (AOTAutograd traces the backward through the fake
    implementation, whose outputs were aliased too): compiled forward and gradients match eager."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, w, b = _inputs(device, op, needs, seed=3)
    fn, _, _, _, s, p = OPS[op]
    wanted = [t for t in (x, w, b) if t is not None and t.requires_grad]

    def loss_and_grads(x, w, b):
        y = fn(x, w, b, s, p, 0.3)
        loss = (y * y).sum()
        return loss, torch.autograd.grad(loss, wanted)

    torch._dynamo.reset()
    with K.use_backend("triton"):
        expected = loss_and_grads(x, w, b)
        y = torch.compile(lambda x, w, b: fn(x, w, b, s, p, 0.3), backend="aot_eager", fullgraph=True)(
            x, w, b
        )
        got = (y * y).sum(), torch.autograd.grad((y * y).sum(), wanted)
    assert_close(got[0], expected[0], 1e-4, 1e-4, "loss")
    for g, e in zip(got[1], expected[1]):
        assert_close(g, e, 1e-4, 1e-4, "gradient")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", list(OPS))
def test_backward_op_returns_distinct_tensors(device, op):
    """Called directly, the backward op gives a fresh empty tensor in each unneeded slot (eager and fake)."""
    x, w, b = _inputs(device, op, (False, False, "frozen"))
    fn, ref, _, _, s, p = OPS[op]
    out = ref(x, w, b, s, p, 0.3)
    backward = getattr(torch.ops.deepsim, f"{op}_backward")
    with K.use_backend("triton"):
        for mask in ([True, False, False], [False, True, False], [False, False, True], [False, False, False]):
            grads = backward(torch.ones_like(out), out, x, w, True, s, p, 0.3, mask)
            ptrs = [g.data_ptr() for g in grads if g.numel()]
            assert len(set(ptrs)) == len(ptrs)
            assert [g.numel() > 0 for g in grads] == mask
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) for t in (out, x, w)]
        grads = backward(torch.ones_like(fakes[0]), *fakes, True, s, p, 0.3, [True, False, False])
        assert grads[0].shape == x.shape and grads[1].numel() == 0 and grads[2].numel() == 0


# A full-size layer of the networks: the backward op of the autoencoder's enc2 block (32 -> 64, k5 s2 p2,
# 32x32 input) at batch 64, fp32, channels_last, against aten's autograd of the reference. In the
# interpreter the mask pass + aten implementation (the Triton dgrad / wgrad at this size would take
# minutes there; tests/kernels/test_conv_backward_triton.py covers them on small shapes), on CUDA both.
@pytest.mark.parametrize(
    "impl",
    [
        "cudnn",
        pytest.param(
            "triton",
            marks=pytest.mark.skipif(
                not torch.cuda.is_available(), reason="interpreter: too slow at full size"
            ),
        ),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_backward_at_full_layer_size(device, impl):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 32, 32, 32, generator=g).to(device).to(memory_format=torch.channels_last)
    w = (torch.randn(64, 32, 5, 5, generator=g) / 28).to(device).to(memory_format=torch.channels_last)
    b = torch.randn(64, generator=g).to(device)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    y_ref = K.reference_conv_lrelu(x, w, b, 2, 2, 0.3)
    grad_out = torch.randn(y_ref.shape, generator=g).to(device)
    grads_ref = torch.autograd.grad(y_ref, (x, w, b), grad_out)
    out = y_ref.detach().contiguous(memory_format=torch.channels_last)
    with K.use_backend("triton"):
        grads = torch.ops.deepsim.conv_lrelu_backward(
            grad_out, out, x.detach(), w.detach(), True, 2, 2, 0.3, [True, True, True], impl, impl
        )
    for name, got, want in zip(("grad_x", "grad_weight", "grad_bias"), grads, grads_ref):
        assert got.shape == want.shape
        assert_close(got, want, 2e-3, 1e-4, name)
    assert grads[0].is_contiguous(memory_format=torch.channels_last)


def _relative_error(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("path", ["triton", "cudnn"])
@pytest.mark.parametrize("layer", LAYERS, ids=[entry[0] for entry in LAYERS])
def test_every_real_layer_on_cuda(layer, path):
    """Every fused block of G, D (64 and 227 px) and the fc6 generator at batch 64, bf16, channels_last,
    on both dispatcher paths: output and all three gradients against an fp32 reference on the same
    rounded values (relative L2 error: bf16 over reductions of up to 65536 terms)."""
    _, c_in, c_out, h, k, s, p, transposed = layer
    g = torch.Generator(device="cuda").manual_seed(7)
    x = (
        torch.randn(64, c_in, h, h, device="cuda", generator=g)
        .bfloat16()
        .to(memory_format=torch.channels_last)
    )
    wshape = (c_in, c_out, k, k) if transposed else (c_out, c_in, k, k)
    w = (torch.randn(wshape, device="cuda", generator=g) / (c_in * k * k) ** 0.5).bfloat16()
    b = (torch.randn(c_out, device="cuda", generator=g) / 10).bfloat16()
    inputs = [t.to(memory_format=torch.channels_last) if t.dim() == 4 else t for t in (x, w, b)]
    inputs = [t.requires_grad_() for t in inputs]
    fn = K.conv_transpose_lrelu if transposed else K.conv_lrelu
    ref = K.reference_conv_transpose_lrelu if transposed else K.reference_conv_lrelu
    with K.use_backend(path):
        y = fn(*inputs, s, p, 0.3)
    ref_inputs = [t.detach().float().requires_grad_() for t in inputs]
    y_ref = ref(*ref_inputs, s, p, 0.3)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(y_ref.shape, device="cuda", generator=g)
    grads = torch.autograd.grad(y, inputs, grad_out.bfloat16())
    grads_ref = torch.autograd.grad(y_ref, ref_inputs, grad_out)
    for name, got, want in zip(
        ("output", "grad_x", "grad_weight", "grad_bias"), (y, *grads), (y_ref, *grads_ref)
    ):
        assert _relative_error(got, want) < 2e-2, name
