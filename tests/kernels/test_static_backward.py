"""The static report's backward rows and occupancy columns (bench/static.py): the arithmetic on CPU, and on
every network layer (slow: compiles each kernel for sm_90) the bars the forward and backward kernels must
meet: 0 spills, async loads, <= 240 registers; wgmma everywhere, a >= 2-wave
(or persistent) schedule everywhere, issued-MMA efficiency >= 0.85 everywhere.
"""

import importlib

import pytest

from bench import static

from ._common import K

C = importlib.import_module(f"{K.__name__}._conv_configs")
B = importlib.import_module(f"{K.__name__}._conv_backward")

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_CTAID.X ;
        /*0020*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64] ;
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0040*/                   IADD3 R5, R5, 0x40, RZ ;
        /*0050*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], R24 ;
        /*0060*/               @P0 BRA 0x20 ;
        /*0070*/                   STG.E.128 desc[UR4][R6.64], R24 ;
        /*0080*/                   EXIT ;
"""


def test_sass_per_wgmma_reads_the_main_loop():
    assert static.sass_per_wgmma(SASS) == 5 / 2  # the loop 0x20..0x60: 5 instructions, 2 HGMMA
    assert static.sass_per_wgmma(SASS.replace("HGMMA", "HMMA")) is None


def test_ctas_per_sm_from_registers_and_shared_memory():
    assert static.ctas_per_sm(128, 4, 64 * 1024) == 3  # shared memory: 228 KB / 65 KB
    assert static.ctas_per_sm(255, 8, 16 * 1024) == 1  # registers: 256 x 256 threads = all 64 K
    assert static.ctas_per_sm(240, 4, 16 * 1024) == 2
    assert static.ctas_per_sm(32, 1, 0) == 32  # the CTA limit


def test_wgrad_splits_fill_two_waves_and_candidates_meet_the_bar():
    geom = C.ConvGeometry(False, 64, 64, 16, 16, 128, 5, 5, 2, 2)  # K = 64*8*8 = 4096 reduction rows
    for config in B.WGRAD_CONFIGS:
        splits, per_split = B.wgrad_splits(geom, config)
        tiles = -(-128 // config.block_m) * -(-1600 // config.block_n)
        steps = -(-4096 // config.block_k)
        assert splits * per_split >= steps > (splits - 1) * per_split  # every K step once
        assert tiles * splits >= 2 * C.SM_COUNT or splits == min(64, steps)
    import torch

    for config in B.wgrad_candidates(geom, torch.bfloat16, "ieee"):
        assert B.wgrad_efficiency(geom, config) >= C.MIN_EFFICIENCY
    assert len(C.GPU_CONFIGS) and all(
        c.block_m * c.block_n <= 64 * 32 * c.num_warps for c in C.GPU_CONFIGS
    ), "more than 64 fp32 accumulators per thread take the forward kernel over 240 registers"


@pytest.fixture(scope="module")
def rows():
    return static.static_report(batch=64, dtype="bf16")


@pytest.mark.slow
def test_every_kernel_on_every_layer_meets_the_hard_bars(rows):
    """Forward, dgrad and wgrad on every layer: 0 spills, asynchronous loads (cp.async or TMA), <= 240
    registers, shared memory within a block's limit."""
    assert {r["kernel"] for r in rows} == set(static.KERNELS)
    for row in rows:
        for c in row["configs"]:
            what = f"{row['network']} {row['layer']} {row['kernel']} {c['config']}"
            assert c["spill_bytes"] == 0, what
            assert c["cp_async"] + c["tma"] > 0, f"{what}: no asynchronous load"
            assert c["registers"] <= 240, f"{what}: {c['registers']} registers"
            assert c["shared_bytes"] <= 227 * 1024, what
            assert c["ctas_per_sm"] >= 1 and c["l2_bytes_per_flop"] > 0, what


def _misses(rows, test):
    return [
        f"{r['network']} {r['layer']} {r['kernel']} {c['config']}"
        for r in rows
        for c in r["configs"]
        if not test(c)
    ]


@pytest.mark.slow
def test_efficiency_at_least_085_on_every_kernel(rows):
    assert _misses(rows, lambda c: c["efficiency"] >= 0.85) == []


@pytest.mark.slow
def test_large_tiles_cut_the_forward_l2_bytes_and_meet_the_bars(rows):
    """The forward's static pick on the layers with many tiles of >= 128 channels (C_in a multiple of 64) is
    a 256 x 128 or 128 x 256 tile: L2 bytes per MMA FLOP under the 128 x 128 tile's 1/64 (bf16), compiled
    with 0 spills, <= 240 registers and no more SASS per wgmma than the 128 x 128 tiles' loops (<= 58)."""
    forward = {(r["network"], r["layer"]): r for r in rows if r["kernel"] == "forward"}
    layers = [("G fc6 227px", f"decoder.layers.{i}") for i in (2, 3, 4, 5)]
    layers += [("D 227px", f"conv{i}") for i in (3, 4, 5)] + [("D 64px", "conv4")]
    for key in layers:
        pick = forward[key]["configs"][0]
        assert pick["config"].startswith(("256x128x", "128x256x")), (key, pick["config"])
        assert pick["l2_bytes_per_flop"] < 1 / 64, key
        assert pick["spill_bytes"] == 0 and pick["registers"] <= C.MAX_REGISTERS, key
        assert pick["wgmma"] > 0 and pick["cp_async"] > 0 and pick["efficiency"] >= C.MIN_EFFICIENCY, key
        assert pick["sass_per_wgmma"] <= 58, key
    # every candidate there: at most the 128 x 128 tile's (a 128 x 64 one, 3/128, was among them before)
    assert max(r["max_l2_bytes_per_flop"] for k, r in forward.items() if k in layers) <= 1 / 64


@pytest.mark.slow
def test_two_waves_or_persistent_on_every_kernel(rows):
    assert _misses(rows, lambda c: c["waves"] >= 2 or c["persistent"]) == []


@pytest.mark.slow
def test_wgmma_in_every_kernel(rows):
    """Every Triton config of every kernel lowers to wgmma (wgrad tiles with fewer than 64 rows run swapped;
    a part no config serves at the bars runs on cuDNN and has no configs here)."""
    assert _misses(rows, lambda c: c["wgmma"] > 0) == []


_PADDED_FIRST_LAYER = """
import json, torch
from bench.static import compile_conv_kernel
from deepsim.kernels._conv_configs import ConvGeometry, config_list, eligible_configs
from deepsim.kernels._conv_igemm import kernel_constexprs
from deepsim.kernels._conv_packing import conv_weight_row_stride
out = {}
for c_in in (3, 4):
    g = ConvGeometry(False, 64, c_in, 64, 64, 32, 5, 5, 2, 2)  # G's first conv, input padded to 4 channels
    cfg = eligible_configs(g, 2, config_list(torch.bfloat16, "ieee"))[0]
    ce = kernel_constexprs(g, cfg, has_bias=True, precision="ieee", w_k_stride=conv_weight_row_stride(g.k, 2))
    out[c_in] = compile_conv_kernel(tuple(sorted(ce.items())), "bf16", True, cfg.num_warps, cfg.num_stages)
print(json.dumps(out))
"""


def test_a_first_layer_padded_to_4_channels_loads_x_asynchronously():
    """With x padded to 4 channels (8-byte bf16 pixels), the first conv's gathers of x become cp.async
    copies (the synchronous loads left are the bias) and the main loop gets shorter per wgmma than with
    3 channels, whose 6-byte pixels no async copy moves."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", _PADDED_FIRST_LAYER],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=static._repo_root(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    three, four = facts["3"], facts["4"]
    assert three["ld_global"] > four["ld_global"] and four["cp_async"] > three["cp_async"]
    assert four["ld_global"] <= 4  # the bias only
    assert four["sass_per_wgmma"] < 0.5 * three["sass_per_wgmma"]
    assert four["spill_bytes"] == 0 and four["wgmma"] > 0
