"""Shared pieces of the kernel regression suite: the package under test, devices and tolerances."""

import os

import pytest
import torch

try:  # installed (pip install -e .): the package as users see it
    import deepsim.kernels as K
except ImportError:  # plain checkout: the same package under its folder name
    import kernels as K

__all__ = ["CUDA", "DEVICES", "DTYPES", "INTERPRET", "K", "assert_close", "skip_unsupported"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CUDA = torch.cuda.is_available()

# cpu runs the Triton kernels in the interpreter (TRITON_INTERPRET=1, set by tests/conftest.py).
DEVICES = [
    pytest.param(
        "cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU Triton needs TRITON_INTERPRET=1")
    ),
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
    ),
]

# (dtype, atol, rtol) against an fp32 reference run on the same (rounded) inputs. On CUDA, TF32 is turned
# off for the fp32 cases so both sides are IEEE fp32 (see the no_tf32 fixture).
DTYPES = [
    pytest.param(torch.float32, 1e-4, 1e-4, id="fp32"),
    pytest.param(torch.float16, 2e-2, 2e-2, id="fp16"),
    pytest.param(
        torch.bfloat16, 1e-1, 5e-2, id="bf16", marks=pytest.mark.skipif(not CUDA, reason="bf16: GPU only")
    ),
]


def skip_unsupported(device, dtype):
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 arithmetic")


def assert_close(actual, expected, atol, rtol, what):
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )
