"""lpips_distance: the LPIPS distance of feature taps, per image, all taps in one launch.

Design notes: docs/kernels.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._backend import backend, can_launch, register_autograd_ops, tl, triton
from ._layout import in_layout_of, is_dense

__all__ = [
    "lpips_distance",
    "reference_lpips_distance",
    "lpips_distance_forward",
    "lpips_distance_backward",
    "LpipsDistanceFunction",
    "MAX_TAPS",
    "DEFAULT_EPS",
]

MAX_TAPS = 5  # taps per launch (LPIPS' AlexNet and VGG both have 5); more taps: successive launches
DEFAULT_EPS = 1e-10  # lpips' eps, here inside the square root as eps^2
_BLOCK_C = 32
_BLOCK_P = 64


@triton.jit
def _tile(f_ptr, base, offs_c, C, pofs, pmask, sc):
    # (BLOCK_C, BLOCK_P) tile of one image's features, fp32; zero outside (C, P).
    m = (offs_c < C)[:, None] & pmask[None, :]
    return tl.load(f_ptr + base + offs_c.to(tl.int64)[:, None] * sc + pofs[None, :], mask=m, other=0.0).to(
        tl.float32
    )


@triton.jit
def _position_block(pid, geo, BLOCK_P: tl.constexpr):
    # The (image b, position block j) of a tap that program pid owns, geo = (C, P, sb, sc, sp, nblk, ntiles,
    # start): tap programs [start, start + ntiles). cc = C when it owns one, else 0 (its channel loops then
    # run no iteration); base = b's offset, pofs / pmask the block's position offsets and mask.
    C, P, sb, sc, sp, nblk, ntiles, start = geo
    local = pid - start
    active = (local >= 0) & (local < ntiles)
    local = tl.where(active, local, 0)
    b = local // nblk
    j = local - b * nblk
    offs_p = j * BLOCK_P + tl.arange(0, BLOCK_P)
    return active, b, j, tl.where(active, C, 0), b.to(tl.int64) * sb, offs_p.to(tl.int64) * sp, offs_p < P


@triton.jit
def _norms(f0_ptr, f1_ptr, base, cc, C, pofs, pmask, sc, eps2, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    # r = 1 / sqrt(sum_c f_c^2 + eps^2) for both sides, per position.
    s0 = tl.zeros((BLOCK_P,), dtype=tl.float32)
    s1 = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for c0 in range(0, cc, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        x0 = _tile(f0_ptr, base, offs_c, C, pofs, pmask, sc)
        x1 = _tile(f1_ptr, base, offs_c, C, pofs, pmask, sc)
        s0 += tl.sum(x0 * x0, axis=0)
        s1 += tl.sum(x1 * x1, axis=0)
    return 1.0 / tl.sqrt(s0 + eps2), 1.0 / tl.sqrt(s1 + eps2)


@triton.jit
def _fwd_tap(partial_ptr, ncols, pid, eps2, tap, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    # partial[b, col + j] = 1/P * sum_{p in block j} sum_c w_c (n0_c - n1_c)^2, when this tap owns pid.
    f0_ptr, f1_ptr, w_ptr, geo, col, inv_p = tap
    C, sc = geo[0], geo[3]
    active, b, j, cc, base, pofs, pmask = _position_block(pid, geo, BLOCK_P)
    r0, r1 = _norms(f0_ptr, f1_ptr, base, cc, C, pofs, pmask, sc, eps2, BLOCK_C, BLOCK_P)
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for c0 in range(0, cc, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        w = tl.load(w_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)
        d = (
            _tile(f0_ptr, base, offs_c, C, pofs, pmask, sc) * r0[None, :]
            - _tile(f1_ptr, base, offs_c, C, pofs, pmask, sc) * r1[None, :]
        )
        acc += tl.sum(w[:, None] * d * d, axis=0)
    tl.store(partial_ptr + b.to(tl.int64) * ncols + col + j, tl.sum(acc, axis=0) * inv_p, mask=active)


@triton.jit
def _lpips_fwd_kernel(partial_ptr, ncols, eps2, taps, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    # taps[l] = (f0, f1, w, geo, col, 1/P): tap l owns programs [start_l, start_l + B * nblk_l) (geo, see
    # _position_block) and writes partial[:, col_l:col_l + nblk_l].
    pid = tl.program_id(0)
    for l in tl.static_range(len(taps)):
        _fwd_tap(partial_ptr, ncols, pid, eps2, taps[l], BLOCK_C, BLOCK_P)


@triton.jit
def _normalized(f0_ptr, f1_ptr, w_ptr, base, offs_c, C, pofs, pmask, sc, r0, r1):
    # n0, n1 and g = 2 w (n0 - n1) on one (BLOCK_C, BLOCK_P) tile.
    w = tl.load(w_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)
    n0 = _tile(f0_ptr, base, offs_c, C, pofs, pmask, sc) * r0[None, :]
    n1 = _tile(f1_ptr, base, offs_c, C, pofs, pmask, sc) * r1[None, :]
    return n0, n1, 2.0 * w[:, None] * (n0 - n1)


@triton.jit
def _bwd_tap(
    gout_ptr,
    pid,
    eps2,
    tap,
    NEED0: tl.constexpr,
    NEED1: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # grad0 = s r0 (g - n0 <g, n0>), grad1 = s r1 (n1 <g, n1> - g), g = 2 w (n0 - n1), s = gout[b] / P.
    f0_ptr, f1_ptr, g0_ptr, g1_ptr, w_ptr, geo, inv_p = tap
    C, sc = geo[0], geo[3]
    active, b, j, cc, base, pofs, pmask = _position_block(pid, geo, BLOCK_P)
    r0, r1 = _norms(f0_ptr, f1_ptr, base, cc, C, pofs, pmask, sc, eps2, BLOCK_C, BLOCK_P)
    dot0 = tl.zeros((BLOCK_P,), dtype=tl.float32)
    dot1 = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for c0 in range(0, cc, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        n0, n1, g = _normalized(f0_ptr, f1_ptr, w_ptr, base, offs_c, C, pofs, pmask, sc, r0, r1)
        dot0 += tl.sum(g * n0, axis=0)
        dot1 += tl.sum(g * n1, axis=0)
    s = tl.load(gout_ptr + b).to(tl.float32) * inv_p
    for c0 in range(0, cc, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        n0, n1, g = _normalized(f0_ptr, f1_ptr, w_ptr, base, offs_c, C, pofs, pmask, sc, r0, r1)
        m = (offs_c < C)[:, None] & pmask[None, :]
        offs = base + offs_c.to(tl.int64)[:, None] * sc + pofs[None, :]
        if NEED0:
            grad0 = (s * r0)[None, :] * (g - n0 * dot0[None, :])
            tl.store(g0_ptr + offs, grad0.to(g0_ptr.dtype.element_ty), mask=m)
        if NEED1:
            grad1 = (s * r1)[None, :] * (n1 * dot1[None, :] - g)
            tl.store(g1_ptr + offs, grad1.to(g1_ptr.dtype.element_ty), mask=m)


@triton.jit
def _lpips_bwd_kernel(
    gout_ptr,
    eps2,
    taps,
    NEED0: tl.constexpr,
    NEED1: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # taps[l] = (f0, f1, grad0, grad1, w, geo, 1/P), laid out as the forward.
    pid = tl.program_id(0)
    for l in tl.static_range(len(taps)):
        _bwd_tap(gout_ptr, pid, eps2, taps[l], NEED0, NEED1, BLOCK_C, BLOCK_P)


# ----------------------------------------------------------------------------------------------------------
# Host launchers


def _as_maps(f0: torch.Tensor, f1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """f0, f1 as (B, C, H, W) with one shared layout whose H and W flatten to one position stride (NCHW or
    channels_last; anything else is made contiguous). 2-D (B, C) taps are 1x1 maps."""
    if f0.dim() == 2:
        f0, f1 = f0[:, :, None, None], f1[:, :, None, None]
    _, _, _, w = f0.shape
    if f0.stride(2) != w * f0.stride(3) or not is_dense(f0):
        f0 = f0.contiguous()
    if f1.stride() != f0.stride():
        f1 = torch.empty_like(f0).copy_(f1)
    return f0, f1


def _launches(maps):
    """Per launch (a group of up to MAX_TAPS taps): its program count and, for each of its taps that owns
    programs, (tap index, geo); geo = (C, P, strides, nblk, ntiles, first program), see _position_block."""
    for g0 in range(0, len(maps), MAX_TAPS):
        taps, start = [], 0
        for i in range(g0, min(g0 + MAX_TAPS, len(maps))):
            f = maps[i][0]
            b, c, h, w = f.shape
            nblk = triton.cdiv(h * w, _BLOCK_P)
            ntiles = b * nblk if c and h * w else 0
            if ntiles:
                taps.append((i, (c, h * w, f.stride(0), f.stride(1), f.stride(3), nblk, ntiles, start)))
            start += ntiles
        if start:
            yield start, taps


def lpips_distance_forward(
    f0s: Sequence[torch.Tensor], f1s: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], eps: float
) -> torch.Tensor:
    """D (B,) fp32 in one launch per group of up to MAX_TAPS taps, plus one fixed-order row sum."""
    maps = [_as_maps(a, b) for a, b in zip(f0s, f1s)]
    device = maps[0][0].device
    cols = [0]  # tap l's partial sums: columns cols[l]:cols[l + 1], one per position block
    for a, _ in maps:
        cols.append(cols[-1] + triton.cdiv(a.shape[2] * a.shape[3], _BLOCK_P))
    partial = torch.zeros(maps[0][0].shape[0], max(cols[-1], 1), device=device, dtype=torch.float32)
    for programs, taps in _launches(maps):
        args = tuple(
            (
                *maps[i],
                weights[i].to(device=device, dtype=torch.float32).contiguous(),
                geo,
                cols[i],
                1.0 / geo[1],
            )
            for i, geo in taps
        )
        _lpips_fwd_kernel[(programs,)](
            partial, partial.shape[1], float(eps) ** 2, args, BLOCK_C=_BLOCK_C, BLOCK_P=_BLOCK_P
        )
    return partial.sum(1)


def lpips_distance_backward(
    f0s: Sequence[torch.Tensor],
    f1s: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    grad_out: torch.Tensor,
    eps: float,
    need0: bool,
    need1: bool,
) -> list[torch.Tensor]:
    """dD/df0 (if need0) then dD/df1 (if need1), each tap's gradient in its feature's dtype and shape, scaled
    per image by grad_out (B,); one launch per group of up to MAX_TAPS taps."""
    maps = [_as_maps(a, b) for a, b in zip(f0s, f1s)]
    device = maps[0][0].device
    gout = grad_out.to(device=device, dtype=torch.float32).contiguous()
    grads0 = [torch.empty_like(a) for a, _ in maps] if need0 else []
    grads1 = [torch.empty_like(a) for a, _ in maps] if need1 else []
    for programs, taps in _launches(maps):
        args = []
        for i, geo in taps:
            a, b = maps[i]
            w = weights[i].to(device=device, dtype=torch.float32).contiguous()
            args.append((a, b, grads0[i] if need0 else a, grads1[i] if need1 else a, w, geo, 1.0 / geo[1]))
        _lpips_bwd_kernel[(programs,)](
            gout, float(eps) ** 2, tuple(args), NEED0=need0, NEED1=need1, BLOCK_C=_BLOCK_C, BLOCK_P=_BLOCK_P
        )
    return [
        in_layout_of(g.reshape(f.shape) if f.dim() == 2 else g, f)
        for grads, feats in ((grads0, f0s), (grads1, f1s))
        for g, f in zip(grads, feats)
    ]


# ----------------------------------------------------------------------------------------------------------
# Reference, torch.library custom op + autograd


def reference_lpips_distance(f0s, f1s, weights, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """D (B,) by the formula above in plain PyTorch (fp32; fp64 for fp64 inputs), differentiable on both
    sides: the CPU path and the test oracle. Taps (B, C, H, W) or (B, C); weights (C,) per tap."""
    f0s, f1s, weights = list(f0s), list(f1s), list(weights)
    _check(f0s, f1s, weights)
    acc = torch.float64 if f0s[0].dtype == torch.float64 else torch.float32
    total = f0s[0].new_zeros(f0s[0].shape[0], dtype=acc)
    for a, b, w in zip(f0s, f1s, weights):
        a, b = a.to(acc), b.to(acc)
        if a.dim() == 2:
            a, b = a[:, :, None, None], b[:, :, None, None]
        n0 = a * torch.rsqrt(a.pow(2).sum(1, keepdim=True) + eps * eps)
        n1 = b * torch.rsqrt(b.pow(2).sum(1, keepdim=True) + eps * eps)
        d = (n0 - n1).pow(2) * w.to(device=a.device, dtype=acc).view(1, -1, 1, 1)
        total = total + d.sum(1).mean((1, 2))
    return total


def _fwd_impl(f0s, f1s, weights, eps):
    if can_launch(f0s[0]):
        return lpips_distance_forward(f0s, f1s, weights, eps)
    with torch.no_grad():
        return reference_lpips_distance(f0s, f1s, weights, eps).float()


def _fwd_fake(f0s, f1s, weights, eps):
    return f0s[0].new_empty((f0s[0].shape[0],), dtype=torch.float32)


def _bwd_impl(f0s, f1s, weights, grad_out, eps, need0, need1):
    if can_launch(f0s[0]):
        return lpips_distance_backward(f0s, f1s, weights, grad_out, eps, need0, need1)
    with torch.enable_grad():
        a = [f.detach().requires_grad_(need0) for f in f0s]
        b = [f.detach().requires_grad_(need1) for f in f1s]
        d = reference_lpips_distance(a, b, weights, eps)
        wanted = (a if need0 else []) + (b if need1 else [])
        grads = torch.autograd.grad(d, wanted, grad_out.to(d.dtype))
    return [g.to(f.dtype) for g, f in zip(grads, wanted)]


def _bwd_fake(f0s, f1s, weights, grad_out, eps, need0, need1):
    return [torch.empty_like(f) for f in (f0s if need0 else [])] + [
        torch.empty_like(f) for f in (f1s if need1 else [])
    ]


class LpipsDistanceFunction(torch.autograd.Function):
    """Autograd for ``deepsim::lpips_distance``: saves the features; backward is one recomputing launch."""

    @staticmethod
    def forward(f0s, f1s, weights, eps):
        return _fwd_impl(f0s, f1s, weights, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        f0s, f1s, weights, eps = inputs
        ctx.n, ctx.eps = len(f0s), eps
        ctx.need0 = any(f.requires_grad for f in f0s)
        ctx.need1 = any(f.requires_grad for f in f1s)
        ctx.save_for_backward(*f0s, *f1s, *weights)

    @staticmethod
    def backward(ctx, grad_out):
        saved, n = ctx.saved_tensors, ctx.n
        f0s, f1s, weights = list(saved[:n]), list(saved[n : 2 * n]), list(saved[2 * n :])
        none = [None] * n
        if not (ctx.need0 or ctx.need1):
            return none, none, none, None
        grads = _backward_op(f0s, f1s, weights, grad_out, ctx.eps, ctx.need0, ctx.need1)
        g0 = list(grads[:n]) if ctx.need0 else none
        g1 = list(grads[n:] if ctx.need0 else grads) if ctx.need1 else none
        return g0, g1, none, None


_TAPS = "Tensor[] f0s, Tensor[] f1s, Tensor[] weights"
_forward_op, _backward_op = register_autograd_ops(
    "lpips_distance",
    _fwd_impl,
    _fwd_fake,
    _bwd_impl,
    _bwd_fake,
    LpipsDistanceFunction,
    schemas=(
        f"({_TAPS}, float eps) -> Tensor",
        f"({_TAPS}, Tensor grad_out, float eps, bool need0, bool need1) -> Tensor[]",
    ),
)


# ----------------------------------------------------------------------------------------------------------
# Public API


def _check(f0s, f1s, weights):
    if len(f0s) == 0 or len(f0s) != len(f1s) or len(weights) != len(f0s):
        raise ValueError(
            f"lpips_distance: got {len(f0s)} f0s, {len(f1s)} f1s and {len(weights)} weights; need equal, >= 1"
        )
    for i, (a, b, w) in enumerate(zip(f0s, f1s, weights)):
        if a.shape != b.shape:
            raise ValueError(f"lpips_distance: f0s[{i}] {tuple(a.shape)} != f1s[{i}] {tuple(b.shape)}")
        if a.dim() not in (2, 4) or a.shape[0] != f0s[0].shape[0]:
            raise ValueError(
                f"lpips_distance: f0s[{i}] {tuple(a.shape)}: expected (B, C, H, W) or (B, C), one B"
            )
        if w.numel() != a.shape[1]:
            raise ValueError(f"lpips_distance: weights[{i}] has {w.numel()} values for {a.shape[1]} channels")


def lpips_distance(f0s, f1s, weights, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """The LPIPS distance of two lists of feature taps, per image (formula in this module's docstring).

    Args:
        f0s, f1s: taps (B, C_l, H_l, W_l) (or (B, C_l)), fp32/fp16/bf16; gradients flow to either side.
        weights: per tap, the C_l linear weights (lpips' ``lin`` layers; they get no gradient).
        eps: inside the square root of the channel norm (as eps^2), so zero features have finite gradients.
    Returns:
        (B,) fp32. Triton (one launch for <= MAX_TAPS taps) on CUDA or in the interpreter, else the reference.
    """
    f0s, f1s, weights = list(f0s), list(f1s), [w.detach().reshape(-1) for w in weights]
    _check(f0s, f1s, weights)
    if backend(f0s[0]) == "reference":
        return reference_lpips_distance(f0s, f1s, weights, eps).float()
    return _forward_op(f0s, f1s, weights, float(eps))
