"""Tile configs of the conv forward kernel, their issued-MMA efficiency, and the per-shape tuner.

Design notes: docs/kernels.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._backend import AUTOTUNE, INTERPRET
from ._conv_shape import conv_out_size

MIN_EFFICIENCY = 0.85  # issued-MMA efficiency a config needs to be eligible for a shape
MAX_CANDIDATES = 3  # eligible configs timed per shape (best static score first)
SHARED_MEMORY_LIMIT = 200 * 1024  # bytes of pipeline buffers allowed (H100: 227 KB per block)
SM_COUNT = 132  # streaming multiprocessors of an H100 SXM, for the wave term of the static score


@dataclass(frozen=True)
class ConvGeometry:
    """One conv (or up-conv) problem: what the kernel's grid, constexprs and efficiency depend on.

    For an up-conv (``transposed``), H x W is the input and the weight is (C_in, C_out, KH, KW).
    """

    transposed: bool
    N: int
    C_in: int
    H: int
    W: int
    C_out: int
    KH: int
    KW: int
    stride: int
    padding: int
    output_padding: tuple[int, int] = (0, 0)  # up-conv only: extra output rows, columns (a conv's dgrad)

    @property
    def out_size(self) -> tuple[int, int]:
        s, p, t, (oph, opw) = self.stride, self.padding, self.transposed, self.output_padding
        return conv_out_size(self.H, self.KH, s, p, t, oph), conv_out_size(self.W, self.KW, s, p, t, opw)

    @property
    def taps(self) -> tuple[int, int]:
        """Taps per GEMM: KH x KW for a conv, ceil(KH/S) x ceil(KW/S) per parity class of an up-conv."""
        if self.transposed:
            return -(-self.KH // self.stride), -(-self.KW // self.stride)
        return self.KH, self.KW

    @property
    def rows(self) -> tuple[int, int]:
        """The output grid of one GEMM: OH x OW, or ceil(OH/S) x ceil(OW/S) per parity class."""
        oh, ow = self.out_size
        if self.transposed:
            return -(-oh // self.stride), -(-ow // self.stride)
        return oh, ow

    @property
    def classes(self) -> int:
        """GEMMs of the decomposition (``gemm_classes``): 1 for a conv."""
        return len(gemm_classes(self))

    @property
    def m(self) -> int:
        """GEMM rows of a conv; for an up-conv, of its largest parity class (ceil(OH/S) x ceil(OW/S))."""
        return self.N * self.rows[0] * self.rows[1]

    @property
    def k(self) -> int:
        """GEMM reduction length of a conv, taps x C_in; for an up-conv, of its largest parity class."""
        return self.taps[0] * self.taps[1] * self.C_in

    def class_k(self) -> list[int]:
        """Reduction length of each GEMM of ``gemm_classes``, in their order."""
        return [c.taps_h * c.taps_w * self.C_in for c in gemm_classes(self)]

    def class_m(self) -> list[int]:
        """Rows of each GEMM of ``gemm_classes``, in their order."""
        return [self.N * c.rows_h * c.rows_w for c in gemm_classes(self)]

    def useful_flops(self) -> int:
        if self.transposed:
            return 2 * self.N * self.H * self.W * self.C_in * self.C_out * self.KH * self.KW
        oh, ow = self.out_size
        return 2 * self.N * oh * ow * self.C_out * self.KH * self.KW * self.C_in

    def tuning_key(self) -> tuple:
        """Everything but the batch, plus the bucket of M = N * OH * OW (next power of two)."""
        oh, ow = self.out_size
        bucket = 1 << max(0, (self.N * oh * ow - 1).bit_length())
        return (
            self.transposed,
            self.C_in,
            self.H,
            self.W,
            self.C_out,
            self.KH,
            self.KW,
            self.stride,
            self.padding,
            self.output_padding,
            bucket,
        )


CLASS_FIELDS = 11  # int32 fields per class in the kernel's class table (GemmClass.fields)


@dataclass(frozen=True)
class GemmClass:
    """One GEMM of an up-conv: output rows oh = ph + S * r for r in [r0h, r0h + rows_h) (columns likewise),
    each reading exactly the taps th in [th0, th0 + taps_h) x [tw0, tw0 + taps_w) of the kernel's flipped
    tap grid (kernels/_conv_igemm.py): its parity class's taps, less those whose input row or column lies
    outside the input (a border row of the output). ``taps_h * taps_w == 0``: rows no input reaches (zeros).
    """

    ph: int
    pw: int
    r0h: int
    rows_h: int
    r0w: int
    rows_w: int
    th0: int
    taps_h: int
    tw0: int
    taps_w: int

    def fields(self, first_m_tile: int) -> list[int]:
        """The kernel's class-table row: these fields, then the class's first M tile."""
        return [*dataclasses.astuple(self), first_m_tile]


def _row_segments(out: int, size: int, k: int, stride: int, padding: int) -> list[tuple]:
    """Per output phase ph (oh = ph + S * r) of one dimension of an up-conv: runs of rows r with the same
    valid tap range, as (ph, r0, rows, t0, taps); an interior run, and one run per border row."""
    t = -(-k // stride)
    runs = []
    for ph in range(min(stride, out)):
        k0 = (ph + padding) % stride
        phase_taps = -(-(k - k0) // stride) if k0 < k else 0
        pad = t - 1 - (ph + padding) // stride  # input row = r - pad + th
        for r in range(-(-(out - ph) // stride)):
            lo, hi = max(t - phase_taps, pad - r), min(t - 1, size - 1 + pad - r)
            key = (lo, hi - lo + 1) if hi >= lo else (0, 0)
            last = runs[-1] if runs else None
            if last and last[0] == ph and last[3:] == key and last[1] + last[2] == r:
                runs[-1] = (ph, last[1], last[2] + 1, *key)
            else:
                runs.append((ph, r, 1, *key))
    return runs


@functools.cache
def gemm_classes(geom: ConvGeometry) -> tuple[GemmClass, ...]:
    """The GEMMs the kernel runs for ``geom``: one for a conv; for an up-conv (and so a conv's dgrad) one per
    parity class and border run of rows and columns, each with its exact taps (docs/kernels.md)."""
    th, tw = geom.taps
    if not geom.transposed:
        return (GemmClass(0, 0, 0, geom.rows[0], 0, geom.rows[1], 0, th, 0, tw),)
    (oh, ow), s, p = geom.out_size, geom.stride, geom.padding
    rows = _row_segments(oh, geom.H, geom.KH, s, p)
    cols = _row_segments(ow, geom.W, geom.KW, s, p)
    return tuple(
        GemmClass(ph, pw, r0h, nh, r0w, nw, th0, kh, tw0, kw)
        for ph, r0h, nh, th0, kh in rows
        for pw, r0w, nw, tw0, kw in cols
    )


@dataclass(frozen=True)
class ConvConfig:
    """Tile sizes and launch options of the forward kernel."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k} w{self.num_warps} s{self.num_stages}"

    def meta(self) -> dict:
        """Keyword arguments of a kernel launch."""
        return dict(
            BLOCK_M=self.block_m,
            BLOCK_N=self.block_n,
            BLOCK_K=self.block_k,
            num_warps=self.num_warps,
            num_stages=self.num_stages,
        )

    @property
    def large(self) -> bool:
        """A 256-row or 256-column tile."""
        return max(self.block_m, self.block_n) > 128

    def shared_memory_bytes(self, element_size: int) -> int:
        """Pipeline buffers: num_stages copies of the A (BM x BK) and B (BK x BN) tiles."""
        return self.num_stages * (self.block_m + self.block_n) * self.block_k * element_size


# The H100 list. Every shape of the networks (C_in 3..512, C_out 32..512, M = N*OH*OW from 1024 up) finds
# eligible configs here; BLOCK_K = 16 / 32 serve K = 72 (8-channel 3x3), 75 (3-channel 5x5) and 147
# (3-channel 7x7), whose K a 64-wide step would pad by 25 to 33 %. The 256-row and 256-column tiles (fewer
# L2 bytes per MMA FLOP) keep <= 64 fp32 accumulators per thread with 8 or 16 warps (16: at most 128
# registers per thread); across taps (small C_in) some spill or pass 240 registers, so they only run with
# the K tile inside one tap (``fits``).
GPU_CONFIGS = [
    ConvConfig(bm, bn, bk, w, s)
    for bm, bn, bk, w, s in [
        (128, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (128, 32, 64, 4, 4),
        (128, 128, 32, 8, 4),
        (128, 64, 32, 4, 4),
        (128, 32, 32, 4, 4),
        (128, 128, 16, 8, 5),
        (128, 64, 16, 4, 5),
        (128, 32, 16, 4, 5),
        (256, 128, 64, 16, 4),
        (128, 256, 64, 16, 4),
        (256, 64, 64, 8, 4),
        (256, 64, 32, 8, 5),
        (256, 32, 64, 8, 4),
        (256, 32, 32, 8, 5),
    ]
]
# fp32 without TF32 has no tensor-core MMA: Triton lowers the dot to FMAs with both operands in registers,
# so the tiles are smaller: none spills on a 3-, 8- and 128-channel conv or an up-conv (tests/kernels/
# gpu_compile.py --all-configs). PyTorch's default lets cuDNN convs use TF32, and then GPU_CONFIGS apply.
FMA_CONFIGS = [
    ConvConfig(bm, bn, bk, w, s)
    for bm, bn, bk, w, s in [
        (128, 64, 16, 8, 2),
        (64, 128, 16, 8, 2),
        (64, 64, 32, 4, 2),
        (64, 64, 16, 4, 2),
        (128, 32, 16, 4, 2),
        (64, 32, 16, 4, 2),
    ]
]
# The interpreter runs every program in numpy: few, mid-sized tiles keep the tests fast; the two BLOCK_K
# values cover both K paths (a K tile inside one tap when C_in % BLOCK_K == 0, across taps otherwise).
INTERPRETER_CONFIGS = [ConvConfig(64, 32, 16, 4, 1), ConvConfig(128, 64, 32, 4, 1)]


def config_list(dtype: torch.dtype, precision: str) -> list[ConvConfig]:
    """The configs for ``dtype`` and the dot's input precision: the interpreter's, the FMA list (fp32 IEEE)
    or the tensor-core list (16-bit types, TF32)."""
    if INTERPRET:
        return INTERPRETER_CONFIGS
    return FMA_CONFIGS if dtype == torch.float32 and precision == "ieee" else GPU_CONFIGS


MAX_REGISTERS = 240  # the register bar of every config (tests/kernels/test_static_backward.py)
REGISTERS_PER_SM, SHARED_PER_SM, MAX_CTAS_PER_SM = 65536, 228 * 1024, 32  # H100 / H200 (sm_90)


def ctas_per_sm(registers: int, num_warps: int, shared_bytes: int) -> int:
    """Resident CTAs per SM allowed by registers (allocated per warp in units of 256) and shared memory
    (plus 1 KB reserved per CTA). The persistent launcher and bench/static.py both count with it."""
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = REGISTERS_PER_SM // (per_warp * num_warps)
    by_smem = SHARED_PER_SM // (shared_bytes + 1024)
    return max(0, min(by_regs, by_smem, MAX_CTAS_PER_SM))


def register_cap(num_warps: int) -> int:
    """Registers per thread a CTA of ``num_warps`` warps can compile to: the bar, or what one CTA's threads
    get of the SM's registers if that is less (128 at 16 warps)."""
    return min(MAX_REGISTERS, REGISTERS_PER_SM // (32 * num_warps))


def estimated_ctas_per_sm(config: ConvConfig, element_size: int, a_tiles: int = 1) -> int:
    """``ctas_per_sm`` before the kernel is compiled: ``register_cap`` registers per thread (an upper
    bound) and the pipeline buffers of ``a_tiles`` A tiles (2 for the dgrad: grad_out and the mask) and
    one B tile per stage, at least 1. Once compiled, the launcher counts with the kernel's own figures."""
    smem = config.num_stages * (a_tiles * config.block_m + config.block_n) * config.block_k * element_size
    return max(1, ctas_per_sm(register_cap(config.num_warps), config.num_warps, smem))


def issued_mma_efficiency(geom: ConvGeometry, config: ConvConfig) -> float:
    """Nominal conv FLOPs (``useful_flops``) / FLOPs issued by the grid's MMAs (docs/kernels.md). Above 1
    where the GEMM classes skip taps that read only padding (the border rows of an up-conv or a dgrad)."""
    n_cols = -(-geom.C_out // config.block_n) * config.block_n
    issued = sum(
        -(-m // config.block_m) * config.block_m * -(-k // config.block_k) * config.block_k
        for m, k in zip(geom.class_m(), geom.class_k())
    )
    return geom.useful_flops() / (2 * issued * n_cols) if issued else 1.0  # 1.0: no MMA to issue


def m_tiles(geom: ConvGeometry, config: ConvConfig) -> int:
    """M tiles over all GEMM classes (each class's rows padded to whole tiles)."""
    return sum(-(-m // config.block_m) for m in geom.class_m())


def static_score(geom: ConvGeometry, config: ConvConfig) -> float:
    """A heuristic rank (higher first), not a measurement: efficiency x wave fill x tile reuse x K depth.

    Wave fill: tiles / (whole waves of SM_COUNT tiles). Tile reuse: BM*BN / (BM+BN), the MACs per loaded
    element (the inverse of L2 bytes per MMA FLOP), relative to a 128 x 128 tile: 4/3 for 256 x 128, so a
    large tile ranks first where it fills the SMs as well (on few tiles, halving them costs more). K depth:
    a 16-wide K step (one wgmma per loop trip, so the loop's bookkeeping weighs) counts half; 32 and more
    count fully.
    """
    programs = m_tiles(geom, config) * -(-geom.C_out // config.block_n)
    waves = math.ceil(programs / SM_COUNT)
    reuse = config.block_m * config.block_n / (config.block_m + config.block_n) / 64
    depth = min(1.0, config.block_k / 32)
    return issued_mma_efficiency(geom, config) * (programs / (waves * SM_COUNT)) * reuse * depth


def fits(geom: ConvGeometry, config: ConvConfig, element_size: int = 2) -> bool:
    """Shared memory within SHARED_MEMORY_LIMIT, and a ``large`` tile only where the K tile lies inside one
    tap (C_in % BLOCK_K == 0): across taps, the per-column tap arithmetic of a 256-row or 256-column tile
    spills on some layers (16 warps: 128 registers) or passes 240 registers (8 warps, 3 channels)."""
    within_tap = geom.C_in % config.block_k == 0
    shared_ok = config.shared_memory_bytes(element_size) <= SHARED_MEMORY_LIMIT
    return shared_ok and (within_tap or not config.large)


def is_eligible(geom: ConvGeometry, config: ConvConfig, element_size: int = 2) -> bool:
    """Meets the efficiency bar and ``fits``."""
    return issued_mma_efficiency(geom, config) >= MIN_EFFICIENCY and fits(geom, config, element_size)


def eligible_configs(geom: ConvGeometry, element_size: int = 2, configs=None) -> list[ConvConfig]:
    """Configs the tuner may pick for ``geom`` out of ``configs`` (default: ``config_list`` for 16-bit
    types): efficiency >= MIN_EFFICIENCY and ``fits`` (shared memory, large tiles), best static score
    first, at most MAX_CANDIDATES; never empty (if no config qualifies, the most efficient one that fits,
    alone)."""
    configs = config_list(torch.bfloat16, "ieee") if configs is None else configs
    fitting = [c for c in configs if fits(geom, c, element_size)] or configs
    good = [c for c in fitting if is_eligible(geom, c, element_size)]
    if not good:
        return [max(fitting, key=lambda c: (issued_mma_efficiency(geom, c), static_score(geom, c)))]
    return sorted(good, key=lambda c: -static_score(geom, c))[:MAX_CANDIDATES]


# ----------------------------------------------------------------------------------------------------------
# Tuner

_forced: list[tuple[ConvConfig, tuple[str, ...]]] = []  # innermost force_config() last
_tuned: dict[tuple, ConvConfig] = {}  # (op, tuning key, dtype, device, precision) -> winner
FORWARD_OPS = ("conv", "conv_transpose")
KERNEL_OPS = (*FORWARD_OPS, "dgrad_conv", "dgrad_conv_transpose", "wgrad_conv", "wgrad_conv_transpose")


@contextlib.contextmanager
def force_config(config: ConvConfig, ops: tuple[str, ...] = FORWARD_OPS):
    """Run every launch of the kernels ``ops`` (default: the forward ones; see KERNEL_OPS) in the block
    with ``config``, eligible or not (tests, benchmarks)."""
    unknown = set(ops) - set(KERNEL_OPS)
    if unknown:
        raise ValueError(f"force_config: unknown ops {sorted(unknown)}; expected some of {KERNEL_OPS}")
    _forced.append((config, tuple(ops)))
    try:
        yield
    finally:
        _forced.pop()


def forced_config(op: str) -> ConvConfig | None:
    for config, ops in reversed(_forced):
        if op in ops:
            return config
    return None


def tuned_configs() -> dict[tuple, ConvConfig]:
    """The decisions made so far: {(op, tuning key, dtype, device, precision): config} (a copy)."""
    return dict(_tuned)


def clear_tuned_configs() -> None:
    _tuned.clear()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def default_timer(launch: Callable[[], None]) -> float:
    """Milliseconds per launch on the current CUDA stream (triton.testing.do_bench, short)."""
    import triton.testing  # lazy: triton is optional (absent on CPU-only installs)

    return float(triton.testing.do_bench(launch, warmup=5, rep=20))


def choose_config(
    op: str,
    geom: ConvGeometry,
    x: torch.Tensor,
    precision: str,
    launch: Callable[[ConvConfig], None],
    *,
    timer: Callable | None = None,
    autotune: bool | None = None,
    candidates: list[ConvConfig] | None = None,
) -> ConvConfig:
    """The config to run ``geom`` with: forced > cached decision > timed candidates > static pick.

    Args:
        op: one of KERNEL_OPS (part of the cache key).
        x: the input (its dtype and device are part of the key; timing only on CUDA).
        precision: the tl.dot input precision (fp32 TF32 or IEEE time differently).
        launch: runs the kernel once with a config (used for timing; its output is overwritten later).
        timer: ms per call of a no-argument launch; default ``default_timer`` (tests pass a fake one).
        autotune: time candidates at all; default: DEEPSIM_AUTOTUNE and not the interpreter.
        candidates: the configs to choose from, best static pick first (the wgrad kernel's own list);
            default the forward kernel's eligible configs for ``geom``.
    """
    forced = forced_config(op)
    if forced is not None:
        return forced
    own_list = candidates is not None
    if not own_list:
        candidates = eligible_configs(geom, x.element_size(), config_list(x.dtype, precision))
    key = (op, geom.tuning_key(), x.dtype, str(x.device), precision)
    cached = _tuned.get(key)
    if cached is not None:
        usable = cached in candidates or (not own_list and is_eligible(geom, cached, x.element_size()))
        return cached if usable else candidates[0]
    autotune = (AUTOTUNE and not INTERPRET) if autotune is None else autotune
    if len(candidates) == 1 or not autotune or _capturing(x.device):
        return candidates[0]  # untimed static pick, not cached: a later eager call may still tune
    if timer is None:
        if x.device.type != "cuda":
            return candidates[0]
        timer = default_timer
    times = {config: timer(lambda config=config: launch(config)) for config in candidates}
    best = min(candidates, key=lambda c: times[c])
    _tuned[key] = best
    return best
