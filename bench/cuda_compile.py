"""Compile the real training step for CUDA (sm_90) on a machine with no GPU, and count what it launches.

    python -m bench.cuda_compile [--workloads autoencoder invert-fc6] [--kernels auto triton] [--json FILE]

Each (workload, kernel backend) pair runs in a child process that pretends to have one H200: a small C
shim (bench/fakecuda/shim.c, built with cc at run time and LD_PRELOADed) answers the CUDA runtime's device
and stream queries, and Python patches make torch.cuda, Dynamo's device interface and triton's driver
report an sm_90 device. The trainer's parameters, optimizer state and the batch become fake CUDA tensors;
``CompiledStep`` (bf16, channels_last, "reduce-overhead") is then compiled by inductor exactly as on a GPU
(AOTAutograd, lowering, Triton codegen, ptxas for sm_90, the CUDA-graph checks), and the compiled frame
runs nothing. The project's own Triton kernels inside its ``deepsim::*`` custom ops are compiled at the
shapes the step calls them with.

Row fields: workload, kernels, graphs, graph_breaks, partitions (each with its devices),
cudagraph_skip_reasons, triton_kernels (inductor's distinct kernels + ours), all_sm90, launches_per_step
(every kernel one iteration launches: inductor's Triton launches, extern calls such as cuDNN convolutions
and matmuls, aten fallbacks, and our custom ops' Triton launches), launches (that count by kind),
flops_per_step (matmuls and convolutions, forward and backward), flops_per_launch, kernel_list (one entry
per launch site, for bench/time_model.py), notes (decisions made without a GPU), seconds, status.

What it proves and what it cannot: see the README ("Compiled for CUDA on a CPU machine"). It patches
private torch and triton APIs: :func:`unsupported` names what is missing, and the row is then skipped.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import types
from collections import Counter
from pathlib import Path

import torch
from deepsim.kernels import use_backend

from deepsim.config import get_preset
from deepsim.tasks import TASKS
from deepsim.train.compiled import CompiledStep
from deepsim.train.factory import build_trainer

ROOT = Path(__file__).resolve().parents[1]
SHIM = Path(__file__).resolve().parent / "fakecuda" / "shim.c"
WORKLOADS = ("autoencoder", "invert-fc6")
KERNELS = ("auto", "triton")
CONTROLS = ("none", "cpu-op", "no-static-address")
CHILD_TIMEOUT_S = 1800
_UNMARKED = None  # the no-static-address control's tensor
# The torch and triton versions this was checked on; older ones lack or change what it patches.
MIN_TORCH, MIN_TRITON = (2, 14), (3, 8)


def _version(text: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", text).groups()
    return int(major), int(minor)


def unsupported() -> str | None:
    """Why this machine cannot run the check (a one-line reason), or None when it can."""
    try:
        # lazy: a missing torch or triton becomes the one-line reason this returns
        import torch
        import triton
    except ImportError as e:
        return f"bench.cuda_compile needs torch and triton ({e})"
    if _version(torch.__version__) < MIN_TORCH or _version(triton.__version__) < MIN_TRITON:
        return (
            f"bench.cuda_compile patches private APIs checked on torch >= {'.'.join(map(str, MIN_TORCH))} "
            f"and triton >= {'.'.join(map(str, MIN_TRITON))}; found torch {torch.__version__}, "
            f"triton {triton.__version__}"
        )
    if torch.version.cuda is None:
        return f"bench.cuda_compile needs a CUDA build of torch (found {torch.__version__})"
    needed = {
        "torch._inductor.output_code": ("CompiledFxGraph",),
        "torch._inductor.runtime.triton_heuristics": ("CachingAutotuner",),
        "torch._dynamo.device_interface": ("CudaInterface", "caching_worker_device_properties"),
        "torch._inductor.fx_passes.joint_graph": ("UniformValueConstantFolder",),
        "torch._inductor.fx_passes.pad_mm": ("_should_pad",),
        "torch.fx.experimental.proxy_tensor": ("CONSTANT_NUMEL_LIMIT",),
        "torch.cuda.amp.common": ("amp_definitely_not_available",),
        "triton.backends.nvidia.driver": ("CudaDriver", "CudaLauncher"),
        "triton.runtime.jit": ("JITFunction",),
    }

    for module, names in needed.items():
        try:
            found = importlib.import_module(module)
        except ImportError:
            return f"bench.cuda_compile: torch/triton here has no module {module}"
        for name in names:
            if not hasattr(found, name):
                return f"bench.cuda_compile: {module}.{name} is missing in this torch/triton"
    if not _include_dir().joinpath("cuda_runtime_api.h").exists():
        return f"bench.cuda_compile: triton's bundled CUDA headers are missing ({_include_dir()})"
    if _compiler() is None:
        return "bench.cuda_compile needs a C compiler (cc or gcc on PATH) to build its CUDA shim"
    return None


def _include_dir() -> Path:
    # lazy, optional dependency: triton may be absent
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "include"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def build_shim(folder: str) -> str:
    """Compile shim.c into ``folder``; returns the shared library's path (SONAME libcuda.so.1)."""
    out = os.path.join(folder, "libdeepsim_fakecuda.so")
    cmd = [
        _compiler(),
        "-shared",
        "-fPIC",
        "-O1",
        f"-I{_include_dir()}",
        "-Wl,-soname,libcuda.so.1",
        "-o",
        out,
        str(SHIM),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench/fakecuda/shim.c: cc failed: {' '.join(done.stderr.split())[:300]}")
    return out


# ---------------------------------------------------------------------------------------- launch counting
def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


_FREE = ("reinterpret_tensor", "empty_strided", "del", "as_strided", "alloc_from_pool")


def launch_sites(source: str) -> list[dict]:
    """Every kernel launch in an inductor output module, in program order: one dict per call site with
    ``kind`` ("triton", "extern", "aten", "custom", "copy"), ``name`` and ``launches`` (kernels it starts).

    Reads the host code of ``call`` and the ``partition_*`` functions (the kernels' own source is in string
    literals, never called there). ``aten.convolution_backward`` counts one launch per gradient it computes
    (cuDNN's data and weight gradients, the bias reduction); cuDNN may split any call further (a lower bound).
    """
    tree = ast.parse(source)
    bodies = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef) and (n.name == "call" or n.name.startswith("partition_"))
    ]
    sites = []
    for body in bodies:
        for node in ast.walk(body):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            if name.startswith("triton_") and last == "run":
                sites.append(dict(kind="triton", name=name[: -len(".run")], launches=1, fn=body.name))
            elif name.startswith("extern_kernels."):
                sites.append(dict(kind="extern", name=last, launches=1, fn=body.name))
            elif ".deepsim." in f".{name}":
                op = name.split("deepsim.", 1)[1].split(".")[0]
                sites.append(dict(kind="custom", name=op, launches=1, fn=body.name))
            elif name.startswith(("aten.", "torch.ops.aten.")):
                op = name.split("aten.", 1)[1].split(".")[0]
                count = 1
                if op == "convolution_backward" and node.args and isinstance(node.args[-1], ast.List):
                    count = sum(isinstance(e, ast.Constant) and e.value is True for e in node.args[-1].elts)
                sites.append(dict(kind="aten", name=op, launches=count, fn=body.name))
            elif last in ("copy_", "zero_", "fill_") and not name.startswith(_FREE):
                sites.append(dict(kind="copy", name=last, launches=1, fn=body.name))
    return sites


def partition_devices(source: str) -> list[dict]:
    """The output module's partitions: each ``partition_*`` function (captured as a CUDA graph under
    reduce-overhead) and, where it does work of its own, ``call`` (what runs outside every partition), with
    the devices its kernels and buffers are on."""
    tree = ast.parse(source)
    out = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef) or not (fn.name == "call" or fn.name.startswith("partition_")):
            continue
        code = ast.get_source_segment(source, fn) or ""
        devices = set()
        if re.search(r"\btriton_\w+\.run\(|empty_strided_cuda|device\(type='cuda'", code):
            devices.add("cuda")
        if re.search(r"\bcpp_fused_\w+\(|empty_strided_cpu|device\(type='cpu'", code):
            devices.add("cpu")
        if fn.name == "call" and not devices and any(s["fn"] == "call" for s in launch_sites(code)):
            devices.add("unknown")
        if fn.name == "call" and not devices:
            continue  # only hands its arguments to the partitions
        out.append(dict(name=fn.name, devices=sorted(devices), cuda_graph=fn.name != "call"))
    if not any(p["name"].startswith("partition_") for p in out):  # no partitioning: the whole graph is one
        for p in out:
            p["cuda_graph"] = True
    return out


# ----------------------------------------------------------------------------------- the fake GPU (child)
H200 = types.SimpleNamespace(
    name="NVIDIA H200",
    major=9,
    minor=0,
    total_memory=150_000_000_000,
    multi_processor_count=132,
    max_threads_per_multi_processor=2048,
    regs_per_multiprocessor=65536,
    warp_size=32,
    max_threads_per_block=1024,
    L2_cache_size=50 * 1024 * 1024,
    shared_memory_per_block=49152,
    shared_memory_per_block_optin=232448,
    shared_memory_per_multiprocessor=233472,
    is_integrated=False,
    is_multi_gpu_board=False,
    gcnArchName="NVIDIA H200",
    uuid="fake",
)


class Record:
    """What the child saw: inductor graphs, Triton kernels (inductor's and ours), notes."""

    def __init__(self):
        self.graphs: list[dict] = []  # one per inductor compile: cudagraph verdicts, source
        self.inductor_kernels: dict[str, list[dict]] = {}  # kernel name -> compiled configs
        self.kernel_estimates: dict[
            str, dict
        ] = {}  # kernel name -> inductor's bytes (GB) and FLOPs estimates
        self.op_kernels: list[dict] = []  # our custom ops' Triton compiles
        self.op_launches: dict[str, set[int]] = {}  # op -> launches per call seen
        self.op_errors: list[str] = []
        self.notes: Counter = Counter()


def _cubin_sm(raw) -> int | None:
    """The SM version an ELF cubin was built for (e_flags, low byte), or None."""
    return struct.unpack_from("<I", raw, 0x30)[0] & 0xFF if raw and raw[:4] == b"\x7fELF" else None


def _patch_torch_cuda(torch) -> None:
    # lazy, optional: private torch internals that vary by version (probed by unsupported())
    import torch.cuda.amp.common as amp_common
    import torch.cuda.graphs as cuda_graphs
    from torch._dynamo import device_interface

    answers = dict(
        # is_available stays False for FakeTensorMode (it keeps factory constants on the CPU and saves no CUDA
        # RNG state); inductor asks Dynamo's CudaInterface instead, which says True.
        is_available=lambda: False,
        device_count=lambda: 1,
        current_device=lambda: 0,
        set_device=lambda d: None,
        get_device_properties=lambda device=None: H200,
        get_device_capability=lambda device=None: (9, 0),
        get_device_name=lambda device=None: H200.name,
        is_bf16_supported=lambda *a, **k: True,
        synchronize=lambda device=None: None,
        _lazy_init=lambda: None,
        is_initialized=lambda: True,
        get_rng_state=lambda device="cuda": torch.zeros(16, dtype=torch.uint8),
        set_rng_state=lambda *a, **k: None,
        get_arch_list=lambda: ["sm_90"],
        _exchange_device=lambda d: 0,
        _maybe_exchange_device=lambda d: 0,
        memory_allocated=lambda device=None: 0,
        is_current_stream_capturing=lambda: False,
    )
    for name, fn in answers.items():
        setattr(torch.cuda, name, fn)
    cuda_graphs.is_current_stream_capturing = answers["is_current_stream_capturing"]
    amp_common.amp_definitely_not_available = lambda: False  # else autocast("cuda") turns itself off
    interface = device_interface.CudaInterface  # its static methods were bound to torch.cuda's at import
    for name in (
        "current_device",
        "set_device",
        "device_count",
        "synchronize",
        "get_device_properties",
        "memory_allocated",
        "is_bf16_supported",
    ):
        setattr(interface, name, staticmethod(answers[name]))
    interface.exchange_device = staticmethod(answers["_exchange_device"])
    interface.maybe_exchange_device = staticmethod(answers["_maybe_exchange_device"])
    interface.get_raw_stream = staticmethod(lambda index: 0)
    interface.is_available = staticmethod(lambda: True)
    interface.get_compute_capability = staticmethod(lambda device=None: 90)
    device_interface.caching_worker_device_properties["cuda"] = [H200]
    device_interface.caching_worker_current_devices["cuda"] = 0


def _patch_inductor(torch, record: Record) -> None:
    # lazy, optional: private torch internals that vary by version (probed by unsupported())
    import torch.fx.experimental.proxy_tensor as proxy_tensor
    from torch._inductor.fx_passes import joint_graph, pad_mm
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map

    # make_fx runs ops on 1-element real constants to fold them; on "cuda" that would allocate: trace them.
    proxy_tensor.CONSTANT_NUMEL_LIMIT = 0

    class OnTheCpu(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            def cpu(v):
                return torch.device("cpu") if isinstance(v, torch.device) and v.type == "cuda" else v

            return func(*tree_map(cpu, args), **tree_map(cpu, kwargs or {}))

    fold = joint_graph.UniformValueConstantFolder.run

    def fold_on_the_cpu(self, *args, **kwargs):  # folds constant subgraphs on real tensors
        with OnTheCpu():
            return fold(self, *args, **kwargs)

    joint_graph.UniformValueConstantFolder.run = fold_on_the_cpu
    should_pad = pad_mm._should_pad

    def should_pad_untimed(*args, **kwargs):  # undecided by heuristics: timed on a GPU; none here
        try:
            return should_pad(*args, **kwargs)
        except (RuntimeError, torch.AcceleratorError):
            record.notes["pad_mm left unpadded (needs GPU timing)"] += 1
            return False

    pad_mm._should_pad = should_pad_untimed

    def make_no_launchers(self):  # each config is compiled to a cubin; loading one needs the driver
        configs = []
        for result in self.compile_results:
            raw = getattr(result.kernel, "cubin_raw", None) or getattr(result.kernel, "asm", {}).get("cubin")
            meta = result.compile_meta
            configs.append(
                dict(
                    cc=meta.get("cc"),
                    cubin_sm=_cubin_sm(raw),
                    num_warps=meta.get("num_warps"),
                    num_stages=meta.get("num_stages"),
                )
            )
        name = self.inductor_meta.get("kernel_name")
        record.inductor_kernels[name] = configs
        record.kernel_estimates[name] = dict(
            gb=self.inductor_meta.get("kernel_num_gb"), flop=self.inductor_meta.get("kernel_flop")
        )
        self.launchers = []

    CachingAutotuner._make_launchers = make_no_launchers
    CachingAutotuner._dynamic_scale_rblock = lambda self: None


def _patch_triton_driver() -> None:
    import triton.runtime.driver  # noqa: F401 - the module (triton.runtime.driver, the name, is its config)
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver, CudaLauncher

    class NoUtils:
        def __getattr__(self, name):
            raise RuntimeError(f"bench.cuda_compile: triton's driver utils.{name} needs a GPU")

    class CompileOnlyDriver(CudaDriver):
        def __init__(self):  # CudaDriver's would build its utils module against libcuda
            self.utils = NoUtils()
            self.launcher_cls = CudaLauncher
            self.get_device_capability = lambda device=None: (9, 0)
            self.get_current_stream = lambda device=None: 0
            self.get_current_device = lambda: 0
            self.set_current_device = lambda device: None

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    CudaDriver.is_active = staticmethod(lambda: True)
    config = sys.modules["triton.runtime.driver"].driver
    config._default = CompileOnlyDriver()
    config.set_active(config._default)


def _patch_custom_ops(torch, record: Record) -> None:
    """Our ``deepsim::*`` ops: tracing calls their fake impl; at each new (shapes, strides, dtypes) the real
    impl also runs on the fake CUDA tensors, with every Triton launch compiled (warmup) instead of run."""

    # lazy, optional: private torch internals that vary by version (probed by unsupported())
    from torch._library.custom_ops import OPDEFS
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils._pytree import tree_flatten
    from triton.runtime.jit import JITFunction

    seen: set = set()
    current: list[str] = []
    launches: list[int] = [0]
    jit_run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        if kernel is not None and current:
            launches[0] += 1
            record.op_kernels.append(
                dict(
                    op=current[-1],
                    kernel=self.fn.__name__,
                    cc=kernel.metadata.target.arch,
                    cubin_sm=_cubin_sm(kernel.asm.get("cubin")),
                )
            )
        return kernel

    @contextlib.contextmanager
    def compiling():
        JITFunction.run = compile_only
        FakeTensor.data_ptr = lambda self: 1 << 20  # 16-byte aligned, like a caching-allocator block
        try:
            yield
        finally:
            JITFunction.run = jit_run
            del FakeTensor.data_ptr

    for name, opdef in list(OPDEFS.items()):
        if not name.startswith("deepsim::") or opdef._abstract_fn is None:
            continue

        def fake_and_compile(*args, _fake=opdef._abstract_fn, _real=opdef._init_fn, _name=name, **kwargs):
            out = _fake(*args, **kwargs)
            leaves = tree_flatten((args, kwargs))[0]  # tensors may come in lists (feature_distance)
            tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
            key = (_name,) + tuple(
                (tuple(a.shape), tuple(a.stride()), a.dtype) if isinstance(a, torch.Tensor) else repr(a)
                for a in leaves
            )
            if key in seen or not tensors or not all(t.is_cuda for t in tensors):
                return out
            seen.add(key)
            current.append(_name.split("::", 1)[1])
            launches[0] = 0
            try:
                with compiling(), torch.no_grad():
                    _real(*args, **kwargs)
                record.op_launches.setdefault(current[-1], set()).add(launches[0])
            except Exception as e:  # noqa: BLE001 - reported in the row
                record.op_errors.append(f"{_name}: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
            finally:
                current.pop()
            return out

        opdef._abstract_fn = fake_and_compile


def _recording_backend(torch, mode: str, record: Record):
    """A torch.compile backend: inductor compiles the graph as ``backend="inductor", mode=mode`` would, and
    the compiled frame returns fake outputs of the traced shapes (nothing runs)."""
    # lazy, optional: private torch internals that vary by version (probed by unsupported())
    import torch._inductor as inductor
    from torch._dynamo.utils import counters
    from torch._guards import detect_fake_mode
    from torch._inductor import config
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    patches = dict(inductor.list_mode_options(mode)) if mode != "default" else {}
    patches["triton.cudagraph_support_input_mutation"] = False  # decide input mutation now, not at replay
    patches["force_disable_caches"] = True  # a cache hit would skip the compile being checked
    patches["benchmark_kernel"] = True  # inductor's bytes and FLOPs estimates in each kernel's meta

    def inner_compile(gm, example_inputs, **kwargs):
        splits = counters["inductor"]["cudagraph_partitions"]
        out = compile_fx_inner(gm, example_inputs, **kwargs)
        info = getattr(out, "cudagraph_info", None)
        record.graphs.append(
            dict(
                backward=bool(kwargs.get("is_backward")),
                devices=sorted(getattr(out, "device_types", ())),
                cudagraphs=bool(config.triton.cudagraphs),
                fail_reasons=list(info.cudagraph_fail_reasons) if info else [],
                disabled_reason=getattr(out, "disabled_cudagraphs_reason", None),
                partition_splits=counters["inductor"]["cudagraph_partitions"] - splits,
                source=getattr(out, "source_code", "") or "",
            )
        )
        return out

    def backend(gm, example_inputs):
        compile_fx(gm, example_inputs, inner_compile=inner_compile, config_patches=patches)
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        flat = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]

        def run_nothing(*args):
            with detect_fake_mode(args):
                values = [n.meta.get("example_value") if hasattr(n, "meta") else n for n in flat]
                res = [
                    torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)
                    if isinstance(v, torch.Tensor)
                    else v
                    for v in values
                ]
            return res if isinstance(outputs, (list, tuple)) else res[0]

        return run_nothing

    return backend


def _trainer(workload: str, batch: int, order: str):
    if workload == "autoencoder":
        config = get_preset("autoencoder-photos").replace(
            batch_size=batch, image_size=64, comparator="alexnet-random:conv3"
        )
    else:
        config = get_preset("invert-fc6").replace(
            batch_size=batch,
            invert_network="alexnet-random",
            comparator="alexnet-random:pool5",
            fc_width=4096,
        )
    config = config.replace(device="cpu", update_order=order, precision="bf16")
    torch.manual_seed(0)
    trainer = build_trainer(config, torch.device("cpu"), TASKS)
    return trainer.to_channels_last(), config  # on the real tensors: the fake copies keep their strides


def _to_fake_cuda(torch, trainer) -> None:
    """Swap every parameter, buffer and optimizer state of ``trainer`` for a fake CUDA tensor of the same
    shape and strides (call inside the FakeTensorMode); shared parameters stay shared."""
    fakes: dict[int, torch.nn.Parameter] = {}
    for module in trainer.modules():
        for name, t in list(module._parameters.items()):
            if t is not None:
                if id(t) not in fakes:
                    empty = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")
                    fakes[id(t)] = torch.nn.Parameter(empty, requires_grad=t.requires_grad)
                module._parameters[name] = fakes[id(t)]
        for name, t in list(module._buffers.items()):
            if t is not None:
                module._buffers[name] = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")
    for optimizer in (trainer.opt_g, trainer.opt_d):
        if optimizer is None:
            continue
        state = {
            fakes[id(p)]: {
                k: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="cuda")
                for k, v in s.items()
            }
            for p, s in optimizer.state.items()
        }
        for group in optimizer.param_groups:
            group["params"] = [fakes[id(p)] for p in group["params"]]
        optimizer.state.clear()
        optimizer.state.update(state)


def _count_flops(torch, trainer, batch) -> int:
    """Matmul and convolution FLOPs of one iteration (forward and backward), counted on the fake tensors
    with the reference kernels (the custom ops are opaque to the counter)."""
    # lazy, optional: private torch internals that vary by version (probed by unsupported())
    from torch.utils.flop_counter import FlopCounterMode

    with use_backend("reference"), FlopCounterMode(display=False) as counter:
        CompiledStep(trainer, "eager").iteration(batch)  # updates fake state only
    return int(counter.get_total_flops())


def child(
    workload: str, kernels: str, batch: int, mode: str, order: str, control: str, keep_code: str | None = None
) -> dict:
    """One row, compiled in this process (which must run under the shim: see :func:`run`)."""
    # lazy, optional: private torch internals that vary by version (probed by unsupported())
    import torch._dynamo
    from torch._dynamo.utils import counters
    from torch._subclasses.fake_tensor import FakeTensorMode

    t0 = time.perf_counter()
    trainer, config = _trainer(workload, batch, order)
    record = Record()
    _patch_torch_cuda(torch)
    _patch_inductor(torch, record)
    _patch_triton_driver()
    _patch_custom_ops(torch, record)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        _to_fake_cuda(torch, trainer)
        side = config.image_size
        x = torch.empty(batch, 3, side, side, device="cuda").contiguous(memory_format=torch.channels_last)
        flops = _count_flops(torch, trainer, x) if control == "none" else None
    if control == "cpu-op":  # a host copy inside the graph
        step_metrics = trainer.step_metrics

        def metrics_through_the_host(*args, **kwargs):
            metrics = step_metrics(*args, **kwargs)
            metrics["Pause/r"] = metrics["Pause/r"].cpu() * 1.0
            return metrics

        trainer.step_metrics = metrics_through_the_host
    if control == "no-static-address":  # a (global) tensor the step mutates in place, never marked static
        global _UNMARKED
        with fake_mode:
            _UNMARKED = torch.zeros((), device="cuda")
        step_metrics = trainer.step_metrics

        def metrics_counting(*args, **kwargs):
            _UNMARKED.add_(1.0)
            return step_metrics(*args, **kwargs)

        trainer.step_metrics = metrics_counting
    step = CompiledStep(trainer, mode, backend=_recording_backend(torch, mode, record))
    step._kernels_decided = True  # dispatch.prepare times conv paths on a GPU: untimed here (DEFAULT_PATH)
    status = "ok"
    try:
        step(x)
    except Exception as e:  # noqa: BLE001 - the failure is the finding
        status = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:400]}"
    if keep_code:
        os.makedirs(keep_code, exist_ok=True)
        for i, g in enumerate(record.graphs):
            Path(keep_code, f"{workload}-{kernels}-{control}-{i}.py").write_text(g["source"])
    sites = [s for g in record.graphs for s in launch_sites(g["source"])]
    op_launches = {op: max(counts) for op, counts in record.op_launches.items()}
    by_kind: Counter = Counter()
    kernel_list = []
    for s in sites:
        n = s["launches"] * (op_launches.get(s["name"], 1) if s["kind"] == "custom" else 1)
        by_kind[s["kind"]] += n
        entry = dict(kind=s["kind"], name=s["name"], launches=n)
        if s["kind"] == "triton":
            entry.update(record.kernel_estimates.get(s["name"], {}))
        kernel_list.append(entry)
    inductor_sm = [c for configs in record.inductor_kernels.values() for c in configs]
    ours = {(k["op"], k["kernel"]) for k in record.op_kernels}
    all_sm90 = bool(inductor_sm or record.op_kernels) and all(
        c["cc"] == 90 and c["cubin_sm"] == 90 for c in inductor_sm + record.op_kernels
    )
    launches = sum(by_kind.values())
    notes = dict(record.notes)
    if any(len(c) > 1 for c in record.op_launches.values()):
        notes["custom ops with shape-dependent launch counts (max taken)"] = sorted(
            op for op, c in record.op_launches.items() if len(c) > 1
        )
    return dict(
        workload=workload,
        kernels=kernels,
        mode=mode,
        order=order,
        batch=batch,
        control=control,
        image_size=config.image_size,
        precision="bf16",
        channels_last=True,
        graphs=counters["stats"]["unique_graphs"],
        graph_breaks=sum(counters["graph_break"].values()),
        inductor_graphs=len(record.graphs),
        partitions=[p for g in record.graphs for p in partition_devices(g["source"])],
        cudagraph_skip_reasons=[r for g in record.graphs for r in g["fail_reasons"]]
        + [g["disabled_reason"] for g in record.graphs if g["disabled_reason"]],
        cudagraph_skips=counters["inductor"]["cudagraph_skips"],
        triton_kernels=len(record.inductor_kernels) + len(ours),
        inductor_triton_kernels=len(record.inductor_kernels),
        custom_op_triton_kernels=len(ours),
        all_sm90=all_sm90,
        launches_per_step=launches,
        launches=dict(by_kind),
        custom_op_launches_per_call=op_launches,
        flops_per_step=flops,
        flops_per_launch=None if not flops or not launches else flops / launches,
        kernel_list=kernel_list,
        op_errors=record.op_errors,
        notes=notes,
        seconds=round(time.perf_counter() - t0, 1),
        status=status if not record.op_errors else f"failed: {record.op_errors[0]}",
    )


# ------------------------------------------------------------------------------------------ the parent
def run(
    workloads=WORKLOADS,
    kernels=KERNELS,
    *,
    batch: int = 64,
    mode: str = "reduce-overhead",
    order: str = "code",
    control: str = "none",
    timeout_s: float = CHILD_TIMEOUT_S,
    keep_code: str | None = None,
) -> list[dict]:
    """One row per (workload, kernels), each compiled in a child process under the CUDA shim."""
    reason = unsupported()
    if reason is not None:
        return [dict(workload=w, kernels=k, status=f"skipped: {reason}") for w in workloads for k in kernels]
    rows = []
    with tempfile.TemporaryDirectory(prefix="deepsim-cuda-compile-") as folder:
        shim = build_shim(folder)
        for workload in workloads:
            for backend in kernels:
                out = os.path.join(folder, f"{workload}-{backend}.json")
                env = {
                    k: v
                    for k, v in os.environ.items()
                    if k not in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")
                }
                env.setdefault("OMP_NUM_THREADS", "1")
                env.update(
                    LD_PRELOAD=":".join(filter(None, [shim, env.get("LD_PRELOAD")])),
                    DEEPSIM_KERNELS=backend,
                    DEEPSIM_AUTOTUNE="0",
                    TORCHINDUCTOR_CACHE_DIR=os.path.join(folder, "inductor"),
                    TRITON_CACHE_DIR=os.path.join(folder, "triton"),
                )
                cmd = [
                    sys.executable,
                    "-m",
                    "bench.cuda_compile",
                    "--child",
                    "--json",
                    out,
                    "--workloads",
                    workload,
                    "--kernels",
                    backend,
                    "--batch",
                    str(batch),
                    "--mode",
                    mode,
                    "--order",
                    order,
                    "--control",
                    control,
                ] + (["--keep-code", os.path.abspath(keep_code)] if keep_code else [])
                t0 = time.perf_counter()
                try:
                    done = subprocess.run(
                        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
                    )
                except subprocess.TimeoutExpired:
                    rows.append(
                        dict(workload=workload, kernels=backend, status=f"failed: over {timeout_s:.0f} s")
                    )
                    continue
                if done.returncode != 0 or not os.path.exists(out):
                    tail = " ".join(done.stderr.split())[-600:]
                    rows.append(
                        dict(
                            workload=workload,
                            kernels=backend,
                            seconds=round(time.perf_counter() - t0, 1),
                            status=f"failed: child exit {done.returncode}: {tail}",
                        )
                    )
                    continue
                rows.append(json.loads(Path(out).read_text()))
    return rows


def format_table(rows: list[dict]) -> str:
    head = (
        "workload",
        "kernels",
        "graphs",
        "breaks",
        "partitions",
        "cg skips",
        "triton k.",
        "sm_90",
        "launches",
        "GFLOP/launch",
        "s",
        "status",
    )
    lines = [head]
    for r in rows:
        parts = "; ".join(f"{p['name']}:{'+'.join(p['devices'])}" for p in r.get("partitions", []))
        fpl = r.get("flops_per_launch")
        lines.append(
            tuple(
                str(v)
                for v in (
                    r.get("workload"),
                    r.get("kernels"),
                    r.get("graphs", "-"),
                    r.get("graph_breaks", "-"),
                    parts or "-",
                    len(r.get("cudagraph_skip_reasons", [])) if "cudagraph_skip_reasons" in r else "-",
                    r.get("triton_kernels", "-"),
                    r.get("all_sm90", "-"),
                    r.get("launches_per_step", "-"),
                    "-" if fpl is None else f"{fpl / 1e9:.2f}",
                    r.get("seconds", "-"),
                    r.get("status", "-")[:60],
                )
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cuda_compile", description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    p.add_argument("--kernels", nargs="+", choices=KERNELS + ("cudnn", "reference"), default=list(KERNELS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument(
        "--mode", choices=("default", "reduce-overhead", "max-autotune"), default="reduce-overhead"
    )
    p.add_argument("--order", choices=("code", "simultaneous"), default="code")
    p.add_argument(
        "--control",
        choices=CONTROLS,
        default="none",
        help="a planted fault the check must report: a .cpu() in the graph (a CPU partition), a tensor "
        "the step mutates without a static address (a CUDA-graph skip)",
    )
    p.add_argument("--json", metavar="FILE", help="write the rows (a JSON list) to FILE")
    p.add_argument("--keep-code", metavar="DIR", help="write inductor's output module of each graph into DIR")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error(f"--batch {args.batch}: expected a positive batch size")
    if args.child:
        row = child(
            args.workloads[0],
            args.kernels[0],
            args.batch,
            args.mode,
            args.order,
            args.control,
            args.keep_code,
        )
        Path(args.json).write_text(json.dumps(row))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # inductor's compile workers and atexit hooks would keep the child alive for minutes
    rows = run(
        args.workloads,
        args.kernels,
        batch=args.batch,
        mode=args.mode,
        order=args.order,
        control=args.control,
        keep_code=args.keep_code,
    )
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return (
        0 if all(r.get("status") == "ok" or str(r.get("status")).startswith("skipped") for r in rows) else 1
    )


if __name__ == "__main__":
    sys.exit(main())
