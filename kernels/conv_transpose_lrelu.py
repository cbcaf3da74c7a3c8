"""conv_transpose_lrelu: transposed convolution (the up-conv block) + bias + LReLU, forward and backward
in Triton implicit GEMMs.

Design notes: docs/kernels.md.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._conv_common import (
    conv_forward,
    conv_lrelu_grads,
    forward_impl,
    lrelu_conv_backward,
    public_call,
    register_backward_op,
    register_forward_op,
    run_path,
    save_for_lrelu_backward,
)

__all__ = [
    "conv_transpose_lrelu",
    "reference_conv_transpose_lrelu",
    "conv_transpose_lrelu_forward",
    "conv_transpose_lrelu_backward",
    "ConvTransposeLReluFunction",
]


def conv_transpose_lrelu_forward(x, weight, bias, stride: int, padding: int, alpha: float) -> torch.Tensor:
    """Launch the fused kernel. x (N, C_in, H, W), weight (C_in, C_out, KH, KW) -> (N, C_out, OH, OW)
    (sizes: ``_conv_shape.conv_out_size``), in x's memory format and dtype. Tuning as for
    ``conv_lrelu_forward``."""
    return conv_forward(x, weight, bias, stride, padding, alpha, transposed=True)


def conv_transpose_lrelu_backward(
    grad_out,
    out,
    x,
    weight,
    has_bias: bool,
    stride: int,
    padding: int,
    alpha: float,
    output_mask: list[bool],
    dgrad: str = "triton",
    wgrad: str = "triton",
):
    """(grad_x, grad_weight, grad_bias); an unneeded one (output_mask False) comes back as an empty tensor."""
    return conv_lrelu_grads(
        grad_out,
        out,
        x,
        weight,
        has_bias,
        stride,
        padding,
        alpha,
        output_mask,
        transposed=True,
        dgrad=dgrad,
        wgrad=wgrad,
    )


class ConvTransposeLReluFunction(torch.autograd.Function):
    """Autograd for the fused up-conv; ``deepsim::conv_transpose_lrelu`` reuses setup_context and backward.

    Inputs (x, W, b, stride, padding, alpha, dgrad, wgrad). Saved: x, W and out. No pre-activation.
    """

    @staticmethod
    def forward(x, weight, bias, stride, padding, alpha, dgrad="triton", wgrad="triton"):
        return forward_impl(
            x, weight, bias, stride, padding, alpha, transposed=True, reference=reference_conv_transpose_lrelu
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        save_for_lrelu_backward(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_out):
        return lrelu_conv_backward(ctx, grad_out, _backward_op)


def reference_conv_transpose_lrelu(x, weight, bias=None, stride=1, padding=0, alpha=0.3):
    """Plain PyTorch: leaky_relu(conv_transpose2d(x, weight, bias), alpha). The CPU path and the oracle."""
    return F.leaky_relu(F.conv_transpose2d(x, weight, bias, stride=stride, padding=padding), alpha)


_backward_op = register_backward_op(True)
_forward_op = register_forward_op(True, reference_conv_transpose_lrelu, ConvTransposeLReluFunction)
_run_path = functools.partial(
    run_path, transposed=True, reference=reference_conv_transpose_lrelu, fused_op=_forward_op
)


_run_path.backward_op = _backward_op  # the dispatcher times and checks dgrad / wgrad through it


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
    return public_call(x, weight, bias, stride, padding, alpha, transposed=True, run=_run_path)
