"""The conv-block dispatcher: per layer shape, the faster of the fused Triton op and cuDNN conv + the Triton
bias+LReLU epilogue, timed once on CUDA and remembered (the idea of ``torch.backends.cudnn.benchmark``).

Design notes: docs/kernels.md.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from . import dispatch_cache
from ._backend import HAS_TRITON, backend, requested_backend
from ._conv_shape import conv_out_size
from .dispatch_cache import CACHE_ENV, cache_path

__all__ = [
    "PATHS",
    "DEFAULT_PATH",
    "CACHE_ENV",
    "Decision",
    "cache_path",
    "choose",
    "conv_path",
    "decision_for",
    "decision_key",
    "backward_impls",
    "time_graph_ms",
    "decisions",
    "format_decisions",
    "prepare",
    "reset",
    "time_cuda_ms",
]

PATHS = ("triton", "cudnn")  # candidates, timed in this order
DEFAULT_PATH = "cudnn"  # untimed choice: inside CUDA-graph capture or a torch.compile trace with no decision
WARMUP, ITERS = 3, 10
GRAPH_CALLS, GRAPH_REPLAYS = 20, 7  # a candidate is timed as GRAPH_CALLS calls in one CUDA graph, replayed
PARTS = ("forward", "dgrad", "wgrad")  # decided separately per key
# Relative L2 error a Triton candidate may have against cuDNN on its first call on a device, per dtype.
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-3, "bf16": 2e-2}
# Device types on which "auto" dispatches. Tests add "cpu" (with a fake timer) to drive the logic.
DISPATCH_DEVICES: tuple[str, ...] = ("cuda",)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}

Run = Callable[..., torch.Tensor]  # run(path, x, weight, bias, stride, padding, alpha) -> out, with autograd


@dataclass
class Decision:
    """One dispatcher decision: which path a conv block of one key takes, and why."""

    op: str  # "conv_lrelu" | "conv_transpose_lrelu"
    key: str  # the key as text (the cache file's key)
    choice: str  # "triton" | "cudnn"
    source: str  # "measured" | "cache file" | "default: ..." (untimed)
    ms: dict[str, float | None] = field(default_factory=dict)  # forward + backward ms per path, if timed
    context: str = ""  # "<card> | torch <v> | triton <v>"
    shape: str = ""  # the call that decided it: "x 64x3x64x64 w 32x3x5x5 s2 p2"
    note: str = ""  # e.g. the error of a path that failed while timing
    dgrad: str = DEFAULT_PATH  # grad_x of the fused path: "triton" | "cudnn" (after the Triton mask pass)
    wgrad: str = DEFAULT_PATH  # grad_W (and grad_b)
    excluded: dict[str, str] = field(default_factory=dict)  # part -> why its Triton candidate was excluded

    def row(self) -> dict:
        """A flat dict (the rows of :func:`decisions`); ms of the backward parts as dgrad_triton_ms..."""
        d = asdict(self)
        ms = d.pop("ms")
        d.update({f"{path}_ms": ms.get(path) for path in PATHS})
        d.update({f"{part}_{path}_ms": ms.get(f"{part}_{path}") for part in PARTS[1:] for path in PATHS})
        return d


_choices: dict[tuple, str] = {}  # key tuple -> path: what traced code reads (plain strings, no objects)
_backward: dict[tuple, tuple[str, str]] = {}  # key tuple -> (dgrad, wgrad) of the fused path
_decided: dict[tuple, Decision] = {}  # key tuple -> the decision behind _choices
_defaults: dict[tuple, Decision] = {}  # untimed defaults taken inside CUDA-graph capture (not cached)
_warned: set[str] = set()
_recording: list[tuple] | None = None  # keys met while prepare() runs


def _timer(step: Callable[[], None]) -> float:
    """Milliseconds of one forward ``step()`` (replaced in tests by a fake timer)."""
    return time_graph_ms(step)


def _backward_timer(step: Callable[[], None]) -> float:
    """Milliseconds of one dgrad or wgrad ``step()`` (``step.part``; replaced in tests by a fake timer)."""
    return time_graph_ms(step)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in fp32 (replaced in tests to fake a mismatch)."""
    want = want.float()
    return float((got.float() - want).norm() / want.norm().clamp_min(1e-12))


def time_graph_ms(step: Callable[[], None], calls: int = GRAPH_CALLS, replays: int = GRAPH_REPLAYS) -> float:
    """ms per ``step()`` as a CUDA-graph step runs it: ``calls`` back-to-back steps captured in one graph,
    replayed ``replays`` times (CUDA events around each replay), the median replay / ``calls``. The host's
    launch cost, which a captured step never pays, does not count. A step that cannot be captured is timed
    eagerly (``time_cuda_ms``)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(WARMUP):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(calls):
                step()
    except Exception:  # noqa: BLE001 - not capturable (host sync): time it eagerly instead
        torch.cuda.synchronize()
        return time_cuda_ms(step)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def _capturing(device: torch.device) -> bool:
    """Whether the current stream of ``device`` is capturing a CUDA graph (replaced in tests)."""
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def time_cuda_ms(step: Callable[[], None], warmup: int = WARMUP, iters: int = ITERS) -> float:
    """Median ms of ``step()`` over ``iters`` CUDA-event timings, after ``warmup`` calls and a synchronize."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


# ---------------------------------------------------------------------------------------------------- keys


def _out_side(op: str, size: int, k: int, stride: int, padding: int) -> int:
    return conv_out_size(size, k, stride, padding, op == "conv_transpose_lrelu")


def _bucket(m: int) -> int:
    return 1 if m <= 1 else 1 << (m - 1).bit_length()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def decision_key(
    op: str, x: torch.Tensor, weight: torch.Tensor, has_bias: bool, stride: int, padding: int
) -> tuple:
    """The table key of one call (see the module doc): ints and strings only, so traced code can read it."""
    n, c_in, h, w = (int(v) for v in x.shape)
    kh, kw = int(weight.shape[2]), int(weight.shape[3])
    c_out = int(weight.shape[1] if op == "conv_transpose_lrelu" else weight.shape[0])
    m = n * _out_side(op, h, kh, stride, padding) * _out_side(op, w, kw, stride, padding)
    channels_last = (
        x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    )
    dtype = _compute_dtype(x)
    dtype_name = _DTYPE_NAMES[dtype] if dtype in _DTYPE_NAMES else str(dtype)
    return (
        op,
        x.device.type,
        x.device.index,
        _bucket(m),
        c_in,
        h,
        w,
        c_out,
        kh,
        kw,
        int(stride),
        int(padding),
        dtype_name,
        "channels_last" if channels_last else "contiguous",
        bool(has_bias),
    )


def key_text(key: tuple) -> str:
    """'conv_lrelu|M<=65536|Cin 3 H 64 W 64|Cout 32 k5x5 s2 p2|bf16|channels_last|bias' (device left out:
    the cache file's context names the card)."""
    op, _, _, m, c_in, h, w, c_out, kh, kw, s, p, dtype, layout, has_bias = key
    return (
        f"{op}|M<={m}|Cin {c_in} H {h} W {w}|Cout {c_out} k{kh}x{kw} s{s} p{p}|{dtype}|{layout}|"
        f"{'bias' if has_bias else 'no bias'}"
    )


def _shape_text(x, weight, stride, padding) -> str:
    return f"x {'x'.join(map(str, x.shape))} w {'x'.join(map(str, weight.shape))} s{stride} p{padding}"


def _context(device: torch.device) -> str:
    try:
        import triton  # lazy: triton is optional (absent on CPU-only installs)

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - no triton: the context says so
        triton_version = "none"
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{card} | torch {torch.__version__} | triton {triton_version}"


# ---------------------------------------------------------------------------------------------- deciding


def _warn_once(tag: str, message: str) -> None:
    if tag not in _warned:
        _warned.add(tag)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _forward_step(run: Run, path: str, x, weight, bias, stride, padding, alpha) -> Callable[[], None]:
    """One forward of ``path`` (no autograd graph: the kernels a step's forward runs)."""

    def step() -> None:
        with torch.no_grad():
            run(path, x, weight, bias, stride, padding, alpha)

    step.path = path  # which path this step runs (for a timer that wants to know, e.g. tests' fake one)
    step.part = "forward"
    return step


def _backward_masks(has_bias: bool) -> dict[str, list[bool]]:
    return {"dgrad": [True, False, False], "wgrad": [False, True, has_bias]}


def _backward_step(backward_op, part: str, impl: str, args: tuple, has_bias: bool) -> Callable[[], None]:
    """One dgrad (grad_x) or wgrad (grad_W, grad_b) of the fused path's backward op with ``impl``."""
    grad_out, out, x, weight, stride, padding, alpha = args
    mask = _backward_masks(has_bias)[part]

    def step() -> None:
        backward_op(grad_out, out, x, weight, has_bias, stride, padding, alpha, mask, impl, impl)

    step.path, step.part = impl, part
    return step


def _check_candidates(op, x, weight, bias, stride, padding, alpha, run: Run, dtype: str):
    """Compare each Triton candidate (forward, dgrad, wgrad) with cuDNN on this call's shape: returns
    ({part: reason} for those off by more than TOLERANCE[dtype] or failing, the backward's arguments)."""
    tol = TOLERANCE.get(dtype, 1e-3)
    excluded: dict[str, str] = {}
    with torch.no_grad():
        want = run("cudnn", x, weight, bias, stride, padding, alpha)
        try:
            err = _relative_error(run("triton", x, weight, bias, stride, padding, alpha), want)
            if not err <= tol:
                excluded["forward"] = f"relative error {err:.3g} > {tol:g}"
        except Exception as error:  # noqa: BLE001 - a failing candidate is excluded, not fatal
            excluded["forward"] = f"{type(error).__name__}: {error}"[:200]
    backward_op = getattr(run, "backward_op", None)
    if backward_op is None:
        return excluded, None
    grad_out = torch.randn_like(want)
    args = (grad_out, want, x.detach(), weight.detach().to(want.dtype), stride, padding, alpha)
    has_bias = bias is not None
    for part, mask in _backward_masks(has_bias).items():
        try:
            ref = backward_op(*args[:4], has_bias, *args[4:], mask, "cudnn", "cudnn")
            got = backward_op(*args[:4], has_bias, *args[4:], mask, "triton", "triton")
            errs = [_relative_error(g, r) for g, r, m in zip(got, ref, mask) if m]
            if not max(errs) <= tol:
                excluded[part] = f"relative error {max(errs):.3g} > {tol:g}"
        except Exception as error:  # noqa: BLE001
            excluded[part] = f"{type(error).__name__}: {error}"[:200]
    return excluded, args


def _time_backward(backward_op, part: str, args: tuple, has_bias: bool, ms: dict) -> str:
    """Time ``part`` (dgrad or wgrad) of each implementation into ms["<part>_<impl>"]; the faster one
    ("triton" only where it ran and beat cuDNN, or cuDNN failed)."""
    for impl in PATHS:
        try:
            ms[f"{part}_{impl}"] = float(
                _backward_timer(_backward_step(backward_op, part, impl, args, has_bias))
            )
        except Exception:  # noqa: BLE001 - a failing implementation loses
            ms[f"{part}_{impl}"] = None
    triton_ms, cudnn_ms = ms[f"{part}_triton"], ms[f"{part}_cudnn"]
    return "triton" if triton_ms is not None and (cudnn_ms is None or triton_ms < cudnn_ms) else DEFAULT_PATH


def _measure(key, op, x, weight, bias, stride, padding, alpha, run: Run) -> Decision:
    shape = _shape_text(x, weight, stride, padding)
    excluded, bwd_args = _check_candidates(op, x, weight, bias, stride, padding, alpha, run, key[12])
    for part, why in excluded.items():
        _warn_once(
            f"excl {key} {part}",
            f"deepsim dispatch: {op} Triton {part} excluded for {shape} "
            f"({key_text(key)}): {why}; using cuDNN",
        )
    ms: dict[str, float | None] = {}
    errors: dict[str, Exception] = {}
    for path in PATHS:
        if path == "triton" and "forward" in excluded:
            ms[path] = None
            continue
        try:
            ms[path] = float(_timer(_forward_step(run, path, x, weight, bias, stride, padding, alpha)))
        except Exception as error:  # noqa: BLE001 - a failing path loses; the other may still run
            ms[path], errors[path] = None, error
    timed = {p: t for p, t in ms.items() if t is not None}
    if not timed:
        raise errors[DEFAULT_PATH]
    best = min(timed.values())
    choice = DEFAULT_PATH if timed.get(DEFAULT_PATH) == best else min(timed, key=timed.get)
    note = "; ".join(f"{p} failed: {type(e).__name__}: {e}" for p, e in errors.items())
    if errors:
        _warn_once(f"fail {key}", f"deepsim dispatch: {note} (for {key_text(key)}); using {choice}")
    impls = {part: DEFAULT_PATH for part in PARTS[1:]}
    if bwd_args is not None:
        for part in PARTS[1:]:
            if part not in excluded:
                impls[part] = _time_backward(run.backward_op, part, bwd_args, bias is not None, ms)
    return Decision(
        op,
        key_text(key),
        choice,
        "measured",
        ms,
        _context(x.device),
        shape,
        note[:300],
        impls["dgrad"],
        impls["wgrad"],
        excluded,
    )


def _impl(value) -> str:
    return value if value in PATHS else DEFAULT_PATH


def _decide(key, op, x, weight, bias, stride, padding, alpha, run: Run) -> str:
    text, context, path = key_text(key), _context(x.device), cache_path()
    entry = dispatch_cache.contexts(path).get(context, {}).get(text) if path is not None else None
    entry = entry if entry is not None and entry["choice"] in PATHS else None
    if entry is not None:
        ms = entry.get("ms") if isinstance(entry.get("ms"), dict) else {}
        decision = Decision(
            op,
            text,
            entry["choice"],
            "cache file",
            ms,
            context,
            entry.get("shape", ""),
            "",
            _impl(entry.get("dgrad")),
            _impl(entry.get("wgrad")),
            entry.get("excluded") if isinstance(entry.get("excluded"), dict) else {},
        )
    elif _capturing(x.device):
        decision = Decision(
            op,
            text,
            DEFAULT_PATH,
            "default: inside CUDA-graph capture, not timed",
            {},
            context,
            _shape_text(x, weight, stride, padding),
        )
        _defaults[key] = decision
        return decision.choice
    else:
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():  # time on x's card
            decision = _measure(key, op, x, weight, bias, stride, padding, alpha, run)
        if path is not None:
            dispatch_cache.store(
                path,
                context,
                text,
                {
                    "choice": decision.choice,
                    "dgrad": decision.dgrad,
                    "wgrad": decision.wgrad,
                    "excluded": decision.excluded,
                    "ms": decision.ms,
                    "shape": decision.shape,
                    "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                },
            )
    _decided[key] = decision
    _choices[key] = decision.choice
    _backward[key] = (decision.dgrad, decision.wgrad)
    _defaults.pop(key, None)
    return decision.choice


def choose(
    op: str, x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int, alpha: float, run: Run
) -> str:
    """The faster path ("triton" or "cudnn") for this call's key, timing it on the first call (see the
    module doc). ``run(path, x, weight, bias, stride, padding, alpha)`` runs one path with autograd."""
    key = decision_key(op, x, weight, bias is not None, stride, padding)
    choice = _choices.get(key)
    if torch.compiler.is_compiling():  # trace time: read, never time (prepare() decided beforehand)
        return choice if choice is not None else DEFAULT_PATH
    if choice is None:
        choice = _decide(key, op, x, weight, bias, stride, padding, alpha, run)
    if _recording is not None:
        _recording.append(key)
    return choice


def backward_impls(
    op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int
) -> tuple[str, str]:
    """(dgrad, wgrad) the fused path's backward runs for this call: "triton" for both when the backend is
    forced to triton; under auto the dispatcher's decision for the key (cuDNN where none was made)."""
    if requested_backend() != "auto":
        return ("triton", "triton")
    return _backward.get(decision_key(op, x, weight, bias is not None, stride, padding), (DEFAULT_PATH,) * 2)


def conv_path(
    op: str, x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int, alpha: float, run: Run
) -> str:
    """The path a public conv op takes for this call: "triton", "cudnn" or "reference".

    Forced by ``DEEPSIM_KERNELS`` / ``use_backend`` (triton | cudnn | reference); under auto, the
    dispatcher's choice on CUDA (:func:`choose`) and the reference elsewhere (see ``kernels.backend``) or
    for a dtype the kernels do not take (fp64).
    """
    if requested_backend() == "auto" and _compute_dtype(x) not in _KERNEL_DTYPES:
        return "reference"  # fp64 and the like: neither kernel path takes them
    if requested_backend() == "auto" and HAS_TRITON and x.device.type in DISPATCH_DEVICES:
        return choose(op, x, weight, bias, stride, padding, alpha, run)
    return backend(x)


# ------------------------------------------------------------------------------------------ reporting


def decisions(*, cache_file: bool = False) -> list[dict]:
    """This process's decisions as rows (dicts: op, key, choice, source, triton_ms, cudnn_ms, context,
    shape, note), untimed defaults included; with ``cache_file`` also every entry of the cache file that
    this process has not used (source "cache file (not used by this process)")."""
    rows = [d.row() for d in _decided.values()] + [d.row() for d in _defaults.values()]
    path = cache_path() if cache_file else None
    if path is not None:
        seen = {(r["context"], r["key"]) for r in rows}
        for context, entries in sorted(dispatch_cache.read(path).items()):
            for text, entry in sorted(entries.items()):
                if (context, text) in seen:
                    continue
                ms = entry.get("ms") if isinstance(entry.get("ms"), dict) else {}
                op = text.split("|", 1)[0]
                rows.append(
                    Decision(
                        op,
                        text,
                        entry["choice"],
                        "cache file (not used by this process)",
                        ms,
                        context,
                        entry.get("shape", ""),
                    ).row()
                )
    return rows


def decision_for(
    op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int
) -> dict | None:
    """The decision (a row as :func:`decisions`) this process holds for such a call, or None (no timing)."""
    key = decision_key(op, x, weight, bias is not None, stride, padding)
    decision = _decided.get(key) or _defaults.get(key)
    return decision.row() if decision is not None else None


def format_decisions(rows: list[dict] | None = None) -> str:
    """The decisions as a fixed-width text table (what ``deepsim bench`` prints)."""
    rows = decisions(cache_file=True) if rows is None else rows
    path = cache_path()
    head = f"Kernel dispatcher decisions (cache file: {path if path is not None else 'off'})"
    if not rows:
        return (
            head + "\n  none: the dispatcher times conv blocks on CUDA only, on their first call under auto"
        )
    width = max(len(r["key"]) for r in rows)

    def ms(v):
        return "" if v is None else f"{v:.3f}"

    lines = [head, f"  {'key':<{width}} {'choice':<7} {'triton ms':>9} {'cudnn ms':>9}  source / card"]
    for r in rows:
        card = r["context"].split(" | ")[0]
        lines.append(
            f"  {r['key']:<{width}} {r['choice']:<7} {ms(r.get('triton_ms')):>9} "
            f"{ms(r.get('cudnn_ms')):>9}  {r['source']} / {card}" + (f" ({r['note']})" if r["note"] else "")
        )
    return "\n".join(lines)


def reset() -> None:
    """Forget this process's decisions and the cache file contents read so far (the file stays)."""
    _choices.clear()
    _backward.clear()
    _decided.clear()
    _defaults.clear()
    _warned.clear()
    dispatch_cache.reset()


# ---------------------------------------------------------------------------------------------- warm-up


def prepare(model: Callable, *example_inputs, **kwargs) -> list[dict]:
    """Decide every conv block that ``model(*example_inputs, **kwargs)`` runs, before torch.compile or
    CUDA-graph capture (which never time; see the module doc). Call it with a batch of the training shape.

    Args:
        model: an nn.Module, or any callable (e.g. a trainer's bound ``compute_losses``); the module (or
            the bound method's owner, if it is a module) runs in eval mode (no BatchNorm statistics
            update), restored afterwards. Runs under no_grad with the RNG state forked (the caller's RNG
            stream is untouched).
        example_inputs, kwargs: what ``model`` is called with; the first tensor gives the device.
    Returns:
        The decisions of the conv blocks met (rows as :func:`decisions`), or [] where nothing would be
        dispatched: a forced ``DEEPSIM_KERNELS``, no triton, or inputs on a device the dispatcher does not
        time on (CPU); the model is then not run at all.
    """
    global _recording
    tensors = [t for t in (*example_inputs, *kwargs.values()) if isinstance(t, torch.Tensor)]
    if not tensors:
        raise ValueError("dispatch.prepare: pass at least one example input tensor (it sets the device)")
    device = tensors[0].device
    if requested_backend() != "auto" or not HAS_TRITON or device.type not in DISPATCH_DEVICES:
        return []
    owner = model if isinstance(model, torch.nn.Module) else getattr(model, "__self__", None)
    modules = list(owner.modules()) if isinstance(owner, torch.nn.Module) else []
    modes = [m.training for m in modules]
    previous, _recording = _recording, []
    try:
        for m in modules:
            m.training = False
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            model(*example_inputs, **kwargs)
        keys = list(dict.fromkeys(_recording))
    finally:
        _recording = previous
        for m, mode in zip(modules, modes):
            m.training = mode
    return [(_decided.get(k) or _defaults[k]).row() for k in keys]
