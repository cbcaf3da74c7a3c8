"""The GEMM + fold dgrad of convs with few input channels (kernels/_conv_dgrad_fold.py): the fold against
torch.nn.functional.fold, grad_x through the op against PyTorch over odd shapes (stride 1/2/4, padding 0..3,
C_in 1..8), both layouts, fp32 / fp16; the GEMM's issued-MMA efficiency on the networks' 3- and 8-channel
layers; the dgrad of an input that needs no gradient is never run.
"""

import importlib

import pytest
import torch

from ._common import DEVICES, K, assert_close, skip_unsupported

C = importlib.import_module(f"{K.__name__}._conv_configs")
F = importlib.import_module(f"{K.__name__}._conv_dgrad_fold")
B = importlib.import_module(f"{K.__name__}._conv_backward")
COMMON = importlib.import_module(f"{K.__name__}._conv_common")

# (x shape, weight shape, stride, padding): C_in 1..8, stride 1 / 2 / 4, padding 0..3, odd sizes, a kernel
# wider than the stride and one narrower, a non-square kernel, rows no tap reaches (7x7 input, k2 s4).
SHAPES = [
    ((2, 3, 13, 11), (5, 3, 7, 7), 2, 3),
    ((1, 1, 9, 10), (4, 1, 3, 3), 1, 1),
    ((2, 8, 7, 9), (6, 8, 3, 3), 1, 0),
    ((1, 3, 23, 19), (7, 3, 7, 7), 4, 2),
    ((2, 5, 8, 7), (3, 5, 5, 3), 2, 2),
    ((1, 2, 7, 7), (4, 2, 2, 2), 4, 0),
    ((1, 4, 6, 6), (9, 4, 4, 4), 2, 1),
]
IDS = [f"{'x'.join(map(str, x))}-k{w[2]}x{w[3]}s{s}p{p}" for x, w, s, p in SHAPES]


def _geom(xs, ws, s, p):
    return C.ConvGeometry(False, xs[0], xs[1], xs[2], xs[3], ws[0], ws[2], ws[3], s, p)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_fold_matches_torch_fold(device, shape):
    geom = _geom(*shape)
    oh, ow = geom.out_size
    g = torch.Generator().manual_seed(1)
    col = torch.randn(geom.N, geom.KH * geom.KW * geom.C_in, oh, ow, generator=g).to(device)
    col = col.contiguous(memory_format=torch.channels_last)
    out = torch.empty((geom.N, geom.C_in, geom.H, geom.W), device=device, memory_format=torch.channels_last)
    F.conv_fold(col, geom, out)
    assert_close(out, F.reference_fold(col, geom).to(device), 1e-5, 1e-5, "fold")
    # the reference against autograd: fold is the adjoint of unfold, i.e. the dgrad of the 1x1 GEMM + im2col
    x = torch.zeros(geom.N, geom.C_in, geom.H, geom.W, requires_grad=True)
    cols = torch.nn.functional.unfold(x, (geom.KH, geom.KW), padding=geom.padding, stride=geom.stride)
    up = col.float().cpu().reshape(geom.N, geom.KH, geom.KW, geom.C_in, oh * ow).permute(0, 3, 1, 2, 4)
    (cols * up.reshape(cols.shape)).sum().backward()
    assert_close(F.reference_fold(col.cpu(), geom), x.grad, 1e-5, 1e-5, "reference fold")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize(
    "dtype, atol, rtol",
    [(torch.float32, 1e-4, 1e-4), (torch.float16, 2e-2, 2e-2)],
    ids=["fp32", "fp16"],
)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_fold_dgrad_matches_pytorch(device, shape, channels_last, dtype, atol, rtol):
    skip_unsupported(device, dtype)
    xs, ws, s, p = shape
    assert F.uses_fold(_geom(*shape))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(xs, generator=g).to(device, dtype)
    w = (torch.randn(ws, generator=g) / 4).to(device, dtype)
    b = torch.randn(ws[0], generator=g).to(device, dtype)
    if channels_last:
        x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    x.requires_grad_()
    with K.use_backend("triton"):
        y = K.conv_lrelu(x, w, b, s, p, 0.2)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    (gx,) = torch.autograd.grad(y, x, grad_out)
    xr = x.detach().float().requires_grad_()
    yr = K.reference_conv_lrelu(xr, w.float(), b.float(), s, p, 0.2)
    (want,) = torch.autograd.grad(yr, xr, grad_out.float())
    assert gx.shape == x.shape and gx.dtype == dtype
    assert_close(gx, want, atol, rtol, "grad_x")


def test_fold_gemm_meets_the_efficiency_bar_on_the_networks_few_channel_layers():
    """D's conv1 (3 -> 32 k7, N = 147) and G's decoder.0 (8 -> 128 k3, N = 72): the GEMM's best configs
    reach >= 0.85; the transposed-conv dgrad they replace sits at 0.06-0.25."""
    for geom in (
        C.ConvGeometry(False, 64, 3, 64, 64, 32, 7, 7, 2, 3),
        C.ConvGeometry(False, 64, 3, 227, 227, 32, 7, 7, 4, 0),
        C.ConvGeometry(False, 64, 8, 8, 8, 128, 3, 3, 1, 1),
    ):
        gg = F.fold_gemm_geometry(geom)
        assert (gg.C_in, gg.C_out, gg.k) == (geom.C_out, geom.KH * geom.KW * geom.C_in, geom.C_out)
        configs = C.eligible_configs(gg, 2, F.fold_gemm_configs(C.GPU_CONFIGS))  # the H100 list
        assert configs and all(C.issued_mma_efficiency(gg, c) >= C.MIN_EFFICIENCY for c in configs)
        old = C.eligible_configs(B.dgrad_geometry(geom), 2, C.GPU_CONFIGS)
        assert max(C.issued_mma_efficiency(B.dgrad_geometry(geom), c) for c in old) < 0.5


def test_no_dgrad_when_the_input_needs_no_gradient(monkeypatch):
    """autograd passes needs_input_grad as output_mask: x without requires_grad runs no dgrad at all (so the
    static report marks the networks' first layers over a photo as not run)."""
    calls = []
    real = COMMON.conv_dgrad
    monkeypatch.setattr(COMMON, "conv_dgrad", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(1, 3, 9, 9)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    for need_x in (False, True):
        with K.use_backend("triton"):
            y = K.conv_lrelu(x.clone().requires_grad_(need_x), w, None, 2, 1, 0.2)
        y.sum().backward()
        assert len(calls) == int(need_x)
