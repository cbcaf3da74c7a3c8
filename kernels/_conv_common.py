"""What conv_lrelu and conv_transpose_lrelu share: argument checks, layouts, the backward, the fake
implementations' shapes and the autograd plumbing.

Both ops save only (x, W, out) and differentiate the same way; they differ in the forward kernel and in
the ``transposed`` flag handed to ``aten.convolution_backward`` (which also says where C_in / C_out sit in
the weight: (C_out, C_in, KH, KW) for a convolution, (C_in, C_out, KH, KW) for a transposed one):
    grad_pre = grad_out * (1 if out > 0 else alpha)   } one Triton pass, deterministic (fixed-order
    grad_b   = sum_{n,h,w} grad_pre                   } partial channel sums, no atomics): lrelu_bias_grads
    grad_x, grad_W = aten.convolution_backward(grad_pre, x, W, transposed)    (cuDNN on CUDA, not Triton)

Why dgrad/wgrad are cuDNN's and not Triton implicit GEMMs that apply the LReLU mask as they load grad_out
(which would never write grad_pre): no GPU has measured either yet, cuDNN's dgrad/wgrad are tuned per
shape for Hopper, and a Triton wgrad needs a split reduction over N*OH*OW (up to 65536 rows here) to be
deterministic without atomics. What the Triton pass saves is real and device-independent: the separate
bias reduction (one full read of grad_pre) is gone, and a gradient nobody asked for is never computed.
An unneeded gradient (output_mask False) comes back as a fresh empty tensor, a distinct one per slot: a
custom op's outputs may not alias each other (torch.library checks it, eager and fake alike).
"""

from __future__ import annotations

import torch

from ._backend import HAS_TRITON, INTERPRET
from ._conv_igemm import input_precision as _igemm_input_precision
from .bias_lrelu import lrelu_bias_grads

# Autotune key of both forward kernels (their argument names).
AUTOTUNE_KEY = ["N", "C_in", "H", "W", "C_out", "OH", "OW", "KH", "KW", "STRIDE", "PAD"]


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


def _nothing(like: torch.Tensor) -> torch.Tensor:
    """A fresh empty tensor for a gradient nobody asked for (one per slot: outputs may not alias)."""
    return like.new_empty(0)


def conv_lrelu_grads(grad_out, out, x, weight, has_bias: bool, stride: int, padding: int, alpha: float,
                     output_mask: list[bool], *, transposed: bool):  # fmt: skip
    """(grad_x, grad_weight, grad_bias) of lrelu(conv(x, W) + b), or of conv_transpose when ``transposed``;
    an unneeded one (output_mask False, or no bias) comes back as a fresh empty tensor.

    One Triton pass for grad_pre and grad_b (``lrelu_bias_grads``), then aten.convolution_backward for
    the ones of grad_x, grad_W that are needed (skipped when neither is).
    """
    need_x, need_w = bool(output_mask[0]), bool(output_mask[1])
    need_b = bool(output_mask[2]) and has_bias
    grad_pre, gb = lrelu_bias_grads(grad_out, out, alpha, need_x or need_w, need_b)
    gx = gw = None
    if need_x or need_w:
        gx, gw, _ = torch.ops.aten.convolution_backward(
            grad_pre, x, weight, None, [stride] * 2, [padding] * 2, [1, 1], transposed, [0, 0], 1,
            [need_x, need_w, False],
        )  # fmt: skip
    # Fixed layouts (x's and weight's memory format), as the fake implementation promises torch.compile.
    return (
        gx.contiguous(memory_format=memory_format_of(x)) if need_x else _nothing(out),
        gw.contiguous(memory_format=memory_format_of(weight)) if need_w else _nothing(out),
        gb.to(weight.dtype) if need_b else _nothing(out),
    )


def _empty_in_layout_of(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=memory_format_of(t))


def conv_lrelu_grads_fake(out, x, weight, has_bias: bool, output_mask: list[bool], *, transposed: bool):
    """Fake (shape, dtype, layout only) result of ``conv_lrelu_grads``, for torch.compile."""
    c_out = weight.shape[1 if transposed else 0]
    return (
        _empty_in_layout_of(x) if output_mask[0] else _nothing(out),
        _empty_in_layout_of(weight) if output_mask[1] else _nothing(out),
        weight.new_empty(c_out) if has_bias and output_mask[2] else _nothing(out),
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
