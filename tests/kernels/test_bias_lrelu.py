"""bias_lrelu (the cuDNN path's epilogue) and its backward, the one-pass LReLU mask + bias gradient:
Triton against the PyTorch reference, output and every gradient, layouts, determinism, torch.compile."""

import importlib

import pytest
import torch

from ._common import DEVICES, DTYPES, INTERPRET, K, assert_close, skip_unsupported

bias_act = importlib.import_module(K.bias_lrelu.__module__)
# Device of the unparametrized tests that force Triton: the interpreter's CPU, else the GPU.
DEVICE = "cpu" if INTERPRET else "cuda"

# (N, C, H, W, channels_last, bias)
SHAPES = [
    pytest.param(2, 5, 7, 3, False, True, id="odd"),
    pytest.param(3, 70, 5, 4, True, True, id="channels_last-multi-channel-block"),
    pytest.param(1, 3, 1, 1, False, True, id="1x1-spatial"),
    pytest.param(2, 6, 1, 9, True, False, id="H1-channels_last-nobias"),
    pytest.param(2, 4, 9, 1, False, True, id="W1"),
    pytest.param(1, 17, 33, 40, False, True, id="multi-row-block"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("N, C, H, W, cl, bias", SHAPES)
def test_bias_lrelu_matches_reference(device, dtype, atol, rtol, N, C, H, W, cl, bias):
    skip_unsupported(device, dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, H, W, generator=g).to(device, dtype)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    b = torch.randn(C, generator=g).to(device, dtype) if bias else None
    inputs = [t.requires_grad_() for t in (x, b) if t is not None]
    with K.use_backend("triton"):
        y = K.bias_lrelu(x, b, 0.2)
    ref_inputs = [t.detach().float().requires_grad_() for t in inputs]
    y_ref = K.reference_bias_lrelu(ref_inputs[0], ref_inputs[1] if bias else None, 0.2)
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride(), "x's dtype and layout"
    assert_close(y, y_ref, atol, rtol, "output")
    grad_out = torch.randn(y.shape, generator=g).to(device)  # not all ones, and NCHW even when y is not
    grads = torch.autograd.grad(y, inputs, grad_out.to(dtype))
    grads_ref = torch.autograd.grad(y_ref, ref_inputs, grad_out)
    for name, got, want in zip(("grad_conv_out", "grad_bias"), grads, grads_ref):
        assert got.shape == want.shape and got.dtype == dtype, name
        assert_close(got, want, atol, rtol if name != "grad_bias" else max(rtol, 1e-3), name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "need_pre, need_bias", [(True, False), (False, True)], ids=["frozen-bias", "fixed-input"]
)
def test_bias_lrelu_one_gradient_only(device, need_pre, need_bias):
    """A frozen bias, or a bias trained on a conv output that needs no gradient: the one asked for."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 5, generator=g).to(device).requires_grad_(need_pre)
    b = torch.randn(3, generator=g).to(device).requires_grad_(need_bias)
    wanted = [t for t in (x, b) if t.requires_grad]
    with K.use_backend("triton"):
        y = K.bias_lrelu(x, b, 0.3)
    grad_out = torch.randn(y.shape, generator=g).to(device)
    (got,) = torch.autograd.grad(y, wanted, grad_out)
    (want,) = torch.autograd.grad(K.reference_bias_lrelu(x, b, 0.3), wanted, grad_out)
    assert_close(got, want, 1e-5, 1e-5, "the requested gradient")


@pytest.mark.parametrize("device", DEVICES)
def test_full_size_layer(device):
    """A real layer's output at batch 64 (the autoencoder's enc1: 32 channels at 32x32), channels_last
    fp32: forward and both gradients against the reference, in the interpreter too."""
    g = torch.Generator().manual_seed(2)
    x = (
        torch.randn(64, 32, 32, 32, generator=g)
        .to(device)
        .to(memory_format=torch.channels_last)
        .requires_grad_()
    )
    b = torch.randn(32, generator=g).to(device).requires_grad_()
    with K.use_backend("triton"):
        y = K.bias_lrelu(x, b, 0.3)
    y_ref = K.reference_bias_lrelu(x, b, 0.3)
    assert_close(y, y_ref, 1e-6, 1e-6, "output")
    grad_out = torch.randn(y.shape, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    for name, got, want in zip(
        ("grad_conv_out", "grad_bias"),
        torch.autograd.grad(y, (x, b), grad_out),
        torch.autograd.grad(y_ref, (x, b), grad_out),
    ):
        assert_close(got, want, 1e-4, 1e-5, name)


def test_bias_gradient_is_bitwise_reproducible_and_one_pass(monkeypatch):
    """grad_pre and the partial channel sums come from one launch over grad_out, then one fixed-order
    reduction launch; two calls agree bit for bit (no atomics)."""
    g = torch.Generator().manual_seed(3)
    out = torch.randn(3, 70, 30, 20, generator=g).to(DEVICE)  # several row blocks and channel blocks
    grad_out = torch.randn(out.shape, generator=g).to(DEVICE)
    launches = []
    for name in ("_lrelu_bias_grad_kernel", "_channel_sum_kernel"):
        kernel = getattr(bias_act, name)

        class Counting:
            def __getitem__(self, grid, kernel=kernel, name=name):
                launches.append(name)
                return kernel[grid]

        monkeypatch.setattr(bias_act, name, Counting())
    first = bias_act.lrelu_bias_grads(grad_out, out, 0.3)
    assert launches == ["_lrelu_bias_grad_kernel", "_channel_sum_kernel"]
    second = bias_act.lrelu_bias_grads(grad_out, out, 0.3)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    ref = bias_act.reference_lrelu_bias_grads(grad_out, out, 0.3)
    assert_close(first[0], ref[0], 0, 0, "grad_pre")
    assert_close(first[1], ref[1], 1e-4, 1e-5, "grad_bias")


@pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs Triton runnable")
def test_bias_lrelu_under_torch_compile():
    """A custom op with a fake: no graph break, and the compiled forward + backward match eager."""
    x = torch.randn(2, 4, 5, 3, device=DEVICE, requires_grad=True)
    b = torch.randn(4, device=DEVICE, requires_grad=True)

    def fn(x, b):
        return K.bias_lrelu(x * 2, b, 0.3).square().sum()

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(x, b)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(x, b)
    expected = fn(x, b)
    assert_close(out, expected, 1e-5, 1e-5, "loss")
    for got, want in zip(torch.autograd.grad(out, (x, b)), torch.autograd.grad(expected, (x, b))):
        assert_close(got, want, 1e-5, 1e-5, "gradient")


def test_saves_only_its_output():
    x = torch.randn(2, 3, 4, 4, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = K.bias_lrelu(x, torch.randn(3, device=DEVICE, requires_grad=True), 0.3)
    assert [t.untyped_storage().data_ptr() for t in saved] == [y.untyped_storage().data_ptr()]


def test_bad_arguments_are_named():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="bias of shape"):
        K.bias_lrelu(x, torch.randn(4))
    with pytest.raises(ValueError, match="alpha"):
        K.bias_lrelu(x, None, -0.5)
    with pytest.raises(ValueError, match="4-D"):
        K.bias_lrelu(torch.randn(3, 4), None)
