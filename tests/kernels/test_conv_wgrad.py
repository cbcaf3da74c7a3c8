"""The wgrad kernel's orientations and its cuDNN fallback (kernels/_conv_backward.py): the swapped tile
(rows = grad_W's columns) against PyTorch over odd shapes, every gradient subset with grad_W, both layouts
and fp32 / fp16 in the interpreter; the config list's bars (wgmma rows, efficiency, the 3-channel first
layers on cuDNN), the split bounds, and a wgrad with no eligible config running cuDNN after the mask pass.
"""

import importlib

import pytest
import torch

from ._common import DTYPES, INTERPRET, K, assert_close, skip_unsupported
from .test_conv_backward_triton import NEEDS, SHAPE_IDS, SHAPES, _AtenLog, _fn, _inputs

B = importlib.import_module(f"{K.__name__}._conv_backward")
C = importlib.import_module(f"{K.__name__}._conv_configs")
WGRAD_OPS = ("wgrad_conv", "wgrad_conv_transpose")
NEEDS_W = [n for n in NEEDS if n[1]]
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="CPU Triton needs TRITON_INTERPRET=1")


def _network_geometries():
    from bench.static import network_layers

    return {(layer.network, layer.name): layer.geom for layer in network_layers(64)}


@needs_interpreter
@pytest.mark.parametrize("config", B.WGRAD_INTERPRETER_SWAPPED, ids=lambda c: c.name)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("needs", NEEDS_W, ids=lambda n: f"x{'+' if n[0] else '-'}w+b-{n[2]}")
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_swapped_wgrad_matches_pytorch(shape, needs, channels_last, config):
    """The swapped tile (MMA rows = grad_W's columns, used where R < 64), forced, gives autograd's
    gradients of the reference (grad_W, and a conv's grad_b from the same reduction)."""
    x, w, b = _inputs("cpu", shape, needs, channels_last=channels_last)
    transposed, _, _, s, p = shape
    fn, ref = _fn(transposed)
    wanted = [t for t in (x, w, b) if t is not None and t.requires_grad]
    with C.force_config(config, ops=WGRAD_OPS), K.use_backend("triton"):
        y = fn(x, w, b, s, p, 0.3)
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        got = torch.autograd.grad(y, wanted, grad_out)
    want = torch.autograd.grad(ref(x, w, b, s, p, 0.3), wanted, grad_out)
    for t, g, e in zip(wanted, got, want):
        assert_close(g, e, 1e-4, 1e-4, f"gradient of {tuple(t.shape)}")


@needs_interpreter
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("swap", [False, True], ids=["rows-R", "swapped"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[3]], ids=[SHAPE_IDS[i] for i in (0, 1, 3)])
def test_wgrad_orientations_in_fp32_and_fp16(shape, swap, dtype, atol, rtol):
    """grad_W and grad_b of both orientations in fp32 / fp16 against an fp32 reference on the same rounded
    values (the interpreter has no bf16)."""
    skip_unsupported("cpu", dtype)
    transposed, _, _, s, p = shape
    x, w, b = _inputs("cpu", shape, (False, True, "trained"), dtype=dtype, channels_last=True)
    fn, ref = _fn(transposed)
    config = (B.WGRAD_INTERPRETER_SWAPPED if swap else B.WGRAD_INTERPRETER_CONFIGS)[0]
    with C.force_config(config, ops=WGRAD_OPS), K.use_backend("triton"):
        y = fn(x, w, b, s, p, 0.3)
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
        got = torch.autograd.grad(y, (w, b), grad_out)
    ref_in = [t.detach().float().requires_grad_() for t in (x, w, b)]
    want = torch.autograd.grad(ref(*ref_in, s, p, 0.3), ref_in[1:], grad_out.float())
    for name, g, e in zip(("grad_W", "grad_b"), got, want):
        assert g.dtype == dtype
        assert_close(g, e, atol * 4, rtol, name)


@needs_interpreter
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "up"])
def test_no_eligible_config_runs_cudnn_after_the_mask_pass(monkeypatch, transposed):
    """Where ``wgrad_candidates`` offers nothing (and no config is forced), conv_wgrad is aten's weight
    gradient of the mask pass's grad_pre: right values, and an aten convolution ran (none otherwise)."""
    shape = SHAPES[3] if transposed else SHAPES[0]
    x, w, b = _inputs("cpu", shape, (False, True, "trained"))
    _, _, _, s, p = shape
    fn, ref = _fn(transposed)
    out = ref(x, w, b, s, p, 0.3).detach()
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    n, c_in, h, wd = x.shape
    geom = C.ConvGeometry(transposed, n, c_in, h, wd, out.shape[1], *w.shape[2:], s, p)
    gw_want, gb_want = torch.autograd.grad(ref(x, w, b, s, p, 0.3), (w, b), grad_out)
    for empty in (True, False):
        with monkeypatch.context() as m:
            if empty:
                m.setattr(B, "wgrad_candidates", lambda *args, **kwargs: [])
            log = _AtenLog()
            with log:
                gw, gb = B.conv_wgrad(grad_out, out, x.detach(), geom, 0.3, not transposed)
        assert any("convolution" in n for n in log.names) == empty, log.names
        assert_close(gw, gw_want, 1e-4, 1e-4, f"grad_W (no candidates: {empty})")
        if not transposed:
            assert_close(gb, gb_want, 1e-4, 1e-4, f"grad_b (no candidates: {empty})")


def test_every_network_wgrad_is_wgmma_shaped_efficient_or_on_cudnn(monkeypatch):
    """On the H100 list, every candidate of every network layer's wgrad has >= 64 MMA rows (wgmma) and
    efficiency >= MIN_EFFICIENCY, swapped tiles only where R < 64; the layers with none are exactly the
    3-channel first layers (R = 32, KCOLS = 75 or 147: a 64-row tile of KCOLS pads them to 0.59 / 0.77)."""
    monkeypatch.setattr(B, "INTERPRET", False)
    assert all(c.block_m >= 64 for c in B.WGRAD_CONFIGS)
    on_cudnn = set()
    for where, geom in _network_geometries().items():
        candidates = B.wgrad_candidates(geom, torch.bfloat16, "ieee")
        if not candidates:
            on_cudnn.add(where)
        assert B.wgrad_runs_triton(geom, torch.bfloat16) == bool(candidates), where
        with C.force_config(B.WGRAD_CONFIGS[0], ops=WGRAD_OPS):
            assert B.wgrad_runs_triton(geom, torch.bfloat16), where  # a forced config always runs
        r = B.wgrad_problem(geom)["R"]
        for c in candidates:
            assert c.block_m >= 64 and B.wgrad_efficiency(geom, c) >= C.MIN_EFFICIENCY, (where, c.name)
            assert c.swap == (r < 64), (where, c.name)
        best = max(B.wgrad_efficiency(geom, c) for c in B.WGRAD_CONFIGS)
        assert (best < C.MIN_EFFICIENCY) == (where in on_cudnn), where
    first_layers = {w for w, g in _network_geometries().items() if not g.transposed and g.C_in == 3}
    assert on_cudnn == first_layers and len(first_layers) == 5


@pytest.mark.parametrize("ctas", [None, 1, 2, 3, 6])
def test_wgrad_splits_cover_two_waves_within_the_bounds(ctas):
    """tiles x splits >= 2 x SM_COUNT x resident CTAs unless a bound binds (<= MAX_SPLITS splits, >= 1 K
    step each, partials <= PARTIAL_BYTES_LIMIT); every K step in exactly one split."""
    for where, geom in _network_geometries().items():
        p = B.wgrad_problem(geom)
        for config in B.WGRAD_CONFIGS:
            splits, per_split = B.wgrad_splits(geom, config, ctas)
            resident = B.wgrad_ctas_estimate(geom, config) if ctas is None else ctas
            steps = -(-p["K"] // config.block_k)
            assert splits * per_split >= steps > (splits - 1) * per_split, (where, config.name)
            assert 1 <= splits <= B.MAX_SPLITS and per_split >= 1
            assert splits == 1 or splits * 4 * p["R"] * p["KCOLS"] <= B.PARTIAL_BYTES_LIMIT
            tiles = -(-p["R"] // B.wgrad_tile(config)[0]) * -(-p["KCOLS"] // B.wgrad_tile(config)[1])
            cap = max(1, min(B.MAX_SPLITS, steps, B.PARTIAL_BYTES_LIMIT // (4 * p["R"] * p["KCOLS"])))
            most = -(-steps // -(-steps // cap))  # the most splits the bounds allow
            assert tiles * splits >= 2 * C.SM_COUNT * resident or splits == most, (where, config.name)


def test_resident_ctas_is_the_static_reports_count():
    from bench import static

    for regs, warps, smem in [(128, 4, 64 * 1024), (255, 8, 16 * 1024), (240, 4, 16 * 1024), (56, 4, 36864)]:
        assert B.resident_ctas(regs, warps, smem) == static.ctas_per_sm(regs, warps, smem)


# Channels that are a multiple of the column tile (32 and 64): the kernel's other column path, one tap
# per tile (a scalar tap, the Q mask per row), for conv (Q = x) and up-conv (Q = grad_pre).
TAP_SHAPES = [
    (False, (2, 32, 5, 4), (6, 32, 3, 2), 1, 1),
    (False, (1, 64, 5, 5), (7, 64, 2, 2), 2, 0),
    (True, (1, 5, 3, 3), (5, 32, 3, 3), 2, 1),
    (True, (2, 3, 3, 2), (3, 64, 2, 2), 1, 0),
]


@needs_interpreter
@pytest.mark.parametrize(
    "config", B.WGRAD_INTERPRETER_CONFIGS + B.WGRAD_INTERPRETER_SWAPPED, ids=lambda c: c.name
)
@pytest.mark.parametrize("shape", TAP_SHAPES, ids=lambda s: f"{'up' if s[0] else 'conv'}-{s[1][1]}x{s[2][1]}")
def test_wgrad_tiles_within_one_tap(shape, config):
    transposed, _, ws, s, p = shape
    x, w, b = _inputs("cpu", shape, (True, True, "trained"), channels_last=True)
    fn, ref = _fn(transposed)
    with C.force_config(config, ops=WGRAD_OPS), K.use_backend("triton"):
        y = fn(x, w, b, s, p, 0.3)
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
        got = torch.autograd.grad(y, (w, b), grad_out)
    want = torch.autograd.grad(ref(x, w, b, s, p, 0.3), (w, b), grad_out)
    for name, g, e in zip(("grad_W", "grad_b"), got, want):
        assert_close(g, e, 1e-4, 1e-4, name)


@needs_interpreter
def test_a_wgrad_on_cudnn_shares_the_one_mask_pass(monkeypatch):
    """dgrad on cuDNN, wgrad asked of Triton where no config serves it (as the 3-channel first layers on
    the H100 list): one mask pass feeds aten's dgrad and wgrad together, not one pass each."""
    common = importlib.import_module(f"{K.__name__}._conv_common")
    x, w, b = _inputs("cpu", SHAPES[0], (True, True, "trained"))
    _, _, _, s, p = SHAPES[0]
    calls = []
    for module in (common, B):  # the mask pass, wherever it is called from
        passes = module.lrelu_bias_grads
        monkeypatch.setattr(
            module, "lrelu_bias_grads", lambda *a, passes=passes, **k: calls.append(1) or passes(*a, **k)
        )
    want = torch.autograd.grad(K.reference_conv_lrelu(x, w, b, s, p, 0.3).sum(), (x, w, b))
    for empty in (False, True):
        calls.clear()
        with monkeypatch.context() as m:
            if empty:
                m.setattr(B, "wgrad_candidates", lambda *args, **kwargs: [])
            with K.use_backend("triton"):
                out = K.reference_conv_lrelu(x, w, b, s, p, 0.3).detach()
                got = common.conv_lrelu_grads(
                    torch.ones_like(out),
                    out,
                    x.detach(),
                    w.detach(),
                    True,
                    s,
                    p,
                    0.3,
                    [True, True, True],
                    transposed=False,
                    dgrad="cudnn",
                    wgrad="triton",
                )
        assert len(calls) == 1, (empty, len(calls))
        for name, g, e in zip(("grad_x", "grad_W", "grad_b"), got, want):
            assert_close(g, e, 1e-4, 1e-4, f"{name} (no wgrad config: {empty})")
