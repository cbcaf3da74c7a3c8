"""conv_lrelu: convolution + bias + LReLU, forward and backward in Triton implicit GEMMs.

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
    "conv_lrelu",
    "reference_conv_lrelu",
    "conv_lrelu_forward",
    "conv_lrelu_backward",
    "ConvLReluFunction",
]


def conv_lrelu_forward(x, weight, bias, stride: int, padding: int, alpha: float) -> torch.Tensor:
    """Launch the fused kernel. x (N, C_in, H, W), weight (C_out, C_in, KH, KW) -> (N, C_out, OH, OW),
    in x's memory format and dtype (weight and bias must have x's dtype).

    Fastest with channels_last x and weight (no copies; see ``_conv_packing``). On CUDA the first call of
    a shape (batch bucketed) times the eligible tile configs (``_conv_configs``): make it before any
    CUDA-graph capture.
    """
    return conv_forward(x, weight, bias, stride, padding, alpha, transposed=False)


def conv_lrelu_backward(
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
    """(grad_x, grad_weight, grad_bias); an unneeded one (output_mask False) comes back as an empty tensor.
    ``dgrad`` / ``wgrad``: "triton" or "cudnn" (see ``_conv_common.conv_lrelu_grads``)."""
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
        transposed=False,
        dgrad=dgrad,
        wgrad=wgrad,
    )


class ConvLReluFunction(torch.autograd.Function):
    """Autograd for the fused op; the custom op ``deepsim::conv_lrelu`` reuses setup_context and backward.

    Inputs (x, W, b, stride, padding, alpha, dgrad, wgrad). Saved: x, W and out. No pre-activation.
    """

    @staticmethod
    def forward(x, weight, bias, stride, padding, alpha, dgrad="triton", wgrad="triton"):
        return forward_impl(
            x, weight, bias, stride, padding, alpha, transposed=False, reference=reference_conv_lrelu
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        save_for_lrelu_backward(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_out):
        return lrelu_conv_backward(ctx, grad_out, _backward_op)


def reference_conv_lrelu(x, weight, bias=None, stride=1, padding=0, alpha=0.3):
    """Plain PyTorch: leaky_relu(conv2d(x, weight, bias), alpha). The CPU path and the test oracle."""
    return F.leaky_relu(F.conv2d(x, weight, bias, stride=stride, padding=padding), alpha)


_backward_op = register_backward_op(False)
_forward_op = register_forward_op(False, reference_conv_lrelu, ConvLReluFunction)
_run_path = functools.partial(
    run_path, transposed=False, reference=reference_conv_lrelu, fused_op=_forward_op
)


_run_path.backward_op = _backward_op  # the dispatcher times and checks dgrad / wgrad through it


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
    return public_call(x, weight, bias, stride, padding, alpha, transposed=False, run=_run_path)
