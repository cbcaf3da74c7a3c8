"""Low-level DeePSiM ops: fused Triton kernels with plain PyTorch references beside them.

Design notes: docs/kernels.md.
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
