"""lpips_distance: Triton against the reference, values and both sides' gradients."""

import pytest
import torch

from ._common import DEVICES, DTYPES, INTERPRET, K, assert_close, skip_unsupported

DEVICE = "cpu" if INTERPRET else "cuda"

# Tap lists: odd sizes (C not a multiple of the channel block, positions not of the position block), a
# 1x1 map, a (B, C) tap, more taps than one launch holds, channels_last.
TAP_SETS = [
    pytest.param([(2, 5, 3, 7), (2, 40, 9, 9), (2, 3, 1, 1)], False, id="odd-sizes"),
    pytest.param([(3, 7, 11, 13)], False, id="one-tap-multi-block"),
    pytest.param([(2, 4, 2, 2), (2, 6)], False, id="2d-tap"),
    pytest.param(
        [(1, 3, 2, 3)] * 4 + [(1, 5, 3, 1), (1, 2, 1, 4), (1, 9, 2, 2)], False, id="7-taps-2-launches"
    ),
    pytest.param([(2, 5, 3, 3), (2, 33, 4, 2)], True, id="channels_last"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shapes, channels_last", TAP_SETS)
@pytest.mark.parametrize("sides", ["x", "both"])
def test_lpips_distance_matches_reference(device, dtype, atol, rtol, shapes, channels_last, sides):
    skip_unsupported(device, dtype)
    torch.manual_seed(0)

    def make(s):
        t = torch.randn(s, device=device).relu()  # ReLU: zeros as in real taps
        if (
            dtype == torch.float16
        ):  # an all-zero position's gradient (~1/eps) does not fit fp16 (docs/lpips.md)
            t = t + 1e-2
        t = t.to(dtype)
        return t.to(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t

    f0s = [make(s).requires_grad_() for s in shapes]
    f1s = [make(s).requires_grad_(sides == "both") for s in shapes]
    weights = [torch.rand(s[1], device=device) for s in shapes]
    with K.use_backend("triton"):
        d = K.lpips_distance(f0s, f1s, weights)
    r0 = [f.detach().float().requires_grad_() for f in f0s]
    r1 = [f.detach().float().requires_grad_(sides == "both") for f in f1s]
    d_ref = K.reference_lpips_distance(r0, r1, weights)
    assert d.dtype == torch.float32 and d.shape == (shapes[0][0],)
    assert_close(d, d_ref, atol, rtol, "distance")
    grad_out = torch.linspace(0.3, -1.1, d.numel(), device=device)  # per image, not ones
    wanted = f0s + (f1s if sides == "both" else [])
    grads = torch.autograd.grad(d, wanted, grad_out)
    grads_ref = torch.autograd.grad(d_ref, r0 + (r1 if sides == "both" else []), grad_out)
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        assert g.shape == g_ref.shape and g.dtype == dtype and g.stride() == wanted[i].stride()
        scale = g_ref.abs().max().item()  # zero-norm positions give gradients of 1/eps: compare relative
        assert_close(g / scale, g_ref / scale, atol, rtol, f"grad {i}")


def test_lpips_distance_deterministic_and_no_grad():
    torch.manual_seed(3)
    f0s = [torch.rand(2, 9, 20, 20, device=DEVICE), torch.rand(2, 4, 5, 5, device=DEVICE)]
    f1s = [torch.rand_like(f) for f in f0s]
    w = [torch.rand(9, device=DEVICE), torch.rand(4, device=DEVICE)]
    with K.use_backend("triton"), torch.no_grad():
        a, b = K.lpips_distance(f0s, f1s, w), K.lpips_distance(f0s, f1s, w)
    assert torch.equal(a, b) and not a.requires_grad


def test_lpips_distance_zero_features_finite():
    f0 = torch.zeros(2, 4, 3, 3, device=DEVICE, requires_grad=True)
    f1 = torch.zeros(2, 4, 3, 3, device=DEVICE)
    f1[0, :, 1, 1] = 1.0
    with K.use_backend("triton"):
        d = K.lpips_distance([f0], [f1], [torch.ones(4, device=DEVICE)])
    (g,) = torch.autograd.grad(d.sum(), [f0])
    assert torch.isfinite(g).all() and torch.isfinite(d).all()
    torch.testing.assert_close(
        d.cpu(), torch.tensor([1.0 / 9, 0.0])
    )  # |0 - unit vector|^2 = 1 at 1 of 9 positions


def test_lpips_distance_rejects_bad_input():
    a = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"weights\[0\] has 4 values for 3 channels"):
        K.lpips_distance([a], [a], [torch.ones(4)])
    with pytest.raises(ValueError, match=r"f0s\[0\] \(2, 3, 4, 4\) != f1s\[0\] \(2, 3, 4, 5\)"):
        K.lpips_distance([a], [torch.rand(2, 3, 4, 5)], [torch.ones(3)])


def test_lpips_distance_traces_under_compile():
    """The custom op's fake implementation and autograd: fullgraph compile (aot_eager) matches eager."""
    torch.manual_seed(5)
    f0s = [
        torch.rand(2, 5, 3, 4, device=DEVICE, requires_grad=True),
        torch.rand(2, 7, 2, 2, device=DEVICE, requires_grad=True),
    ]
    f1s = [torch.rand(2, 5, 3, 4, device=DEVICE), torch.rand(2, 7, 2, 2, device=DEVICE)]
    w = [torch.rand(5, device=DEVICE), torch.rand(7, device=DEVICE)]
    with K.use_backend("triton"):
        eager = K.lpips_distance(f0s, f1s, w)
        compiled = torch.compile(
            lambda a, b: K.lpips_distance([a, b], f1s, w), backend="aot_eager", fullgraph=True
        )
        out = compiled(*f0s)
    torch.testing.assert_close(out, eager)
    for g, g_eager in zip(torch.autograd.grad(out.sum(), f0s), torch.autograd.grad(eager.sum(), f0s)):
        torch.testing.assert_close(g, g_eager)
