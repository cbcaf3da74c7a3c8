"""Every Triton kernel compiles for a Hopper GPU (sm_90, PTX + cubin), checked on a machine without one,
and the conv forward kernel's static report holds on every network layer.

The interpreter runs the kernels' arithmetic but not their lowering: tl.dot layout rules, shared memory per
tile config, register spills and IR type errors only show up when compiling for a GPU. triton.compile with
a GPUTarget needs no device, so this runs everywhere, in subprocesses (the interpreter, on for this test
session, replaces triton.jit): tests/kernels/gpu_compile.py for every kernel, and ``python -m bench.static``
for the conv forward kernel in bf16 on each layer shape of the networks with each config the tuner may pick.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.static import format_table, static_report

SCRIPT = Path(__file__).with_name("gpu_compile.py")


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["DEEPSIM_AUTOTUNE"] = "1"  # the full config lists, as a GPU run uses them
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "0 failed"
    compiled = [line for line in lines if line.startswith("ok")]
    assert any("_conv_igemm_lrelu_kernel fp32 tf32 up" in line for line in compiled)
    assert any("_conv_igemm_lrelu_kernel fp16" in line for line in compiled)
    assert any("_feature_distance_fwd_kernel bf16 layers=8" in line for line in compiled)
    assert any("_lpips_bwd_kernel bf16 taps=5" in line for line in compiled)
    assert len(compiled) >= 20


@pytest.mark.slow
def test_static_report_on_every_network_layer():
    """bf16, channels_last, batch 64, every conv / up-conv layer of G (autoencoder, fc6), D (64 and 227 px,
    padded and unpadded): no spills, wgmma and asynchronous loads in every kernel the tuner may run, and
    issued-MMA efficiency >= 0.85 for each of those configs."""
    rows = static_report(
        batch=64, dtype="bf16", kernels=("forward",)
    )  # the backward: test_static_backward.py
    assert len(rows) >= 30
    for row in rows:
        where = f"{row['network']} {row['layer']} ({row['shape']})"
        assert row["configs"], where
        for config in row["configs"]:
            what = f"{where} {config['config']}"
            assert config["spill_bytes"] == 0, what
            assert config["wgmma"] > 0, f"{what}: no wgmma"
            assert config["cp_async"] + config["tma"] > 0, f"{what}: no asynchronous load"
            assert config["efficiency"] >= 0.85, f"{what}: efficiency {config['efficiency']:.3f}"
            assert config["shared_bytes"] <= 227 * 1024, what
    shapes = {row["shape"] for row in rows}
    assert any(s.startswith("up ") for s in shapes), "the up-convs"
    assert any(s.startswith("conv 3->") for s in shapes), "the 3-channel first layers"
    assert "conv 32->64 k5s1p0 56x56->52x52" in shapes, "the unpadded 227 px discriminator"
    table = format_table(rows)
    assert len(table.splitlines()) == len(rows) + 2 and " NO " not in table
