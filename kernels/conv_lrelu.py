"""conv_lrelu: convolution + bias + LReLU in one Triton implicit-GEMM kernel.

Forward (one launch):  out = lrelu(conv2d(x, W) + b),  lrelu(p) = p if p > 0 else alpha * p.
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

from ._backend import AUTOTUNE, INTERPRET, register_op, tl, triton
from ._conv_common import (
    AUTOTUNE_KEY,
    as_int,
    check_conv_args,
    conv_lrelu_grads,
    conv_lrelu_grads_fake,
    empty_conv_output,
    input_precision,
    lrelu_conv_backward,
    memory_format_of,
    save_for_lrelu_backward,
    use_triton_impl,
)
from .bias_lrelu import bias_lrelu
from .dispatch import conv_path

__all__ = [
    "conv_lrelu",
    "reference_conv_lrelu",
    "conv_lrelu_forward",
    "conv_lrelu_backward",
    "ConvLReluFunction",
]

# Autotune configs: the network's layers have C_in in {3, 8, 32, 64, 128, 256}, C_out in {32..256} and
# N*OH*OW from 4096 (64 x 8 x 8) to 65536 (64 x 32 x 32). Small-K configs serve the 3-channel first layers.
if INTERPRET:  # the interpreter runs each program in numpy: one small config keeps tests fast.
    _CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
else:
    _CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 32, 16, 4, 4),  # C_in = 3 / 8, C_out = 32
            (64, 32, 32, 4, 4),
            (128, 64, 32, 4, 3),
            (64, 64, 32, 4, 4),
            (128, 128, 32, 8, 3),
            (64, 128, 64, 4, 3),  # 128 -> 256, 256 -> 256 at 8x8 / 4x4 (small M)
            (256, 64, 32, 8, 3),  # large M (batch 64 at 32x32)
        ]
    ]
    if not AUTOTUNE:  # DEEPSIM_AUTOTUNE=0: one config that is also in the list above
        _CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=4)]


@triton.autotune(configs=_CONFIGS, key=AUTOTUNE_KEY)
@triton.jit
def _conv_lrelu_fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    N, C_in, H, W, C_out, OH, OW,
    sxn, sxc, sxh, sxw,
    swo, swi, swh, sww,
    son, soc, soh, sow,
    alpha,
    STRIDE: tl.constexpr, PAD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Implicit GEMM: rows m = (n, oh, ow), cols = c_out, reduction k = (kh, kw, c_in):
    #   pre[m, co] = b[co] + sum_{kh,kw,ci} x[n, ci, oh*S - P + kh, ow*S - P + kw] * W[co, ci, kh, kw]
    #   out = pre if pre > 0 else alpha * pre          (d out / d pre = 1 if pre > 0 else alpha)
    # fp32 accumulation whatever the input dtype; generic strides cover NCHW and channels_last.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < N * OH * OW
    mask_n = offs_n < C_out
    n = offs_m // (OH * OW)
    ohw = offs_m % (OH * OW)
    oh = ohw // OW
    ow = ohw % OW
    x_base = x_ptr + n.to(tl.int64) * sxn  # (BLOCK_M,)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kh in range(KH):
        ih = oh * STRIDE - PAD + kh
        for kw in range(KW):
            iw = ow * STRIDE - PAD + kw
            valid = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_row = x_base + ih * sxh + iw * sxw  # (BLOCK_M,)
            w_col = w_ptr + offs_n * swo + kh * swh + kw * sww  # (BLOCK_N,)
            for c0 in range(0, C_in, BLOCK_K):
                offs_k = c0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < C_in
                a = tl.load(
                    a_row[:, None] + offs_k[None, :] * sxc, mask=valid[:, None] & mask_k[None, :], other=0.0
                )
                b = tl.load(
                    w_col[None, :] + offs_k[:, None] * swi, mask=mask_k[:, None] & mask_n[None, :], other=0.0
                )
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N) fp32
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = tl.where(acc > 0, acc, acc * alpha)
    o_ptrs = out_ptr + (n.to(tl.int64) * son + oh * soh + ow * sow)[:, None] + offs_n[None, :] * soc
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------------------------------------
# Launchers


def _out_size(H, W, KH, KW, stride, padding):
    return (H + 2 * padding - KH) // stride + 1, (W + 2 * padding - KW) // stride + 1


def conv_lrelu_forward(x, weight, bias, stride: int, padding: int, alpha: float) -> torch.Tensor:
    """Launch the fused kernel. x (N, C_in, H, W), weight (C_out, C_in, KH, KW) -> (N, C_out, OH, OW),
    in x's memory format and dtype (weight and bias must have x's dtype)."""
    N, C_in, H, W = x.shape
    C_out, _, KH, KW = weight.shape
    OH, OW = _out_size(H, W, KH, KW, stride, padding)
    if OH <= 0 or OW <= 0:
        raise ValueError(f"conv_lrelu: input {H}x{W} is smaller than kernel {KH}x{KW} with padding {padding}")
    out = empty_conv_output(x, C_out, OH, OW)
    if out.numel() == 0:
        return out
    b = bias if bias is not None else weight  # dummy pointer, never read when HAS_BIAS is False

    def grid(meta):
        return (triton.cdiv(N * OH * OW, meta["BLOCK_M"]), triton.cdiv(C_out, meta["BLOCK_N"]))

    _conv_lrelu_fwd_kernel[grid](
        x, weight, b, out,
        N, C_in, H, W, C_out, OH, OW,
        *x.stride(), *weight.stride(), *out.stride(),
        float(alpha),
        STRIDE=stride, PAD=padding, KH=KH, KW=KW,
        HAS_BIAS=bias is not None, INPUT_PRECISION=input_precision(x.dtype),
    )  # fmt: skip
    return out


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
