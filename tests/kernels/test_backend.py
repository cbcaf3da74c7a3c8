"""The DEEPSIM_KERNELS switch, use_backend, and import without triton."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ._common import INTERPRET, K

ROOT = Path(__file__).resolve().parents[2]


def test_env_var_read_at_call_time(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.setenv("DEEPSIM_KERNELS", "reference")
    assert K.backend(x) == "reference"
    monkeypatch.setenv("DEEPSIM_KERNELS", "auto")
    assert K.backend(x) == ("triton" if x.is_cuda else "reference")
    if INTERPRET:
        monkeypatch.setenv("DEEPSIM_KERNELS", "triton")
        assert K.backend(x) == "triton"
    monkeypatch.setenv("DEEPSIM_KERNELS", "fast")
    with pytest.raises(ValueError, match="DEEPSIM_KERNELS"):
        K.backend(x)


def test_use_backend_overrides_env(monkeypatch):
    monkeypatch.setenv("DEEPSIM_KERNELS", "triton")
    with K.use_backend("reference"):
        assert K.backend(torch.zeros(1)) == "reference"
        with K.use_backend("auto"):
            assert K.requested_backend() == "auto"
        assert K.requested_backend() == "reference"
    assert K.requested_backend() == "triton"
    with pytest.raises(ValueError, match="use_backend"):
        with K.use_backend("cuda"):
            pass


def test_reference_backend_is_plain_pytorch():
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    w = torch.randn(3, 2, 3, 3)
    with K.use_backend("reference"):
        y = K.conv_lrelu(x, w, None, 1, 1)
    assert "LeakyRelu" in type(y.grad_fn).__name__


def test_import_without_triton_falls_back():
    code = (
        "import sys, warnings; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, kernels as K\n"
        "assert not K.HAS_TRITON\n"
        "x = torch.randn(1, 2, 4, 4)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    with K.use_backend('triton'):\n"
        "        assert K.backend(x) == 'reference'\n"
        "        y = K.conv_lrelu(x, torch.randn(3, 2, 3, 3), None, 1, 1)\n"
        "assert any('triton failed to import' in str(m.message) for m in w), w\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DEEPSIM_KERNELS"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_cudnn_choice_is_accepted(monkeypatch):
    """DEEPSIM_KERNELS=cudnn (conv blocks on aten/cuDNN conv + the Triton epilogue) from the environment
    and from use_backend; backend() reports it for any device (the epilogue falls back to PyTorch)."""
    monkeypatch.setenv("DEEPSIM_KERNELS", "cudnn")
    assert K.requested_backend() == "cudnn" and K.backend(torch.zeros(1)) == "cudnn"
    monkeypatch.setenv("DEEPSIM_KERNELS", "auto")
    with K.use_backend("cudnn"):
        assert K.backend(torch.zeros(1)) == "cudnn"
    assert "cudnn" in K.BACKENDS
