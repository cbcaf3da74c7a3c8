"""The Triton backward of conv_lrelu and conv_transpose_lrelu: dgrad and wgrad, with the LReLU mask applied
as grad_out is loaded (grad_pre = grad_out * (1 if out > 0 else alpha) is never written).

Design notes: docs/kernels.md.
"""

from __future__ import annotations

import dataclasses

import torch

from ._backend import INTERPRET, tl, triton
from ._conv_configs import (
    MAX_CANDIDATES,
    MIN_EFFICIENCY,
    SM_COUNT,
    ConvConfig,
    ConvGeometry,
    choose_config,
    config_list,
    eligible_configs,
)
from ._conv_dgrad_fold import conv_fold, fold_gemm_configs, fold_gemm_geometry, fold_gemm_weight, uses_fold
from ._conv_igemm import INDEX_64_NUMEL, conv_igemm_forward, input_precision
from ._conv_packing import activation_operand
from ._conv_shape import conv_out_size

__all__ = ["conv_dgrad", "conv_wgrad", "dgrad_geometry", "wgrad_splits", "WGRAD_CONFIGS"]


def dgrad_geometry(geom: ConvGeometry) -> ConvGeometry:
    """The forward problem whose output is grad_x of ``geom`` (see the module doc)."""
    oh, ow = geom.out_size
    if geom.transposed:
        return ConvGeometry(
            False, geom.N, geom.C_out, oh, ow, geom.C_in, geom.KH, geom.KW, geom.stride, geom.padding
        )
    pad = (
        geom.H - conv_out_size(oh, geom.KH, geom.stride, geom.padding, True),
        geom.W - conv_out_size(ow, geom.KW, geom.stride, geom.padding, True),
    )
    return ConvGeometry(
        True, geom.N, geom.C_out, oh, ow, geom.C_in, geom.KH, geom.KW, geom.stride, geom.padding, pad
    )


def dgrad_config_list(dtype: torch.dtype, precision: str) -> list[ConvConfig]:
    """The forward kernel's configs for a dgrad: the same, except 4-warp 128-row tiles run with 8 warps
    (the mask multiply on the A operand takes them over 240 registers)."""
    return [
        dataclasses.replace(c, num_warps=8)
        if c.block_m >= 128 and c.block_n >= 64 and c.num_warps == 4
        else c
        for c in config_list(dtype, precision)
    ]


def conv_dgrad(
    grad_out: torch.Tensor, out: torch.Tensor, weight: torch.Tensor, geom: ConvGeometry, alpha: float
) -> torch.Tensor:
    """grad_x (N, C_in, H, W), channels_last, of lrelu(conv(x, W) + b) (or the up-conv), from grad_out and
    the saved out (same shape, any layouts)."""
    dg = dgrad_geometry(geom)
    grad_x = torch.empty(
        (geom.N, geom.C_in, geom.H, geom.W),
        dtype=out.dtype,
        device=out.device,
        memory_format=torch.channels_last,
    )
    if grad_x.numel() == 0:
        return grad_x
    if grad_out.numel() == 0:
        return grad_x.zero_()
    op = "dgrad_conv_transpose" if geom.transposed else "dgrad_conv"  # named after the forward op
    configs = dgrad_config_list(out.dtype, input_precision(out.dtype))
    if uses_fold(geom):  # few input channels: dcol = grad_pre @ W (a 1x1 conv, mask on load), then fold
        gg = fold_gemm_geometry(geom)
        col = torch.empty(
            (gg.N, gg.C_out, gg.H, gg.W),
            dtype=out.dtype,
            device=out.device,
            memory_format=torch.channels_last,
        )
        configs = eligible_configs(gg, out.element_size(), fold_gemm_configs(configs, gg))
        conv_igemm_forward(
            grad_out.to(out.dtype),
            fold_gemm_weight(weight),
            None,
            gg,
            alpha,
            col,
            mask=out,
            op=op,
            configs=configs,
        )
        return conv_fold(col, geom, grad_x)
    configs = eligible_configs(dg, out.element_size(), configs)
    return conv_igemm_forward(
        grad_out.to(out.dtype), weight, None, dg, alpha, grad_x, mask=out, op=op, configs=configs
    )


# ----------------------------------------------------------------------------------------------------------
# wgrad

_RUNTIME = ["M_TOTAL", "I_HW", "I_W", "Q_H", "Q_W", "R", "STRIDE", "PAD", "ITERS_PER_SPLIT"]


@triton.jit(do_not_specialize=_RUNTIME)
def _conv_wgrad_kernel(
    p_ptr,
    q_ptr,
    m_ptr,
    part_ptr,
    bias_part_ptr,
    M_TOTAL,
    I_HW,
    I_W,
    Q_H,
    Q_W,
    R,
    STRIDE,
    PAD,
    ITERS_PER_SPLIT,
    alpha,
    C: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    MASK_P: tl.constexpr,
    MASK_Q: tl.constexpr,
    BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # D[r, col] partial over this split's K rows; col = (kh, kw, c), KCOLS = KH * KW * C.
    #   part[split, r, col] = sum_{m in split} P[m, r] * Q[gather(m, kh, kw), c]     (P, Q NHWC)
    #   bias_part[split, r] = sum_{m in split} P[m, r]                                (BIAS: conv only)
    # P (or Q) is multiplied by (1 if m > 0 else alpha) as it is loaded (MASK_P / MASK_Q; m: the saved out).
    KCOLS: tl.constexpr = KH * KW * C
    c_tiles = tl.cdiv(KCOLS, BLOCK_C)
    pid = tl.program_id(0)
    pid_c = pid % c_tiles
    pid_r = pid // c_tiles
    split = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < KCOLS
    if C % BLOCK_C == 0:  # the column tile lies inside one tap: tap scalar, the Q mask per row
        tap0 = (pid_c * BLOCK_C) // C
        kh = tap0 // KW + tl.zeros((BLOCK_C,), dtype=tl.int32)
        kw = tap0 % KW + tl.zeros((BLOCK_C,), dtype=tl.int32)
        c = (pid_c * BLOCK_C) % C + tl.arange(0, BLOCK_C)
    else:  # small C (3, 4, 8): (tap, c) per column
        tap = cols // C
        c = cols % C
        kh = tap // KW
        kw = tap % KW
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    m0 = split * ITERS_PER_SPLIT * BLOCK_K
    for it in range(0, ITERS_PER_SPLIT):
        m = m0 + it * BLOCK_K + tl.arange(0, BLOCK_K)  # (BLOCK_K,) reduction rows (n, i, j)
        m_ok = m < M_TOTAL
        if INDEX_64:
            m = m.to(tl.int64)
        p_off = (m * R)[:, None] + offs_r[None, :]  # (BLOCK_K, BLOCK_R)
        p_ok = m_ok[:, None] & r_ok[None, :]
        p = tl.load(p_ptr + p_off, mask=p_ok, other=0.0)
        if MASK_P:
            sign = tl.load(m_ptr + p_off, mask=p_ok, other=0.0)
            p = tl.where(sign.to(tl.float32) > 0, p, p.to(tl.float32) * alpha).to(p_ptr.dtype.element_ty)
        if BIAS:
            bias_acc += tl.sum(p.to(tl.float32), axis=0)
        n = m // I_HW
        ij = m % I_HW
        if C % BLOCK_C == 0:
            qh = (ij // I_W) * STRIDE - PAD + tap0 // KW  # (BLOCK_K,)
            qw = (ij % I_W) * STRIDE - PAD + tap0 % KW
            row_ok = m_ok & (qh >= 0) & (qh < Q_H) & (qw >= 0) & (qw < Q_W)
            q_ok = row_ok[:, None]
            q_off = (((n * Q_H + qh) * Q_W + qw) * C)[:, None] + c[None, :]
        else:
            qh = ((ij // I_W) * STRIDE - PAD)[:, None] + kh[None, :]
            qw = ((ij % I_W) * STRIDE - PAD)[:, None] + kw[None, :]
            q_ok = m_ok[:, None] & col_ok[None, :] & (qh >= 0) & (qh < Q_H) & (qw >= 0) & (qw < Q_W)
            q_off = ((n[:, None] * Q_H + qh) * Q_W + qw) * C + c[None, :]  # (BLOCK_K, BLOCK_C)
        q = tl.load(q_ptr + q_off, mask=q_ok, other=0.0)
        if MASK_Q:
            sign = tl.load(m_ptr + q_off, mask=q_ok, other=0.0)
            q = tl.where(sign.to(tl.float32) > 0, q, q.to(tl.float32) * alpha).to(q_ptr.dtype.element_ty)
        acc = tl.dot(tl.trans(p), q, acc, input_precision=INPUT_PRECISION)  # (BLOCK_R, BLOCK_C) fp32
    base = split.to(tl.int64) * R * KCOLS
    tl.store(
        part_ptr + base + (offs_r * KCOLS)[:, None] + cols[None, :], acc, mask=r_ok[:, None] & col_ok[None, :]
    )
    if BIAS:
        if pid_c == 0:
            tl.store(bias_part_ptr + split * R + offs_r, bias_acc, mask=r_ok)


@triton.jit
def _split_sum_kernel(part_ptr, out_ptr, SPLITS, SIZE, BLOCK: tl.constexpr):
    # out[i] = sum_{s = 0 .. SPLITS-1} part[s, i], in split order (fp32), cast to out's dtype.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < SIZE
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLITS):
        acc += tl.load(part_ptr + s * SIZE + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


# Tiles (block_m = BLOCK_R rows of D, block_n = BLOCK_C columns, block_k = BLOCK_K reduction rows).
WGRAD_CONFIGS = [
    ConvConfig(bm, bn, bk, w, s)
    for bm, bn, bk, w, s in [
        (64, 128, 64, 8, 3),  # 8 warps: with 4 these sit at 252-254 registers
        (128, 64, 64, 8, 3),
        (64, 64, 64, 4, 4),
        (32, 128, 64, 4, 3),
        (32, 64, 64, 4, 4),
        (64, 32, 64, 4, 4),
        (32, 32, 64, 4, 4),
        (64, 16, 64, 4, 4),
        (128, 16, 64, 4, 4),
    ]
]
WGRAD_FMA_CONFIGS = [ConvConfig(64, 64, 16, 4, 2), ConvConfig(32, 64, 16, 4, 2), ConvConfig(32, 32, 16, 4, 2)]
WGRAD_INTERPRETER_CONFIGS = [ConvConfig(32, 32, 32, 4, 1), ConvConfig(16, 64, 16, 4, 1)]


def wgrad_problem(geom: ConvGeometry) -> dict:
    """R (rows of D), C (channels of Q), K (reduction rows N * I_H * I_W), KCOLS of grad_W."""
    oh, ow = geom.out_size
    if geom.transposed:
        return dict(
            R=geom.C_in, C=geom.C_out, K=geom.N * geom.H * geom.W, KCOLS=geom.KH * geom.KW * geom.C_out
        )
    return dict(R=geom.C_out, C=geom.C_in, K=geom.N * oh * ow, KCOLS=geom.KH * geom.KW * geom.C_in)


def wgrad_efficiency(geom: ConvGeometry, config: ConvConfig) -> float:
    """Useful FLOPs / FLOPs issued by the wgrad grid's MMAs (padding of R, KCOLS and K to the tiles)."""
    p = wgrad_problem(geom)
    issued = (
        -(-p["R"] // config.block_m)
        * config.block_m
        * -(-p["KCOLS"] // config.block_n)
        * config.block_n
        * -(-p["K"] // config.block_k)
        * config.block_k
    )
    return p["R"] * p["KCOLS"] * p["K"] / issued


def wgrad_splits(geom: ConvGeometry, config: ConvConfig, sm_count: int = SM_COUNT) -> tuple[int, int]:
    """(splits, K steps per split): enough splits that the grid covers two waves of ``sm_count`` SMs
    (at least one K step each, at most 64 splits)."""
    p = wgrad_problem(geom)
    tiles = -(-p["R"] // config.block_m) * -(-p["KCOLS"] // config.block_n)
    steps = max(1, -(-p["K"] // config.block_k))
    want = max(1, min(64, steps, -(-2 * sm_count // tiles)))
    per_split = -(-steps // want)
    return -(-steps // per_split), per_split


def wgrad_config_list(dtype: torch.dtype, precision: str) -> list[ConvConfig]:
    if INTERPRET:
        return WGRAD_INTERPRETER_CONFIGS
    return WGRAD_FMA_CONFIGS if dtype == torch.float32 and precision == "ieee" else WGRAD_CONFIGS


def wgrad_candidates(geom: ConvGeometry, dtype: torch.dtype, precision: str) -> list[ConvConfig]:
    """The wgrad configs the tuner may pick: efficiency >= MIN_EFFICIENCY (else the most efficient one
    alone), then the larger tiles first; at most MAX_CANDIDATES."""
    configs = wgrad_config_list(dtype, precision)
    good = [c for c in configs if wgrad_efficiency(geom, c) >= MIN_EFFICIENCY]
    if not good:
        return [max(configs, key=lambda c: (wgrad_efficiency(geom, c), c.block_m * c.block_n))]
    return sorted(good, key=lambda c: -c.block_m * c.block_n)[:MAX_CANDIDATES]


def wgrad_constexprs(
    geom: ConvGeometry, config: ConvConfig, *, bias: bool, precision: str, index_64: bool = False
) -> dict:
    """Constexpr arguments of ``_conv_wgrad_kernel`` (the launcher and bench/static.py build them here)."""
    p = wgrad_problem(geom)
    return dict(
        C=p["C"],
        KH=geom.KH,
        KW=geom.KW,
        MASK_P=not geom.transposed,
        MASK_Q=geom.transposed,
        BIAS=bias,
        INPUT_PRECISION=precision,
        INDEX_64=index_64,
        BLOCK_R=config.block_m,
        BLOCK_C=config.block_n,
        BLOCK_K=config.block_k,
    )


def conv_wgrad(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    x: torch.Tensor,
    geom: ConvGeometry,
    alpha: float,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grad_W in channels_last storage, grad_b or None) of lrelu(conv(x, W) + b) (or the up-conv).

    ``need_bias`` only for a conv (the bias sum is the row sum of P, see the module doc).
    """
    if need_bias and geom.transposed:
        raise ValueError("conv_wgrad: the bias gradient of an up-conv comes from the mask pass, not wgrad")
    p = wgrad_problem(geom)
    w_shape = (geom.C_in, geom.C_out) if geom.transposed else (geom.C_out, geom.C_in)
    grad_w = torch.empty(
        (*w_shape, geom.KH, geom.KW), dtype=out.dtype, device=out.device, memory_format=torch.channels_last
    )
    grad_b = torch.empty(p["R"], dtype=torch.float32, device=out.device) if need_bias else None
    if p["K"] == 0 or grad_w.numel() == 0:
        grad_w.zero_()
        return grad_w, (grad_b.zero_() if grad_b is not None else None)
    g = activation_operand(grad_out.to(out.dtype))
    m = activation_operand(out)
    xs = activation_operand(x)
    oh, ow = geom.out_size
    if geom.transposed:  # P = x over the input grid, Q = grad_pre over the output grid
        p_t, q_t, i_hw, i_w, q_h, q_w = xs, g, geom.H * geom.W, geom.W, oh, ow
    else:  # P = grad_pre over the output grid, Q = x
        p_t, q_t, i_hw, i_w, q_h, q_w = g, xs, oh * ow, ow, geom.H, geom.W
    precision = input_precision(out.dtype)
    index_64 = max(p_t.numel(), q_t.numel()) >= INDEX_64_NUMEL
    state = {}

    def launch(config: ConvConfig) -> None:
        splits, per_split = wgrad_splits(geom, config)
        part = torch.empty((splits, p["R"], p["KCOLS"]), dtype=torch.float32, device=out.device)
        bias_part = (
            torch.empty((splits, p["R"]), dtype=torch.float32, device=out.device) if need_bias else part
        )
        tiles = triton.cdiv(p["R"], config.block_m) * triton.cdiv(p["KCOLS"], config.block_n)
        _conv_wgrad_kernel[(tiles, splits)](
            p_t,
            q_t,
            m,
            part,
            bias_part,
            p["K"],
            i_hw,
            i_w,
            q_h,
            q_w,
            p["R"],
            geom.stride,
            geom.padding,
            per_split,
            float(alpha),
            **wgrad_constexprs(geom, config, bias=need_bias, precision=precision, index_64=index_64),
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
        state.update(part=part, bias_part=bias_part, splits=splits)

    candidates = wgrad_candidates(geom, out.dtype, precision)
    chosen = choose_config(
        "wgrad_conv_transpose" if geom.transposed else "wgrad_conv",
        geom,
        out,
        precision,
        launch,
        candidates=candidates,
    )
    launch(chosen)
    _sum_splits(state["part"], grad_w, state["splits"])
    if need_bias:
        _sum_splits(state["bias_part"], grad_b, state["splits"])
    return grad_w, grad_b


def _sum_splits(part: torch.Tensor, out: torch.Tensor, splits: int) -> None:
    size = out.numel()
    block = 1024
    _split_sum_kernel[(triton.cdiv(size, block),)](part, out, splits, size, BLOCK=block)
