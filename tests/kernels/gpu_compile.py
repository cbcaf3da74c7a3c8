"""Compile every Triton kernel for an NVIDIA GPU target on a machine without one.

Triton's compiler (front end, LLVM, ptxas shipped with triton) needs no device: ``triton.compile`` with a
``GPUTarget`` lowers a kernel to PTX and a cubin. That catches, on the CPU, the errors that the interpreter
cannot see (tl.dot shape/dtype rules, shared-memory overflows of an autotune config, type mismatches in
the lowered IR) before a GPU session spends its minutes on them. It does not run the kernels.

Run as a script (``python tests/kernels/gpu_compile.py [--all-configs]``) in a process where
TRITON_INTERPRET is unset: under the interpreter ``triton.jit`` returns interpreted functions. The conv
forward kernel in bf16 is covered per network layer by ``python -m bench.static`` (registers, spills,
wgmma, async loads, efficiency); here it compiles in the other dtypes (every config with --all-configs).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("gpu_compile.py needs TRITON_INTERPRET unset")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # bench

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
FLOAT_ARGS = {"alpha", "mask_alpha", "scale"}


def _kernel(module: str, name: str):
    return getattr(importlib.import_module(f"deepsim.kernels.{module}"), name)


def _signature(fn, pointer: str, constexprs: dict, overrides: dict | None = None) -> dict:
    """Pointer args get ``pointer``; float-named scalars fp32; other scalars i32; constexprs as given."""
    overrides = overrides or {}
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in overrides:
            sig[p.name] = overrides[p.name]
        elif p.name.endswith("_ptr") or "_ptr" in p.name:
            sig[p.name] = pointer
        elif p.name in FLOAT_ARGS:
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: no value for constexpr {missing}")
    return sig


def compile_kernel(
    fn, pointer: str, constexprs: dict, *, num_warps=4, num_stages=3, overrides=None, target=HOPPER
):
    fn = getattr(fn, "fn", fn) if not isinstance(fn, triton.runtime.jit.JITFunction) else fn
    src = ASTSource(fn=fn, signature=_signature(fn, pointer, constexprs, overrides), constexprs=constexprs)
    compiled = triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
    return compiled


def _conv_jobs(all_configs: bool):
    """The conv forward kernel (conv_lrelu and conv_transpose_lrelu) in fp32 (TF32 and IEEE) and fp16, on a
    layer of each K path and an up-conv: the static pick, or with --all-configs every config that ``fits``.
    bf16 on every network layer and every eligible config is bench/static.py's report (test_static_report)."""
    from bench.static import compile_conv_kernel

    config_list = _kernel("_conv_configs", "config_list")
    geometry = _kernel("_conv_configs", "ConvGeometry")
    eligible = _kernel("_conv_configs", "eligible_configs")
    constexprs_of = _kernel("_conv_igemm", "kernel_constexprs")
    row_stride = _kernel("_conv_packing", "conv_weight_row_stride")
    fits = _kernel("_conv_configs", "fits")
    geoms = {
        "conv 128->256 k3": geometry(False, 64, 128, 16, 16, 256, 3, 3, 1, 1),
        "conv 3->32 k7s4": geometry(False, 64, 3, 227, 227, 32, 7, 7, 4, 0),
        "conv 8->128 k3": geometry(False, 64, 8, 8, 8, 128, 3, 3, 1, 1),
        "up 128->64 k4s2": geometry(True, 64, 128, 8, 8, 64, 4, 4, 2, 1),
    }
    torch_dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    for dtype, precision, size in (
        ("fp32", "tf32", 4),
        ("fp32", "ieee", 4),
        ("fp16", "ieee", 2),
        ("bf16", "ieee", 2),
    ):
        if dtype == "bf16" and not all_configs:
            continue
        configs = config_list(torch_dtypes[dtype], precision)
        for name, g in geoms.items():
            fitting = [c for c in configs if fits(g, c, size)]  # shared memory, large tiles
            for cfg in fitting if all_configs else eligible(g, size, configs)[:1]:
                w_k_stride = g.k if g.transposed else row_stride(g.k, size)
                constexprs = constexprs_of(g, cfg, has_bias=True, precision=precision, w_k_stride=w_k_stride)

                def run(constexprs=constexprs, cfg=cfg, dtype=dtype, g=g):
                    facts = compile_conv_kernel(
                        tuple(sorted(constexprs.items())),
                        dtype,
                        g.C_out % 16 == 0,
                        cfg.num_warps,
                        cfg.num_stages,
                    )
                    if facts["spill_bytes"]:
                        raise RuntimeError(f"spills {facts['spill_bytes']} bytes")
                    return facts["shared_bytes"]

                yield f"_conv_igemm_lrelu_kernel {dtype} {precision} {name} {cfg.name}", run
    g, cfg = (
        geoms["up 128->64 k4s2"],
        eligible(geoms["up 128->64 k4s2"], 2, config_list(torch.bfloat16, "ieee"))[0],
    )
    constexprs = constexprs_of(g, cfg, has_bias=False, precision="ieee", index_64=True)
    yield (
        f"_conv_igemm_lrelu_kernel bf16 int64 indices no bias {cfg.name}",
        lambda: compile_conv_kernel(
            tuple(sorted(constexprs.items())), "bf16", True, cfg.num_warps, cfg.num_stages
        )["shared_bytes"],
    )


def jobs(all_configs: bool):
    """(label, thunk that compiles and returns the shared memory in bytes) for every kernel we ship."""
    yield from _conv_jobs(all_configs)

    def plain(fn, pointer, constexprs, options, overrides):
        return lambda: compile_kernel(fn, pointer, constexprs, overrides=overrides, **options).metadata.shared

    bias_act = importlib.import_module("deepsim.kernels.bias_lrelu")
    fd = importlib.import_module("deepsim.kernels.feature_distance")
    pw = importlib.import_module("deepsim.kernels.pairwise_distance")
    for dtype, pointer in DTYPES.items():
        for name in (
            "_bias_lrelu_fwd_kernel",
            "_lrelu_bias_grad_kernel",
        ):  # BLOCK_M x BLOCK_C as launched at C >= 64
            flags = dict(HAS_BIAS=True) if "fwd" in name else dict(WRITE_GRAD_PRE=True, BIAS_GRAD=True)
            yield (
                f"{name} {dtype}",
                plain(
                    getattr(bias_act, name),
                    pointer,
                    dict(BLOCK_M=64, BLOCK_C=64, **flags),
                    {},
                    {"partial_ptr": "*fp32"} if "grad" in name else None,
                ),
            )
        for layers in (1, 8):  # one layer = (fake, real, grad, numel, wscale, gscale, first program)
            layer = (pointer, pointer, pointer, "i32", "fp32", "fp32", "i32")
            yield (
                f"_feature_distance_fwd_kernel {dtype} layers={layers}",
                plain(
                    fd._feature_distance_fwd_kernel,
                    pointer,
                    dict(COMPUTE_GRAD=True, BLOCK=fd._BLOCK, ITERS=8),
                    {},
                    {"partial_ptr": "*fp32", "layers": (layer,) * layers},
                ),
            )
            yield (
                f"_feature_distance_bwd_kernel {dtype} layers={layers}",
                plain(
                    fd._feature_distance_bwd_kernel,
                    pointer,
                    dict(BLOCK=fd._BLOCK, ITERS=8),
                    {},
                    {"grad_loss_ptr": "*fp32", "layers": ((pointer, pointer, "i32", "i32"),) * layers},
                ),
            )
    lp = importlib.import_module("deepsim.kernels.lpips_distance")
    geo = ("i32",) * 8  # (C, P, strides, position blocks, programs, first program)
    for dtype, pointer in (("fp32", "*fp32"), ("bf16", "*bf16")):  # 5 taps (LPIPS' launch)
        for direction, fn, flags, tap in (
            ("fwd", lp._lpips_fwd_kernel, {}, (pointer, pointer, "*fp32", geo, "i32", "fp32")),
            (
                "bwd",
                lp._lpips_bwd_kernel,
                dict(NEED0=True, NEED1=True),
                (pointer,) * 4 + ("*fp32", geo, "fp32"),
            ),
        ):
            over = {"eps2": "fp32", "partial_ptr": "*fp32", "gout_ptr": "*fp32", "taps": (tap,) * 5}
            yield (
                f"_lpips_{direction}_kernel {dtype} taps=5",
                plain(fn, pointer, dict(BLOCK_C=lp._BLOCK_C, BLOCK_P=lp._BLOCK_P, **flags), {}, over),
            )
    yield (
        "_channel_sum_kernel",
        plain(bias_act._channel_sum_kernel, "*fp32", dict(BLOCK_R=64, BLOCK_C=64), {}, None),
    )
    yield (
        "_feature_distance_sum_kernel",
        plain(fd._feature_distance_sum_kernel, "*fp32", dict(BLOCK=fd._SUM_BLOCK), {}, None),
    )
    yield (
        "_mean_pairwise_distance_fwd_kernel",
        plain(
            pw._mean_pairwise_distance_fwd_kernel,
            "*fp32",
            dict(BLOCK_M=pw._BLOCK_M, BLOCK_D=pw._BLOCK_D),
            {},
            {"partial_ptr": "*fp32"},
        ),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all-configs", action="store_true", help="every tile config in every dtype")
    args = parser.parse_args(argv)
    failures = 0
    for label, run in jobs(args.all_configs):
        start = time.perf_counter()
        try:
            shared = run()
            print(f"ok    {label}  shared={shared} B  {time.perf_counter() - start:.1f}s", flush=True)
        except Exception as error:  # noqa: BLE001 - report every kernel, then fail
            failures += 1
            print(
                f"FAIL  {label}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                flush=True,
            )
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
