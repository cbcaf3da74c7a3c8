"""The body conv_lrelu and conv_transpose_lrelu share: argument checks, layouts, the forward launcher, the
backward, the custom ops' fake implementations, the dispatcher's paths and the public call.

Design notes: docs/kernels.md.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._backend import can_launch, register_op
from ._conv_backward import conv_dgrad, conv_wgrad, wgrad_runs_triton
from ._conv_configs import ConvGeometry
from ._conv_igemm import conv_igemm_forward
from ._conv_shape import as_int, conv_out_size, normalize_padding
from .bias_lrelu import bias_lrelu, lrelu_bias_grads
from .dispatch import backward_impls, conv_path

# dtypes the Triton and cuDNN paths take; anything else (fp64...) runs the reference or is rejected.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
IMPLS = ("triton", "cudnn")  # per-gradient implementations of the backward

__all__ = ["LReluConvOp", "as_int", "conv_out_size", "memory_format_of"]


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
    geom = geometry(x.shape, weight.shape, stride, padding, transposed)
    tri_x = need_x and can_launch(grad_out) and dgrad == "triton"
    # A wgrad no Triton config serves (the 3-channel first layers) shares the aten path's one mask pass.
    tri_w = need_w and can_launch(grad_out) and wgrad == "triton" and wgrad_runs_triton(geom, out.dtype)
    gx = conv_dgrad(grad_out, out, weight, geom, alpha) if tri_x else None
    gw = gb = None
    if tri_w:  # a conv's bias gradient comes out of the wgrad reduction
        gw, gb = conv_wgrad(grad_out, out, x, geom, alpha, need_b and not transposed)
    aten_x, aten_w, pass_b = need_x and not tri_x, need_w and not tri_w, need_b and gb is None
    if aten_x or aten_w or pass_b:
        ax, aw, pb = _mask_pass_grads(grad_out, out, x, weight, alpha, geom, (aten_x, aten_w, pass_b))
        gx, gw, gb = (ax if aten_x else gx), (aw if aten_w else gw), (pb if pass_b else gb)
    # Fixed layouts (x's and weight's memory format), as the fake implementation promises torch.compile.
    return (
        gx.contiguous(memory_format=memory_format_of(x)) if need_x else _nothing(out),
        gw.contiguous(memory_format=memory_format_of(weight)) if need_w else _nothing(out),
        gb.to(weight.dtype) if need_b else _nothing(out),
    )


def _mask_pass_grads(grad_out, out, x, weight, alpha: float, geom: ConvGeometry, need: tuple[bool, ...]):
    """(grad_x, grad_W, grad_b), each where ``need`` asks for it (else None): one Triton pass writes
    grad_pre (and grad_b), then aten.convolution_backward."""
    need_x, need_w, need_b = need
    grad_pre, gb = lrelu_bias_grads(grad_out, out, alpha, need_x or need_w, need_b)
    if not (need_x or need_w):
        return None, None, gb
    s, p = [geom.stride] * 2, [geom.padding] * 2
    mask = [need_x, need_w, False]
    gx, gw, _ = torch.ops.aten.convolution_backward(
        grad_pre, x, weight, None, s, p, [1, 1], geom.transposed, [0, 0], 1, mask
    )
    return gx, gw, gb


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
# One op: custom ops, autograd Function, the dispatcher's paths and the public call

_CALL = "Tensor x, Tensor weight, Tensor? bias, SymInt stride, SymInt padding, float alpha"
_IMPLS = 'str dgrad="triton", str wgrad="triton"'
_FORWARD_SCHEMA = f"({_CALL}, {_IMPLS}) -> Tensor"
_BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor out, Tensor x, Tensor weight, bool has_bias, SymInt stride, SymInt padding, "
    f"float alpha, bool[] output_mask, {_IMPLS}) -> (Tensor, Tensor, Tensor)"
)


class LReluConvOp:
    """conv_lrelu (or conv_transpose_lrelu, when ``transposed``): the PyTorch reference, ``deepsim::<op>``
    and ``deepsim::<op>_backward``, the autograd Function (``function``, named ``function_name``), the
    launchers, the dispatcher's paths (``run``) and the public call (``__call__``).
    The autograd inputs are (x, W, b, stride, padding, alpha, dgrad, wgrad); saved: x, W and out (the
    LReLU slope is read from sign(out); no pre-activation)."""

    def __init__(self, transposed: bool, function_name: str, module: str):
        self.transposed, self.name = transposed, op_name(transposed)
        self.aten = F.conv_transpose2d if transposed else F.conv2d  # the reference's conv, and cuDNN's
        self.backward_op = register_op(
            f"{self.name}_backward",
            self.backward,
            fake=self._backward_fake,
            setup_context=_no_double_backward_setup,
            backward=self._no_double_backward,
            schema=_BACKWARD_SCHEMA,
        )
        self.function = _autograd_function(self, function_name, module)
        self.forward_op = register_op(
            self.name,
            self.function.forward,
            fake=self._forward_fake,
            setup_context=self.function.setup_context,
            backward=self.function.backward,
            schema=_FORWARD_SCHEMA,
        )
        self.run = functools.partial(run_path, op=self)  # the dispatcher's run(path, x, W, b, s, p, alpha)
        self.run.backward_op = self.backward_op  # it times and checks dgrad / wgrad through it

    def reference(self, x, weight, bias=None, stride=1, padding=0, alpha=0.3) -> torch.Tensor:
        """Plain PyTorch: leaky_relu(conv2d(x, weight, bias, stride, padding), alpha), conv_transpose2d for
        the up-conv. The CPU path and the test oracle."""
        return F.leaky_relu(self.aten(x, weight, bias, stride=stride, padding=padding), alpha)

    def forward(self, x, weight, bias, stride: int, padding: int, alpha: float) -> torch.Tensor:
        """Launch the fused kernel: x (N, C_in, H, W), weight (C_out, C_in, KH, KW), or (C_in, C_out, KH,
        KW) for the up-conv -> (N, C_out, OH, OW) (``_conv_shape.conv_out_size``), in x's memory format
        and dtype (weight and bias must have x's dtype).

        Fastest with channels_last x and weight (no copies; see ``_conv_packing``). On CUDA the first call
        of a shape (batch bucketed) times the eligible tile configs (``_conv_configs``): make it before any
        CUDA-graph capture.
        """
        return conv_forward(x, weight, bias, stride, padding, alpha, transposed=self.transposed)

    def backward(
        self,
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
        """(grad_x, grad_weight, grad_bias); an unneeded one (output_mask False) comes back as an empty
        tensor. ``dgrad`` / ``wgrad``: "triton" or "cudnn" (see ``_conv_common.conv_lrelu_grads``)."""
        args = (grad_out, out, x, weight, has_bias, stride, padding, alpha, output_mask)
        return conv_lrelu_grads(*args, transposed=self.transposed, dgrad=dgrad, wgrad=wgrad)

    def _backward_fake(self, grad_out, out, x, weight, has_bias, stride, padding, alpha, output_mask, *impls):
        return conv_lrelu_grads_fake(out, x, weight, has_bias, output_mask, transposed=self.transposed)

    def _no_double_backward(self, ctx, *grads):
        raise RuntimeError(
            f"{self.name}: double backward (a gradient of its gradient) is not implemented on the "
            "Triton path; run with DEEPSIM_KERNELS=reference (or use_backend('reference')) for higher-order "
            "gradients"
        )

    def forward_impl(self, x, weight, bias, stride, padding, alpha) -> torch.Tensor:
        """The forward custom op's body: Triton where it runs, the reference elsewhere."""
        if can_launch(x):
            return self.forward(x, weight, bias, stride, padding, alpha)
        out = self.reference(x, weight, bias, stride, padding, alpha)
        return out.contiguous(memory_format=memory_format_of(x))

    def _forward_fake(self, x, weight, bias, stride, padding, alpha, *impls) -> torch.Tensor:
        geom = geometry(x.shape, weight.shape, stride, padding, self.transposed)
        return empty_conv_output(x, geom.C_out, *geom.out_size)

    def __call__(self, x, weight, bias, stride, padding, alpha) -> torch.Tensor:
        """Check and normalise the arguments of the public op, ask the dispatcher for the path, run it."""
        op = self.name
        check_conv_args(x, weight, bias, float(alpha), op, 0 if self.transposed else 1)
        stride = as_int(stride, "stride")
        if stride < 1:
            raise ValueError(f"{op}: stride={stride} must be >= 1")
        kernel = (int(weight.shape[2]), int(weight.shape[3]))
        padding = normalize_padding(padding, kernel, stride, op, self.transposed)
        alpha = float(alpha)
        path = conv_path(op, x, weight, bias, stride, padding, alpha, self.run)
        if path != "triton":
            return self.run(path, x, weight, bias, stride, padding, alpha)
        dgrad, wgrad = backward_impls(op, x, weight, bias, stride, padding)
        return self.run(path, x, weight, bias, stride, padding, alpha, dgrad=dgrad, wgrad=wgrad)


def _no_double_backward_setup(ctx, inputs, output) -> None:
    pass


def _autograd_function(op: LReluConvOp, name: str, module: str) -> type[torch.autograd.Function]:
    """``op``'s autograd Function, ``<module>.<name>``; the custom op ``deepsim::<op>`` reuses its
    setup_context and backward."""

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(x, weight, bias, stride, padding, alpha, dgrad="triton", wgrad="triton"):
            return op.forward_impl(x, weight, bias, stride, padding, alpha)

        @staticmethod
        def setup_context(ctx, inputs, output):
            x, weight, bias, stride, padding, alpha, dgrad, wgrad = inputs
            ctx.save_for_backward(x, weight, output)
            ctx.conf = (bias is not None, stride, padding, alpha, dgrad, wgrad)

        @staticmethod
        def backward(ctx, grad_out):
            x, weight, out = ctx.saved_tensors
            has_bias, stride, padding, alpha, dgrad, wgrad = ctx.conf
            mask = [bool(m) for m in ctx.needs_input_grad[:3]]
            grads = op.backward_op(
                grad_out, out, x, weight, has_bias, stride, padding, alpha, mask, dgrad, wgrad
            )
            wanted = (mask[0], mask[1], mask[2] and has_bias)
            return (*(g if w else None for g, w in zip(grads, wanted)), None, None, None, None, None)

    Function.__name__ = Function.__qualname__ = name
    Function.__module__ = module
    Function.__doc__ = (
        f"Autograd for the fused ``{op.name}``; the custom op ``deepsim::{op.name}`` reuses its "
        "setup_context and backward. Inputs (x, W, b, stride, padding, alpha, dgrad, wgrad). Saved: x, W "
        "and out. No pre-activation."
    )
    return Function


def run_path(
    path: str, x, weight, bias, stride, padding, alpha, dgrad="triton", wgrad="triton", *, op: LReluConvOp
) -> torch.Tensor:
    """One of the dispatcher's forward paths (kernels/dispatch.py), with autograd: "triton" (the fused
    custom op, whose backward runs ``dgrad`` / ``wgrad``), "cudnn" (aten conv without bias + the Triton
    bias+LReLU epilogue; aten backward) or "reference" (eager)."""
    if path == "reference":
        return op.reference(x, weight, bias, stride, padding, alpha)
    if torch.is_autocast_enabled(x.device.type):  # custom ops skip autocast: cast as F.conv2d would
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{op.name}: dtype {x.dtype} is not supported by the {path} path "
            "(fp32, fp16, bf16); use DEEPSIM_KERNELS=reference"
        )
    weight = weight.to(x.dtype)
    bias = bias.to(x.dtype) if bias is not None else None
    if path == "cudnn":
        return bias_lrelu(op.aten(x, weight, None, stride=stride, padding=padding), bias, alpha)
    return op.forward_op(x, weight, bias, stride, padding, alpha, dgrad, wgrad)
