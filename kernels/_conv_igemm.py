"""The forward kernel of conv_lrelu and conv_transpose_lrelu: one channels_last implicit GEMM with a flat,
software-pipelined reduction loop, bias and LReLU in the epilogue.

Design notes: docs/kernels.md.
"""

from __future__ import annotations

import torch

from ._backend import INTERPRET, tl, triton
from ._conv_configs import (
    CLASS_FIELDS as _CLASS_FIELDS,
)
from ._conv_configs import (
    ConvConfig,
    ConvGeometry,
    choose_config,
    ctas_per_sm,
    estimated_ctas_per_sm,
    gemm_classes,
    m_tiles,
)
from ._conv_packing import activation_operand, conv_weight_operand, is_nhwc, upconv_weight_operand


def fp32_uses_tf32(cudnn=None) -> bool:
    """Whether fp32 convolutions may use TF32, read from PyTorch as cuDNN convolutions read it.

    The current API is ``torch.backends.cudnn.conv.fp32_precision`` ("tf32" allows it; "ieee" does not,
    nor "none", which the legacy ``allow_tf32 = False`` sets). Reading the legacy
    ``torch.backends.cudnn.allow_tf32`` raises once the new API has set conv and rnn apart, so the legacy
    flag is read only where the new one does not exist (older torch). ``cudnn`` stands in for
    ``torch.backends.cudnn`` (tests).
    """
    cudnn = torch.backends.cudnn if cudnn is None else cudnn
    conv = getattr(getattr(cudnn, "conv", None), "fp32_precision", None)
    if conv is not None:
        return conv == "tf32"
    return bool(cudnn.allow_tf32)


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot input_precision for ``dtype``: "tf32" for fp32 when PyTorch allows TF32 convs, else "ieee"."""
    return "tf32" if dtype == torch.float32 and fp32_uses_tf32() and not INTERPRET else "ieee"


# Only what shapes the code is a compile-time constant (C_in, the kernel and tap counts, the weight row
# stride, tiles); sizes, C_out, stride and padding are runtime arguments, so one compile serves every batch
# and image size and every layer with the same C_in and kernel (the divisions by them run once per tile).
# C_out keeps Triton's divisible-by-16 specialization, which the vectorized weight loads and stores use.
CLASS_FIELDS = tl.constexpr(_CLASS_FIELDS)  # int32 fields per row of the class table (GemmClass.fields)
_RUNTIME_SIZES = ["N", "H", "W", "OH", "OW", "ROWS_H", "ROWS_W", "STRIDE", "PAD", "M_TILES", "CLASS_TABLE"]


@triton.jit
def _igemm_tile(
    pid_m,
    pid_n,
    cls,
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    m_ptr,
    cls_ptr,
    N,
    H,
    W,
    OH,
    OW,
    ROWS_H,
    ROWS_W,
    C_OUT,
    STRIDE,
    PAD,
    alpha,
    mask_alpha,
    C_IN: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    TH: tl.constexpr,
    TW: tl.constexpr,
    W_K_STRIDE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr,
    MASK_A: tl.constexpr,
    LRELU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # MASK_A (the dgrad): x is grad_out and m the saved forward output of the same shape; the A operand is
    # x * (1 if m > 0 else mask_alpha), the LReLU mask applied as it is loaded. LRELU False: no activation.
    # One output tile: rows pid_m of parity class cls (0 for a conv), columns pid_n.
    if TRANSPOSED:  # GEMM class cls (GemmClass): its parity (ph, pw), rows and exact taps
        row = cls_ptr + cls * CLASS_FIELDS
        ph = tl.load(row)
        pw = tl.load(row + 1)
        r0h = tl.load(row + 2)
        rows_w = tl.load(row + 5)
        r0w = tl.load(row + 4)
        class_rows = tl.load(row + 3) * rows_w
        th_lo = tl.load(row + 6)  # taps th in [th_lo, th_lo + taps_h): kh = KH0 + S * (TH - 1 - th)
        taps_h = tl.load(row + 7)
        tw_lo = tl.load(row + 8)
        taps_w = tl.load(row + 9)
        kh0 = (ph + PAD) % STRIDE
        kw0 = (pw + PAD) % STRIDE
        pad_h = TH - 1 - (ph + PAD) // STRIDE  # ih = r - pad_h + th
        pad_w = TW - 1 - (pw + PAD) // STRIDE
        k_total = taps_h * taps_w * C_IN  # reduction length of this class's GEMM
        k_iters = (k_total + BLOCK_K - 1) // BLOCK_K
        in_step = 1
        out_step = STRIDE
    else:
        ph = 0
        pw = 0
        r0h = 0
        r0w = 0
        rows_w = ROWS_W
        class_rows = ROWS_H * ROWS_W
        pad_h = PAD
        pad_w = PAD
        taps_w: tl.constexpr = TW
        th_lo = 0
        tw_lo = 0
        k_total: tl.constexpr = TH * TW * C_IN
        k_iters: tl.constexpr = (TH * TW * C_IN + BLOCK_K - 1) // BLOCK_K
        in_step = STRIDE
        out_step = 1

    # Rows of this tile: (n, r, c), r in [r0h, r0h + rows_h), c likewise (the output, or one GEMM class).
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = offs_m // class_rows
    rc = offs_m % class_rows
    r = r0h + rc // rows_w
    c = r0w + rc % rows_w
    oh = r * out_step + ph
    ow = c * out_step + pw
    row_ok = (n < N) & (oh < OH) & (ow < OW)
    ih0 = r * in_step - pad_h
    iw0 = c * in_step - pad_w
    if INDEX_64:
        n = n.to(tl.int64)
    pix0 = (n * H + ih0) * W + iw0  # NHWC pixel index of tap (0, 0); may be out of range (masked)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = offs_n < C_OUT
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(0, k_iters):
        k0 = it * BLOCK_K
        if C_IN % BLOCK_K == 0:
            # The K tile lies inside one tap: tap and channel offset are scalars, the mask is per row.
            CHUNKS: tl.constexpr = C_IN // BLOCK_K
            tap = it // CHUNKS
            th = th_lo + tap // taps_w
            tw = tw_lo + tap % taps_w
            ci = (it % CHUNKS) * BLOCK_K + offs_k  # (BLOCK_K,)
            ih = ih0 + th
            iw = iw0 + tw
            a_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_off = ((pix0 + th * W + tw) * C_IN)[:, None] + ci[None, :]
            a = tl.load(x_ptr + a_off, mask=a_ok[:, None], other=0.0)
            if MASK_A:
                sign = tl.load(m_ptr + a_off, mask=a_ok[:, None], other=0.0)
                a = tl.where(sign.to(tl.float32) > 0, a, a.to(tl.float32) * mask_alpha).to(
                    x_ptr.dtype.element_ty
                )
            if TRANSPOSED:
                kh = kh0 + STRIDE * (TH - 1 - th)
                kw = kw0 + STRIDE * (TW - 1 - tw)
                w_row = (ci * KH + kh) * KW + kw  # (C_in, KH, KW, C_out) storage
                b_ok = co_ok[None, :]
                b_ptrs = w_ptr + (w_row * C_OUT)[:, None] + offs_n[None, :]
            else:
                b_ok = co_ok[None, :]
                b_ptrs = w_ptr + (k0 + offs_k)[:, None] + (offs_n * W_K_STRIDE)[None, :]
            b = tl.load(b_ptrs, mask=b_ok, other=0.0)
        else:
            # Small C_in: one K tile spans several taps, (tap, ci) per column.
            k = k0 + offs_k
            k_ok = k < k_total
            tap = k // C_IN
            ci = k % C_IN
            th = th_lo + tap // taps_w
            tw = tw_lo + tap % taps_w
            ih = ih0[:, None] + th[None, :]
            iw = iw0[:, None] + tw[None, :]
            a_ok = row_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_off = (pix0[:, None] + (th * W + tw)[None, :]) * C_IN + ci[None, :]
            a = tl.load(x_ptr + a_off, mask=a_ok, other=0.0)
            if MASK_A:
                sign = tl.load(m_ptr + a_off, mask=a_ok, other=0.0)
                a = tl.where(sign.to(tl.float32) > 0, a, a.to(tl.float32) * mask_alpha).to(
                    x_ptr.dtype.element_ty
                )
            if TRANSPOSED:
                kh = kh0 + STRIDE * (TH - 1 - th)
                kw = kw0 + STRIDE * (TW - 1 - tw)
                w_row = (ci * KH + kh) * KW + kw
                b_ok = k_ok[:, None] & co_ok[None, :]
                b_ptrs = w_ptr + (w_row * C_OUT)[:, None] + offs_n[None, :]
            else:
                # Rows are zero-padded to W_K_STRIDE (16-byte multiple): masking at the padded length keeps
                # the mask constant over 16-byte runs, so these loads stay vectorized cp.async copies.
                b_ok = (k < W_K_STRIDE)[:, None] & co_ok[None, :]
                b_ptrs = w_ptr + k[:, None] + (offs_n * W_K_STRIDE)[None, :]
            b = tl.load(b_ptrs, mask=b_ok, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N) fp32

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=co_ok, other=0.0).to(tl.float32)[None, :]
    if LRELU:
        out = tl.where(acc > 0, acc, acc * alpha)
    else:
        out = acc
    o_pix = (n * OH + oh) * OW + ow
    o_ptrs = out_ptr + (o_pix * C_OUT)[:, None] + offs_n[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & co_ok[None, :])


@triton.jit(do_not_specialize=_RUNTIME_SIZES)
def _conv_igemm_lrelu_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    m_ptr,
    cls_ptr,
    N,
    H,
    W,
    OH,
    OW,
    ROWS_H,
    ROWS_W,
    C_OUT,
    STRIDE,
    PAD,
    M_TILES,
    CLASS_TABLE,
    alpha,
    mask_alpha,
    C_IN: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    TH: tl.constexpr,
    TW: tl.constexpr,
    W_K_STRIDE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr,
    MASK_A: tl.constexpr,
    LRELU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # A persistent schedule: the grid is at most the CTAs that are resident at once (persistent_programs)
    # and each program loops over the tiles program_id, program_id + num_programs, ... Tile order: columns
    # fastest (neighbouring programs share their A rows in L2), then rows, then GEMM classes.
    n_tiles = tl.cdiv(C_OUT, BLOCK_N)
    if TRANSPOSED:  # M tiles of every class, in class order
        num_tiles = M_TILES * n_tiles
    else:
        num_tiles = tl.cdiv(N * ROWS_H * ROWS_W, BLOCK_M) * n_tiles
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        m_tile = tile // n_tiles
        if TRANSPOSED:  # the class of this M tile (the table's tile entries follow its class rows)
            cls = tl.load(cls_ptr + CLASS_TABLE + m_tile)
            pid_m = m_tile - tl.load(cls_ptr + cls * CLASS_FIELDS + CLASS_FIELDS - 1)
        else:
            cls = 0
            pid_m = m_tile
        _igemm_tile(
            pid_m,
            tile % n_tiles,
            cls,
            x_ptr,
            w_ptr,
            b_ptr,
            out_ptr,
            m_ptr,
            cls_ptr,
            N,
            H,
            W,
            OH,
            OW,
            ROWS_H,
            ROWS_W,
            C_OUT,
            STRIDE,
            PAD,
            alpha,
            mask_alpha,
            C_IN,
            KH,
            KW,
            TRANSPOSED,
            TH,
            TW,
            W_K_STRIDE,
            HAS_BIAS,
            INPUT_PRECISION,
            INDEX_64,
            MASK_A,
            LRELU,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
        )


# ----------------------------------------------------------------------------------------------------------
# Launch

INDEX_64_NUMEL = 2**31  # tensors from this many elements on index in int64 (int32 below: cheaper math)


def kernel_constexprs(
    geom: ConvGeometry,
    config: ConvConfig,
    *,
    has_bias: bool,
    precision: str,
    w_k_stride: int | None = None,
    index_64: bool = False,
    dgrad: bool = False,
) -> dict:
    """The kernel's constexpr arguments for ``geom`` and ``config`` (the launcher and bench/static.py
    both build them here, so the static report compiles exactly what runs). Sizes that vary with the
    batch or the image are runtime arguments (``runtime_sizes``)."""
    th, tw = geom.taps
    return dict(
        C_IN=geom.C_in,
        KH=geom.KH,
        KW=geom.KW,
        TRANSPOSED=geom.transposed,
        TH=th,
        TW=tw,
        W_K_STRIDE=geom.k if w_k_stride is None else w_k_stride,
        HAS_BIAS=has_bias,
        INPUT_PRECISION=precision,
        INDEX_64=index_64,
        MASK_A=dgrad,
        LRELU=not dgrad,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
    )


def runtime_sizes(geom: ConvGeometry, config: ConvConfig) -> dict:
    """The kernel's runtime size arguments: N, H, W, OH, OW, ROWS_H, ROWS_W, C_OUT, STRIDE, PAD, and for
    the class table M_TILES (M tiles of all classes) and CLASS_TABLE (where its tile entries start)."""
    (oh, ow), (rows_h, rows_w) = geom.out_size, geom.rows
    return dict(
        N=geom.N,
        H=geom.H,
        W=geom.W,
        OH=oh,
        OW=ow,
        ROWS_H=rows_h,
        ROWS_W=rows_w,
        C_OUT=geom.C_out,
        STRIDE=geom.stride,
        PAD=geom.padding,
        M_TILES=m_tiles(geom, config),
        CLASS_TABLE=geom.classes * CLASS_FIELDS,
    )


def num_tiles(geom: ConvGeometry, config: ConvConfig) -> int:
    """Output tiles of the GEMM(s): M tiles of every class x C_out tiles."""
    return m_tiles(geom, config) * triton.cdiv(geom.C_out, config.block_n)


def class_table(geom: ConvGeometry, block_m: int) -> list[int]:
    """The kernel's int32 class table: one row per GEMM class (``GemmClass.fields``, ending with the
    class's first M tile), then the class of each M tile."""
    rows, owners, first = [], [], 0
    for i, c in enumerate(gemm_classes(geom)):
        rows += c.fields(first)
        tiles = -(-(geom.N * c.rows_h * c.rows_w) // block_m)
        owners += [i] * tiles
        first += tiles
    return rows + owners


_class_tables: dict[tuple, torch.Tensor] = {}  # (geometry, BLOCK_M, device) -> the table on the device
_captured_tables: list[torch.Tensor] = []  # tables first built inside a CUDA-graph capture (kept alive)


def class_table_on(geom: ConvGeometry, block_m: int, device: torch.device) -> torch.Tensor:
    """``class_table`` as an int32 tensor on ``device``, built once per shape and tile height. Inside a
    CUDA-graph capture a missing table is copied from pinned memory by the graph itself (not cached)."""
    key = (geom, block_m, str(device))
    table = _class_tables.get(key)
    if table is not None:
        return table
    host = torch.tensor(class_table(geom, block_m), dtype=torch.int32)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        host = host.pin_memory()
        table = torch.empty_like(host, device=device).copy_(host, non_blocking=True)
        _captured_tables.extend((host, table))
        return table
    table = _class_tables[key] = host.to(device)
    return table


INTERPRETER_PROGRAMS = 3  # the interpreter's resident CTAs: tests run several tiles per program
_compiled_ctas: dict[tuple, int] = {}  # (constexprs, warps, stages, dtype, device) -> CTAs per SM, compiled


def grid_size(geom: ConvGeometry, config: ConvConfig, sm_count: int, ctas: int) -> tuple[int]:
    """The persistent grid: min(tiles, SMs x resident CTAs per SM); each program loops over its tiles."""
    return (max(1, min(num_tiles(geom, config), sm_count * ctas)),)


def sm_count(device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _operands(x, weight, bias, geom: ConvGeometry, mask, out) -> dict:
    """The kernel's tensors (channels_last activations and output, the weight operand) and flags."""
    x_op = activation_operand(x)
    if geom.transposed:
        w_op, w_k_stride = upconv_weight_operand(weight), geom.k
    else:
        w_op, w_k_stride = conv_weight_operand(weight)
    out_op = out if is_nhwc(out) else torch.empty_like(out, memory_format=torch.channels_last)
    return dict(
        x=x_op,
        w=w_op,
        b=bias.contiguous() if bias is not None else w_op,  # w_op: a dummy pointer, never read
        out=out_op,
        m=activation_operand(mask) if mask is not None else x_op,  # likewise
        w_k_stride=w_k_stride,
        index_64=max(x_op.numel(), out_op.numel()) >= INDEX_64_NUMEL,
    )


def _launch(ops: dict, geom: ConvGeometry, config: ConvConfig, alpha, precision, has_bias, dgrad) -> None:
    """One persistent launch. Resident CTAs: the compiled kernel's own registers and shared memory once
    it has run on the device, else the conservative ``estimated_ctas_per_sm``."""
    x = ops["x"]
    constexprs = kernel_constexprs(
        geom,
        config,
        has_bias=has_bias,
        precision=precision,
        w_k_stride=ops["w_k_stride"],
        index_64=ops["index_64"],
        dgrad=dgrad,
    )
    key = (tuple(constexprs.items()), config.num_warps, config.num_stages, x.dtype, str(x.device))
    ctas = _compiled_ctas.get(key) or (
        1 if INTERPRET else estimated_ctas_per_sm(config, x.element_size(), 2 if dgrad else 1)
    )
    grid = grid_size(geom, config, sm_count(x.device), ctas)
    kernel = _conv_igemm_lrelu_kernel[grid](
        x,
        ops["w"],
        ops["b"],
        ops["out"],
        ops["m"],
        class_table_on(geom, config.block_m, x.device),
        **runtime_sizes(geom, config),
        alpha=float(alpha),
        mask_alpha=float(alpha),
        **constexprs,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    n_regs = getattr(kernel, "n_regs", None)
    if key not in _compiled_ctas and not INTERPRET and n_regs:
        _compiled_ctas[key] = max(1, ctas_per_sm(n_regs, config.num_warps, kernel.metadata.shared))


def conv_igemm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    geom: ConvGeometry,
    alpha: float,
    out: torch.Tensor,
    mask: torch.Tensor | None = None,
    op: str | None = None,
    configs: list[ConvConfig] | None = None,
) -> torch.Tensor:
    """Run lrelu(conv(x, W) + b) (or the up-conv, ``geom.transposed``) into ``out`` and return it.

    With ``mask`` (a dgrad: x is grad_out, ``mask`` the saved forward output, x's shape) the kernel computes
    conv(x * (1 if mask > 0 else alpha), W) instead: the mask on the load, no bias, no activation.

    Args:
        x: (N, C_in, H, W), any layout (converted to channels_last if it is not; see ``_conv_packing``).
        weight: (C_out, C_in, KH, KW), or (C_in, C_out, KH, KW) for an up-conv; x's dtype.
        bias: (C_out,) or None.
        out: (N, C_out, OH, OW) in x's dtype; written directly when channels_last, else through an NHWC
            buffer and one copy.
        op: the tuner's key (default from ``geom``); configs: candidates (default the eligible ones).
    """
    ops = _operands(x, weight, bias, geom, mask, out)
    precision = input_precision(x.dtype)
    args = (alpha, precision, bias is not None, mask is not None)
    op = op or ("conv_transpose" if geom.transposed else "conv")
    config = choose_config(
        op, geom, ops["x"], precision, lambda c: _launch(ops, geom, c, *args), candidates=configs
    )
    _launch(ops, geom, config, *args)
    if ops["out"] is not out:
        out.copy_(ops["out"])
    return out
