"""conv_lrelu: convolution + bias + LReLU in one Triton implicit-GEMM kernel.

Forward (one launch):  out = lrelu(conv2d(x, W) + b),  lrelu(p) = p if p > 0 else alpha * p.
The kernel, shared with conv_transpose_lrelu, is ``_conv_igemm._conv_igemm_lrelu_kernel``: channels_last,
one flat pipelined K = KH*KW*C_in loop (cp.async + wgmma on sm_90), bias and LReLU in the epilogue. Operand
layouts (weights read from the parameter's own channels_last storage, no cache): ``_conv_packing``. Tile
configs, issued-MMA efficiency and the per-shape tuner: ``_conv_configs``.
Backward keeps only ``out`` of its own (x and W are alive anyway: x is the previous layer's output, W a
parameter), since for alpha >= 0 the sign of ``out`` is the sign of the pre-activation:
    grad_pre = grad_out * (1 if out > 0 else alpha)   } one deterministic Triton pass
    grad_b = sum_{n,h,w} grad_pre                     } (kernels/bias_lrelu.py, ``lrelu_bias_grads``)
    grad_x, grad_W = aten.convolution_backward(grad_pre, x, W)  (cuDNN on CUDA; why: kernels/_conv_common.py)
The public ``conv_lrelu`` runs this fused op or, per layer shape, cuDNN conv + the Triton bias+LReLU
epilogue, whichever kernels/dispatch.py measured faster (same saved tensors, same backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import register_op
from ._conv_common import (
    as_int,
    check_conv_args,
    conv_lrelu_grads,
    conv_lrelu_grads_fake,
    empty_conv_output,
    lrelu_conv_backward,
    memory_format_of,
    save_for_lrelu_backward,
    use_triton_impl,
)
from ._conv_configs import ConvGeometry
from ._conv_igemm import conv_igemm_forward
from .bias_lrelu import bias_lrelu
from .dispatch import conv_path

__all__ = [
    "conv_lrelu",
    "reference_conv_lrelu",
    "conv_lrelu_forward",
    "conv_lrelu_backward",
    "ConvLReluFunction",
]

# ----------------------------------------------------------------------------------------------------------
# Launchers


def _out_size(H, W, KH, KW, stride, padding):
    return (H + 2 * padding - KH) // stride + 1, (W + 2 * padding - KW) // stride + 1


def conv_lrelu_forward(x, weight, bias, stride: int, padding: int, alpha: float) -> torch.Tensor:
    """Launch the fused kernel. x (N, C_in, H, W), weight (C_out, C_in, KH, KW) -> (N, C_out, OH, OW),
    in x's memory format and dtype (weight and bias must have x's dtype).

    Fastest with channels_last x and weight (no copies; see ``_conv_packing``). On CUDA the first call of
    a shape (batch bucketed) times the eligible tile configs (``_conv_configs``): make it before any
    CUDA-graph capture.
    """
    N, C_in, H, W = x.shape
    C_out, _, KH, KW = weight.shape
    OH, OW = _out_size(H, W, KH, KW, stride, padding)
    if OH <= 0 or OW <= 0:
        raise ValueError(f"conv_lrelu: input {H}x{W} is smaller than kernel {KH}x{KW} with padding {padding}")
    out = empty_conv_output(x, C_out, OH, OW)
    if out.numel() == 0:
        return out
    geom = ConvGeometry(False, N, C_in, H, W, C_out, KH, KW, stride, padding)
    return conv_igemm_forward(x, weight, bias, geom, alpha, out)


def conv_lrelu_backward(grad_out: torch.Tensor, out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                        has_bias: bool, stride: int, padding: int, alpha: float, output_mask: list[bool]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(grad_x, grad_weight, grad_bias); an unneeded one (output_mask False) comes back as an empty tensor."""
    return conv_lrelu_grads(
        grad_out, out, x, weight, has_bias, stride, padding, alpha, output_mask, transposed=False
    )


# ----------------------------------------------------------------------------------------------------------
# torch.library custom ops (so torch.compile traces them with no graph break) and autograd


def _fwd_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int,
              alpha: float) -> torch.Tensor:  # fmt: skip
    if use_triton_impl(x):
        return conv_lrelu_forward(x, weight, bias, stride, padding, alpha)
    return reference_conv_lrelu(x, weight, bias, stride, padding, alpha).contiguous(
        memory_format=memory_format_of(x)
    )


def _fwd_fake(x, weight, bias, stride, padding, alpha):
    C_out, _, KH, KW = weight.shape
    return empty_conv_output(x, C_out, *_out_size(x.shape[2], x.shape[3], KH, KW, stride, padding))


def _bwd_fake(grad_out, out, x, weight, has_bias, stride, padding, alpha, output_mask):
    return conv_lrelu_grads_fake(out, x, weight, has_bias, output_mask, transposed=False)


class ConvLReluFunction(torch.autograd.Function):
    """Autograd for the fused op; the custom op ``deepsim::conv_lrelu`` reuses setup_context and backward.

    Saved for backward: x (for grad_W), W (for grad_x) and out (for the LReLU slope). No pre-activation.
    """

    @staticmethod
    def forward(x, weight, bias, stride, padding, alpha):
        return _fwd_impl(x, weight, bias, stride, padding, alpha)

    @staticmethod
    def setup_context(ctx, inputs, output):
        save_for_lrelu_backward(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_out):
        return lrelu_conv_backward(ctx, grad_out, _conv_lrelu_backward_op)


_conv_lrelu_backward_op = register_op("conv_lrelu_backward", conv_lrelu_backward, fake=_bwd_fake)
_conv_lrelu_op = register_op(
    "conv_lrelu", _fwd_impl, fake=_fwd_fake,
    setup_context=ConvLReluFunction.setup_context, backward=ConvLReluFunction.backward,
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Public API


def reference_conv_lrelu(x, weight, bias=None, stride=1, padding=0, alpha=0.3):
    """Plain PyTorch: leaky_relu(conv2d(x, weight, bias), alpha). The CPU path and the test oracle."""
    return F.leaky_relu(F.conv2d(x, weight, bias, stride=stride, padding=padding), alpha)


def conv_lrelu(x, weight, bias=None, stride=1, padding=0, alpha=0.3):
    """Fused ``leaky_relu(conv2d(x, weight, bias, stride, padding), alpha)``.

    Args:
        x: (N, C_in, H, W), NCHW or channels_last; fp32, fp16 or bf16 (fp32 accumulation).
        weight: (C_out, C_in, KH, KW); cast to x's dtype if it differs (mixed precision). Under
            torch.autocast, x is first cast to the autocast dtype (as F.conv2d's inputs are).
        bias: (C_out,) or None.
        stride, padding: ints (or square pairs).
        alpha: LReLU negative slope, >= 0.
    Returns:
        (N, C_out, OH, OW) in x's dtype and memory format.

    Paths (kernels/dispatch.py): "triton" runs the forward in one Triton kernel; "cudnn" runs aten
    (cuDNN) conv2d without bias, then the Triton bias+LReLU epilogue. Both save only their output
    besides x and W, and share the backward: one Triton pass for grad_pre and the bias gradient, then
    aten.convolution_backward (cuDNN on CUDA) for the input and weight gradients. ``DEEPSIM_KERNELS``
    (or ``use_backend``) = triton | cudnn | reference forces a path; under auto, CUDA calls take the one
    the dispatcher timed faster for this shape, CPU calls the reference.
    """
    stride, padding, alpha = as_int(stride, "stride"), as_int(padding, "padding"), float(alpha)
    check_conv_args(x, weight, bias, alpha, "conv_lrelu", 1)
    path = conv_path("conv_lrelu", x, weight, bias, stride, padding, alpha, _run_path)
    return _run_path(path, x, weight, bias, stride, padding, alpha)


def _run_path(path: str, x, weight, bias, stride: int, padding: int, alpha: float) -> torch.Tensor:
    """One of the dispatcher's paths (kernels/dispatch.py), with autograd: "triton" (the fused custom op),
    "cudnn" (aten conv without bias + the Triton bias+LReLU epilogue) or "reference" (eager)."""
    if path == "reference":
        return reference_conv_lrelu(x, weight, bias, stride, padding, alpha)
    if torch.is_autocast_enabled(x.device.type):  # custom ops skip autocast: cast as F.conv2d would
        x = x.to(torch.get_autocast_dtype(x.device.type))
    weight = weight.to(x.dtype)
    bias = bias.to(x.dtype) if bias is not None else None
    if path == "cudnn":
        return bias_lrelu(F.conv2d(x, weight, None, stride=stride, padding=padding), bias, alpha)
    return _conv_lrelu_op(x, weight, bias, stride, padding, alpha)
