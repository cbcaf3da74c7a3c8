"""Static report of the conv forward kernels on every layer of the networks, compiled for sm_90 on any
machine (no GPU needed).

    python -m bench.static [--batch 64] [--dtype bf16] [--json]

For each conv and up-conv layer of the autoencoder G (64 px), the discriminator (64 and 227 px, in both
layouts of disc_padding: "padded" and "code" = unpadded) and the fc6 inversion generator (227 px), at the
given batch, channels_last:
  * the tile configs the tuner may pick for the shape (``eligible_configs``) and the issued-MMA efficiency
    of each: useful conv FLOPs / FLOPs issued by the grid's MMAs (arithmetic on shape and tiles, exact);
  * each of those kernels compiled with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (with the
    signature the JIT would build for the launch), then read: registers and local memory, i.e. spills
    (``cuobjdump -res-usage`` on the cubin Triton built), shared memory (the compiled metadata), and
    counts of PTX instructions: ``wgmma.mma_async``, ``cp.async`` (asynchronous global-to-shared copies),
    ``cp.async.bulk.tensor`` (TMA) and ``ld.global`` (synchronous loads: the epilogue's bias, plus, in the
    3-channel first layers, the gathers of x, whose 6-byte bf16 pixels no async copy can move; their
    weights still arrive by cp.async).
A wgrad row's programs are the split grid the launcher builds from the compiled kernel's resident CTAs
(``wgrad_splits``); a layer with no Triton wgrad config meeting the bars (``wgrad_candidates`` empty: the
3-channel first layers) is a row with no configs, printed as "cuDNN (no config meets the bars)".
Layer shapes are derived from the real modules (forward hooks on a meta-device run), so a change of the
networks shows up here. What this proves: the efficiency bar, that wgmma and asynchronous loads are
emitted, and that nothing spills. What it cannot: speed, which needs a GPU (bench/kernels.py).

``static_report()`` returns the rows; ``format_table(rows)`` renders them (``deepsim bench`` can print it).
Compiling needs triton's real JIT: in a process where TRITON_INTERPRET=1 (the test session), the report
runs itself in a subprocess without it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch
from deepsim.kernels import use_backend
from deepsim.kernels._conv_backward import (
    _conv_wgrad_kernel,
    dgrad_config_list,
    dgrad_geometry,
    wgrad_candidates,
    wgrad_constexprs,
    wgrad_efficiency,
    wgrad_problem,
    wgrad_splits,
    wgrad_tile,
)
from deepsim.kernels._conv_configs import (
    SM_COUNT,
    ConvGeometry,
    config_list,
    ctas_per_sm,
    eligible_configs,
    estimated_ctas_per_sm,
    issued_mma_efficiency,
)
from deepsim.kernels._conv_dgrad_fold import fold_gemm_configs, fold_gemm_geometry, uses_fold
from deepsim.kernels._conv_igemm import _conv_igemm_lrelu_kernel, kernel_constexprs, num_tiles
from deepsim.kernels._conv_packing import conv_weight_row_stride

from deepsim.applications.generators import InversionGenerator
from deepsim.networks import AutoencoderGenerator, ConvLReLU, Discriminator, UpConvLReLU

BATCH = 64
HOPPER = (90, 32)  # GPUTarget("cuda", 90, 32): H100, warp size 32
POINTER_TYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# PTX instructions counted per kernel: wgmma, cp.async (Ampere-style async copies), TMA tensor loads, and
# synchronous global loads (the epilogue's bias, plus the gathers no async copy can make: 3-channel pixels).
PTX_COUNTS = {
    "wgmma": r"\bwgmma\.mma_async\b",
    "cp_async": r"\bcp\.async\.c[ag]\.shared\.global\b",
    "tma": r"\bcp\.async\.bulk\.tensor\b",
    "ld_global": r"\bld\.global\b",
    "nctaid": r"%nctaid\.x\b",  # reads the grid size: a persistent kernel looping over its tiles
}


@dataclass(frozen=True)
class Layer:
    """One conv-like layer of a network: where it is and the problem it poses to the kernel."""

    network: str
    name: str
    geom: ConvGeometry
    input_needs_grad: bool = True  # False: training never runs this layer's dgrad (output_mask[0] False)

    @property
    def shape(self) -> str:
        g = self.geom
        kind = "up" if g.transposed else "conv"
        oh, ow = g.out_size
        return f"{kind} {g.C_in}->{g.C_out} k{g.KH}s{g.stride}p{g.padding} {g.H}x{g.W}->{oh}x{ow}"


def _networks(batch: int):
    """(network label, module builder, input builder), all on the meta device. The inputs require grad
    where training differentiates through them: D sees G's images; G's inputs (a photo, fc6 features) do
    not, so the dgrad of a layer that reads them directly never runs."""

    def image(side, needs_grad=False):
        return lambda: (torch.empty(batch, 3, side, side, device="meta", requires_grad=needs_grad),)

    return [
        ("G autoencoder 64px", AutoencoderGenerator, image(64)),
        # D in both layouts (config disc_padding): "code" (unpadded convs, the default) and "padded"
        ("D 64px", lambda: Discriminator(first_stride=2, padding="padded"), image(64, True)),
        ("D 227px", lambda: Discriminator(first_stride=4, padding="padded"), image(227, True)),
        ("D 64px unpadded", lambda: Discriminator(first_stride=2, padding="code"), image(64, True)),
        ("D 227px unpadded", lambda: Discriminator(first_stride=4, padding="code"), image(227, True)),
        (
            "G fc6 227px",
            lambda: InversionGenerator("fc6", image_size=227),
            lambda: (torch.empty(batch, 4096, device="meta"),),
        ),
    ]


def network_layers(batch: int = BATCH) -> list[Layer]:
    """Every fused conv (ConvLReLU) and up-conv (UpConvLReLU) layer of the networks, with the shape it sees
    at ``batch``, recorded by forward hooks on a meta-device forward (the reference path; no compute)."""

    layers = []
    for network, build, inputs in _networks(batch):
        with torch.device("meta"):
            model = build()
        handles = []
        for name, module in model.named_modules():
            if isinstance(module, (ConvLReLU, UpConvLReLU)):

                def hook(mod, args, out, name=name, network=network):
                    n, c_in, h, w = args[0].shape
                    transposed = isinstance(mod, UpConvLReLU)
                    kh, kw = mod.kernel_size
                    geom = ConvGeometry(
                        transposed, n, c_in, h, w, mod.out_channels, kh, kw, mod.stride[0], mod.padding[0]
                    )
                    if tuple(out.shape[2:]) != geom.out_size:
                        raise RuntimeError(
                            f"{network} {name}: geometry {geom.out_size} != {tuple(out.shape)}"
                        )
                    layers.append(Layer(network, name, geom, bool(args[0].requires_grad)))

                handles.append(module.register_forward_hook(hook))
        with use_backend("reference"):  # autograd on: which inputs require grad is part of the result
            model(*inputs())
        for h in handles:
            h.remove()
    return layers


# ----------------------------------------------------------------------------------------------------------
# Compiling for sm_90 without a GPU


@functools.cache
def compile_conv_kernel(
    constexprs: tuple, dtype: str, c_out_divisible_by_16: bool, num_warps: int, num_stages: int
) -> dict:
    """Compile the conv forward kernel (or, with MASK_A, the dgrad) for sm_90 and read it: registers, local
    memory (spills), shared memory, PTX instruction counts, SASS per wgmma. Cached per process.

    ``constexprs`` is ``kernel_constexprs(...)`` as sorted items. The signature is what the JIT builds for
    a launch: pointers 16-byte aligned (any fresh allocation), C_OUT divisible by 16 when it is, the other
    runtime sizes unspecialized (as the kernel declares).
    """
    divisible = ("C_OUT",) if c_out_divisible_by_16 else ()
    return compile_kernel(
        _conv_igemm_lrelu_kernel,
        constexprs,
        dtype,
        num_warps,
        num_stages,
        divisible,
        int_pointers=("cls_ptr",),  # the int32 class table
    )


@functools.cache
def compile_wgrad_kernel(
    constexprs: tuple, dtype: str, r_divisible_by_16: bool, num_warps: int, num_stages: int
) -> dict:
    """As ``compile_conv_kernel``, for the wgrad kernel (partials in fp32)."""

    divisible = ("R",) if r_divisible_by_16 else ()
    return compile_kernel(
        _conv_wgrad_kernel,
        constexprs,
        dtype,
        num_warps,
        num_stages,
        divisible,
        fp32_pointers=("part_ptr", "bias_part_ptr"),
    )


def compile_kernel(
    fn,
    constexprs: tuple,
    dtype: str,
    num_warps: int,
    num_stages: int,
    divisible: tuple = (),
    fp32_pointers: tuple = (),
    int_pointers: tuple = (),
) -> dict:
    # lazy, optional dependency: triton may be absent
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            signature[p.name] = (
                "*fp32"
                if p.name in fp32_pointers
                else "*i32"
                if p.name in int_pointers
                else POINTER_TYPES[dtype]
            )
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[p.name] = "fp32" if "alpha" in p.name else "i32"
            if p.name in divisible:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=dict(constexprs), attrs=attrs)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", *HOPPER), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    return inspect_compiled(compiled.asm["ptx"], compiled.asm["cubin"], compiled.metadata.shared)


def inspect_compiled(ptx: str, cubin: bytes, shared: int) -> dict:
    """Registers and local memory of the cubin (``cuobjdump -res-usage``: LOCAL/STACK > 0 means spills),
    the kernel's shared memory, and instruction counts in the PTX."""
    # lazy, optional dependency: triton may be absent
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "-res-usage", path], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "-sass", path], capture_output=True, text=True, check=True
        ).stdout
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
    info = dict(
        registers=int(fields["REG"]),
        spill_bytes=int(fields["STACK"]) + int(fields["LOCAL"]),
        shared_bytes=int(shared),
    )
    info.update({name: len(re.findall(pattern, ptx)) for name, pattern in PTX_COUNTS.items()})
    info["sass_per_wgmma"] = sass_per_wgmma(sass)
    return info


def sass_per_wgmma(sass: str) -> float | None:
    """SASS instructions per HGMMA (wgmma) in the main loop: the backward branch whose range holds the
    most HGMMA instructions, its length in instructions / those HGMMAs. None without a wgmma loop."""
    instrs = [(int(a, 16), text) for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    best = None
    for addr, text in instrs:
        target = re.search(r"\bBRA\s+(?:`\(\S+\)\s*)?0x([0-9a-f]+)", text)
        if not target or int(target.group(1), 16) >= addr:
            continue
        start = int(target.group(1), 16)
        body = [t for a, t in instrs if start <= a <= addr]
        mma = sum("HGMMA" in t for t in body)
        if mma and (best is None or mma > best[0]):
            best = (mma, len(body))
    return None if best is None else best[1] / best[0]


# ----------------------------------------------------------------------------------------------------------
# The report


KERNELS = ("forward", "dgrad", "wgrad")
CUDNN_ROW = "cuDNN (no config meets the bars)"  # a row whose kernel never runs: nothing to score


def _kernel_configs(kind: str, g: ConvGeometry, dtype: str):
    """(geometry the kernel runs, [(config, efficiency, programs, L2 bytes per MMA FLOP, compile thunk)])."""

    element = torch.empty((), dtype=TORCH_DTYPES[dtype]).element_size()
    precision = "tf32" if dtype == "fp32" else "ieee"  # fp32: PyTorch's default cuDNN setting
    out = []
    if kind in ("forward", "dgrad"):
        fold = kind == "dgrad" and uses_fold(g)  # the GEMM of GEMM + fold (the fold: no MMA)
        kg = g if kind == "forward" else fold_gemm_geometry(g) if fold else dgrad_geometry(g)
        w_k_stride = kg.k if kg.transposed else conv_weight_row_stride(kg.k, element)
        configs = (config_list if kind == "forward" else dgrad_config_list)(TORCH_DTYPES[dtype], precision)
        for c in eligible_configs(kg, element, fold_gemm_configs(configs, kg) if fold else configs):
            ce = kernel_constexprs(
                kg,
                c,
                has_bias=kind == "forward",
                precision=precision,
                w_k_stride=w_k_stride,
                dgrad=kind == "dgrad",
            )
            a_reads = 2 if kind == "dgrad" else 1  # the dgrad reads out beside grad_out (the mask)
            l2 = element * (a_reads * c.block_m + c.block_n) / (2 * c.block_m * c.block_n)
            out.append(
                (
                    c,
                    issued_mma_efficiency(kg, c),
                    num_tiles(kg, c),
                    l2,
                    kg.C_in % c.block_k == 0,
                    lambda ce=ce, c=c, kg=kg: compile_conv_kernel(
                        tuple(sorted(ce.items())), dtype, kg.C_out % 16 == 0, c.num_warps, c.num_stages
                    ),
                )
            )
        return kg, out
    p = wgrad_problem(g)

    def compiled(c):
        ce = wgrad_constexprs(g, c, bias=not g.transposed, precision=precision)
        r16 = p["R"] % 16 == 0
        return compile_wgrad_kernel(tuple(sorted(ce.items())), dtype, r16, c.num_warps, c.num_stages)

    def ctas(c):  # the launcher's count: resident CTAs of the compiled kernel
        facts = compiled(c)
        return ctas_per_sm(facts["registers"], c.num_warps, facts["shared_bytes"])

    for c in wgrad_candidates(g, TORCH_DTYPES[dtype], precision, ctas):
        block_r, block_c, _ = wgrad_tile(c)
        tiles = -(-p["R"] // block_r) * -(-p["KCOLS"] // block_c)
        # elements read per K row: the R side and the KCOLS side, the masked one twice (with the mask)
        r_reads, c_reads = (block_r, 2 * block_c) if g.transposed else (2 * block_r, block_c)
        l2 = element * (r_reads + c_reads) / (2 * block_r * block_c)
        out.append(
            (
                c,
                wgrad_efficiency(g, c),
                # the launcher sizes the split grid from the compiled kernel's resident CTAs: so here
                lambda facts, c=c, tiles=tiles: tiles * wgrad_splits(g, c, ctas(c))[0],
                l2,
                p["C"] % block_c == 0,
                lambda c=c: compiled(c),
            )
        )
    return g, out


def layer_report(layer: Layer, dtype: str = "bf16", kernel: str = "forward") -> dict:
    """One row: the layer, one of its kernels (forward, dgrad, wgrad), the configs the tuner may pick with
    efficiency, compiled facts, occupancy and waves, and their worst case."""
    g = layer.geom
    head = dict(
        network=layer.network,
        layer=layer.name,
        shape=layer.shape,
        dtype=dtype,
        kernel=kernel,
        M=g.N * g.out_size[0] * g.out_size[1],
        K=g.KH * g.KW * g.C_in,
    )
    if kernel == "dgrad" and not layer.input_needs_grad:
        return dict(head, classes=0, configs=[], note="not run: the input needs no gradient")
    kg, candidates = _kernel_configs(kernel, g, dtype)
    element = torch.empty((), dtype=TORCH_DTYPES[dtype]).element_size()
    configs = []
    for config, efficiency, tiles, l2, within, compile_it in candidates:
        facts = compile_it()
        ctas = ctas_per_sm(facts["registers"], config.num_warps, facts["shared_bytes"])
        tiles = tiles(facts) if callable(tiles) else tiles  # the wgrad's splits follow its residency
        persistent = facts["nctaid"] > 0  # the kernel loops over tiles (the forward / dgrad one)
        programs = min(tiles, SM_COUNT * max(ctas, 1)) if persistent else tiles
        estimate = estimated_ctas_per_sm(config, element, 2 if kernel == "dgrad" else 1)
        first = min(tiles, SM_COUNT * estimate)
        configs.append(
            dict(
                config=config.name,
                efficiency=efficiency,
                tiles=tiles,
                programs=programs,
                persistent=persistent,
                tiles_per_program=-(-tiles // programs),
                first_launch_programs=first if persistent else tiles,  # before the kernel's own figures
                ctas_per_sm=ctas,
                waves=tiles / (SM_COUNT * max(ctas, 1)),
                l2_bytes_per_flop=l2,
                k_tiles="within a tap" if within else "across taps",
                **facts,
            )
        )
    note = f"GEMM N={kg.C_out} + fold" if kernel == "dgrad" and uses_fold(g) else ""
    row = dict(head, classes=kg.classes, configs=configs, note=note)
    if not configs:  # no Triton config meets the bars (wgrad_candidates): that part runs on cuDNN
        return dict(row, backend=CUDNN_ROW, note=CUDNN_ROW)
    return dict(row, backend="triton", **_worst_and_pick(configs))


def _worst_and_pick(configs: list[dict]) -> dict:
    """A row's summary: the worst case over its configs, and the pick's (the first: best static score)."""
    pick = configs[0]
    return dict(
        pick=pick["config"],
        pick_l2_bytes_per_flop=pick["l2_bytes_per_flop"],
        pick_sass_per_wgmma=pick["sass_per_wgmma"] or 0.0,
        min_efficiency=min(c["efficiency"] for c in configs),
        max_registers=max(c["registers"] for c in configs),
        spill_bytes=sum(c["spill_bytes"] for c in configs),
        max_shared_bytes=max(c["shared_bytes"] for c in configs),
        wgmma=all(c["wgmma"] > 0 for c in configs),
        async_loads=all(c["cp_async"] + c["tma"] > 0 for c in configs),
        min_waves=min(c["waves"] for c in configs),
        persistent=all(c["persistent"] for c in configs),
        max_tiles_per_program=max(c["tiles_per_program"] for c in configs),
        max_l2_bytes_per_flop=max(c["l2_bytes_per_flop"] for c in configs),
        max_sass_per_wgmma=max((c["sass_per_wgmma"] or 0.0) for c in configs),
    )


def _report_here(batch: int, dtype: str, kernels=KERNELS, networks=None) -> list[dict]:
    return [
        layer_report(layer, dtype, kernel)
        for layer in network_layers(batch)
        if networks is None or layer.network in networks
        for kernel in kernels
    ]


def static_report(batch: int = BATCH, dtype: str = "bf16", kernels=KERNELS, networks=None) -> list[dict]:
    """The rows of the report (see the module docstring): per layer, one row per kernel in ``kernels``
    (forward, dgrad, wgrad), of the networks named in ``networks`` (default all); in a subprocess if this
    process interprets Triton (TRITON_INTERPRET=1, where triton.compile cannot lower kernels)."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return _report_here(batch, dtype, kernels, networks)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [
        sys.executable,
        "-m",
        "bench.static",
        "--batch",
        str(batch),
        "--dtype",
        dtype,
        "--json",
        "--kernels",
        ",".join(kernels),
    ] + (["--networks", ";".join(networks)] if networks else [])
    done = subprocess.run(args, env=env, capture_output=True, text=True, cwd=_repo_root())
    if done.returncode != 0:
        raise RuntimeError(f"python -m bench.static failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout)


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def format_table(rows: list[dict]) -> str:
    """A fixed-width table, one line per layer and kernel: the worst case over its eligible configs, then
    the pick (the first candidate) with its L2 bytes per MMA FLOP and SASS per wgmma."""
    head = (
        f"{'network':<18} {'layer':<16} {'shape':<34} {'kernel':<7} {'configs':>7} {'eff min':>7} "
        f"{'regs':>4} {'spill':>5} {'smem KB':>7} {'wgmma':>5} {'async':>5} {'cp.async/ld':>11} "
        f"{'CTA/SM':>6} {'waves':>6} {'persist':>7} {'tiles/prog':>10} {'L2 B/FLOP':>9} {'SASS/wgmma':>10} "
        f"{'pick':<18} {'pick L2':>7} {'pick SASS':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if not r["configs"]:
            lines.append(
                f"{r['network']:<18} {r['layer']:<16} {r['shape']:<34} {r['kernel']:<7} "
                f"{0:>7} {r.get('note') or r.get('backend', CUDNN_ROW)}"
            )
            continue
        cp_async = min(c["cp_async"] for c in r["configs"])
        ld_global = max(c["ld_global"] for c in r["configs"])
        ctas = min(c["ctas_per_sm"] for c in r["configs"])
        lines.append(
            f"{r['network']:<18} {r['layer']:<16} {r['shape']:<34} {r.get('kernel', 'forward'):<7} "
            f"{len(r['configs']):>7} {r['min_efficiency']:>7.3f} {r['max_registers']:>4} "
            f"{r['spill_bytes']:>5} "
            f"{r['max_shared_bytes'] / 1024:>7.0f} {'yes' if r['wgmma'] else 'NO':>5} "
            f"{'yes' if r['async_loads'] else 'NO':>5} {f'{cp_async}/{ld_global}':>11} {ctas:>6} "
            f"{r['min_waves']:>6.2f} {'yes' if r['persistent'] else 'no':>7} "
            f"{r['max_tiles_per_program']:>10} "
            f"{r['max_l2_bytes_per_flop']:>9.4f} {r['max_sass_per_wgmma']:>10.1f} "
            f"{r['pick']:<18} {r['pick_l2_bytes_per_flop']:>7.4f} {r['pick_sass_per_wgmma']:>9.1f}"
            + (f"  {r['note']}" if r.get("note") else "")
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.static", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--batch", type=int, default=BATCH, help="batch size of the layer shapes (default 64)"
    )
    parser.add_argument("--dtype", default="bf16", choices=sorted(POINTER_TYPES), help="operand dtype")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--kernels", default=",".join(KERNELS), help="comma-separated: forward,dgrad,wgrad")
    parser.add_argument("--networks", default=None, help="';'-separated network labels (default: all)")
    args = parser.parse_args(argv)
    kernels = tuple(k for k in args.kernels.split(",") if k)
    if set(kernels) - set(KERNELS):
        parser.error(f"--kernels {args.kernels!r}: expected some of {','.join(KERNELS)}")
    rows = static_report(args.batch, args.dtype, kernels, args.networks.split(";") if args.networks else None)
    print(json.dumps(rows) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
