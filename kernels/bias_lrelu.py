"""bias_lrelu: ``lrelu(conv_out + b)`` in one Triton pass, and the LReLU mask + bias gradient in one pass.

Design notes: docs/kernels.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import INTERPRET, can_launch, register_autograd_ops, tl, triton

__all__ = [
    "bias_lrelu",
    "reference_bias_lrelu",
    "bias_lrelu_forward",
    "lrelu_bias_grads",
    "reference_lrelu_bias_grads",
    "BiasLReluFunction",
]

# Elements per program (BLOCK_M * BLOCK_C) in both passes. The interpreter pays per program, not per element.
_TILE = 16384 if INTERPRET else 4096
_SUM_ROWS = 64  # partial rows added per step by _channel_sum_kernel


@triton.jit
def _tile(M, C, HW, s_n, s_c, s_hw, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    # This program's (BLOCK_M rows) x (BLOCK_C channels) tile of a tensor walked as rows m = (n, h, w) by
    # channels c: offsets n * s_n + hw * s_hw + c * s_c, the in-bounds mask, the channels and their mask.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = (offs_m < M)[:, None] & mask_c[None, :]
    n = offs_m // HW
    hw = offs_m % HW
    offs = (n.to(tl.int64) * s_n + hw * s_hw)[:, None] + (offs_c * s_c)[None, :]
    return offs, mask, offs_c, mask_c


@triton.jit
def _bias_lrelu_fwd_kernel(
    x_ptr,
    b_ptr,
    out_ptr,
    M,
    C,
    HW,
    s_n,
    s_c,
    s_hw,
    alpha,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # out[m, c] = lrelu(x[m, c] + b[c]), m = (n, h, w); x and out share the strides (s_n, s_c, s_hw).
    #   d out / d x = 1 if out > 0 else alpha;  d out / d b[c] = the same, summed over m.
    offs, mask, offs_c, mask_c = _tile(M, C, HW, s_n, s_c, s_hw, BLOCK_M, BLOCK_C)
    pre = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        pre += tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    out = tl.where(pre > 0, pre, pre * alpha)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lrelu_bias_grad_kernel(
    grad_out_ptr,
    out_ptr,
    grad_pre_ptr,
    partial_ptr,
    M,
    C,
    HW,
    s_n,
    s_c,
    s_hw,
    alpha,
    WRITE_GRAD_PRE: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # One pass over grad_out and out (same strides):
    #   grad_pre[m, c] = grad_out[m, c] * (1 if out[m, c] > 0 else alpha)
    #   partial[pid_m, c] = sum_{m in this program's rows} grad_pre[m, c]   (fp32, before rounding)
    # grad_b[c] = sum over pid_m of partial[pid_m, c] follows in _channel_sum_kernel (fixed order).
    offs, mask, offs_c, mask_c = _tile(M, C, HW, s_n, s_c, s_hw, BLOCK_M, BLOCK_C)
    g = tl.load(grad_out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(out_ptr + offs, mask=mask, other=0.0)
    gp = tl.where(o > 0, g, g * alpha)  # masked lanes: g = 0, so gp = 0 and the sums are unaffected
    if WRITE_GRAD_PRE:
        tl.store(grad_pre_ptr + offs, gp.to(grad_pre_ptr.dtype.element_ty), mask=mask)
    if BIAS_GRAD:
        tl.store(partial_ptr + tl.program_id(0).to(tl.int64) * C + offs_c, tl.sum(gp, axis=0), mask=mask_c)


@triton.jit
def _channel_sum_kernel(partial_ptr, out_ptr, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # out[c] = sum_{r < R} partial[r, c], rows added in increasing order (deterministic; no atomics).
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        ptrs = partial_ptr + rows.to(tl.int64)[:, None] * C + offs_c[None, :]
        acc += tl.load(ptrs, mask=(rows < R)[:, None] & mask_c[None, :], other=0.0)
    tl.store(out_ptr + offs_c, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=mask_c)


# ----------------------------------------------------------------------------------------------------------
# Launchers


def _dense(t: torch.Tensor) -> torch.Tensor:
    """t itself when it is dense NCHW or channels_last, else a contiguous copy."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def _rows_by_channels(t: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """(M, C, HW, stride_n, stride_c, stride_hw) of a dense 4-D tensor walked as rows (n, h, w) x channels."""
    N, C, H, W = t.shape
    s_n, s_c, s_h, s_w = t.stride()
    s_hw = s_h if W == 1 else s_w  # H == 1: hw = w; W == 1: hw = h; else dense layouts have s_h == W * s_w
    if H > 1 and W > 1 and s_h != W * s_w:
        raise AssertionError(f"h and w do not merge in strides {t.stride()}")  # unreachable for dense t
    return N * H * W, C, H * W, s_n, s_c, s_hw


def _blocks(C: int) -> tuple[int, int]:
    block_c = min(64, max(16, triton.next_power_of_2(C)))
    return _TILE // block_c, block_c


def _check_4d(t: torch.Tensor, name: str) -> None:
    if t.dim() != 4:
        raise ValueError(f"bias_lrelu: {name} must be 4-D (N, C, H, W), got shape {tuple(t.shape)}")


def bias_lrelu_forward(conv_out: torch.Tensor, bias: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """Launch ``_bias_lrelu_fwd_kernel``: lrelu(conv_out + bias) in conv_out's dtype and (dense) layout.

    conv_out (N, C, H, W); bias (C,) in any float dtype, or None.
    """
    x = _dense(conv_out)
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    M, C, HW, s_n, s_c, s_hw = _rows_by_channels(x)
    block_m, block_c = _blocks(C)
    grid = (triton.cdiv(M, block_m), triton.cdiv(C, block_c))
    _bias_lrelu_fwd_kernel[grid](
        x,
        bias if bias is not None else x,
        out,
        M,
        C,
        HW,
        s_n,
        s_c,
        s_hw,
        float(alpha),
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_C=block_c,
    )
    return out


def lrelu_bias_grads(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    alpha: float,
    need_grad_pre: bool = True,
    need_grad_bias: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad_pre, grad_bias) of out = lrelu(pre) with pre = conv_out + bias, from the saved ``out`` only.

    grad_pre (in out's dtype and layout) = grad_out * where(out > 0, 1, alpha); grad_bias (C,) in out's
    dtype = sum of grad_pre over (n, h, w), accumulated in fp32 in a fixed order. One Triton pass plus
    one small fixed-order reduction where Triton runs (CUDA, or the interpreter), the PyTorch reference
    elsewhere. A gradient that is not needed is not computed and comes back as None.
    """
    if not (need_grad_pre or need_grad_bias):
        return None, None
    if not can_launch(out):
        grad_pre, grad_bias = reference_lrelu_bias_grads(grad_out, out, alpha)
        return (grad_pre if need_grad_pre else None), (grad_bias if need_grad_bias else None)
    out = _dense(out)
    if grad_out.stride() != out.stride() or grad_out.dtype != out.dtype:
        grad_out = torch.empty_like(out).copy_(grad_out)  # one layout for all three tensors
    M, C, HW, s_n, s_c, s_hw = _rows_by_channels(out)
    block_m, block_c = _blocks(C)
    rows = triton.cdiv(M, block_m)
    grad_pre = torch.empty_like(out) if need_grad_pre else None
    partial = torch.empty((rows, C), device=out.device, dtype=torch.float32) if need_grad_bias else None
    if M and C:
        _lrelu_bias_grad_kernel[(rows, triton.cdiv(C, block_c))](
            grad_out,
            out,
            grad_pre if need_grad_pre else out,
            partial if need_grad_bias else out,
            M,
            C,
            HW,
            s_n,
            s_c,
            s_hw,
            float(alpha),
            WRITE_GRAD_PRE=need_grad_pre,
            BIAS_GRAD=need_grad_bias,
            BLOCK_M=block_m,
            BLOCK_C=block_c,
        )
    grad_bias = None
    if need_grad_bias:
        grad_bias = torch.empty(C, device=out.device, dtype=out.dtype)
        if M == 0:
            grad_bias.zero_()
        elif C:
            _channel_sum_kernel[(triton.cdiv(C, block_c),)](
                partial, grad_bias, rows, C, BLOCK_R=_SUM_ROWS, BLOCK_C=block_c
            )
    return grad_pre, grad_bias


def reference_lrelu_bias_grads(grad_out: torch.Tensor, out: torch.Tensor, alpha: float):
    """Plain PyTorch (grad_pre, grad_bias) of ``lrelu_bias_grads``: the CPU path and the test oracle."""
    grad_pre = torch.where(out > 0, grad_out, grad_out * alpha).to(out.dtype)
    grad_bias = torch.where(out > 0, grad_out.float(), grad_out.float() * alpha).sum((0, 2, 3))
    return grad_pre.contiguous(memory_format=_format_of(out)), grad_bias.to(out.dtype)


def _format_of(t: torch.Tensor) -> torch.memory_format:
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


# ----------------------------------------------------------------------------------------------------------
# torch.library custom ops and autograd


def _fwd_impl(conv_out: torch.Tensor, bias: torch.Tensor | None, alpha: float) -> torch.Tensor:
    if can_launch(conv_out):
        return bias_lrelu_forward(conv_out, bias, alpha)
    return reference_bias_lrelu(conv_out, bias, alpha).contiguous(memory_format=_format_of(conv_out))


def _fwd_fake(conv_out, bias, alpha):
    return torch.empty_like(_dense(conv_out))


def _nothing(like: torch.Tensor) -> torch.Tensor:
    """A fresh empty tensor for a gradient that was not asked for (each one distinct: a custom op's
    outputs may not alias each other)."""
    return like.new_empty(0)


def _bwd_impl(
    grad_out: torch.Tensor, out: torch.Tensor, alpha: float, need_grad_pre: bool, need_grad_bias: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_pre, grad_bias = lrelu_bias_grads(grad_out, out, alpha, need_grad_pre, need_grad_bias)
    return (
        grad_pre if grad_pre is not None else _nothing(out),
        grad_bias if grad_bias is not None else _nothing(out),
    )


def _bwd_fake(grad_out, out, alpha, need_grad_pre, need_grad_bias):
    return (
        torch.empty_like(_dense(out)) if need_grad_pre else _nothing(out),
        out.new_empty(out.shape[1]) if need_grad_bias else _nothing(out),
    )


class BiasLReluFunction(torch.autograd.Function):
    """Autograd for ``deepsim::bias_lrelu`` (inputs conv_out, bias, alpha); saves only the output."""

    @staticmethod
    def forward(conv_out, bias, alpha):
        return _fwd_impl(conv_out, bias, alpha)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, bias, alpha = inputs
        ctx.save_for_backward(output)
        ctx.conf = (bias is not None, alpha)

    @staticmethod
    def backward(ctx, grad_out):
        (out,) = ctx.saved_tensors
        has_bias, alpha = ctx.conf
        need_pre, need_bias = ctx.needs_input_grad[0], has_bias and ctx.needs_input_grad[1]
        grad_pre, grad_bias = _backward_op(grad_out, out, alpha, need_pre, need_bias)
        return (grad_pre if need_pre else None), (grad_bias if need_bias else None), None


_forward_op, _backward_op = register_autograd_ops(
    "bias_lrelu", _fwd_impl, _fwd_fake, _bwd_impl, _bwd_fake, BiasLReluFunction
)


# ----------------------------------------------------------------------------------------------------------
# Public API


def reference_bias_lrelu(conv_out, bias=None, alpha=0.3):
    """Plain PyTorch: leaky_relu(conv_out + bias[None, :, None, None], alpha). The CPU path and the oracle."""
    pre = conv_out if bias is None else conv_out + bias.to(conv_out.dtype)[None, :, None, None]
    return F.leaky_relu(pre, alpha)


def bias_lrelu(conv_out: torch.Tensor, bias: torch.Tensor | None = None, alpha: float = 0.3) -> torch.Tensor:
    """Fused ``leaky_relu(conv_out + bias[None, :, None, None], alpha)``: the cuDNN path's epilogue.

    Args:
        conv_out: (N, C, H, W), NCHW or channels_last; fp32, fp16 or bf16 (fp32 arithmetic).
        bias: (C,) or None; cast to conv_out's dtype.
        alpha: LReLU negative slope, >= 0 (the backward reads the slope from sign(out)).
    Returns:
        (N, C, H, W) in conv_out's dtype and memory format. Saved for backward: this output only.

    Backward: grad_conv_out and grad_bias in one Triton pass (``lrelu_bias_grads``). Triton on CUDA
    tensors and under ``TRITON_INTERPRET=1``; the PyTorch reference elsewhere (same saved tensors).
    """
    _check_4d(conv_out, "conv_out")
    if alpha < 0:
        raise ValueError(
            f"bias_lrelu: alpha={alpha} must be >= 0 (the backward reads the slope from sign(out))"
        )
    if bias is not None:
        if bias.shape != (conv_out.shape[1],):
            raise ValueError(
                f"bias_lrelu: bias of shape {tuple(bias.shape)}, expected ({conv_out.shape[1]},) "
                "(one value per channel of conv_out)"
            )
        bias = bias.to(conv_out.dtype)
    return _forward_op(conv_out, bias, float(alpha))
