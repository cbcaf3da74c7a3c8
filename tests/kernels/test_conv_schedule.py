"""The schedule of the forward / dgrad kernel (kernels/_conv_igemm.py): exact taps per parity class in the
issued-MMA count, the persistent grid (arithmetic and, in the interpreter, results independent of the
number of programs), and on every network layer (slow: compiles for sm_90) a persistent or >= 2-wave
schedule on the forward and the dgrad, with a first launch that never asks for more CTAs than are resident.
"""

import importlib

import pytest
import torch

from bench import static

from ._common import DEVICES, K

C = importlib.import_module(f"{K.__name__}._conv_configs")
B = importlib.import_module(f"{K.__name__}._conv_backward")
G = importlib.import_module(f"{K.__name__}._conv_igemm")


def _valid_taps(out: int, size: int, k: int, s: int, p: int, oh: int) -> set[int]:
    """Brute force, from the up-conv's definition out[oh] += x[ih] * w[kh] where oh = ih * s - p + kh."""
    return {kh for kh in range(k) for ih in range(size) if ih * s - p + kh == oh}


@pytest.mark.parametrize(
    "k, s, p, size",
    [
        (3, 2, 1, 9),
        (5, 2, 2, 9),
        (7, 4, 3, 9),
        (4, 2, 1, 9),
        (1, 2, 0, 9),
        (3, 4, 0, 9),
        (5, 1, 0, 6),
        (3, 1, 1, 2),
        (2, 3, 0, 4),
    ],
)
def test_gemm_classes_partition_the_output_with_exactly_its_valid_taps(k, s, p, size):
    """Every output pixel is in exactly one class, and its class reads exactly the taps that reach it from
    inside the input (a border row has fewer): no tap is padded, none is missed."""
    geom = C.ConvGeometry(True, 2, 64, size, size + 1, 32, k, k, s, p)
    (oh, ow), (th, tw) = geom.out_size, geom.taps
    seen = {}
    for c in C.gemm_classes(geom):
        for r in range(c.r0h, c.r0h + c.rows_h):
            for q in range(c.r0w, c.r0w + c.rows_w):
                pixel = (c.ph + s * r, c.pw + s * q)
                assert pixel not in seen, f"{pixel} in two classes"
                kh0, kw0 = (c.ph + p) % s, (c.pw + p) % s  # the kernel's tap map: kh = kh0 + s * (TH-1-t)
                seen[pixel] = (
                    {kh0 + s * (th - 1 - t) for t in range(c.th0, c.th0 + c.taps_h)},
                    {kw0 + s * (tw - 1 - t) for t in range(c.tw0, c.tw0 + c.taps_w)},
                )
    assert set(seen) == {(y, x) for y in range(oh) for x in range(ow)}
    for (y, x), (taps_h, taps_w) in seen.items():
        want_h, want_w = _valid_taps(oh, geom.H, k, s, p, y), _valid_taps(ow, geom.W, k, s, p, x)
        if want_h and want_w:
            assert (taps_h, taps_w) == (want_h, want_w), (y, x)
        else:
            assert not taps_h or not taps_w, (y, x)  # no input reaches it: a zero-tap class
    config = C.ConvConfig(64, 32, 64, 4, 2)  # C_in % BLOCK_K == 0: no K padding
    issued = sum(-(-m // 64) * 64 * kk for m, kk in zip(geom.class_m(), geom.class_k()))
    assert C.issued_mma_efficiency(geom, config) == pytest.approx(geom.useful_flops() / (2 * issued * 32))


def test_strided_conv_dgrads_reach_full_efficiency():
    """The dgrads of G's and D's k3 s2 and k5 s2 convs (0.5625 and 0.694 with padded classes): at least the
    nominal FLOPs (above 1: the border classes skip the taps that read padding)."""
    for geom in (
        C.ConvGeometry(False, 64, 64, 16, 16, 128, 3, 3, 2, 1),
        C.ConvGeometry(False, 64, 32, 32, 32, 64, 5, 5, 2, 2),
        C.ConvGeometry(False, 64, 256, 16, 16, 256, 3, 3, 2, 1),
    ):
        dg = B.dgrad_geometry(geom)
        best = max(C.issued_mma_efficiency(dg, c) for c in C.GPU_CONFIGS)
        assert best >= 1.0


@pytest.mark.parametrize("side, first_stride", [(64, 2), (227, 4)])
def test_unpadded_discriminator_dgrads_meet_the_efficiency_bar(side, first_stride):
    """The full correlation of a valid conv's dgrad: 0.64-0.85 with one GEMM per parity class (its border
    rows read zeros), >= 0.85 for every eligible config once border rows are classes of their own."""
    for layer in static.network_layers(64):
        if layer.network != f"D {side}px unpadded" or not layer.input_needs_grad:
            continue
        dg = B.dgrad_geometry(layer.geom)
        if B.uses_fold(layer.geom):  # few input channels: GEMM + fold, not this decomposition
            continue
        configs = C.eligible_configs(dg, 2, B.dgrad_config_list(torch.bfloat16, "ieee"))
        assert min(C.issued_mma_efficiency(dg, c) for c in configs) >= C.MIN_EFFICIENCY, layer.name


def test_persistent_grid_is_bounded_by_resident_ctas():
    geom = C.ConvGeometry(False, 64, 64, 32, 32, 128, 3, 3, 1, 1)
    config = C.GPU_CONFIGS[0]
    tiles = G.num_tiles(geom, config)
    assert tiles == 64 * 32 * 32 // 128 * 1
    assert G.grid_size(geom, config, 132, 1) == (132,)
    assert G.grid_size(geom, config, 132, 2) == (264,)
    assert G.grid_size(geom, config, 10_000, 2) == (tiles,)
    for c in C.GPU_CONFIGS:  # the estimate counts with the register cap: never above the compiled count
        cap = C.register_cap(c.num_warps)  # the bar (240), or 128 at 16 warps
        assert cap == (128 if c.num_warps == 16 else C.MAX_REGISTERS)
        for a_tiles in (1, 2):
            est = C.estimated_ctas_per_sm(c, 2, a_tiles)
            smem = c.num_stages * (a_tiles * c.block_m + c.block_n) * c.block_k * 2
            assert 1 <= est <= max(1, C.ctas_per_sm(cap, c.num_warps, smem))
            assert est <= C.ctas_per_sm(cap, c.num_warps, 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "up"])
def test_results_do_not_depend_on_the_number_of_programs(device, transposed, monkeypatch):
    """Forward and dgrad with 1, 3 and 7 programs (several tiles each, classes folded into the tile index):
    the same bits, and the reference's values."""
    g = torch.Generator().manual_seed(0)
    if transposed:
        x, w = torch.randn(2, 16, 5, 6, generator=g), torch.randn(16, 8, 4, 4, generator=g) / 4
        fn, ref = K.conv_transpose_lrelu, K.reference_conv_transpose_lrelu
    else:
        x, w = torch.randn(2, 16, 11, 9, generator=g), torch.randn(24, 16, 3, 3, generator=g) / 4
        fn, ref = K.conv_lrelu, K.reference_conv_lrelu
    x, w = x.to(device).requires_grad_(), w.to(device)
    results = []
    for programs in (1, 3, 7):
        monkeypatch.setattr(G, "INTERPRETER_PROGRAMS", programs)
        with K.use_backend("triton"):
            y = fn(x, w, None, 2, 1, 0.2)
            (gx,) = torch.autograd.grad(y, x, torch.ones_like(y) - 0.5 * (y > 0))
        results.append((y.detach(), gx))
    for y, gx in results[1:]:
        assert torch.equal(y, results[0][0]) and torch.equal(gx, results[0][1])
    xr = x.detach().float().requires_grad_()
    yr = ref(xr, w.float(), None, 2, 1, 0.2)
    (want,) = torch.autograd.grad(yr, xr, torch.ones_like(yr) - 0.5 * (yr > 0))
    torch.testing.assert_close(results[0][0].float(), yr.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results[0][1].float(), want, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def rows():
    return static.static_report(batch=64, dtype="bf16", kernels=("forward", "dgrad"))


@pytest.mark.slow
def test_forward_and_dgrad_are_persistent_or_two_waves(rows):
    """Every config of the forward and the dgrad on every layer: persistent (its PTX reads the grid size
    and the grid is at most the resident CTAs) or >= 2 waves; the first launch (before the kernel's own
    register count is known) asks for no more programs than the compiled kernel keeps resident."""
    misses = []
    for r in rows:
        for c in r["configs"]:
            what = f"{r['network']} {r['layer']} {r['kernel']} {c['config']}"
            resident = static.SM_COUNT * c["ctas_per_sm"]
            if not (c["waves"] >= 2 or (c["persistent"] and c["programs"] <= resident)):
                misses.append(what)
            if c["persistent"]:
                assert c["first_launch_programs"] <= resident, f"{what}: first launch oversubscribes"
                assert c["tiles_per_program"] == -(-c["tiles"] // c["programs"]), what
    assert misses == []
    assert any(c["tiles_per_program"] > 1 for r in rows for c in r["configs"])
