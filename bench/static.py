"""Static report of the conv forward kernels on every layer of the networks, compiled for sm_90 on any
machine (no GPU needed).

    python -m bench.static [--batch 64] [--dtype bf16] [--json]

For each conv and up-conv layer of the autoencoder G (64 px), the discriminator (64 and 227 px, in both
layouts of disc_padding: "padded" and "code" = unpadded) and the fc6 inversion generator (227 px), at the given batch, channels_last:
  * the tile configs the tuner may pick for the shape (``eligible_configs``) and the issued-MMA efficiency
    of each: useful conv FLOPs / FLOPs issued by the grid's MMAs (arithmetic on shape and tiles, exact);
  * each of those kernels compiled with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (with the
    signature the JIT would build for the launch), then read: registers and local memory, i.e. spills
    (``cuobjdump -res-usage`` on the cubin Triton built), shared memory (the compiled metadata), and
    counts of PTX instructions: ``wgmma.mma_async``, ``cp.async`` (asynchronous global-to-shared copies),
    ``cp.async.bulk.tensor`` (TMA) and ``ld.global`` (synchronous loads: the epilogue's bias, plus, in the
    3-channel first layers, the gathers of x, whose 6-byte bf16 pixels no async copy can move; their
    weights still arrive by cp.async).
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
from deepsim.kernels._conv_configs import ConvGeometry, config_list, eligible_configs, issued_mma_efficiency
from deepsim.kernels._conv_igemm import _conv_igemm_lrelu_kernel, kernel_constexprs
from deepsim.kernels._conv_packing import conv_weight_row_stride

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
}


@dataclass(frozen=True)
class Layer:
    """One conv-like layer of a network: where it is and the problem it poses to the kernel."""

    network: str
    name: str
    geom: ConvGeometry

    @property
    def shape(self) -> str:
        g = self.geom
        kind = "up" if g.transposed else "conv"
        oh, ow = g.out_size
        return (f"{kind} {g.C_in}->{g.C_out} k{g.KH}s{g.stride}p{g.padding} "
                f"{g.H}x{g.W}->{oh}x{ow}")  # fmt: skip


def _networks(batch: int):
    """(network label, module builder, input builder), all on the meta device."""
    from deepsim.applications.generators import InversionGenerator
    from deepsim.networks import AutoencoderGenerator, Discriminator

    def image(side):
        return lambda: (torch.empty(batch, 3, side, side, device="meta"),)

    return [
        ("G autoencoder 64px", AutoencoderGenerator, image(64)),
        # D in both layouts (config disc_padding): "code" (unpadded convs, the default) and "padded"
        ("D 64px", lambda: Discriminator(first_stride=2, padding="padded"), image(64)),
        ("D 227px", lambda: Discriminator(first_stride=4, padding="padded"), image(227)),
        ("D 64px unpadded", lambda: Discriminator(first_stride=2, padding="code"), image(64)),
        ("D 227px unpadded", lambda: Discriminator(first_stride=4, padding="code"), image(227)),
        ("G fc6 227px", lambda: InversionGenerator("fc6", image_size=227),
         lambda: (torch.empty(batch, 4096, device="meta"),)),
    ]  # fmt: skip


def network_layers(batch: int = BATCH) -> list[Layer]:
    """Every fused conv (ConvLReLU) and up-conv (UpConvLReLU) layer of the networks, with the shape it sees
    at ``batch``, recorded by forward hooks on a meta-device forward (the reference path; no compute)."""
    from deepsim.networks import ConvLReLU, UpConvLReLU

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
                    geom = ConvGeometry(transposed, n, c_in, h, w, mod.out_channels, kh, kw,
                                                     mod.stride[0], mod.padding[0])  # fmt: skip
                    if tuple(out.shape[2:]) != geom.out_size:
                        raise RuntimeError(f"{network} {name}: geometry {geom.out_size} != {tuple(out.shape)}")
                    layers.append(Layer(network, name, geom))

                handles.append(module.register_forward_hook(hook))
        with use_backend("reference"), torch.no_grad():
            model(*inputs())
        for h in handles:
            h.remove()
    return layers


# ----------------------------------------------------------------------------------------------------------
# Compiling for sm_90 without a GPU


def _tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


@functools.cache
def compile_conv_kernel(constexprs: tuple, dtype: str, c_out_divisible_by_16: bool, num_warps: int,
                        num_stages: int) -> dict:  # fmt: skip
    """Compile the conv forward kernel (or, with MASK_A, the dgrad) for sm_90 and read it: registers, local
    memory (spills), shared memory, PTX instruction counts, SASS per wgmma. Cached per process.

    ``constexprs`` is ``kernel_constexprs(...)`` as sorted items. The signature is what the JIT builds for
    a launch: pointers 16-byte aligned (any fresh allocation), C_OUT divisible by 16 when it is, the other
    runtime sizes unspecialized (as the kernel declares).
    """
    divisible = ("C_OUT",) if c_out_divisible_by_16 else ()
    return compile_kernel(_conv_igemm_lrelu_kernel, constexprs, dtype, num_warps, num_stages, divisible)


@functools.cache
def compile_wgrad_kernel(constexprs: tuple, dtype: str, r_divisible_by_16: bool, num_warps: int,
                         num_stages: int) -> dict:  # fmt: skip
    """As ``compile_conv_kernel``, for the wgrad kernel (partials in fp32)."""
    from deepsim.kernels._conv_backward import _conv_wgrad_kernel

    divisible = ("R",) if r_divisible_by_16 else ()
    return compile_kernel(_conv_wgrad_kernel, constexprs, dtype, num_warps, num_stages, divisible,
                          fp32_pointers=("part_ptr", "bias_part_ptr"))  # fmt: skip


def compile_kernel(fn, constexprs: tuple, dtype: str, num_warps: int, num_stages: int,
                   divisible: tuple = (), fp32_pointers: tuple = ()) -> dict:  # fmt: skip
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            signature[p.name] = "*fp32" if p.name in fp32_pointers else POINTER_TYPES[dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[p.name] = "fp32" if "alpha" in p.name else "i32"
            if p.name in divisible:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=dict(constexprs), attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", *HOPPER),
                              options={"num_warps": num_warps, "num_stages": num_stages})  # fmt: skip
    return inspect_compiled(compiled.asm["ptx"], compiled.asm["cubin"], compiled.metadata.shared)


def inspect_compiled(ptx: str, cubin: bytes, shared: int) -> dict:
    """Registers and local memory of the cubin (``cuobjdump -res-usage``: LOCAL/STACK > 0 means spills),
    the kernel's shared memory, and instruction counts in the PTX."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", path], capture_output=True,
                               text=True, check=True).stdout  # fmt: skip
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
    info = dict(registers=int(fields["REG"]), spill_bytes=int(fields["STACK"]) + int(fields["LOCAL"]),
                shared_bytes=int(shared))  # fmt: skip
    info.update({name: len(re.findall(pattern, ptx)) for name, pattern in PTX_COUNTS.items()})
    return info


# ----------------------------------------------------------------------------------------------------------
# The report


def layer_report(layer: Layer, dtype: str = "bf16") -> dict:
    """One row: the layer, its eligible configs with efficiency and compiled facts, and their worst case."""
    g = layer.geom
    element = torch.empty((), dtype=TORCH_DTYPES[dtype]).element_size()
    precision = "tf32" if dtype == "fp32" else "ieee"  # fp32: PyTorch's default cuDNN setting
    w_k_stride = g.k if g.transposed else conv_weight_row_stride(g.k, element)
    configs = []
    for config in eligible_configs(g, element, config_list(TORCH_DTYPES[dtype], precision)):
        constexprs = kernel_constexprs(g, config, has_bias=True, precision=precision, w_k_stride=w_k_stride)
        facts = compile_conv_kernel(tuple(sorted(constexprs.items())), dtype, g.C_out % 16 == 0,
                                    config.num_warps, config.num_stages)  # fmt: skip
        k_tiles = "within a tap" if g.C_in % config.block_k == 0 else "across taps"
        configs.append(dict(config=config.name, efficiency=issued_mma_efficiency(g, config), k_tiles=k_tiles,
                            **facts))  # fmt: skip
    return dict(
        network=layer.network, layer=layer.name, shape=layer.shape, dtype=dtype,
        M=g.N * g.out_size[0] * g.out_size[1], K=g.KH * g.KW * g.C_in, classes=g.classes,
        configs=configs,
        min_efficiency=min(c["efficiency"] for c in configs),
        max_registers=max(c["registers"] for c in configs),
        spill_bytes=sum(c["spill_bytes"] for c in configs),
        max_shared_bytes=max(c["shared_bytes"] for c in configs),
        wgmma=all(c["wgmma"] > 0 for c in configs),
        async_loads=all(c["cp_async"] + c["tma"] > 0 for c in configs),
    )  # fmt: skip


def _report_here(batch: int, dtype: str) -> list[dict]:
    return [layer_report(layer, dtype) for layer in network_layers(batch)]


def static_report(batch: int = BATCH, dtype: str = "bf16") -> list[dict]:
    """The rows of the report (see the module docstring); in a subprocess if this process interprets
    Triton (TRITON_INTERPRET=1, where triton.compile cannot lower kernels)."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return _report_here(batch, dtype)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "bench.static", "--batch", str(batch), "--dtype", dtype, "--json"],
                          env=env, capture_output=True, text=True, cwd=_repo_root())  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"python -m bench.static failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout)


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def format_table(rows: list[dict]) -> str:
    """A fixed-width table, one line per layer (worst case over its eligible configs)."""
    head = (f"{'network':<18} {'layer':<16} {'shape':<34} {'configs':>7} {'eff min':>7} {'regs':>4} "
            f"{'spill':>5} {'smem KB':>7} {'wgmma':>5} {'async':>5} {'cp.async/ld':>11}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        cp_async = min(c["cp_async"] for c in r["configs"])
        ld_global = max(c["ld_global"] for c in r["configs"])
        lines.append(
            f"{r['network']:<18} {r['layer']:<16} {r['shape']:<34} {len(r['configs']):>7} "
            f"{r['min_efficiency']:>7.3f} {r['max_registers']:>4} {r['spill_bytes']:>5} "
            f"{r['max_shared_bytes'] / 1024:>7.0f} {'yes' if r['wgmma'] else 'NO':>5} "
            f"{'yes' if r['async_loads'] else 'NO':>5} {f'{cp_async}/{ld_global}':>11}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.static", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=BATCH, help="batch size of the layer shapes (default 64)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(POINTER_TYPES), help="operand dtype")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    rows = static_report(args.batch, args.dtype)
    print(json.dumps(rows) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
