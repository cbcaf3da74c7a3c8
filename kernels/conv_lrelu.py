"""conv_lrelu: convolution + bias + LReLU, forward and backward in Triton implicit GEMMs.

Design notes: docs/kernels.md.
"""

from __future__ import annotations

from ._conv_common import LReluConvOp

__all__ = [
    "conv_lrelu",
    "reference_conv_lrelu",
    "conv_lrelu_forward",
    "conv_lrelu_backward",
    "ConvLReluFunction",
]


_OP = LReluConvOp(False, "ConvLReluFunction", __name__)
# The reference, leaky_relu(conv2d(x, weight, bias, stride, padding), alpha): the CPU path, the oracle.
reference_conv_lrelu = _OP.reference
# The launchers: x (N, C_in, H, W), weight (C_out, C_in, KH, KW) -> (N, C_out, OH, OW).
conv_lrelu_forward, conv_lrelu_backward = _OP.forward, _OP.backward
ConvLReluFunction = _OP.function  # deepsim::conv_lrelu shares its autograd


def conv_lrelu(x, weight, bias=None, stride=1, padding=0, alpha=0.3):
    """Fused ``leaky_relu(conv2d(x, weight, bias, stride, padding), alpha)``.

    Args:
        x: (N, C_in, H, W), NCHW or channels_last; fp32, fp16 or bf16 (fp32 accumulation); other dtypes
            (fp64) run the reference under auto and are rejected by the forced triton / cudnn paths.
        weight: (C_out, C_in, KH, KW); cast to x's dtype if it differs (mixed precision). Under
            torch.autocast, x is first cast to the autocast dtype (as F.conv2d's inputs are).
        bias: (C_out,) or None.
        stride: int (or square pair). padding: int, square pair, "valid" or "same" (stride 1, odd kernel).
        alpha: LReLU negative slope, >= 0.
    Returns:
        (N, C_out, OH, OW) in x's dtype and memory format.

    Paths (kernels/dispatch.py): "triton" runs forward and backward in Triton kernels; "cudnn" runs aten
    (cuDNN) conv2d without bias, then the Triton bias+LReLU epilogue. ``DEEPSIM_KERNELS`` (or
    ``use_backend``) = triton | cudnn | reference forces a path; under auto, CUDA calls take the one the
    dispatcher timed faster for this shape, CPU calls the reference. Double backward: reference only.
    """
    return _OP(x, weight, bias, stride, padding, alpha)
