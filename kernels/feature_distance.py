"""feature_distance: weighted sum of squared feature differences over all comparator taps in one launch.

Design notes: docs/kernels.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._backend import INTERPRET, backend, can_launch, register_autograd_ops, tl, triton
from ._layout import in_layout_of, is_dense

__all__ = [
    "feature_distance",
    "reference_feature_distance",
    "feature_distance_forward",
    "feature_distance_backward",
    "deterministic_sum",
    "FeatureDistanceFunction",
    "MAX_LAYERS",
]

_BLOCK = 1024
_ITERS = 1 if INTERPRET else 8  # elements per program = _BLOCK * _ITERS (fewer, larger programs on GPU)
_SUM_BLOCK = 1024
MAX_LAYERS = 8  # layers per forward launch (kernel argument slots); more layers: successive launches of 8


@triton.jit
def _chunk(layer, pid, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # This program's contribution from one layer = (fake, real, grad, numel, wscale, gscale, block_start):
    # chunk (pid - block_start) of the layer when block_start <= pid < block_start + cdiv(numel, BLOCK *
    # ITERS), else 0 (its loop runs zero times). wscale = w_l / denom, gscale = 2 w_l / denom:
    #   contribution = wscale * sum (f - r)^2          (fp32 accumulation)
    #   grad_f       = gscale * (f - r)                (= d contribution / d f; stored in the fakes' dtype)
    fake_ptr, real_ptr, grad_ptr, numel, wscale, gscale, block_start = layer
    active, start, iters = _owned(pid, numel, block_start, BLOCK, ITERS)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, iters):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        mask = active & (offs < numel)
        f = tl.load(fake_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(real_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = f - r
        acc += d * d
        if COMPUTE_GRAD:
            tl.store(grad_ptr + offs, (d * gscale).to(grad_ptr.dtype.element_ty), mask=mask)
    return tl.sum(acc, axis=0) * wscale


@triton.jit
def _owned(pid, numel, block_start, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # Whether pid owns a chunk of a layer whose chunks are programs [block_start, + cdiv(numel, BLOCK *
    # ITERS)), the chunk's first element, and its iteration count (0 when it owns none).
    local = pid - block_start
    nblocks = (numel + (BLOCK * ITERS - 1)) // (BLOCK * ITERS)
    active = (local >= 0) & (local < nblocks)
    return active, local.to(tl.int64) * (BLOCK * ITERS), tl.where(active, ITERS, 0)


@triton.jit
def _feature_distance_fwd_kernel(
    partial_ptr, layers, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr
):
    # Up to MAX_LAYERS layers in one launch, a tuple of kernel arguments each (no device-side table); layer
    # l owns programs [block_start_l, block_start_l + cdiv(numel_l, BLOCK * ITERS)). Every layer's code is
    # reached by every program, but only the owning layer's loop iterates.
    # partial[pid] = that program's (weighted) partial sum.
    pid = tl.program_id(0)
    acc = _chunk(layers[0], pid, COMPUTE_GRAD, BLOCK, ITERS)
    for l in tl.static_range(1, len(layers)):
        acc += _chunk(layers[l], pid, COMPUTE_GRAD, BLOCK, ITERS)
    tl.store(partial_ptr + pid, acc)


@triton.jit
def _feature_distance_sum_kernel(partial_ptr, out_ptr, n, scale, BLOCK: tl.constexpr):
    # out = scale * sum_p partial[p], one program, fixed order (deterministic; no atomics).
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0) * scale)


@triton.jit
def _scale_chunk(layer, g, pid, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # This program's chunk of one layer = (saved, grad, numel, block_start), when it owns it (else no
    # iteration): grad_fake = saved * g (saved = dL/dfake from the forward, g = dL_total/dL; fp32 multiply)
    saved_ptr, grad_ptr, numel, block_start = layer
    active, start, iters = _owned(pid, numel, block_start, BLOCK, ITERS)
    for i in range(0, iters):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        s = tl.load(saved_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(grad_ptr + offs, (s * g).to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _feature_distance_bwd_kernel(grad_loss_ptr, layers, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # dL_total/dfake_l = (dL/dfake_l, saved by the forward) * dL_total/dL, for up to MAX_LAYERS layers in
    # one launch, laid out as in the forward; every argument is a scalar or a pointer (no device-side
    # table), so the launch is graph-safe.
    pid = tl.program_id(0)
    g = tl.load(grad_loss_ptr).to(tl.float32)
    for l in tl.static_range(len(layers)):
        _scale_chunk(layers[l], g, pid, BLOCK, ITERS)


def deterministic_sum(partials: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """scale * partials.sum() as a 0-dim fp32 tensor, in one Triton program, in a fixed order."""
    out = torch.empty((), device=partials.device, dtype=torch.float32)
    _feature_distance_sum_kernel[(1,)](partials, out, partials.numel(), float(scale), BLOCK=_SUM_BLOCK)
    return out


def _dense_pair(f: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """f and r with one shared dense layout (f's when f is dense), so a flat index means one element."""
    if not (f.is_contiguous() or (f.dim() == 4 and f.is_contiguous(memory_format=torch.channels_last))):
        f = f.contiguous()
    if r.stride() != f.stride():
        r = torch.empty_like(f).copy_(r)
    return f, r


def _groups(n: int):
    """Layer indices in launch groups of up to MAX_LAYERS, in layer order."""
    return (range(g0, min(g0 + MAX_LAYERS, n)) for g0 in range(0, n, MAX_LAYERS))


def feature_distance_forward(
    fakes: Sequence[torch.Tensor],
    reals: Sequence[torch.Tensor],
    weights: Sequence[float],
    denom: float,
    compute_grad: bool,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward launch per group of up to MAX_LAYERS layers (so one launch for <= 8 taps) plus one sum,
    all into one partial-sum buffer in layer order. Returns (loss 0-dim fp32, [dL/dfake_l] in each fake's
    dtype if compute_grad else []). Graph-safe: every kernel argument is a scalar or a tensor pointer, no
    host data is copied to the device."""
    device = fakes[0].device
    pairs = [_dense_pair(f, r) for f, r in zip(fakes, reals)]  # each layer keeps its own dtype
    grads = [torch.empty_like(f) for f, _ in pairs] if compute_grad else []  # pairs keep dense f's strides
    progs = [triton.cdiv(f.numel(), _BLOCK * _ITERS) for f, _ in pairs]
    if sum(progs) == 0:
        return torch.zeros((), device=device, dtype=torch.float32), grads
    partials = torch.empty(sum(progs), device=device, dtype=torch.float32)
    base = 0
    for group in _groups(len(pairs)):
        layers, start = [], 0
        for i in group:
            if progs[i] == 0:  # an empty layer (its storage pointer may be null) takes no part
                continue
            f, r = pairs[i]
            w = weights[i] / denom
            layers.append((f, r, grads[i] if compute_grad else f, f.numel(), w, 2.0 * w, start))
            start += progs[i]
        if start == 0:
            continue
        _feature_distance_fwd_kernel[(start,)](
            partials[base:], tuple(layers), COMPUTE_GRAD=compute_grad, BLOCK=_BLOCK, ITERS=_ITERS
        )
        base += start
    # Non-dense fakes were computed through a contiguous copy: hand back empty_like(fake) layouts.
    return deterministic_sum(partials), [in_layout_of(g, f) for g, f in zip(grads, fakes)]


def feature_distance_backward(saved: Sequence[torch.Tensor], grad_loss: torch.Tensor) -> list[torch.Tensor]:
    """dL_total/dfake_l = saved_l * grad_loss (grad_loss a 0-dim tensor), each in saved_l's dtype and layout.

    One launch for up to MAX_LAYERS layers (so one for <= 8 taps; more: successive launches of 8), laid
    out like the forward; graph-safe (scalar and pointer arguments only, no host table)."""
    if not can_launch(grad_loss):
        return [s * grad_loss.to(s.dtype) for s in saved]
    grad_loss = grad_loss.to(torch.float32)
    grads = [torch.empty_like(s) for s in saved]
    for group in _groups(len(saved)):
        layers, start = [], 0
        for i in group:
            s = saved[i]
            if s.numel() and is_dense(s):  # empty (pointer may be null) or odd layout: below
                layers.append((s, grads[i], s.numel(), start))
                start += triton.cdiv(s.numel(), _BLOCK * _ITERS)
        if start:
            _feature_distance_bwd_kernel[(start,)](grad_loss, tuple(layers), BLOCK=_BLOCK, ITERS=_ITERS)
    for i, s in enumerate(saved):  # the forward saves dense gradients; anything else: a torch multiply
        if s.numel() and not is_dense(s):
            grads[i] = s * grad_loss.to(s.dtype)
    return grads


# ----------------------------------------------------------------------------------------------------------
# torch.library custom op + autograd


def _fwd_impl(fakes, reals, weights, denom, compute_grad):
    if can_launch(fakes[0]):
        return feature_distance_forward(fakes, reals, weights, denom, compute_grad)
    loss = fakes[0].new_zeros((), dtype=torch.float32)
    grads = []
    for f, r, w in zip(fakes, reals, weights):
        d = f.float() - r.float()
        loss = loss + (w / denom) * d.pow(2).sum()
        if compute_grad:
            grads.append((d * (2.0 * w / denom)).to(f.dtype))
    return loss, grads


def _fwd_fake(fakes, reals, weights, denom, compute_grad):
    loss = fakes[0].new_empty((), dtype=torch.float32)
    return loss, ([torch.empty_like(f) for f in fakes] if compute_grad else [])


def _bwd_fake(saved, grad_loss):
    return [torch.empty_like(s) for s in saved]


class FeatureDistanceFunction(torch.autograd.Function):
    """Autograd for ``deepsim::feature_distance``: saves dL/dfake from the forward; backward is one scale."""

    @staticmethod
    def forward(fakes, reals, weights, denom, compute_grad):
        return _fwd_impl(fakes, reals, weights, denom, compute_grad)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, grads = output
        ctx.num_layers = len(inputs[0])
        ctx.save_for_backward(*grads)

    @staticmethod
    def backward(ctx, grad_loss, _grad_grads):
        saved = ctx.saved_tensors
        grads = _backward_op(list(saved), grad_loss) if saved else [None] * ctx.num_layers
        return grads, [None] * ctx.num_layers, None, None, None


_forward_op, _backward_op = register_autograd_ops(
    "feature_distance",
    _fwd_impl,
    _fwd_fake,
    feature_distance_backward,
    _bwd_fake,
    FeatureDistanceFunction,
    schemas=(
        "(Tensor[] fakes, Tensor[] reals, float[] weights, float denom, bool compute_grad)"
        " -> (Tensor, Tensor[])",
        "(Tensor[] saved, Tensor grad_loss) -> Tensor[]",
    ),
)


# ----------------------------------------------------------------------------------------------------------
# Public API


def _check(fakes, reals, weights, reduction):
    if len(fakes) == 0 or len(fakes) != len(reals):
        raise ValueError(f"feature_distance: got {len(fakes)} fakes and {len(reals)} reals; need equal, >= 1")
    for i, (f, r) in enumerate(zip(fakes, reals)):
        if f.shape != r.shape:
            raise ValueError(f"feature_distance: fakes[{i}] {tuple(f.shape)} != reals[{i}] {tuple(r.shape)}")
    if weights is not None and len(weights) != len(fakes):
        raise ValueError(f"feature_distance: {len(weights)} weights for {len(fakes)} layers")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"feature_distance: reduction={reduction!r}, expected 'sum' or 'mean'")


def reference_feature_distance(fakes, reals, weights=None, reduction="sum"):
    """sum_l w_l * sum((fake_l - real_l)^2); reduction "mean" divides by the batch size fakes[0].shape[0].

    Plain PyTorch, fp32 accumulation (fp64 for fp64 inputs): the CPU path and the test oracle. Reals are
    detached.
    """
    fakes, reals = list(fakes), list(reals)
    _check(fakes, reals, weights, reduction)
    acc = torch.float64 if fakes[0].dtype == torch.float64 else torch.float32  # float64 for gradcheck
    total = fakes[0].new_zeros((), dtype=acc)
    for i, (f, r) in enumerate(zip(fakes, reals)):
        w = 1.0 if weights is None else float(weights[i])
        total = total + w * (f.to(acc) - r.detach().to(acc)).pow(2).sum()
    if reduction == "mean":
        total = total / fakes[0].shape[0]
    return total


def feature_distance(fakes, reals, weights=None, reduction="sum"):
    """Weighted squared feature distance over all comparator taps: one kernel launch for up to 8 taps (then
    one per further 8) plus one fixed-order sum; deterministic and CUDA-graph safe.

    Args:
        fakes: sequence of tensors (any shapes) from the generated images; gradients flow to these.
        reals: same shapes; no gradient (detached).
        weights: one float per layer (default 1.0 each).
        reduction: "sum", or "mean" to divide by the batch size ``fakes[0].shape[0]``.
    Returns:
        0-dim fp32 tensor. Inputs fp32/fp16/bf16 (each layer in its own dtype), fp32 accumulation.
    The Triton path computes dL/dfake in the forward pass and saves it (one activation-sized buffer per
    layer, in the fakes' dtype) when grad mode is on and any fake requires grad.
    """
    fakes, reals = list(fakes), list(reals)
    _check(fakes, reals, weights, reduction)
    if backend(fakes[0]) == "reference":
        return reference_feature_distance(fakes, reals, weights, reduction)
    w = [1.0] * len(fakes) if weights is None else [float(v) for v in weights]
    denom = float(fakes[0].shape[0]) if reduction == "mean" else 1.0
    compute_grad = torch.is_grad_enabled() and any(f.requires_grad for f in fakes)
    loss, _ = _forward_op(fakes, [r.detach() for r in reals], w, denom, compute_grad)
    return loss
