"""What conv_lrelu and conv_transpose_lrelu share: argument checks, layouts, the LReLU grad_pre step, the
aten backward, the fake implementations' shapes and the autograd plumbing.

Both ops save only (x, W, out) and differentiate the same way; they differ in the forward kernel and in
the ``transposed`` flag handed to ``aten.convolution_backward`` (which also says where C_in / C_out sit in
the weight: (C_out, C_in, KH, KW) for a convolution, (C_in, C_out, KH, KW) for a transposed one):
    grad_pre = grad_out * (1 if out > 0 else alpha)           (Triton, ``_lrelu_grad_pre_kernel``)
    grad_x, grad_W = aten.convolution_backward(grad_pre, x, W, transposed)  (cuDNN / aten, not Triton)
    grad_b = sum_{n,h,w} grad_pre                               (torch reduction in fp32)
"""

from __future__ import annotations

import torch

from ._backend import HAS_TRITON, INTERPRET, tl, triton
from ._conv_igemm import input_precision as _igemm_input_precision

# Autotune key of both forward kernels (their argument names).
AUTOTUNE_KEY = ["N", "C_in", "H", "W", "C_out", "OH", "OW", "KH", "KW", "STRIDE", "PAD"]


@triton.jit
def _lrelu_grad_pre_kernel(grad_out_ptr, out_ptr, grad_pre_ptr, numel, alpha, BLOCK: tl.constexpr):
    # out = lrelu(pre) keeps the sign of pre (alpha >= 0), so only out is needed:
    #   grad_pre = grad_out * (1 if out > 0 else alpha)
    # (grad_out, out, grad_pre share one dense layout, so a flat index walks all three alike.)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(grad_out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(out_ptr + offs, mask=mask, other=0.0)
    gp = tl.where(o > 0, g, g * alpha)
    tl.store(grad_pre_ptr + offs, gp.to(grad_pre_ptr.dtype.element_ty), mask=mask)


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """channels_last if ``t`` is stored NHWC (and not also plain contiguous), else contiguous_format."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def empty_conv_output(x: torch.Tensor, c_out: int, oh: int, ow: int) -> torch.Tensor:
    """An uninitialised (N, c_out, oh, ow) output in x's dtype, device and memory format."""
    return torch.empty(
        (x.shape[0], c_out, oh, ow), dtype=x.dtype, device=x.device, memory_format=memory_format_of(x)
    )


def input_precision(dtype: torch.dtype) -> str:
    """fp32 dots use TF32 exactly when eager cuDNN convolutions would (see ``_conv_igemm.fp32_uses_tf32``)."""
    return _igemm_input_precision(dtype)


def use_triton_impl(t: torch.Tensor) -> bool:
    """Inside the custom ops: Triton where it can run (CUDA, or CPU under TRITON_INTERPRET=1)."""
    return HAS_TRITON and (t.is_cuda or INTERPRET)


def as_int(value, name: str) -> int:
    """Accept an int or a square pair (s, s); anything else is an error naming the argument."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name}={value!r}: only square values are supported (an int or (v, v))")
        value = value[0]
    return int(value)


def check_conv_args(x, weight, bias, alpha, op: str, c_in_dim: int):
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            f"{op}: x and weight must be 4-D, got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    if x.shape[1] != weight.shape[c_in_dim]:
        raise ValueError(f"{op}: x has {x.shape[1]} channels, weight expects {weight.shape[c_in_dim]}")
    if alpha < 0:
        raise ValueError(
            f"{op}: alpha={alpha} must be >= 0 (the backward reads the LReLU slope from sign(out))"
        )


def lrelu_grad_pre(grad_out: torch.Tensor, out: torch.Tensor, alpha: float) -> torch.Tensor:
    """grad_pre = grad_out * where(out > 0, 1, alpha), in out's layout and dtype, by the Triton kernel."""
    grad_out = grad_out.contiguous(memory_format=memory_format_of(out))
    if grad_out.stride() != out.stride():  # odd layouts (size-1 dims): fall back to plain contiguous
        grad_out, out = grad_out.contiguous(), out.contiguous()
    grad_pre = torch.empty_like(out)
    numel = out.numel()
    BLOCK = 1024
    _lrelu_grad_pre_kernel[(triton.cdiv(numel, BLOCK),)](
        grad_out, out, grad_pre, numel, float(alpha), BLOCK=BLOCK
    )
    return grad_pre


def reference_grad_pre(grad_out: torch.Tensor, out: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.where(out > 0, grad_out, grad_out * alpha).to(out.dtype)


def conv_lrelu_grads(grad_out, out, x, weight, has_bias: bool, stride: int, padding: int, alpha: float,
                     output_mask: list[bool], *, transposed: bool):  # fmt: skip
    """(grad_x, grad_weight, grad_bias) of lrelu(conv(x, W) + b), or of conv_transpose when ``transposed``;
    an unneeded one (output_mask False) comes back as an empty tensor."""
    if use_triton_impl(out):
        grad_pre = lrelu_grad_pre(grad_out, out, alpha)
    else:
        grad_pre = reference_grad_pre(grad_out, out, alpha)
    gx, gw, _ = torch.ops.aten.convolution_backward(
        grad_pre, x, weight, None, [stride] * 2, [padding] * 2, [1, 1], transposed, [0, 0], 1,
        [output_mask[0], output_mask[1], False],
    )  # fmt: skip
    empty = grad_pre.new_empty(0)
    gb = empty
    if has_bias and output_mask[2]:
        gb = grad_pre.sum((0, 2, 3), dtype=torch.float32).to(weight.dtype)
    # Fixed layouts (x's and weight's memory format), as the fake implementation promises torch.compile.
    gx = gx.contiguous(memory_format=memory_format_of(x)) if gx is not None else empty
    gw = gw.contiguous(memory_format=memory_format_of(weight)) if gw is not None else empty
    return gx, gw, gb


def _empty_in_layout_of(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=memory_format_of(t))


def conv_lrelu_grads_fake(out, x, weight, has_bias: bool, output_mask: list[bool], *, transposed: bool):
    """Fake (shape, dtype, layout only) result of ``conv_lrelu_grads``, for torch.compile."""
    empty = out.new_empty(0)
    c_out = weight.shape[1 if transposed else 0]
    return (
        _empty_in_layout_of(x) if output_mask[0] else empty,
        _empty_in_layout_of(weight) if output_mask[1] else empty,
        weight.new_empty(c_out) if has_bias and output_mask[2] else empty,
    )


# ----------------------------------------------------------------------------------------------------------
# Autograd plumbing shared by ConvLReluFunction and ConvTransposeLReluFunction (inputs: x, W, b, stride,
# padding, alpha). Saved for backward: x (for grad_W), W (for grad_x) and out (for the LReLU slope).


def save_for_lrelu_backward(ctx, inputs, output) -> None:
    x, weight, bias, stride, padding, alpha = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.conf = (bias is not None, stride, padding, alpha)


def lrelu_conv_backward(ctx, grad_out, backward_op):
    """Gradients for (x, W, b, stride, padding, alpha) through the registered ``backward_op``."""
    x, weight, out = ctx.saved_tensors
    has_bias, stride, padding, alpha = ctx.conf
    mask = [bool(m) for m in ctx.needs_input_grad[:3]]
    gx, gw, gb = backward_op(grad_out, out, x, weight, has_bias, stride, padding, alpha, mask)
    return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] and has_bias else None,
            None, None, None)  # fmt: skip
