"""feature_distance and mean_pairwise_distance: Triton against the reference."""

import importlib

import pytest
import torch

from ._common import DEVICES, DTYPES, INTERPRET, K, assert_close, skip_unsupported

# Device of the unparametrized tests that force the Triton backend: the interpreter's CPU, else the GPU
# (TRITON_INTERPRET is unset where a GPU is present, and Triton on a CPU tensor needs it).
DEVICE = "cpu" if INTERPRET else "cuda"

# Comparator-tap-like lists: odd sizes, a 1x1 map, one layer spanning several programs, channels_last.
LAYER_SETS = [
    pytest.param([(2, 3, 5, 5), (2, 7), (2, 1, 1, 1)], False, id="odd-sizes"),
    pytest.param([(1, 4, 33, 17)], False, id="one-layer-multi-program"),
    pytest.param([(2, 5, 3, 3), (2, 6, 2, 2)], True, id="channels_last"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shapes, channels_last", LAYER_SETS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_feature_distance_matches_reference(device, dtype, atol, rtol, shapes, channels_last, reduction):
    skip_unsupported(device, dtype)
    torch.manual_seed(0)

    def make(s):
        t = torch.randn(s, device=device).to(dtype)
        return t.to(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t

    fakes = [make(s).requires_grad_() for s in shapes]
    reals = [make(s) for s in shapes]
    weights = [0.5, 2.0, 0.1][: len(shapes)]
    with K.use_backend("triton"):
        loss = K.feature_distance(fakes, reals, weights, reduction)
    fakes_ref = [f.detach().float().requires_grad_() for f in fakes]
    loss_ref = K.reference_feature_distance(fakes_ref, [r.float() for r in reals], weights, reduction)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, loss_ref, atol, rtol, "loss")
    grad_out = torch.tensor(0.37, device=device)  # not one
    grads = torch.autograd.grad(loss, fakes, grad_out)
    grads_ref = torch.autograd.grad(loss_ref, fakes_ref, grad_out)
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        assert g.shape == g_ref.shape and g.dtype == dtype
        assert_close(g, g_ref, atol, rtol, f"grad fakes[{i}]")


@pytest.mark.parametrize("device", DEVICES)
def test_feature_distance_deterministic_and_no_grad(device):
    torch.manual_seed(3)
    fakes = [torch.randn(2, 3, 40, 40, device=device), torch.randn(2, 9, device=device)]
    reals = [torch.randn_like(f) for f in fakes]
    with K.use_backend("triton"), torch.no_grad():
        a = K.feature_distance(fakes, reals)
        b = K.feature_distance(fakes, reals)
    assert torch.equal(a, b), "two runs on the same input must agree bitwise"
    assert not a.requires_grad


def test_feature_distance_reals_get_no_gradient():
    fake = torch.randn(2, 3, device=DEVICE, requires_grad=True)
    real = torch.randn(2, 3, device=DEVICE, requires_grad=True)
    with K.use_backend("triton"):
        K.feature_distance([fake], [real]).backward()
    assert fake.grad is not None and real.grad is None


def test_feature_distance_reference_gradcheck_float64():
    f = [
        torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True),
        torch.randn(2, 5, dtype=torch.float64, requires_grad=True),
    ]
    r = [torch.randn_like(t) for t in f]
    assert torch.autograd.gradcheck(
        lambda a, b: K.reference_feature_distance([a, b], r, [0.3, 1.5], "mean"), f
    )


def test_feature_distance_bad_arguments():
    with pytest.raises(ValueError, match="reduction"):
        K.feature_distance([torch.zeros(1)], [torch.zeros(1)], reduction="max")
    with pytest.raises(ValueError, match=r"fakes\[0\]"):
        K.feature_distance([torch.zeros(2)], [torch.zeros(3)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("N, D", [(2, 3), (5, 7), (33, 70), (40, 1)], ids=["pair", "odd", "multi-tile", "D1"])
def test_mean_pairwise_distance_matches_reference(device, dtype, atol, rtol, N, D):
    skip_unsupported(device, dtype)
    torch.manual_seed(0)
    x = torch.randn(N, D, device=device).to(dtype)
    with K.use_backend("triton"):
        d = K.mean_pairwise_distance(x)
    d_ref = K.reference_mean_pairwise_distance(x.float())
    assert d.dtype == torch.float32 and d.dim() == 0
    assert_close(d, d_ref, max(atol, 1e-4), max(rtol, 1e-4), "mean distance")


def test_mean_pairwise_distance_identical_rows_and_errors():
    x = torch.ones(6, 4, device=DEVICE)
    with K.use_backend("triton"):
        assert K.mean_pairwise_distance(x).item() == pytest.approx(0.0, abs=1e-6)
        with pytest.raises(ValueError, match="N >= 2"):
            K.mean_pairwise_distance(torch.randn(1, 3, device=DEVICE))


def test_feature_distance_mixed_layouts():
    """A transposed (non-contiguous) fake and a real in another layout: same values, grads in fake's
    layout."""
    torch.manual_seed(4)
    fake = torch.randn(5, 3, device=DEVICE).t().requires_grad_()  # (3, 5), strides (1, 3)
    real = torch.randn(3, 5, device=DEVICE)
    cl_fake = torch.randn(2, 3, 4, 4, device=DEVICE).to(memory_format=torch.channels_last).requires_grad_()
    cl_real = torch.randn(2, 3, 4, 4, device=DEVICE)
    with K.use_backend("triton"):
        loss = K.feature_distance([fake, cl_fake], [real, cl_real], [1.0, 0.5])
    loss_ref = K.reference_feature_distance([fake, cl_fake], [real, cl_real], [1.0, 0.5])
    assert_close(loss, loss_ref, 1e-4, 1e-4, "loss")
    g = torch.autograd.grad(loss, [fake, cl_fake])
    g_ref = torch.autograd.grad(loss_ref, [fake, cl_fake])
    for a, b in zip(g, g_ref):
        assert_close(a, b, 1e-5, 1e-5, "grad")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_feature_distance_cuda_graph_capture():
    """The op captures in a CUDA graph (torch.compile "reduce-overhead" does this): a replay on new
    inputs copied into the captured buffers gives their loss and gradients."""
    torch.manual_seed(6)
    shapes = [(4, 8, 16, 16), (4, 32, 8, 8), (4, 5)]
    fakes = [torch.randn(s, device="cuda", requires_grad=True) for s in shapes]
    reals = [torch.randn(s, device="cuda") for s in shapes]
    weights = [1.0, 0.5, 2.0]

    def step():
        loss = K.feature_distance(fakes, reals, weights, "mean")
        return loss.detach(), torch.autograd.grad(loss, fakes)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), K.use_backend("triton"):
        step()  # warm-up (compiles) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), K.use_backend("triton"):
        loss, grads = step()
    with torch.no_grad():
        for t in fakes + reals:
            t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    fakes_ref = [f.detach().clone().requires_grad_() for f in fakes]
    loss_ref = K.reference_feature_distance(fakes_ref, reals, weights, "mean")
    assert_close(loss, loss_ref, 1e-4, 1e-4, "loss")
    for g, g_ref in zip(grads, torch.autograd.grad(loss_ref, fakes_ref)):
        assert_close(g, g_ref, 1e-4, 1e-4, "grad")


def _taps(n, dtypes=(torch.float32,)):
    """n comparator-tap-like layers: varied sizes (some spanning several programs), cycling dtypes/layouts."""
    shapes = [
        (2, 3, 5, 5),
        (2, 7),
        (1, 4, 33, 17),
        (2, 1, 1, 1),
        (2, 6, 4, 4),
        (3, 11),
        (2, 2, 30, 20),
        (2, 5, 3, 3),
        (4, 9),
        (2, 8, 2, 2),
    ]
    fakes, reals = [], []
    for i in range(n):
        s = shapes[i % len(shapes)]
        f = torch.randn(s, device=DEVICE).to(dtypes[i % len(dtypes)])
        r = torch.randn(s, device=DEVICE).to(dtypes[(i + 1) % len(dtypes)])
        if f.dim() == 4 and i % 3 == 1:
            f = f.to(memory_format=torch.channels_last)  # fake channels_last, real contiguous
        elif f.dim() == 2 and i % 3 == 2:
            f = f.t().contiguous().t()  # non-contiguous view layout
        fakes.append(f.requires_grad_())
        reals.append(r)
    return fakes, reals


@pytest.mark.parametrize("num_layers", [1, 3, 9], ids=["1-layer", "3-layers", "9-layers-two-launches"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_feature_distance_layer_counts(num_layers, reduction):
    """1, 3 and 9 layers (9 > MAX_LAYERS: two forward launches into one partial buffer) match the reference,
    gradients included, with a random grad_output; two runs agree bitwise."""
    torch.manual_seed(7 + num_layers)
    fakes, reals = _taps(num_layers)
    weights = [0.25 + 0.5 * i for i in range(num_layers)]
    with K.use_backend("triton"):
        loss = K.feature_distance(fakes, reals, weights, reduction)
        again = K.feature_distance(fakes, reals, weights, reduction)
    assert torch.equal(loss, again), "two runs on the same input must agree bitwise"
    fakes_ref = [f.detach().clone().requires_grad_() for f in fakes]
    loss_ref = K.reference_feature_distance(fakes_ref, reals, weights, reduction)
    assert_close(loss, loss_ref, 1e-4, 1e-4, "loss")
    grad_out = torch.rand((), device=DEVICE) + 0.5
    grads = torch.autograd.grad(loss, fakes, grad_out)
    grads_ref = torch.autograd.grad(loss_ref, fakes_ref, grad_out)
    for i, (g, g_ref, f) in enumerate(zip(grads, grads_ref, fakes)):
        assert g.dtype == f.dtype and g.stride() == f.stride()
        assert_close(g, g_ref, 1e-4, 1e-4, f"grad fakes[{i}]")


@pytest.mark.parametrize("num_layers", [3, 9])
def test_feature_distance_mixed_dtypes(num_layers):
    """Layers of different dtypes in one launch (fp32/fp16; bf16 too on a GPU): each gradient in its fake's
    dtype, values against an fp32 reference on the same rounded inputs."""
    torch.manual_seed(11)
    dtypes = (torch.float32, torch.float16) + ((torch.bfloat16,) if DEVICE == "cuda" else ())
    fakes, reals = _taps(num_layers, dtypes)
    weights = [1.0 + 0.1 * i for i in range(num_layers)]
    with K.use_backend("triton"):
        loss = K.feature_distance(fakes, reals, weights, "mean")
    fakes_ref = [f.detach().float().requires_grad_() for f in fakes]
    loss_ref = K.reference_feature_distance(fakes_ref, [r.float() for r in reals], weights, "mean")
    assert_close(loss, loss_ref, 1e-3, 1e-3, "loss")
    grad_out = torch.tensor(0.61, device=DEVICE)
    grads = torch.autograd.grad(loss, fakes, grad_out)
    grads_ref = torch.autograd.grad(loss_ref, fakes_ref, grad_out)
    for i, (g, g_ref, f) in enumerate(zip(grads, grads_ref, fakes)):
        assert g.dtype == f.dtype and g.shape == f.shape
        tol = 1e-4 if f.dtype == torch.float32 else 5e-2
        assert_close(g, g_ref, tol, tol, f"grad fakes[{i}]")


def test_feature_distance_empty_layer():
    """A zero-element layer among others contributes nothing and gets an empty gradient."""
    torch.manual_seed(12)
    fakes = [
        torch.randn(2, 3, device=DEVICE, requires_grad=True),
        torch.randn(0, 4, device=DEVICE, requires_grad=True),
        torch.randn(2, 5, device=DEVICE, requires_grad=True),
    ]
    reals = [torch.randn_like(f) for f in fakes]
    with K.use_backend("triton"):
        loss = K.feature_distance(fakes, reals, [1.0, 2.0, 3.0])
    loss_ref = K.reference_feature_distance(fakes, reals, [1.0, 2.0, 3.0])
    assert_close(loss, loss_ref, 1e-5, 1e-5, "loss")
    grads = torch.autograd.grad(loss, fakes)
    assert grads[1].shape == (0, 4)


def _count_launches(monkeypatch, module, name) -> list:
    """Replace ``module.name`` (a Triton kernel) by a wrapper that records each launch's grid."""
    kernel, calls = getattr(module, name), []

    class Counting:
        def __getitem__(self, grid):
            calls.append(grid)
            return kernel[grid]

    monkeypatch.setattr(module, name, Counting())
    return calls


@pytest.mark.parametrize("num_layers, launches", [(3, 1), (8, 1), (9, 2)])
def test_feature_distance_forward_launch_count(monkeypatch, num_layers, launches):
    """Up to MAX_LAYERS layers take exactly one forward launch; 9 take two."""
    fd = importlib.import_module(K.feature_distance.__module__)
    assert fd.MAX_LAYERS == 8
    calls = _count_launches(monkeypatch, fd, "_feature_distance_fwd_kernel")
    fakes, reals = _taps(num_layers)
    with K.use_backend("triton"):
        K.feature_distance(fakes, reals)
    assert len(calls) == launches


@pytest.mark.parametrize("num_layers, launches", [(3, 1), (8, 1), (9, 2)])
def test_feature_distance_backward_launch_count(monkeypatch, num_layers, launches):
    """Backward: one launch for up to MAX_LAYERS taps (9 take two), no per-tap launch, and the gradients
    (saved dL/dfake times a non-one grad_output) match the reference, in each fake's layout."""
    fd = importlib.import_module(K.feature_distance.__module__)
    calls = _count_launches(monkeypatch, fd, "_feature_distance_bwd_kernel")
    torch.manual_seed(13)
    fakes, reals = _taps(num_layers)
    with K.use_backend("triton"):
        loss = K.feature_distance(fakes, reals)
    grad_out = torch.tensor(1.7, device=DEVICE)
    grads = torch.autograd.grad(loss, fakes, grad_out)
    assert len(calls) == launches
    fakes_ref = [f.detach().clone().requires_grad_() for f in fakes]
    grads_ref = torch.autograd.grad(K.reference_feature_distance(fakes_ref, reals), fakes_ref, grad_out)
    for i, (g, g_ref, f) in enumerate(zip(grads, grads_ref, fakes)):
        assert g.stride() == f.stride()
        assert_close(g, g_ref, 1e-4, 1e-4, f"grad fakes[{i}]")
