"""The Triton backward of conv_lrelu and conv_transpose_lrelu: dgrad and wgrad, with the LReLU mask applied
as grad_out is loaded (grad_pre = grad_out * (1 if out > 0 else alpha) is never written).

Design notes: docs/kernels.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

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
    forced_config,
)
from ._conv_dgrad_fold import conv_fold, fold_gemm_configs, fold_gemm_geometry, fold_gemm_weight, uses_fold
from ._conv_igemm import INDEX_64_NUMEL, conv_igemm_forward, input_precision
from ._conv_packing import activation_operand
from ._conv_shape import conv_out_size
from .bias_lrelu import lrelu_bias_grads

__all__ = [
    "conv_dgrad",
    "conv_wgrad",
    "dgrad_geometry",
    "wgrad_runs_triton",
    "wgrad_splits",
    "WgradConfig",
    "WGRAD_CONFIGS",
]


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
    """The forward kernel's configs for a dgrad: the same but the ``large`` tiles (with grad_out and the
    mask in shared memory they spill, pass 240 registers or 227 KB), and 4-warp 128-row tiles run with 8
    warps (the mask multiply on the A operand takes them over 240 registers)."""
    return [
        dataclasses.replace(c, num_warps=8)
        if c.block_m >= 128 and c.block_n >= 64 and c.num_warps == 4
        else c
        for c in config_list(dtype, precision)
        if not c.large
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
    SWAP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # D[r, col] partial over this split's K rows; col = (kh, kw, c), KCOLS = KH * KW * C.
    #   part[split, r, col] = sum_{m in split} P[m, r] * Q[gather(m, kh, kw), c]     (P, Q NHWC)
    #   bias_part[split, r] = sum_{m in split} P[m, r]                                (BIAS: conv only)
    # P (or Q) is multiplied by (1 if m > 0 else alpha) as it is loaded (MASK_P / MASK_Q; m: the saved out).
    # SWAP: the MMA computes the tile of D's transpose, acc (BLOCK_C, BLOCK_R) = Q^T P, so that D's columns
    # are the MMA's rows (wgmma needs 64 rows; R = 32 has fewer).
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
    else:  # small C (3, 4, 8) or a tile over several taps: (tap, c) per column
        tap = cols // C
        c = cols % C
        kh = tap // KW
        kw = tap % KW
    if SWAP:
        acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    else:
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
        if SWAP:
            acc = tl.dot(tl.trans(q), p, acc, input_precision=INPUT_PRECISION)  # (BLOCK_C, BLOCK_R) fp32
        else:
            acc = tl.dot(tl.trans(p), q, acc, input_precision=INPUT_PRECISION)  # (BLOCK_R, BLOCK_C) fp32
    base = split.to(tl.int64) * R * KCOLS
    if SWAP:
        d_off = cols[:, None] + (offs_r * KCOLS)[None, :]
        d_ok = col_ok[:, None] & r_ok[None, :]
    else:
        d_off = (offs_r * KCOLS)[:, None] + cols[None, :]
        d_ok = r_ok[:, None] & col_ok[None, :]
    tl.store(part_ptr + base + d_off, acc, mask=d_ok)
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


@dataclasses.dataclass(frozen=True)
class WgradConfig(ConvConfig):
    """A wgrad tile: block_m x block_n x block_k is the MMA tile (wgmma needs block_m >= 64). Over D =
    grad_W (R x KCOLS) as stored, block_m rows of R; ``swap``: over D's transpose, block_m of KCOLS."""

    swap: bool = False

    @property
    def name(self) -> str:
        return ConvConfig.name.fget(self) + (" T" if self.swap else "")


def wgrad_tile(config: ConvConfig) -> tuple[int, int, bool]:
    """(rows of R, columns of KCOLS, swap) a config's tile covers (a plain ConvConfig: not swapped)."""
    if getattr(config, "swap", False):
        return config.block_n, config.block_m, True
    return config.block_m, config.block_n, False


# The H100 list: every MMA tile has >= 64 rows (wgmma). Swapped (T) tiles serve R = 32 (C_out = 32 convs,
# C_in = 32 up-convs); K steps of 128 give the thin tiles more MMA per pipeline stage and fewer resident
# CTAs, so that 64 splits still cover two waves (wgrad_splits).
WGRAD_CONFIGS = [
    WgradConfig(bm, bn, bk, w, s, t)
    for bm, bn, bk, w, s, t in [
        (64, 128, 64, 8, 3, False),  # 8 warps: with 4 these sit at 252-254 registers
        (128, 64, 64, 8, 3, False),
        (64, 64, 64, 4, 4, False),
        (64, 32, 64, 4, 4, False),
        (64, 32, 128, 4, 3, False),
        (128, 16, 64, 4, 4, False),
        (64, 32, 64, 4, 4, True),
        (64, 32, 128, 4, 3, True),
        (128, 32, 64, 4, 4, True),
        (64, 16, 128, 4, 4, True),
    ]
]
WGRAD_FMA_CONFIGS = [WgradConfig(64, 64, 16, 4, 2), WgradConfig(64, 32, 16, 4, 2, True)]
# The interpreter's (correctness on tiny shapes; both orientations, both column paths).
WGRAD_INTERPRETER_CONFIGS = [WgradConfig(32, 32, 32, 4, 1), WgradConfig(16, 64, 16, 4, 1)]
WGRAD_INTERPRETER_SWAPPED = [WgradConfig(32, 16, 32, 4, 1, True), WgradConfig(64, 8, 16, 4, 1, True)]
MAX_SPLITS = 64  # K chunks of one wgrad (the fixed-order sum reads each partial once)
PARTIAL_BYTES_LIMIT = 32 << 20  # the fp32 partials of all splits together


def wgrad_problem(geom: ConvGeometry) -> dict:
    """R (rows of D), C (channels of Q), K (reduction rows N * I_H * I_W), KCOLS of grad_W."""
    oh, ow = geom.out_size
    if geom.transposed:
        return dict(
            R=geom.C_in, C=geom.C_out, K=geom.N * geom.H * geom.W, KCOLS=geom.KH * geom.KW * geom.C_out
        )
    return dict(R=geom.C_out, C=geom.C_in, K=geom.N * oh * ow, KCOLS=geom.KH * geom.KW * geom.C_in)


def _tiles(p: dict, config: ConvConfig) -> int:
    block_r, block_c, _ = wgrad_tile(config)
    return -(-p["R"] // block_r) * -(-p["KCOLS"] // block_c)


def wgrad_efficiency(geom: ConvGeometry, config: ConvConfig) -> float:
    """Useful FLOPs / FLOPs issued by the wgrad grid's MMAs (padding of R, KCOLS and K to the tiles)."""
    p = wgrad_problem(geom)
    block_r, block_c, _ = wgrad_tile(config)
    issued = _tiles(p, config) * block_r * block_c * -(-p["K"] // config.block_k) * config.block_k
    return p["R"] * p["KCOLS"] * p["K"] / issued


REGISTERS_PER_SM, SHARED_PER_SM, MAX_CTAS_PER_SM = 65536, 228 * 1024, 32  # sm_90 (H100 / H200)


def resident_ctas(registers: int, num_warps: int, shared_bytes: int) -> int:
    """CTAs per SM that registers (allocated per warp in units of 256) and shared memory (plus 1 KB
    reserved per CTA) allow, at least 1: the count bench/static.py's ``ctas_per_sm`` makes."""
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = REGISTERS_PER_SM // (per_warp * num_warps)
    by_smem = SHARED_PER_SM // (shared_bytes + 1024)
    return max(1, min(by_regs, by_smem, MAX_CTAS_PER_SM))


def wgrad_ctas_estimate(geom: ConvGeometry, config: ConvConfig, element_size: int = 2) -> int:
    """Resident CTAs per SM without a compiled kernel (the interpreter, and ranking the candidates):
    shared memory as num_stages buffers of the P, Q and mask tiles, registers as the fp32 accumulator's
    share plus 64. Within one CTA of the compiled count on the networks' layers (bench.static)."""
    block_r, block_c, _ = wgrad_tile(config)
    masked = block_c if geom.transposed else block_r
    shared = config.num_stages * (block_r + block_c + masked) * config.block_k * element_size
    registers = config.block_m * config.block_n // (32 * config.num_warps) + 64
    return resident_ctas(registers, config.num_warps, shared)


def wgrad_splits(
    geom: ConvGeometry, config: ConvConfig, ctas: int | None = None, sm_count: int = SM_COUNT
) -> tuple[int, int]:
    """(splits, K steps per split): enough splits that tiles x splits covers two waves of ``ctas``
    resident CTAs (default ``wgrad_ctas_estimate``; the launcher passes the compiled kernel's count) on
    ``sm_count`` SMs, within MAX_SPLITS, one K step per split at least and the fp32 partials within
    PARTIAL_BYTES_LIMIT."""
    p = wgrad_problem(geom)
    ctas = wgrad_ctas_estimate(geom, config) if ctas is None else ctas
    steps = max(1, -(-p["K"] // config.block_k))
    want = -(-2 * sm_count * ctas // _tiles(p, config))
    cap = max(1, min(MAX_SPLITS, steps, PARTIAL_BYTES_LIMIT // (4 * p["R"] * p["KCOLS"])))
    per_split = max(1, steps // min(want, cap))
    if -(-steps // per_split) > cap:
        per_split = -(-steps // cap)
    return -(-steps // per_split), per_split


def wgrad_waves(geom: ConvGeometry, config: ConvConfig, ctas: int | None = None) -> float:
    """Programs of the split grid / (SM_COUNT x ``ctas``; default ``wgrad_ctas_estimate``)."""
    ctas = wgrad_ctas_estimate(geom, config) if ctas is None else ctas
    splits, _ = wgrad_splits(geom, config, ctas)
    return _tiles(wgrad_problem(geom), config) * splits / (SM_COUNT * ctas)


def wgrad_config_list(dtype: torch.dtype, precision: str) -> list[ConvConfig]:
    if INTERPRET:
        return WGRAD_INTERPRETER_CONFIGS + WGRAD_INTERPRETER_SWAPPED
    return WGRAD_FMA_CONFIGS if dtype == torch.float32 and precision == "ieee" else WGRAD_CONFIGS


def wgrad_candidates(
    geom: ConvGeometry, dtype: torch.dtype, precision: str, ctas: Callable | None = None
) -> list[ConvConfig]:
    """The wgrad configs the tuner may pick: efficiency >= MIN_EFFICIENCY, swapped tiles only where R < 64
    (no 64-row tile of R); of those, the ones whose split grid covers two waves (``wgrad_waves`` with
    ``ctas(config)``, the compiled kernel's resident CTAs, or the estimate where it gives None) where any
    does; the larger tiles first; at most MAX_CANDIDATES.

    [] where no config meets the efficiency bar (the 3-channel first layers: docs/kernels.md): that wgrad
    goes to cuDNN after the mask pass (``conv_wgrad``). The interpreter's list (correctness on tiny shapes)
    falls back to its most efficient config instead.
    """
    configs = wgrad_config_list(dtype, precision)
    small_r = wgrad_problem(geom)["R"] < 64
    good = [
        c
        for c in configs
        if wgrad_efficiency(geom, c) >= MIN_EFFICIENCY and (small_r or not wgrad_tile(c)[2] or INTERPRET)
    ]
    if not good:
        return [max(configs, key=lambda c: wgrad_efficiency(geom, c))] if INTERPRET else []
    filled = [c for c in good if wgrad_waves(geom, c, ctas(c) if ctas else None) >= 2] or good
    return sorted(filled, key=lambda c: (-c.block_m * c.block_n, wgrad_tile(c)[2]))[:MAX_CANDIDATES]


def wgrad_constexprs(
    geom: ConvGeometry, config: ConvConfig, *, bias: bool, precision: str, index_64: bool = False
) -> dict:
    """Constexpr arguments of ``_conv_wgrad_kernel`` (the launcher and bench/static.py build them here)."""
    block_r, block_c, swap = wgrad_tile(config)
    return dict(
        C=wgrad_problem(geom)["C"],
        KH=geom.KH,
        KW=geom.KW,
        MASK_P=not geom.transposed,
        MASK_Q=geom.transposed,
        BIAS=bias,
        INPUT_PRECISION=precision,
        INDEX_64=index_64,
        SWAP=swap,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        BLOCK_K=config.block_k,
    )


def wgrad_runs_triton(geom: ConvGeometry, dtype: torch.dtype) -> bool:
    """Whether ``conv_wgrad`` runs the Triton kernel for ``geom`` (a candidate meets the bars, or a config
    is forced) rather than cuDNN after the mask pass."""
    op = "wgrad_conv_transpose" if geom.transposed else "wgrad_conv"
    return bool(wgrad_candidates(geom, dtype, input_precision(dtype))) or forced_config(op) is not None


def conv_wgrad(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    x: torch.Tensor,
    geom: ConvGeometry,
    alpha: float,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grad_W in channels_last storage, grad_b or None) of lrelu(conv(x, W) + b) (or the up-conv).

    ``need_bias`` only for a conv (the bias sum is the row sum of P, see the module doc). Where no Triton
    config meets the bars (``wgrad_candidates`` is empty, and none is forced), cuDNN computes grad_W after
    the Triton mask pass.
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
        return grad_w.zero_(), (grad_b.zero_() if grad_b is not None else None)
    if not wgrad_runs_triton(geom, out.dtype):
        return _cudnn_wgrad(grad_out, out, x, geom, alpha, need_bias, grad_w)
    op = "wgrad_conv_transpose" if geom.transposed else "wgrad_conv"
    precision = input_precision(out.dtype)
    o = _wgrad_operands(grad_out, out, x, geom)
    state = {}

    def ctas(config: ConvConfig) -> int | None:
        return _compiled_ctas(*_wgrad_call(o, geom, config, alpha, need_bias, precision))

    def launch(config: ConvConfig) -> None:
        args, meta = _wgrad_call(o, geom, config, alpha, need_bias, precision)
        splits, per_split = wgrad_splits(geom, config, _compiled_ctas(args, meta))
        part = torch.empty((splits, p["R"], p["KCOLS"]), dtype=torch.float32, device=out.device)
        bias_part = part.new_empty((splits, p["R"])) if need_bias else part
        _conv_wgrad_kernel[(_tiles(p, config), splits)](*args(part, bias_part, per_split), **meta)
        state.update(part=part, bias_part=bias_part, splits=splits)

    candidates = wgrad_candidates(geom, out.dtype, precision, ctas)

    launch(choose_config(op, geom, out, precision, launch, candidates=candidates))
    _sum_splits(state["part"], grad_w, state["splits"])
    if need_bias:
        _sum_splits(state["bias_part"], grad_b, state["splits"])
    return grad_w, grad_b


def _wgrad_operands(grad_out, out, x, geom: ConvGeometry) -> dict:
    """P, Q and the mask (NHWC views) with Q's grid and P's row grid (see the module doc)."""
    g = activation_operand(grad_out.to(out.dtype))
    xs = activation_operand(x)
    oh, ow = geom.out_size
    if geom.transposed:  # P = x over the input grid, Q = grad_pre over the output grid
        p_t, q_t, i_hw, i_w, q_h, q_w = xs, g, geom.H * geom.W, geom.W, oh, ow
    else:  # P = grad_pre over the output grid, Q = x
        p_t, q_t, i_hw, i_w, q_h, q_w = g, xs, oh * ow, ow, geom.H, geom.W
    return dict(p=p_t, q=q_t, m=activation_operand(out), i_hw=i_hw, i_w=i_w, q_h=q_h, q_w=q_w)


def _wgrad_call(o: dict, geom: ConvGeometry, config, alpha: float, need_bias: bool, precision: str):
    """(args(part, bias_part, per_split): the kernel's arguments, its launch options) for ``config``."""
    p = wgrad_problem(geom)
    index_64 = max(o["p"].numel(), o["q"].numel()) >= INDEX_64_NUMEL
    meta = dict(
        wgrad_constexprs(geom, config, bias=need_bias, precision=precision, index_64=index_64),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    sizes = (p["K"], o["i_hw"], o["i_w"], o["q_h"], o["q_w"], p["R"], geom.stride, geom.padding)

    def args(part=o["p"], bias_part=o["p"], per_split=1):  # defaults: any pointer (compiling only)
        return (o["p"], o["q"], o["m"], part, bias_part, *sizes, per_split, float(alpha))

    return args, meta


_ctas: dict[tuple, int] = {}  # (constexprs, launch options, dtype, device) -> resident CTAs per SM


def _compiled_ctas(args: Callable, meta: dict) -> int | None:
    """Resident CTAs per SM of the compiled kernel (its registers and shared memory; the grid does not
    change the binary), or None where nothing is compiled (the interpreter, or a failed warmup)."""
    t = args()[0]
    if INTERPRET or not t.is_cuda:
        return None
    key = (tuple(sorted(meta.items())), t.dtype, str(t.device))
    if key not in _ctas:
        try:
            part = torch.empty(1, dtype=torch.float32, device=t.device)  # fp32 partial pointers
            kernel = _conv_wgrad_kernel.warmup(*args(part, part), grid=(1, 1), **meta)
            kernel._init_handles()  # loads the binary: n_regs
            _ctas[key] = resident_ctas(kernel.n_regs, meta["num_warps"], kernel.metadata.shared)
        except Exception:  # noqa: BLE001 - the estimate then sizes the grid (a few splits off at worst)
            return None
    return _ctas[key]


def _cudnn_wgrad(grad_out, out, x, geom: ConvGeometry, alpha: float, need_bias: bool, grad_w: torch.Tensor):
    """(grad_W, grad_b or None) by aten's (cuDNN's) weight gradient of grad_pre from the Triton mask pass;
    ``grad_w`` (empty) only lends the weight's shape."""
    grad_pre, grad_b = lrelu_bias_grads(grad_out.to(out.dtype), out, alpha, True, need_bias)
    _, gw, _ = torch.ops.aten.convolution_backward(
        grad_pre,
        x.to(out.dtype),
        grad_w,
        None,
        [geom.stride] * 2,
        [geom.padding] * 2,
        [1, 1],
        geom.transposed,
        [0, 0],
        1,
        [False, True, False],
    )
    return gw, grad_b


def _sum_splits(part: torch.Tensor, out: torch.Tensor, splits: int) -> None:
    size = out.numel()
    block = 1024
    _split_sum_kernel[(triton.cdiv(size, block),)](part, out, splits, size, BLOCK=block)
