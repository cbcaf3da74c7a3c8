"""conv_transpose_lrelu: transposed convolution (the up-conv block) + bias + LReLU, forward and backward
in Triton implicit GEMMs.

Design notes: docs/kernels.md.
"""

from __future__ import annotations

from ._conv_common import LReluConvOp

__all__ = [
    "conv_transpose_lrelu",
    "reference_conv_transpose_lrelu",
    "conv_transpose_lrelu_forward",
    "conv_transpose_lrelu_backward",
    "ConvTransposeLReluFunction",
]


_OP = LReluConvOp(True, "ConvTransposeLReluFunction", __name__)
# The reference, leaky_relu(conv_transpose2d(x, weight, bias, stride, padding), alpha): CPU path, oracle.
reference_conv_transpose_lrelu = _OP.reference
# The launchers: x (N, C_in, H, W), weight (C_in, C_out, KH, KW) -> (N, C_out, (H-1)*S - 2*P + KH, ...).
conv_transpose_lrelu_forward, conv_transpose_lrelu_backward = _OP.forward, _OP.backward
ConvTransposeLReluFunction = _OP.function  # deepsim::conv_transpose_lrelu shares its autograd


def conv_transpose_lrelu(x, weight, bias=None, stride=1, padding=0, alpha=0.3):
    """Fused ``leaky_relu(conv_transpose2d(x, weight, bias, stride, padding), alpha)`` (the up-conv block).

    Args:
        x: (N, C_in, H, W), NCHW or channels_last; fp32, fp16 or bf16 (fp32 accumulation); fp64 runs the
            reference under auto and is rejected by the forced triton / cudnn paths.
        weight: (C_in, C_out, KH, KW), the nn.ConvTranspose2d layout; cast to x's dtype if it differs.
            Under torch.autocast, x is first cast to the autocast dtype (as F.conv_transpose2d's are).
        bias: (C_out,) or None.
        stride, padding: ints (or square pairs); no string padding, output_padding, dilation or groups.
        alpha: LReLU negative slope, >= 0.
    Returns:
        (N, C_out, (H-1)*stride - 2*padding + KH, ...) in x's dtype and memory format.

    Paths as for ``conv_lrelu``. Double backward: reference only.
    """
    return _OP(x, weight, bias, stride, padding, alpha)
