"""pytest configuration for the micro-benchmarks in bench/ (``pytest bench --benchmark-only``).

Unlike tests/conftest.py this does not turn on the Triton interpreter: timing interpreted kernels means
nothing, so on a machine without CUDA the benchmarks time the PyTorch paths only.
"""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # `import bench` from any working directory
    sys.path.insert(0, _ROOT)
