"""conv_transpose_lrelu: transposed convolution (the up-conv block) + bias + LReLU in one Triton kernel.

Forward (one launch, gather form of the implicit GEMM):
    pre[n, co, oh, ow] = b[co] + sum_{ci,kh,kw} x[n, ci, ih, iw] * W[ci, co, kh, kw],
        ih = (oh + P - kh) / S, iw = (ow + P - kw) / S, taken only when divisible and in range;
    out = lrelu(pre) = pre if pre > 0 else alpha * pre.
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
    "conv_transpose_lrelu",
    "reference_conv_transpose_lrelu",
    "conv_transpose_lrelu_forward",
    "conv_transpose_lrelu_backward",
    "ConvTransposeLReluFunction",
]

# Up-convs of the network: 128 -> 64 (8x8 -> 16x16) and 64 -> 32 (16x16 -> 32x32), k4 s2 p1, batch 64.
if INTERPRET:
    _CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
else:
    _CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (64, 32, 32, 4, 4),
            (128, 32, 32, 4, 4),
            (128, 64, 32, 4, 3),
            (64, 64, 64, 4, 3),
            (256, 64, 32, 8, 3),
        ]
    ]
    if not AUTOTUNE:  # DEEPSIM_AUTOTUNE=0: one config that is also in the list above
        _CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=4)]


@triton.autotune(configs=_CONFIGS, key=AUTOTUNE_KEY)
@triton.jit
def _conv_transpose_lrelu_fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    N, C_in, H, W, C_out, OH, OW,
    sxn, sxc, sxh, sxw,
    swi, swo, swh, sww,
    son, soc, soh, sow,
    alpha,
    STRIDE: tl.constexpr, PAD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Gather implicit GEMM, rows m = (n, oh, ow), cols = c_out, reduction k = (kh, kw, c_in):
    #   pre[m, co] = b[co] + sum x[n, ci, (oh+P-kh)/S, (ow+P-kw)/S] * W[ci, co, kh, kw]  (divisible, in range)
    #   out = pre if pre > 0 else alpha * pre          (d out / d pre = 1 if pre > 0 else alpha)
    # Taps that miss (not divisible by S) are masked: (S^2 - 1)/S^2 of the loads are skipped, not free.
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
    x_base = x_ptr + n.to(tl.int64) * sxn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kh in range(KH):
        th = oh + PAD - kh
        ih = th // STRIDE
        valid_h = (th >= 0) & (th % STRIDE == 0) & (ih < H)
        for kw in range(KW):
            tw = ow + PAD - kw
            iw = tw // STRIDE
            valid = mask_m & valid_h & (tw >= 0) & (tw % STRIDE == 0) & (iw < W)
            a_row = x_base + ih * sxh + iw * sxw
            w_col = w_ptr + offs_n * swo + kh * swh + kw * sww
            for c0 in range(0, C_in, BLOCK_K):
                offs_k = c0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < C_in
                a = tl.load(
                    a_row[:, None] + offs_k[None, :] * sxc, mask=valid[:, None] & mask_k[None, :], other=0.0
                )
                b = tl.load(
                    w_col[None, :] + offs_k[:, None] * swi, mask=mask_k[:, None] & mask_n[None, :], other=0.0
                )
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = tl.where(acc > 0, acc, acc * alpha)
    o_ptrs = out_ptr + (n.to(tl.int64) * son + oh * soh + ow * sow)[:, None] + offs_n[None, :] * soc
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _out_size(H, W, KH, KW, stride, padding):
    return (H - 1) * stride - 2 * padding + KH, (W - 1) * stride - 2 * padding + KW


def conv_transpose_lrelu_forward(x, weight, bias, stride: int, padding: int, alpha: float) -> torch.Tensor:
    """Launch the fused kernel. x (N, C_in, H, W), weight (C_in, C_out, KH, KW) -> (N, C_out, OH, OW)
    with OH = (H - 1) * stride - 2 * padding + KH, in x's memory format and dtype."""
    N, C_in, H, W = x.shape
    _, C_out, KH, KW = weight.shape
    OH, OW = _out_size(H, W, KH, KW, stride, padding)
    if OH <= 0 or OW <= 0:
        raise ValueError(f"conv_transpose_lrelu: padding {padding} leaves no output for {H}x{W}, kernel {KH}")
    out = empty_conv_output(x, C_out, OH, OW)
    if out.numel() == 0:
        return out
    b = bias if bias is not None else weight

    def grid(meta):
        return (triton.cdiv(N * OH * OW, meta["BLOCK_M"]), triton.cdiv(C_out, meta["BLOCK_N"]))

    _conv_transpose_lrelu_fwd_kernel[grid](
        x, weight, b, out,
        N, C_in, H, W, C_out, OH, OW,
        *x.stride(), *weight.stride(), *out.stride(),
        float(alpha),
        STRIDE=stride, PAD=padding, KH=KH, KW=KW,
        HAS_BIAS=bias is not None, INPUT_PRECISION=input_precision(x.dtype),
    )  # fmt: skip
    return out


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
