"""Every Triton kernel compiles for a Hopper GPU (sm_90, PTX + cubin), checked on a machine without one.

The interpreter runs the kernels' arithmetic but not their lowering: tl.dot layout rules, shared memory per
autotune config and IR type errors only show up when compiling for a GPU. triton.compile with a GPUTarget
needs no device, so this runs everywhere; tests/kernels/gpu_compile.py does the work in a subprocess
(the interpreter, on for this test session, replaces triton.jit).
"""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("gpu_compile.py")


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["DEEPSIM_AUTOTUNE"] = "1"  # the full autotune lists, as a GPU run uses them
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "0 failed"
    compiled = [line for line in lines if line.startswith("ok")]
    assert any("_conv_lrelu_fwd_kernel bf16" in line for line in compiled)
    assert any("_feature_distance_fwd_kernel bf16 layers=8" in line for line in compiled)
    assert len(compiled) >= 20
