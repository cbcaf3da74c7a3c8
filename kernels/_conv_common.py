"""The body conv_lrelu and conv_transpose_lrelu share: argument checks, layouts, the forward launcher, the
backward, the custom ops' fake implementations, the dispatcher's paths and the public call.

Design notes: docs/kernels.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ._backend import HAS_TRITON, INTERPRET, register_op
from ._conv_backward import conv_dgrad, conv_wgrad
from ._conv_configs import ConvGeometry
from ._conv_igemm import conv_igemm_forward
from ._conv_shape import as_int, conv_out_size, normalize_padding
from .bias_lrelu import bias_lrelu, lrelu_bias_grads
from .dispatch import backward_impls, conv_path

# dtypes the Triton and cuDNN paths take; anything else (fp64...) runs the reference or is rejected.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
IMPLS = ("triton", "cudnn")  # per-gradient implementations of the backward

__all__ = ["as_int", "conv_out_size", "memory_format_of"]


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


def use_triton_impl(t: torch.Tensor) -> bool:
    """Inside the custom ops: Triton where it can run (CUDA, or CPU under TRITON_INTERPRET=1)."""
    return HAS_TRITON and (t.is_cuda or INTERPRET)


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


def geometry(x_shape, w_shape, stride: int, padding: int, transposed: bool) -> ConvGeometry:
    """The forward problem of a call: x (N, C_in, H, W), weight in the op's layout."""
    n, c_in, h, w = (int(v) for v in x_shape)
    c_out = int(w_shape[1] if transposed else w_shape[0])
    return ConvGeometry(transposed, n, c_in, h, w, c_out, int(w_shape[2]), int(w_shape[3]), stride, padding)


def op_name(transposed: bool) -> str:
    return "conv_transpose_lrelu" if transposed else "conv_lrelu"


# ----------------------------------------------------------------------------------------------------------
# Forward


def conv_forward(
    x, weight, bias, stride: int, padding: int, alpha: float, *, transposed: bool
) -> torch.Tensor:
    """Launch the fused forward kernel: (N, C_out, OH, OW) in x's memory format and dtype (weight and
    bias must have x's dtype). See ``conv_lrelu_forward`` / ``conv_transpose_lrelu_forward``."""
    geom = geometry(x.shape, weight.shape, stride, padding, transposed)
    oh, ow = geom.out_size
    if oh <= 0 or ow <= 0:
        raise ValueError(
            f"{op_name(transposed)}: input {geom.H}x{geom.W} with kernel {geom.KH}x{geom.KW}, "
            f"stride {stride}, padding {padding} leaves no output"
        )
    out = empty_conv_output(x, geom.C_out, oh, ow)
    if out.numel() == 0:
        return out
    return conv_igemm_forward(x, weight, bias, geom, alpha, out)


def forward_impl(x, weight, bias, stride, padding, alpha, *, transposed: bool, reference: Callable):
    """The forward custom op's body: Triton where it runs, the reference elsewhere."""
    if use_triton_impl(x):
        return conv_forward(x, weight, bias, stride, padding, alpha, transposed=transposed)
    out = reference(x, weight, bias, stride, padding, alpha)
    return out.contiguous(memory_format=memory_format_of(x))


def forward_fake(x, weight, stride, padding, *, transposed: bool) -> torch.Tensor:
    geom = geometry(x.shape, weight.shape, stride, padding, transposed)
    return empty_conv_output(x, geom.C_out, *geom.out_size)


# ----------------------------------------------------------------------------------------------------------
# Backward


def _nothing(like: torch.Tensor) -> torch.Tensor:
    """A fresh empty tensor for a gradient nobody asked for (one per slot: outputs may not alias)."""
    return like.new_empty(0)


def conv_lrelu_grads(
    grad_out,
    out,
    x,
    weight,
    has_bias: bool,
    stride: int,
    padding: int,
    alpha: float,
    output_mask: list[bool],
    *,
    transposed: bool,
    dgrad: str = "cudnn",
    wgrad: str = "cudnn",
):
    """(grad_x, grad_weight, grad_bias) of lrelu(conv(x, W) + b), or of conv_transpose when ``transposed``;
    an unneeded one (output_mask False, or no bias) comes back as a fresh empty tensor.

    ``dgrad`` / ``wgrad`` ("triton" | "cudnn") pick the implementation of grad_x / grad_W (and grad_b with
    it): "triton" applies the LReLU mask as grad_out is loaded (kernels/_conv_backward.py); "cudnn" runs one
    Triton pass for grad_pre (and grad_b) and then aten.convolution_backward. Where Triton cannot run,
    both are the aten path (with the PyTorch reference of the mask pass).
    """

    need_x, need_w = bool(output_mask[0]), bool(output_mask[1])
    need_b = bool(output_mask[2]) and has_bias
    triton_ok = use_triton_impl(grad_out)
    tri_x = need_x and triton_ok and dgrad == "triton"
    tri_w = need_w and triton_ok and wgrad == "triton"
    geom = geometry(x.shape, weight.shape, stride, padding, transposed)
    gx = gw = gb = None
    if tri_x:
        gx = conv_dgrad(grad_out, out, weight, geom, alpha)
    if tri_w:  # a conv's bias gradient comes out of the wgrad reduction
        gw, gb = conv_wgrad(grad_out, out, x, geom, alpha, need_b and not transposed)
    aten_x, aten_w = need_x and not tri_x, need_w and not tri_w
    need_b_pass = need_b and gb is None
    if aten_x or aten_w or need_b_pass:
        grad_pre, gb_pass = lrelu_bias_grads(grad_out, out, alpha, aten_x or aten_w, need_b_pass)
        gb = gb_pass if need_b_pass else gb
        if aten_x or aten_w:
            ax, aw, _ = torch.ops.aten.convolution_backward(
                grad_pre,
                x,
                weight,
                None,
                [stride] * 2,
                [padding] * 2,
                [1, 1],
                transposed,
                [0, 0],
                1,
                [aten_x, aten_w, False],
            )
            gx = ax if aten_x else gx
            gw = aw if aten_w else gw
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
# padding, alpha, dgrad, wgrad). Saved for backward: x (for grad_W), W (for grad_x) and out (the slope).


def save_for_lrelu_backward(ctx, inputs, output) -> None:
    x, weight, bias, stride, padding, alpha, dgrad, wgrad = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.conf = (bias is not None, stride, padding, alpha, dgrad, wgrad)


def lrelu_conv_backward(ctx, grad_out, backward_op):
    """Gradients for (x, W, b, stride, padding, alpha, dgrad, wgrad) through the registered
    ``backward_op``."""
    x, weight, out = ctx.saved_tensors
    has_bias, stride, padding, alpha, dgrad, wgrad = ctx.conf
    mask = [bool(m) for m in ctx.needs_input_grad[:3]]
    gx, gw, gb = backward_op(grad_out, out, x, weight, has_bias, stride, padding, alpha, mask, dgrad, wgrad)
    return (
        gx if mask[0] else None,
        gw if mask[1] else None,
        gb if mask[2] and has_bias else None,
        None,
        None,
        None,
        None,
        None,
    )


def _no_double_backward(op: str):
    """(setup_context, backward) for a backward op: differentiating it again is an error naming the op."""

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(
            f"{op}: double backward (a gradient of its gradient) is not implemented on the Triton path; "
            "run with DEEPSIM_KERNELS=reference (or use_backend('reference')) for higher-order gradients"
        )

    return setup_context, backward


def register_backward_op(transposed: bool):
    """``deepsim::<op>_backward``: (grad_out, out, x, W, has_bias, stride, padding, alpha, output_mask,
    dgrad, wgrad) -> (grad_x, grad_W, grad_b); differentiating it raises a clear error."""
    op = op_name(transposed)

    def impl(
        grad_out: torch.Tensor,
        out: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        has_bias: bool,
        stride: int,
        padding: int,
        alpha: float,
        output_mask: list[bool],
        dgrad: str = "triton",
        wgrad: str = "triton",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
            transposed=transposed,
            dgrad=dgrad,
            wgrad=wgrad,
        )

    def fake(
        grad_out,
        out,
        x,
        weight,
        has_bias,
        stride,
        padding,
        alpha,
        output_mask,
        dgrad="triton",
        wgrad="triton",
    ):
        return conv_lrelu_grads_fake(out, x, weight, has_bias, output_mask, transposed=transposed)

    setup_context, backward = _no_double_backward(op)
    return register_op(f"{op}_backward", impl, fake=fake, setup_context=setup_context, backward=backward)


def register_forward_op(transposed: bool, reference: Callable, function: type):
    """``deepsim::<op>``: (x, W, b, stride, padding, alpha, dgrad, wgrad) -> out, with ``function``'s
    setup_context and backward (``dgrad`` / ``wgrad`` name the backward's implementations)."""

    def impl(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: int,
        padding: int,
        alpha: float,
        dgrad: str = "triton",
        wgrad: str = "triton",
    ) -> torch.Tensor:
        return forward_impl(
            x, weight, bias, stride, padding, alpha, transposed=transposed, reference=reference
        )

    def fake(x, weight, bias, stride, padding, alpha, dgrad="triton", wgrad="triton"):
        return forward_fake(x, weight, stride, padding, transposed=transposed)

    return register_op(
        op_name(transposed), impl, fake=fake, setup_context=function.setup_context, backward=function.backward
    )


# ----------------------------------------------------------------------------------------------------------
# The dispatcher's paths and the public call


def run_path(
    path: str,
    x,
    weight,
    bias,
    stride: int,
    padding: int,
    alpha: float,
    *,
    transposed: bool,
    reference: Callable,
    fused_op,
    dgrad: str = "triton",
    wgrad: str = "triton",
) -> torch.Tensor:
    """One of the dispatcher's forward paths (kernels/dispatch.py), with autograd: "triton" (the fused
    custom op, whose backward runs ``dgrad`` / ``wgrad``), "cudnn" (aten conv without bias + the Triton
    bias+LReLU epilogue; aten backward) or "reference" (eager)."""
    if path == "reference":
        return reference(x, weight, bias, stride, padding, alpha)
    if torch.is_autocast_enabled(x.device.type):  # custom ops skip autocast: cast as F.conv2d would
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{op_name(transposed)}: dtype {x.dtype} is not supported by the {path} path "
            "(fp32, fp16, bf16); use DEEPSIM_KERNELS=reference"
        )
    weight = weight.to(x.dtype)
    bias = bias.to(x.dtype) if bias is not None else None
    if path == "cudnn":
        aten = F.conv_transpose2d if transposed else F.conv2d
        return bias_lrelu(aten(x, weight, None, stride=stride, padding=padding), bias, alpha)
    return fused_op(x, weight, bias, stride, padding, alpha, dgrad, wgrad)


def public_call(x, weight, bias, stride, padding, alpha, *, transposed: bool, run: Callable) -> torch.Tensor:
    """Check and normalise the arguments of a public conv op, ask the dispatcher for the path, run it."""

    op = op_name(transposed)
    check_conv_args(x, weight, bias, float(alpha), op, 0 if transposed else 1)
    stride = as_int(stride, "stride")
    if stride < 1:
        raise ValueError(f"{op}: stride={stride} must be >= 1")
    padding = normalize_padding(padding, (int(weight.shape[2]), int(weight.shape[3])), stride, op, transposed)
    alpha = float(alpha)
    path = conv_path(op, x, weight, bias, stride, padding, alpha, run)
    if path != "triton":
        return run(path, x, weight, bias, stride, padding, alpha)
    dgrad, wgrad = backward_impls(op, x, weight, bias, stride, padding)
    return run(path, x, weight, bias, stride, padding, alpha, dgrad=dgrad, wgrad=wgrad)
