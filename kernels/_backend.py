"""Backend switch and optional-triton import shared by the op files.

``DEEPSIM_KERNELS`` = ``auto`` | ``triton`` | ``cudnn`` | ``reference`` is read at call time (not import
time), so tests and benchmarks can flip it; ``use_backend`` overrides it inside a ``with`` block. ``cudnn``
forces the conv blocks onto aten/cuDNN conv + the Triton bias+LReLU epilogue; ``auto`` lets the dispatcher
(kernels/dispatch.py) time that against the fused Triton op per layer shape on CUDA.
"""

import contextlib
import os
import warnings

import torch

try:  # kernels/ must import where triton does not (CPU-only wheels, macOS): fall back to the reference.
    import triton
    import triton.language as tl

    HAS_TRITON = True
    TRITON_IMPORT_ERROR = None
except Exception as exc:  # noqa: BLE001 - any import failure means "no triton"
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = repr(exc)

    class _TritonStub:
        """Just enough of ``triton`` for the ``@triton.jit`` / ``@triton.autotune`` decorators to run."""

        @staticmethod
        def jit(fn=None, **kwargs):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def autotune(*args, **kwargs):
            return lambda f: f

        @staticmethod
        def Config(*args, **kwargs):
            return None

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

    class _TlStub:
        @staticmethod
        def constexpr(value=None):
            """Stands in for the annotation ``x: tl.constexpr`` and for a constant ``tl.constexpr(v)``."""
            return value

        float32 = float16 = bfloat16 = None

    triton = _TritonStub()
    tl = _TlStub()

BACKENDS = ("auto", "triton", "cudnn", "reference")
ENV_VAR = "DEEPSIM_KERNELS"
# TRITON_INTERPRET is read by triton at import time; we mirror it to pick small autotune configs.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# DEEPSIM_AUTOTUNE=0 (read at import): the conv kernels use one config instead of autotuning their list. Each
# config is a separate Triton compile per shape, which adds up to minutes over the GPU test suite's shapes.
AUTOTUNE = os.environ.get("DEEPSIM_AUTOTUNE", "1") != "0"

_override: list[str] = []  # innermost use_backend() last
_warned_no_triton = False


def requested_backend() -> str:
    """The backend asked for: the innermost ``use_backend`` block, else ``$DEEPSIM_KERNELS``, else auto."""
    choice = _override[-1] if _override else os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={choice!r}: expected one of {', '.join(BACKENDS)}")
    return choice


def backend(tensor: torch.Tensor | None = None) -> str:
    """The implementation family that runs for ``tensor``: ``"triton"``, ``"cudnn"`` or ``"reference"``.

    auto: Triton on CUDA tensors (the conv blocks then ask the dispatcher, kernels/dispatch.py, which of
    their Triton and cuDNN paths is faster), the PyTorch reference elsewhere. triton: Triton always (a CPU
    tensor needs ``TRITON_INTERPRET=1`` set before triton was imported). cudnn: the conv blocks run aten
    (cuDNN) conv + the Triton bias+LReLU epilogue (the epilogue falls back to PyTorch where Triton cannot
    run); the other ops run as under auto. reference: the PyTorch reference.
    Where triton failed to import, "triton" falls back to the reference with a warning.
    """
    global _warned_no_triton
    choice = requested_backend()
    if choice in ("reference", "cudnn"):
        return choice
    if not HAS_TRITON:
        if choice == "triton" and not _warned_no_triton:
            _warned_no_triton = True
            warnings.warn(
                f"{ENV_VAR}=triton but triton failed to import ({TRITON_IMPORT_ERROR}); "
                "using the PyTorch reference",
                RuntimeWarning,
                stacklevel=2,
            )
        return "reference"
    is_cuda = tensor is not None and tensor.is_cuda
    if choice == "auto":
        return "triton" if is_cuda else "reference"
    if not is_cuda and not INTERPRET:
        raise RuntimeError(
            f"{ENV_VAR}=triton on a {'CPU' if tensor is not None else 'missing'} tensor needs "
            "TRITON_INTERPRET=1 in the environment before triton is imported (or use a CUDA tensor)"
        )
    return "triton"


@contextlib.contextmanager
def use_backend(name: str):
    """Force ``name`` ("auto", "triton", "cudnn" or "reference") inside the block, whatever
    ``$DEEPSIM_KERNELS`` says."""
    if name not in BACKENDS:
        raise ValueError(f"use_backend({name!r}): expected one of {', '.join(BACKENDS)}")
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()


def can_launch(t: torch.Tensor) -> bool:
    """Inside the custom ops: Triton where it can run (CUDA, or CPU under TRITON_INTERPRET=1)."""
    return HAS_TRITON and (t.is_cuda or INTERPRET)


def register_op(name: str, fn, *, fake, setup_context=None, backward=None, schema=None):
    """Register ``deepsim::<name>`` once (re-importing the package under another name must not fail)."""
    if hasattr(torch.ops.deepsim, name):
        return getattr(torch.ops.deepsim, name).default
    op = torch.library.custom_op(f"deepsim::{name}", fn, mutates_args=(), schema=schema)
    op.register_fake(fake)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    return op


def register_autograd_ops(
    name: str, forward, forward_fake, backward, backward_fake, function, schemas=(None, None)
):
    """``deepsim::<name>_backward`` (no autograd of its own), then ``deepsim::<name>`` with ``function``'s
    setup_context and backward; ``schemas``: theirs, (forward, backward), where not inferred from the type
    hints. Returns (forward op, backward op)."""
    backward_op = register_op(f"{name}_backward", backward, fake=backward_fake, schema=schemas[1])
    forward_op = register_op(
        name,
        forward,
        fake=forward_fake,
        setup_context=function.setup_context,
        backward=function.backward,
        schema=schemas[0],
    )
    return forward_op, backward_op
