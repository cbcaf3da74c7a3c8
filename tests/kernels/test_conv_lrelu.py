"""conv_lrelu and conv_transpose_lrelu: Triton against the PyTorch reference, output and every gradient."""

import pytest
import torch

from ._common import DEVICES, DTYPES, K, assert_close, skip_unsupported

# (N, C_in, H, W, C_out, k, stride, padding, channels_last, bias)
CONV_SHAPES = [
    pytest.param(2, 3, 9, 9, 5, 3, 1, 1, False, True, id="odd-channels"),
    pytest.param(1, 4, 15, 15, 6, 7, 4, 3, False, True, id="batch1-k7s4"),
    pytest.param(2, 5, 6, 7, 3, 3, 2, 1, True, True, id="channels_last-s2"),
    pytest.param(2, 3, 1, 1, 4, 1, 1, 0, False, True, id="1x1-spatial"),
    pytest.param(1, 17, 5, 5, 33, 3, 1, 1, False, False, id="multi-block-nobias"),
    pytest.param(2, 3, 8, 8, 4, 5, 2, 2, True, True, id="k5s2-channels_last"),
]
# (N, C_in, H, W, C_out, k, stride, padding, channels_last, bias); weight (C_in, C_out, k, k)
UPCONV_SHAPES = [
    pytest.param(2, 5, 4, 4, 3, 4, 2, 1, False, True, id="k4s2p1"),
    pytest.param(1, 7, 3, 3, 6, 4, 2, 1, True, True, id="k4s2p1-channels_last-batch1"),
    pytest.param(2, 4, 1, 1, 6, 3, 1, 1, False, True, id="1x1-spatial"),
    pytest.param(1, 17, 2, 3, 33, 4, 2, 1, False, False, id="multi-block-nobias"),
    pytest.param(1, 3, 3, 3, 2, 3, 3, 0, False, True, id="stride3"),
]


def _make(device, dtype, N, C_in, H, W, C_out, k, channels_last, bias, transposed):
    x = torch.randn(N, C_in, H, W, device=device).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    wshape = (C_in, C_out, k, k) if transposed else (C_out, C_in, k, k)
    w = (torch.randn(wshape, device=device) / (C_in * k * k) ** 0.5).to(dtype)
    b = torch.randn(C_out, device=device).to(dtype) if bias else None
    return x, w, b


def _check(op, ref, device, dtype, atol, rtol, N, C_in, H, W, C_out, k, s, p, cl, bias, transposed):
    skip_unsupported(device, dtype)
    torch.manual_seed(0)
    x, w, b = _make(device, dtype, N, C_in, H, W, C_out, k, cl, bias, transposed)
    inputs = [t.requires_grad_() for t in (x, w, b) if t is not None]
    with K.use_backend("triton"):
        y = op(x, w, b, s, p, 0.3)
    # fp32 oracle on the same rounded values
    ref_inputs = [t.detach().float().requires_grad_() for t in inputs]
    if cl:
        ref_inputs[0] = ref_inputs[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    xr, wr = ref_inputs[:2]
    br = ref_inputs[2] if bias else None
    y_ref = ref(xr, wr, br, s, p, 0.3)
    assert y.dtype == dtype and y.shape == y_ref.shape
    if cl:
        assert y.is_contiguous(memory_format=torch.channels_last), "channels_last in, channels_last out"
    assert_close(y, y_ref, atol, rtol, "output")
    grad_out = torch.randn_like(y_ref)  # not all ones
    grads = torch.autograd.grad(y, inputs, grad_out.to(dtype))
    grads_ref = torch.autograd.grad(y_ref, ref_inputs, grad_out)
    for name, g, g_ref in zip(("grad_x", "grad_weight", "grad_bias"), grads, grads_ref):
        assert g.shape == g_ref.shape and g.dtype == dtype, name
        assert_close(g, g_ref, atol, rtol, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("N, C_in, H, W, C_out, k, s, p, cl, bias", CONV_SHAPES)
def test_conv_lrelu_matches_reference(device, dtype, atol, rtol, N, C_in, H, W, C_out, k, s, p, cl, bias):
    _check(
        K.conv_lrelu,
        K.reference_conv_lrelu,
        device,
        dtype,
        atol,
        rtol,
        N,
        C_in,
        H,
        W,
        C_out,
        k,
        s,
        p,
        cl,
        bias,
        transposed=False,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("N, C_in, H, W, C_out, k, s, p, cl, bias", UPCONV_SHAPES)
def test_conv_transpose_lrelu_matches_reference(
    device, dtype, atol, rtol, N, C_in, H, W, C_out, k, s, p, cl, bias
):
    _check(
        K.conv_transpose_lrelu,
        K.reference_conv_transpose_lrelu,
        device,
        dtype,
        atol,
        rtol,
        N,
        C_in,
        H,
        W,
        C_out,
        k,
        s,
        p,
        cl,
        bias,
        transposed=True,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_conv_lrelu_input_without_grad(device):
    """First layer: the image needs no gradient; weight and bias gradients still match."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 6, 6, device=device)
    w = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    with K.use_backend("triton"):
        y = K.conv_lrelu(x, w, b, 2, 1)
    g = torch.randn_like(y)
    gw, gb = torch.autograd.grad(y, (w, b), g)
    gw_ref, gb_ref = torch.autograd.grad(K.reference_conv_lrelu(x, w, b, 2, 1), (w, b), g)
    assert_close(gw, gw_ref, 1e-4, 1e-4, "grad_weight")
    assert_close(gb, gb_ref, 1e-4, 1e-4, "grad_bias")


def test_reference_gradcheck_float64():
    torch.manual_seed(2)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: K.reference_conv_lrelu(*a, 2, 1, 0.3), (x, w, b))
    wt = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: K.reference_conv_transpose_lrelu(*a, 2, 1, 0.3), (x, wt, b))


def test_bad_arguments_are_named():
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="channels"):
        K.conv_lrelu(x, torch.randn(2, 4, 3, 3), None)
    with pytest.raises(ValueError, match="alpha"):
        K.conv_lrelu(x, torch.randn(2, 3, 3, 3), None, alpha=-0.1)
    with pytest.raises(ValueError, match="stride"):
        K.conv_lrelu(x, torch.randn(2, 3, 3, 3), None, stride=(1, 2))


def test_autograd_functions_apply_directly():
    """ConvLReluFunction / ConvTransposeLReluFunction (the Liger-style entry points) match the reference."""
    torch.manual_seed(5)
    x = torch.randn(1, 3, 5, 5, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    wt = torch.randn(3, 4, 4, 4, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    for fn, ref, weight in [
        (K.ConvLReluFunction, K.reference_conv_lrelu, w),
        (K.ConvTransposeLReluFunction, K.reference_conv_transpose_lrelu, wt),
    ]:
        y = fn.apply(x, weight, b, 2, 1, 0.2)
        y_ref = ref(x, weight, b, 2, 1, 0.2)
        assert_close(y, y_ref, 1e-4, 1e-4, "output")
        g = torch.randn_like(y)
        for a, r in zip(
            torch.autograd.grad(y, (x, weight, b), g), torch.autograd.grad(y_ref, (x, weight, b), g)
        ):
            assert_close(a, r, 1e-4, 1e-4, "grad")


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_runs_the_fused_ops_in_the_autocast_dtype(device):
    """Custom ops are not autocast by the dispatcher; the public ops cast x like F.conv2d would."""
    torch.manual_seed(6)
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    x = torch.randn(2, 3, 6, 6, device=device, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
    wt = torch.randn(3, 4, 4, 4, device=device, requires_grad=True)
    for op, ref, weight in [
        (K.conv_lrelu, K.reference_conv_lrelu, w),
        (K.conv_transpose_lrelu, K.reference_conv_transpose_lrelu, wt),
    ]:
        with torch.autocast(device, dtype=dtype):
            with K.use_backend("triton"):
                y = op(x, weight, None, 2, 1)
            y_ref = ref(x, weight, None, 2, 1)
        assert y.dtype == y_ref.dtype == dtype
        assert_close(y, y_ref, 5e-2, 5e-2, "output")
        gx, gw = torch.autograd.grad(y.float().sum(), (x, weight))
        assert gx.dtype == gw.dtype == torch.float32
