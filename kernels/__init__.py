"""Low-level DeePSiM ops: fused Triton kernels with plain PyTorch references beside them.

Installed as ``deepsim.kernels``. This package imports torch and triton only, never ``deepsim``.

Backend switch, read at call time: the environment variable ``DEEPSIM_KERNELS`` =
``auto`` (default: Triton on CUDA tensors, where the conv blocks take whichever of the fused Triton op and
cuDNN conv + the Triton bias+LReLU epilogue the dispatcher, ``kernels.dispatch``, timed faster for the layer
shape; the PyTorch reference elsewhere), ``triton`` (always Triton; on CPU tensors this needs
``TRITON_INTERPRET=1`` set before triton is imported), ``cudnn`` (conv blocks on aten/cuDNN conv + the Triton
epilogue) or ``reference`` (always the PyTorch reference). ``use_backend("reference")`` overrides it inside a
``with`` block, and ``backend(tensor)`` says which implementation family a call on ``tensor`` would run.
``dispatch.prepare(model, example_input)`` decides every conv block of a model before torch.compile or
CUDA-graph capture, and ``dispatch.decisions()`` lists what was decided. Where triton fails to import
everything runs the reference (with a warning if "triton" was asked for; see ``TRITON_IMPORT_ERROR``).

Every Triton op is also a ``torch.library`` custom op (``torch.ops.deepsim.*``) with a fake
implementation and registered autograd, so ``torch.compile`` traces it without a graph break.
"""

from . import dispatch
from ._backend import BACKENDS, HAS_TRITON, TRITON_IMPORT_ERROR, backend, requested_backend, use_backend
from ._conv_igemm import fp32_uses_tf32
from .bias_lrelu import BiasLReluFunction, bias_lrelu, reference_bias_lrelu
from .conv_lrelu import ConvLReluFunction, conv_lrelu, reference_conv_lrelu
from .conv_transpose_lrelu import (
    ConvTransposeLReluFunction,
    conv_transpose_lrelu,
    reference_conv_transpose_lrelu,
)
from .feature_distance import FeatureDistanceFunction, feature_distance, reference_feature_distance
from .lpips_distance import LpipsDistanceFunction, lpips_distance, reference_lpips_distance
from .pairwise_distance import mean_pairwise_distance, reference_mean_pairwise_distance

__all__ = [
    "BACKENDS",
    "HAS_TRITON",
    "TRITON_IMPORT_ERROR",
    "backend",
    "requested_backend",
    "use_backend",
    "fp32_uses_tf32",
    "dispatch",
    "bias_lrelu",
    "reference_bias_lrelu",
    "BiasLReluFunction",
    "conv_lrelu",
    "reference_conv_lrelu",
    "ConvLReluFunction",
    "conv_transpose_lrelu",
    "reference_conv_transpose_lrelu",
    "ConvTransposeLReluFunction",
    "feature_distance",
    "reference_feature_distance",
    "FeatureDistanceFunction",
    "lpips_distance",
    "reference_lpips_distance",
    "LpipsDistanceFunction",
    "mean_pairwise_distance",
    "reference_mean_pairwise_distance",
]
