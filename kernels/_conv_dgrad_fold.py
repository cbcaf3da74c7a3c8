"""The dgrad of a conv with few input channels (C_in < 16, e.g. the 3-channel image): a GEMM and a fold.

A dgrad as a transposed conv has GEMM N = C_in: a 16-wide MMA tile would be mostly padding. Instead

    dcol[(n, oh, ow), (kh, kw, ci)] = sum_co grad_pre[(n, oh, ow), co] * W[co, ci, kh, kw]

is one GEMM with N = KH * KW * C_in (147 for a 3-channel 7x7), run by the forward kernel as a 1x1 conv over
grad_out with the LReLU mask on the load (MASK_A), and then

    grad_x[n, ih, iw, ci] = sum_{kh, kw: ih = oh*S - P + kh, iw = ow*S - P + kw} dcol[n, oh, ow, kh, kw, ci]

is a fold (col2im) computed as a gather-sum per element of grad_x: each output element is written once, in
a fixed order (deterministic, no atomics). Reference: ``reference_fold`` (torch.nn.functional.fold).

Design notes: docs/kernels.md.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ._backend import tl, triton
from ._conv_configs import ConvConfig, ConvGeometry

FOLD_MAX_C_IN = 15  # dgrads with at most this many output channels (the conv's C_in) take the GEMM + fold
FOLD_BLOCK = 512  # grad_x elements per fold program


def uses_fold(geom: ConvGeometry) -> bool:
    """Whether the dgrad of ``geom`` runs as GEMM + fold (a conv with C_in <= FOLD_MAX_C_IN)."""
    return not geom.transposed and geom.C_in <= FOLD_MAX_C_IN


def fold_gemm_geometry(geom: ConvGeometry) -> ConvGeometry:
    """The 1x1 conv whose output is dcol: over grad_out (N, C_out, OH, OW), KH * KW * C_in channels out."""
    oh, ow = geom.out_size
    return ConvGeometry(False, geom.N, geom.C_out, oh, ow, geom.KH * geom.KW * geom.C_in, 1, 1, 1, 0)


def fold_gemm_weight(weight: torch.Tensor) -> torch.Tensor:
    """W (C_out, C_in, KH, KW) as the 1x1 conv weight (KH * KW * C_in, C_out, 1, 1), rows in (kh, kw, ci)
    order: the GEMM's B operand (tiny; a copy per call)."""
    c_out, c_in, kh, kw = weight.shape
    return weight.permute(2, 3, 1, 0).reshape(kh * kw * c_in, c_out, 1, 1).contiguous()


def fold_gemm_configs(configs: list[ConvConfig], geom: ConvGeometry | None = None) -> list[ConvConfig]:
    """``configs`` plus a 16-column variant of each 128-row one (N = KH * KW * C_in, e.g. 72, 75, 147,
    pads by at most 15 columns then). With ``geom`` (the GEMM's), only configs with at least 2 K steps
    where any has: a 1-step loop (K = C_out = 32, BLOCK_K = 32) is not software-pipelined, its loads
    are synchronous."""
    extra = [dataclasses.replace(c, block_n=16) for c in configs if c.block_m >= 128 and c.block_n == 32]
    out = configs + [c for c in extra if c not in configs]
    if geom is not None:
        out = [c for c in out if geom.k > c.block_k] or out
    return out


@triton.jit(do_not_specialize=["N", "H", "W", "OH", "OW", "STRIDE", "PAD"])
def _conv_fold_kernel(
    col_ptr,
    out_ptr,
    N,
    H,
    W,
    OH,
    OW,
    STRIDE,
    PAD,
    C: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # out[n, ih, iw, c] = sum over taps (kh, kw) with ih + PAD - kh = oh * STRIDE, 0 <= oh < OH (likewise w)
    # of col[n, oh, ow, (kh * KW + kw) * C + c]; col NHWC with KH * KW * C channels, out NHWC. Fixed order.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if INDEX_64:
        offs = offs.to(tl.int64)
    ok = offs < N * H * W * C
    c = offs % C
    pix = offs // C
    iw = pix % W
    ih = (pix // W) % H
    n = pix // (W * H)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for kh in tl.static_range(KH):
        th = ih + PAD - kh
        th_c = tl.where(th > 0, th, 0)  # no division of negatives
        oh = th_c // STRIDE
        h_ok = (th >= 0) & (th_c - oh * STRIDE == 0) & (oh < OH)
        for kw in tl.static_range(KW):
            tw = iw + PAD - kw
            tw_c = tl.where(tw > 0, tw, 0)
            ow = tw_c // STRIDE
            m = ok & h_ok & (tw >= 0) & (tw_c - ow * STRIDE == 0) & (ow < OW)
            src = ((n * OH + oh) * OW + ow) * (KH * KW * C) + (kh * KW + kw) * C + c
            acc += tl.load(col_ptr + src, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def conv_fold(col: torch.Tensor, geom: ConvGeometry, out: torch.Tensor) -> torch.Tensor:
    """Fold ``col`` (N, KH * KW * C_in, OH, OW), channels_last, into ``out`` (N, C_in, H, W), channels_last:
    grad_x of ``geom`` (see the module doc)."""
    oh, ow = geom.out_size
    total = out.numel()
    _conv_fold_kernel[(triton.cdiv(total, FOLD_BLOCK),)](
        col,
        out,
        geom.N,
        geom.H,
        geom.W,
        oh,
        ow,
        geom.stride,
        geom.padding,
        C=geom.C_in,
        KH=geom.KH,
        KW=geom.KW,
        INDEX_64=max(col.numel(), total) >= 2**31 - FOLD_BLOCK,
        BLOCK=FOLD_BLOCK,
    )
    return out


def reference_fold(col: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """``conv_fold`` in PyTorch (torch.nn.functional.fold), (N, C_in, H, W) fp32 (the test oracle)."""
    n, _, oh, ow = col.shape
    cols = col.float().reshape(n, geom.KH, geom.KW, geom.C_in, oh * ow).permute(0, 3, 1, 2, 4)
    cols = cols.reshape(n, geom.C_in * geom.KH * geom.KW, oh * ow)  # (N, C * KH * KW, L), fold's order
    p = geom.padding
    full = F.fold(cols, (geom.H + 2 * p, geom.W + 2 * p), (geom.KH, geom.KW), stride=geom.stride)
    return full[:, :, p : p + geom.H, p : p + geom.W]  # (N, C, H, W): the padding border dropped
