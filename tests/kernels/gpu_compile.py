"""Compile every Triton kernel for an NVIDIA GPU target on a machine without one.

Triton's compiler (front end, LLVM, ptxas shipped with triton) needs no device: ``triton.compile`` with a
``GPUTarget`` lowers a kernel to PTX and a cubin. That catches, on the CPU, the errors that the interpreter
cannot see (tl.dot shape/dtype rules, shared-memory overflows of an autotune config, type mismatches in
the lowered IR) before a GPU session spends its minutes on them. It does not run the kernels.

Run as a script (``python tests/kernels/gpu_compile.py [--all-configs]``) in a process where
TRITON_INTERPRET is unset: under the interpreter ``triton.jit`` returns interpreted functions.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("gpu_compile.py needs TRITON_INTERPRET unset")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
FLOAT_ARGS = {"alpha", "scale", "wscale", "gscale"} | {f"{k}scale{i}" for k in "wg" for i in range(8)}


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
        elif p.name.rstrip("01234567") in {"wscale", "gscale"} or p.name in FLOAT_ARGS:
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: no value for constexpr {missing}")
    return sig


def compile_kernel(fn, pointer: str, constexprs: dict, *, num_warps=4, num_stages=3, overrides=None, target=HOPPER):
    fn = getattr(fn, "fn", fn) if not isinstance(fn, triton.runtime.jit.JITFunction) else fn
    src = ASTSource(fn=fn, signature=_signature(fn, pointer, constexprs, overrides), constexprs=constexprs)
    compiled = triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
    return compiled


def jobs(all_configs: bool):
    """(label, kernel, pointer type, constexprs, launch options, overrides) for every kernel we ship."""
    for module, name in (("conv_lrelu", "_conv_lrelu_fwd_kernel"), ("conv_transpose_lrelu", "_conv_transpose_lrelu_fwd_kernel")):
        tuner = _kernel(module, name)
        for dtype, pointer in DTYPES.items():
            configs = tuner.configs if (all_configs or dtype == "bf16") else tuner.configs[:1]
            for cfg in configs:
                constexprs = dict(STRIDE=2, PAD=1, KH=4 if "transpose" in module else 3, KW=4 if "transpose" in module else 3,
                                  HAS_BIAS=True, INPUT_PRECISION="tf32" if dtype == "fp32" else "ieee", **cfg.kwargs)
                label = f"{name} {dtype} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}"
                yield label, tuner.fn, pointer, constexprs, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages), None
    bias_act = importlib.import_module("deepsim.kernels.bias_lrelu")
    fd = importlib.import_module("deepsim.kernels.feature_distance")
    pw = importlib.import_module("deepsim.kernels.pairwise_distance")
    for dtype, pointer in DTYPES.items():
        for name in ("_bias_lrelu_fwd_kernel", "_lrelu_bias_grad_kernel"):  # BLOCK_M x BLOCK_C as launched at C >= 64
            flags = dict(HAS_BIAS=True) if "fwd" in name else dict(WRITE_GRAD_PRE=True, BIAS_GRAD=True)
            yield (f"{name} {dtype}", getattr(bias_act, name), pointer, dict(BLOCK_M=64, BLOCK_C=64, **flags), {},
                   {"partial_ptr": "*fp32"} if "grad" in name else None)
        for layers in (1, 8):
            partial = {"partial_ptr": "*fp32"}
            yield (f"_feature_distance_fwd_kernel {dtype} layers={layers}", fd._feature_distance_fwd_kernel, pointer,
                   dict(NUM_LAYERS=layers, COMPUTE_GRAD=True, BLOCK=fd._BLOCK, ITERS=8), {}, partial)
        for layers in (1, 8):
            yield (f"_feature_distance_bwd_kernel {dtype} layers={layers}", fd._feature_distance_bwd_kernel, pointer,
                   dict(NUM_LAYERS=layers, BLOCK=fd._BLOCK, ITERS=8), {}, {"grad_loss_ptr": "*fp32"})
    yield ("_channel_sum_kernel", bias_act._channel_sum_kernel, "*fp32", dict(BLOCK_R=64, BLOCK_C=64), {}, None)
    yield ("_feature_distance_sum_kernel", fd._feature_distance_sum_kernel, "*fp32", dict(BLOCK=fd._SUM_BLOCK), {}, None)
    yield ("_mean_pairwise_distance_fwd_kernel", pw._mean_pairwise_distance_fwd_kernel, "*fp32",
           dict(BLOCK_M=pw._BLOCK_M, BLOCK_D=pw._BLOCK_D), {}, {"partial_ptr": "*fp32"})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all-configs", action="store_true", help="every autotune config in every dtype")
    args = parser.parse_args(argv)
    failures = 0
    for label, fn, pointer, constexprs, options, overrides in jobs(args.all_configs):
        start = time.perf_counter()
        try:
            compiled = compile_kernel(fn, pointer, constexprs, overrides=overrides, **options)
            shared = compiled.metadata.shared
            print(f"ok    {label}  shared={shared} B  {time.perf_counter() - start:.1f}s", flush=True)
        except Exception as error:  # noqa: BLE001 - report every kernel, then fail
            failures += 1
            print(f"FAIL  {label}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}", flush=True)
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
