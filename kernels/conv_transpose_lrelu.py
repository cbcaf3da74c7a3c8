"""conv_transpose_lrelu: transposed convolution (the up-conv block) + bias + LReLU in one Triton kernel.

Forward (one launch):
    pre[n, co, oh, ow] = b[co] + sum_{ci,kh,kw} x[n, ci, ih, iw] * W[ci, co, kh, kw],
        ih = (oh + P - kh) / S, iw = (ow + P - kw) / S, taken only when divisible and in range;
    out = lrelu(pre) = pre if pre > 0 else alpha * pre.
Computed by output parity (sub-pixel decomposition): outputs with oh = S*r + ph only receive the taps
kh = (ph + P) mod S + S*j, so each of the S*S classes is a dense ceil(KH/S) x ceil(KW/S)-tap conv (2 x 2 for
k4 s2) and no MMA is issued on the structural zeros. The kernel is ``_conv_igemm._conv_igemm_lrelu_kernel``
(shared with conv_lrelu; one launch, the classes on program_id(1)).
Backward keeps only ``out`` of its own (x and W are alive anyway):
    grad_pre = grad_out * (1 if out > 0 else alpha)   } one deterministic Triton pass
    grad_b = sum_{n,h,w} grad_pre                     } (kernels/bias_lrelu.py, ``lrelu_bias_grads``)
    grad_x, grad_W = aten.convolution_backward(grad_pre, ..., transposed=True)  (cuDNN on CUDA)
The public ``conv_transpose_lrelu`` runs this fused op or, per layer shape, cuDNN conv_transpose + the
Triton bias+LReLU epilogue, whichever kernels/dispatch.py measured faster.
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
    "conv_transpose_lrelu",
    "reference_conv_transpose_lrelu",
    "conv_transpose_lrelu_forward",
    "conv_transpose_lrelu_backward",
    "ConvTransposeLReluFunction",
]

def _out_size(H, W, KH, KW, stride, padding):
    return (H - 1) * stride - 2 * padding + KH, (W - 1) * stride - 2 * padding + KW


def conv_transpose_lrelu_forward(x, weight, bias, stride: int, padding: int, alpha: float) -> torch.Tensor:
    """Launch the fused kernel. x (N, C_in, H, W), weight (C_in, C_out, KH, KW) -> (N, C_out, OH, OW)
    with OH = (H - 1) * stride - 2 * padding + KH, in x's memory format and dtype.

    One launch covers the stride**2 output-parity classes (a dense ceil(KH/S) x ceil(KW/S)-tap conv
    each). Fastest with channels_last x and weight; tuning as for ``conv_lrelu_forward``.
    """
    N, C_in, H, W = x.shape
    _, C_out, KH, KW = weight.shape
    OH, OW = _out_size(H, W, KH, KW, stride, padding)
    if OH <= 0 or OW <= 0:
        raise ValueError(f"conv_transpose_lrelu: padding {padding} leaves no output for {H}x{W}, kernel {KH}")
    out = empty_conv_output(x, C_out, OH, OW)
    if out.numel() == 0:
        return out
    geom = ConvGeometry(True, N, C_in, H, W, C_out, KH, KW, stride, padding)
    return conv_igemm_forward(x, weight, bias, geom, alpha, out)


def conv_transpose_lrelu_backward(grad_out: torch.Tensor, out: torch.Tensor, x: torch.Tensor,
                                  weight: torch.Tensor, has_bias: bool, stride: int, padding: int,
                                  alpha: float, output_mask: list[bool]
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(grad_x, grad_weight, grad_bias); an unneeded one (output_mask False) comes back as an empty tensor."""
    return conv_lrelu_grads(
        grad_out, out, x, weight, has_bias, stride, padding, alpha, output_mask, transposed=True
    )


def _fwd_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int,
              alpha: float) -> torch.Tensor:  # fmt: skip
    if use_triton_impl(x):
        return conv_transpose_lrelu_forward(x, weight, bias, stride, padding, alpha)
    out = reference_conv_transpose_lrelu(x, weight, bias, stride, padding, alpha)
    return out.contiguous(memory_format=memory_format_of(x))


def _fwd_fake(x, weight, bias, stride, padding, alpha):
    _, C_out, KH, KW = weight.shape
    return empty_conv_output(x, C_out, *_out_size(x.shape[2], x.shape[3], KH, KW, stride, padding))


def _bwd_fake(grad_out, out, x, weight, has_bias, stride, padding, alpha, output_mask):
    return conv_lrelu_grads_fake(out, x, weight, has_bias, output_mask, transposed=True)


class ConvTransposeLReluFunction(torch.autograd.Function):
    """Autograd for the fused up-conv; ``deepsim::conv_transpose_lrelu`` reuses setup_context and backward.

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
        return lrelu_conv_backward(ctx, grad_out, _backward_op)


_backward_op = register_op("conv_transpose_lrelu_backward", conv_transpose_lrelu_backward, fake=_bwd_fake)
_forward_op = register_op(
    "conv_transpose_lrelu", _fwd_impl, fake=_fwd_fake,
    setup_context=ConvTransposeLReluFunction.setup_context, backward=ConvTransposeLReluFunction.backward,
)  # fmt: skip


def reference_conv_transpose_lrelu(x, weight, bias=None, stride=1, padding=0, alpha=0.3):
    """Plain PyTorch: leaky_relu(conv_transpose2d(x, weight, bias), alpha). The CPU path and the oracle."""
    return F.leaky_relu(F.conv_transpose2d(x, weight, bias, stride=stride, padding=padding), alpha)


def conv_transpose_lrelu(x, weight, bias=None, stride=1, padding=0, alpha=0.3):
    """Fused ``leaky_relu(conv_transpose2d(x, weight, bias, stride, padding), alpha)`` (the up-conv block).

    Args:
        x: (N, C_in, H, W), NCHW or channels_last; fp32, fp16 or bf16 (fp32 accumulation).
        weight: (C_in, C_out, KH, KW), the nn.ConvTranspose2d layout; cast to x's dtype if it differs.
            Under torch.autocast, x is first cast to the autocast dtype (as F.conv_transpose2d's are).
        bias: (C_out,) or None.
        stride, padding: ints (or square pairs); no output_padding, dilation or groups.
        alpha: LReLU negative slope, >= 0.
    Returns:
        (N, C_out, (H-1)*stride - 2*padding + KH, ...) in x's dtype and memory format.

    Paths (kernels/dispatch.py), as for ``conv_lrelu``: "triton" (forward in one Triton kernel) or
    "cudnn" (aten conv_transpose2d without bias + the Triton bias+LReLU epilogue); shared backward: one
    Triton pass for grad_pre and the bias gradient, then aten.convolution_backward (transposed=True).
    """
    stride, padding, alpha = as_int(stride, "stride"), as_int(padding, "padding"), float(alpha)
    check_conv_args(x, weight, bias, alpha, "conv_transpose_lrelu", 0)
    path = conv_path("conv_transpose_lrelu", x, weight, bias, stride, padding, alpha, _run_path)
    return _run_path(path, x, weight, bias, stride, padding, alpha)


def _run_path(path: str, x, weight, bias, stride: int, padding: int, alpha: float) -> torch.Tensor:
    """One of the dispatcher's paths (kernels/dispatch.py), with autograd: "triton" (the fused custom op),
    "cudnn" (aten conv without bias + the Triton bias+LReLU epilogue) or "reference" (eager)."""
    if path == "reference":
        return reference_conv_transpose_lrelu(x, weight, bias, stride, padding, alpha)
    if torch.is_autocast_enabled(x.device.type):  # custom ops skip autocast: cast as F.conv_transpose2d would
        x = x.to(torch.get_autocast_dtype(x.device.type))
    weight = weight.to(x.dtype)
    bias = bias.to(x.dtype) if bias is not None else None
    if path == "cudnn":
        return bias_lrelu(F.conv_transpose2d(x, weight, None, stride=stride, padding=padding), bias, alpha)
    return _forward_op(x, weight, bias, stride, padding, alpha)
