"""Root pytest configuration, kept minimal.

Without a usable NVIDIA GPU, turn on the Triton interpreter for the whole session (TRITON_INTERPRET is
read when triton is first imported, so it is set here, at conftest import, before any test imports it);
the Triton kernels then run on CPU tensors. The GPU check does not import triton (or initialise CUDA).
"""

import os
import shutil
import sys
from pathlib import Path

import pytest


def cuda_present() -> bool:
    """An NVIDIA driver is visible (without importing triton or initialising CUDA)."""
    return shutil.which("nvidia-smi") is not None or os.path.exists("/dev/nvidia0")


if not cuda_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A plain checkout (no `pip install -e .`) can still import the top-level `kernels` package.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# triton <= 3.6's interpreter vs numpy >= 2.4: see tests/triton_compat.py (a no-op elsewhere).
_TRITON_COMPAT = None
if os.environ.get("TRITON_INTERPRET") == "1":
    try:
        from tests.triton_compat import fix_interpreter_scalar_index

        _TRITON_COMPAT = fix_interpreter_scalar_index()
    except ImportError:  # no triton: the kernels run their references (deepsim.kernels says so)
        pass


def pytest_report_header(config):
    return _TRITON_COMPAT


def _cuda_usable() -> bool:
    import torch

    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not cuda_present() or not _cuda_usable(), reason="needs a CUDA device")

# ---- other engineers: append fixtures below this line -------------------------------------------------


@pytest.fixture
def one_intra_op_thread():
    """One intra-op thread: on a shared 2-core runner, OpenMP threads spinning against other processes make
    a step ~50x slower; results do not depend on the thread count beyond reduction order (same in a test).
    Training-step modules take it for every test with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The kernel dispatcher (kernels/dispatch.py) keeps its decisions in memory during tests instead of writing
# the user's ~/.cache/deepsim/dispatch.json; tests of the cache file point DEEPSIM_DISPATCH_CACHE elsewhere.
os.environ.setdefault("DEEPSIM_DISPATCH_CACHE", "off")


@pytest.fixture
def ieee_fp32():
    """IEEE fp32 on both sides of a comparison: no TF32 in matmuls or convolutions (the Triton convs follow
    PyTorch's fp32 conv setting as cuDNN does). Through torch.backends.*.fp32_precision where torch has it
    (once that API is used, the legacy allow_tf32 flags raise), else the legacy flags; restored afterwards."""
    import torch

    conv, matmul = getattr(torch.backends.cudnn, "conv", None), torch.backends.cuda.matmul
    if hasattr(conv, "fp32_precision") and hasattr(matmul, "fp32_precision"):
        saved = conv.fp32_precision, matmul.fp32_precision
        conv.fp32_precision = matmul.fp32_precision = "ieee"
        yield
        conv.fp32_precision, matmul.fp32_precision = saved
        return
    saved = torch.backends.cudnn.allow_tf32, matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = saved


# Markers whose tests run only when ``-m`` names them: large fuzzing budgets, and the CUDA compile check
# (minutes per workload; .ci/run runs it as a step of its own).
OPT_IN_MARKERS = ("fuzz", "cuda_compile")


def pytest_collection_modifyitems(config, items):
    """Tests marked with an opt-in marker run only when ``-m`` names the marker."""
    expression = config.getoption("markexpr", "") or ""
    skipped = [m for m in OPT_IN_MARKERS if m not in expression]
    opted_out = [item for item in items if any(item.get_closest_marker(m) for m in skipped)]
    if opted_out:
        config.hook.pytest_deselected(items=opted_out)
        items[:] = [item for item in items if item not in opted_out]
