"""The benchmark harness behind ``python -m bench``: machine info, measured peaks, group runs, roofline.

A *group* is a module ``bench.<name>`` with ``run(device: str, quick: bool) -> list[dict]``. Each row has
the keys group, name, variant, baseline, value, unit, ratio_vs_baseline and optionally flops, bytes,
peak_memory, note. The harness adds:

* ``status``: "ok", or "failed: <error>" / "skipped: <reason>" on the one row a broken group becomes;
* ``ratio_vs_baseline`` where the group left it empty and the baseline row (same group and name,
  ``variant == baseline``) was measured in the same run: value / baseline value;
* ``gain``: how many times better than the baseline, whatever the unit's direction (baseline / value for
  times, bytes and counts, value / baseline for rates such as images/s);
* roofline columns, for rows with flops and/or bytes and the time they took (a ``time_s`` key, a value in
  a time unit such as s, ms, us, ms/step, or achieved ``tflops`` beside ``flops``):
  ``flop_floor_s`` = flops / measured peak FLOP/s, ``byte_floor_s`` = bytes / measured peak bytes/s, and
  ``roofline_fraction`` = max(floors) / measured time (1.0 = at the roofline).

Peaks are *measured* at the start of each run on the benchmark device: a large ``torch.matmul`` in the
benchmark dtype (fp32 on CPU, bf16 on CUDA) for FLOP/s, a large tensor copy for bytes/s (bytes read +
bytes written, over the time). They are the best of a few repeats, so they are achievable peaks, not the
datasheet's.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bench.roofline import attach_work

__all__ = [
    "GROUPS",
    "ROW_KEYS",
    "BenchRun",
    "add_roofline",
    "fill_ratios",
    "format_compact",
    "format_group_table",
    "format_markdown",
    "gain",
    "group_main",
    "machine_info",
    "measure_peaks",
    "run_group",
    "run_groups",
    "time_seconds",
    "write_outputs",
]

GROUPS = ("kernels", "loader", "step")
ROW_KEYS = ("group", "name", "variant", "baseline", "value", "unit", "ratio_vs_baseline")
OPTIONAL_KEYS = ("flops", "bytes", "peak_memory", "note")
REPO_ROOT = Path(__file__).resolve().parents[1]

# unit -> seconds per unit, for the roofline (a row needs a time to be placed against the peaks).
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
# Units where a smaller value is better (besides times); rates ("<thing>/s") are bigger-is-better.
_LOWER_IS_BETTER = {"bytes", "b", "kib", "mib", "gib", "kb", "mb", "gb", "graph breaks", "breaks", "count",
                    "recompiles", "ops"}  # fmt: skip


# ----------------------------------------------------------------------------------------------- units
def time_seconds(value: float | None, unit: str | None) -> float | None:
    """The row's value in seconds when its unit is a time ("ms", "s", "ms/step", "us/iter"), else None."""
    if value is None or not unit:
        return None
    head = unit.strip().split("/")[0].strip().lower()
    tail = unit.strip().split("/")[1:] if "/" in unit else []
    if head in _TIME_UNITS and (not tail or tail[0].strip().lower() not in ("s", "sec", "second")):
        return float(value) * _TIME_UNITS[head]
    return None


def row_seconds(row: dict) -> float | None:
    """Seconds that the row's ``flops`` / ``bytes`` took: its ``time_s`` key; else its value when the unit
    is a time ("ms", "ms/step"); else flops / (tflops * 1e12) when the row reports achieved ``tflops``
    (bench/step.py: value in img/s, flops per step). None when the row gives no such time."""
    if _finite(row.get("time_s")):
        return float(row["time_s"])
    t = time_seconds(row.get("value"), row.get("unit"))
    if t is not None:
        return t
    if _finite(row.get("flops")) and _finite(row.get("tflops")) and row["tflops"] > 0:
        return row["flops"] / (row["tflops"] * 1e12)
    return None


def _lower_is_better(unit: str | None) -> bool | None:
    if not unit:
        return None
    u = unit.strip().lower()
    if time_seconds(1.0, unit) is not None:
        return True
    if u.endswith("/s") or u.endswith("per second"):
        return False
    if u in _LOWER_IS_BETTER or u.split("/")[0].strip() in _LOWER_IS_BETTER:
        return True
    return None


def gain(row: dict) -> float | None:
    """How many times better than its baseline the row is (>1 better), from ratio_vs_baseline and the unit."""
    ratio = row.get("ratio_vs_baseline")
    direction = _lower_is_better(row.get("unit"))
    if ratio is None or direction is None or not _finite(ratio):
        return None
    if direction:
        return None if ratio == 0 else 1.0 / ratio
    return float(ratio)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ------------------------------------------------------------------------------------------ machine
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> dict:
    """commit (short hash, or $DEEPSIM_COMMIT where the copy has no .git) and whether the tree differs."""
    commit = _git("rev-parse", "--short", "HEAD")
    if commit is None:
        return {"commit": os.environ.get("DEEPSIM_COMMIT", "unknown"), "dirty": None, "modified": None,
                "untracked": None}  # fmt: skip
    modified = [ln for ln in (_git("status", "--porcelain", "--untracked-files=no") or "").splitlines() if ln]
    untracked = [ln for ln in (_git("status", "--porcelain") or "").splitlines() if ln.startswith("??")]
    return {"commit": commit, "dirty": bool(modified or untracked), "modified": len(modified),
            "untracked": len(untracked)}  # fmt: skip


def commit_label(meta: dict) -> str:
    """'8dbc7e8', '8dbc7e8 + uncommitted changes (2 modified, 5 untracked paths)' or 'unknown'."""
    commit, dirty = meta.get("commit", "unknown"), meta.get("dirty")
    if dirty:
        return f"{commit} + uncommitted changes ({meta.get('modified')} modified, {meta.get('untracked')} untracked paths)"
    return commit if dirty is not None else f"{commit} (no git metadata)"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(*dists: str) -> str | None:
    from importlib import metadata

    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def machine_info(device: str) -> dict:
    """Machine, card, library versions and git state, as recorded at the head of every run."""
    import torch

    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:  # noqa: BLE001 - any import failure is just reported
        triton_version = f"unavailable ({type(e).__name__})"
    dali = _version("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110", "nvidia-dali")
    if dali is None:
        try:  # a --target install (bench/gpu.sh) has no dist-info on the metadata path in some layouts
            import nvidia.dali as _dali

            dali = _dali.__version__
        except Exception:  # noqa: BLE001
            dali = None
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "platform": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "device": str(device),
        "card": torch.cuda.get_device_name(torch.device(device)) if cuda else "none (CPU run)",
        "cuda": torch.version.cuda if cuda else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "dali": dali or "not installed",
        "kernels_backend": os.environ.get("DEEPSIM_KERNELS", "auto"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    info.update(git_state())
    return info


def machine_label(meta: dict) -> str:
    if meta.get("card") and not str(meta["card"]).startswith("none"):
        return f"{meta['card']} (host CPU: {meta['cpu']}, {meta['cpu_cores']} cores)"
    return f"{meta.get('cpu_cores')}-core CPU ({meta.get('cpu')}), no GPU"


# -------------------------------------------------------------------------------------------- peaks
def _timer(device: str) -> Callable[[Callable[[], Any]], float]:
    import torch

    cuda = str(device).startswith("cuda")

    def once(fn) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return once


def _best(once, fn, repeats: int, min_time: float) -> float:
    """Shortest of at least ``repeats`` timed calls, going on until ``min_time`` s have passed (at most
    4x repeats): a shared or boosting machine shows its peak only in some windows."""
    t0, times = time.perf_counter(), []
    while len(times) < repeats or (time.perf_counter() - t0 < min_time and len(times) < 4 * repeats):
        times.append(once(fn))
    return min(times)


def measure_peaks(device: str, quick: bool = False) -> dict:
    """Achievable peaks on ``device``: matmul FLOP/s in the benchmark dtype and copy bandwidth in bytes/s.

    CPU: fp32 matmul (n = 2048 quick, 3072 full), 128/256 MiB copy. CUDA: bf16 matmul (n = 4096 / 8192),
    0.5/1 GiB copy. Each is the best of several repeats after a warm-up (repeating for at least 1 s /
    3 s on CPU, 0.5 s / 1 s on CUDA).
    """
    import torch

    cuda = str(device).startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    n = (4096 if quick else 8192) if cuda else (2048 if quick else 3072)
    copy_mib = (512 if quick else 1024) if cuda else (128 if quick else 256)
    repeats = (5 if quick else 10) if cuda else (3 if quick else 5)
    min_time = (0.5 if quick else 1.0) if cuda else (1.0 if quick else 3.0)  # seconds of repeats, at least
    once = _timer(device)

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    once(lambda: torch.matmul(a, b))
    best_mm = _best(once, lambda: torch.matmul(a, b), repeats, min_time)

    numel = copy_mib * 2**20 // 4
    src = torch.empty(numel, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    once(lambda: dst.copy_(src))
    best_copy = _best(once, lambda: dst.copy_(src), repeats, min_time)
    moved = 2 * src.numel() * src.element_size()  # read src + write dst
    return {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "flops_per_s": 2 * n**3 / best_mm,
        "bytes_per_s": moved / best_copy,
        "matmul_n": n,
        "copy_bytes": moved,
        "method": f"best of >= {repeats} repeats and >= {min_time:g} s: torch.matmul {n}x{n} {str(dtype).removeprefix('torch.')}; "
        f"tensor copy {copy_mib} MiB (read + write)",
    }


# ----------------------------------------------------------------------------------------- roofline
def add_roofline(row: dict, peaks: dict | None) -> dict:
    """Add flop_floor_s, byte_floor_s, roofline_fraction to ``row`` (in place) where it has the inputs."""
    row.setdefault("flop_floor_s", None)
    row.setdefault("byte_floor_s", None)
    row.setdefault("roofline_fraction", None)
    if not peaks or row.get("status", "ok") != "ok":
        return row
    t = row_seconds(row)
    flops, nbytes = row.get("flops"), row.get("bytes")
    if _finite(flops) and _finite(peaks.get("flops_per_s")) and peaks["flops_per_s"] > 0:
        row["flop_floor_s"] = flops / peaks["flops_per_s"]
    if _finite(nbytes) and _finite(peaks.get("bytes_per_s")) and peaks["bytes_per_s"] > 0:
        row["byte_floor_s"] = nbytes / peaks["bytes_per_s"]
    floors = [f for f in (row["flop_floor_s"], row["byte_floor_s"]) if f is not None]
    if floors and t is not None and t > 0:
        row["roofline_fraction"] = max(floors) / t
    return row


def fill_ratios(rows: list[dict]) -> list[dict]:
    """Fill ratio_vs_baseline (value / baseline value, same group and name) where a group left it None,
    and for every row ``baseline_value`` (the baseline row's value, where measured) and ``gain``."""
    index = {
        (r.get("group"), r.get("name"), r.get("variant")): r
        for r in rows
        if r.get("status", "ok") == "ok" and _finite(r.get("value"))
    }
    for r in rows:
        base = index.get((r.get("group"), r.get("name"), r.get("baseline")))
        r["baseline_value"] = base["value"] if base is not None else r.get("baseline_value")
        if r.get("ratio_vs_baseline") is None and r.get("status", "ok") == "ok" and _finite(r.get("value")):
            if base is not None and base["value"] != 0:
                r["ratio_vs_baseline"] = r["value"] / base["value"]
        r["gain"] = gain(r)
    return rows


# ------------------------------------------------------------------------------------------- groups
class GroupTimeout(Exception):
    """A group ran past --group-timeout."""


def _normalise(rows, group: str) -> list[dict]:
    if not isinstance(rows, (list, tuple)):
        raise TypeError(f"bench/{group}.py run() returned {type(rows).__name__}, expected a list of dicts")
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise TypeError(f"bench/{group}.py run() row {i} is {type(r).__name__}, expected a dict")
        row = {k: r.get(k) for k in ROW_KEYS}
        row.update({k: v for k, v in r.items() if k not in ROW_KEYS})
        row["group"] = row["group"] or group
        row.setdefault("status", "ok")
        out.append(row)
    return out


def _status_row(group: str, status: str) -> dict:
    row = {k: None for k in ROW_KEYS}
    row.update(group=group, name=f"({group} group)", variant="", baseline="", unit="", status=status)
    return row


def run_group(group: str, device: str, quick: bool, module=None, timeout_s: float | None = None):
    """Run one group; never raises. Returns (rows, info) with info = {status, seconds, rows[, traceback]}.

    ``module`` (anything with a ``run(device, quick)``) replaces ``import bench.<group>`` (tests use it).
    A missing bench/<group>.py gives one row with status "skipped: ..."; an import error or an exception in
    ``run`` gives one row with status "failed: <Type>: <message>".
    """
    t0 = time.perf_counter()
    info: dict = {}
    try:
        if module is None:
            try:
                module = importlib.import_module(f"bench.{group}")
            except ModuleNotFoundError as e:
                if e.name == f"bench.{group}":
                    status = f"skipped: bench/{group}.py does not exist"
                    return [_status_row(group, status)], {"status": status, "seconds": 0.0, "rows": 0}
                raise
        run = getattr(module, "run", None)
        if not callable(run):
            raise AttributeError(f"bench/{group}.py has no run(device, quick)")
        with _alarm(timeout_s, group):
            rows = _normalise(run(device, quick), group)
        try:
            attach_work(rows, module)
        except Exception as e:  # noqa: BLE001 - counts are a bonus; the rows stand without them
            print(f"bench: group {group}: no FLOP/byte counts ({type(e).__name__}: {e})", file=sys.stderr)
        info = {"status": "ok", "rows": len(rows)}
    except BaseException as e:  # noqa: BLE001 - a broken group must not end the run (Ctrl-C aside)
        if isinstance(e, KeyboardInterrupt):
            raise
        message = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        status = f"failed: {message}"
        print(f"bench: group {group} {status}", file=sys.stderr)
        rows = [_status_row(group, status)]
        info = {"status": status, "rows": 0, "traceback": traceback.format_exc()}
    info["seconds"] = time.perf_counter() - t0
    return rows, info


class _alarm:
    """SIGALRM-based time limit for a group on the main thread of a Unix process; a no-op elsewhere."""

    def __init__(self, seconds: float | None, group: str):
        self.seconds, self.group = seconds, group
        self.active = bool(seconds) and hasattr(signal, "SIGALRM")

    def _fire(self, signum, frame):
        raise GroupTimeout(f"group {self.group} ran past {self.seconds:.0f} s")

    def __enter__(self):
        if self.active:
            try:
                self.previous = signal.signal(signal.SIGALRM, self._fire)
                signal.setitimer(signal.ITIMER_REAL, float(self.seconds))
            except ValueError:  # not the main thread
                self.active = False
        return self

    def __exit__(self, *exc):
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)
        return False


class BenchRun:
    """The state of one run: meta, peaks, per-group info and rows; serialisable with :meth:`to_dict`."""

    def __init__(self, meta: dict, peaks: dict | None, quick: bool):
        self.meta, self.peaks, self.quick = meta, peaks, quick
        self.groups: dict[str, dict] = {}
        self.rows: list[dict] = []

    def add(self, group: str, rows: list[dict], info: dict) -> None:
        self.groups[group] = {k: v for k, v in info.items() if k != "traceback"}
        if "traceback" in info:
            self.groups[group]["traceback"] = info["traceback"]
        self.rows.extend(rows)
        fill_ratios(self.rows)
        for r in self.rows:
            add_roofline(r, self.peaks)

    def to_dict(self) -> dict:
        return {"meta": self.meta, "mode": "quick" if self.quick else "full", "peaks": self.peaks,
                "groups": self.groups, "rows": self.rows}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict) -> BenchRun:
        run = cls(data.get("meta", {}), data.get("peaks"), data.get("mode") == "quick")
        run.groups, run.rows = data.get("groups", {}), data.get("rows", [])
        fill_ratios(run.rows)
        for r in run.rows:
            add_roofline(r, run.peaks)
        return run


def run_groups(groups: Iterable[str], device: str, quick: bool, *, modules: dict | None = None,
               peaks: dict | None = None, meta: dict | None = None, out: Path | None = None,
               timeout_s: float | None = None, on_group: Callable[[BenchRun], None] | None = None) -> BenchRun:  # fmt: skip
    """Run ``groups`` in order on ``device`` and collect every row; writes ``out`` after each group so that
    a run cut short (a time limit, a crash in a later group) keeps what it measured.

    Args:
        modules: {group: module} overriding ``import bench.<group>`` (tests pass fakes here).
        peaks: measured peaks (see :func:`measure_peaks`); None leaves the roofline columns empty.
        meta: machine info (default: :func:`machine_info`).
    """
    run = BenchRun(meta if meta is not None else machine_info(device), peaks, quick)
    for group in groups:
        rows, info = run_group(group, device, quick, (modules or {}).get(group), timeout_s)
        run.add(group, rows, info)
        if out is not None:
            write_outputs(run, out)
        if on_group is not None:
            on_group(run)
    return run


# -------------------------------------------------------------------------------------------- tables
def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return ""
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, (int, float)):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.{digits}g}"
    return str(x)


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return ""
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def _md_escape(s) -> str:
    return str(s).replace("|", "\\|")


def header_lines(run: BenchRun) -> list[str]:
    m, p = run.meta, run.peaks
    lines = [
        f"- machine: {machine_label(m)}; {m.get('platform')}, Python {m.get('python')}",
        f"- card: {m.get('card')}" + (f" (CUDA {m['cuda']})" if m.get("cuda") else ""),
        f"- torch {m.get('torch')}, triton {m.get('triton')}, DALI {m.get('dali')}",
        f"- commit: {commit_label(m)}",
        f"- date: {m.get('date')}; device {m.get('device')}; mode {'quick' if run.quick else 'full'}",
    ]
    if p:
        lines.append(
            f"- measured peaks: {p['flops_per_s'] / 1e9:.4g} GFLOP/s ({p['dtype']} matmul n={p['matmul_n']}), "
            f"{p['bytes_per_s'] / 1e9:.4g} GB/s (copy, read + write)"
        )
    else:
        lines.append("- measured peaks: not measured (roofline columns empty)")
    for g, info in run.groups.items():
        lines.append(
            f"- group {g}: {info.get('status')} ({info.get('rows', 0)} rows, {info.get('seconds', 0):.1f} s)"
        )
    return lines


COLUMNS = ("group", "benchmark", "variant", "baseline", "value", "baseline value", "unit", "ratio", "gain",
           "FLOP floor", "byte floor", "of roofline", "status")  # fmt: skip


def table_cells(r: dict) -> list[str]:
    frac = r.get("roofline_fraction")
    return [
        r.get("group") or "",
        r.get("name") or "",
        r.get("variant") or "",
        r.get("baseline") or "",
        _fmt(r.get("value")),
        _fmt(r.get("baseline_value")),
        r.get("unit") or "",
        "" if r.get("ratio_vs_baseline") is None else f"{r['ratio_vs_baseline']:.3g}x",
        "" if r.get("gain") is None else f"{r['gain']:.3g}x",
        _fmt_seconds(r.get("flop_floor_s")),
        _fmt_seconds(r.get("byte_floor_s")),
        "" if frac is None else f"{100 * frac:.3g}%",
        r.get("status", "ok") + (f" ({r['note']})" if r.get("note") else ""),
    ]


def format_markdown(run: BenchRun, title: str | None = None, level: int = 2) -> str:
    """The run as Markdown: a header (machine, card, versions, commit, peaks, groups) and one table."""
    lines = ["#" * level + " " + (title or "Benchmark run"), ""] + header_lines(run) + [""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "|".join("---" for _ in COLUMNS) + "|")
    for r in run.rows:
        lines.append("| " + " | ".join(_md_escape(c) for c in table_cells(r)) + " |")
    lines += [
        "",
        "ratio = value / baseline value (same run); gain = times better than the baseline (lower-is-better "
        "units inverted); FLOP/byte floor = flops / peak FLOP/s, bytes / peak bytes/s at the measured peaks; "
        "of roofline = max(floors) / measured time.",
    ]
    return "\n".join(lines) + "\n"


def format_compact(run: BenchRun, width: int = 56) -> str:
    """A short fixed-width table (one line per row) for a terminal, e.g. the end of bench/gpu.sh."""
    m = run.meta
    lines = [f"{machine_label(m)} | torch {m.get('torch')} triton {m.get('triton')} DALI {m.get('dali')} | "
             f"{commit_label(m)}"]  # fmt: skip
    for r in run.rows:
        name = r.get("name") or ""
        name = name if len(name) <= width else name[: width - 1] + "~"
        if r.get("status", "ok") != "ok":
            lines.append(f"{r.get('group', ''):<8} {name:<{width}} {r['status'][:80]}")
            continue
        value = f"{_fmt(r.get('value'))} {r.get('unit') or ''}"
        ratio = "" if r.get("gain") is None else f"gain {r['gain']:.3g}x"
        frac = "" if r.get("roofline_fraction") is None else f"roof {100 * r['roofline_fraction']:.3g}%"
        lines.append(f"{r.get('group', ''):<8} {name:<{width}} {str(r.get('variant') or ''):<22} "
                     f"{value:>22} {ratio:>12} {frac:>10}")  # fmt: skip
    return "\n".join(lines)


def format_group_table(rows: list[dict]) -> str:
    """One group's rows as a fixed-width table, as ``python -m bench.<group>`` prints them: name, variant,
    value, unit, ratio vs baseline, and GFLOP (per row), of peak, peak MiB where any row has them."""
    extras = [
        (key, title, fmt)
        for key, title, fmt in (
            ("flops", "GFLOP", lambda v: f"{v / 1e9:.1f}"),
            ("peak_fraction", "of peak", lambda v: f"{100 * v:.1f}%"),
            ("peak_memory", "peak MiB", lambda v: f"{v / 2**20:.0f}"),
        )
        if any(r.get(key) is not None for r in rows)
    ]
    name_w = max([len("name")] + [len(str(r.get("name") or "")) for r in rows])
    variant_w = max([len("variant")] + [len(str(r.get("variant") or "")) for r in rows])
    lines = [
        f"{'name':<{name_w}} {'variant':<{variant_w}} {'value':>12} {'unit':<9} {'vs baseline':>11}"
        + "".join(f" {title:>9}" for _, title, _ in extras)
    ]
    for r in rows:
        ratio = "" if r.get("ratio_vs_baseline") is None else f"{r['ratio_vs_baseline']:.3g}x"
        line = (
            f"{str(r.get('name') or ''):<{name_w}} {str(r.get('variant') or ''):<{variant_w}} "
            f"{_fmt(r.get('value')):>12} {r.get('unit') or '':<9} {ratio:>11}"
        )
        lines.append(line + "".join(f" {'' if r.get(k) is None else fmt(r[k]):>9}" for k, _, fmt in extras))
    return "\n".join(lines)


def group_main(run: Callable[[str, bool], list[dict]], description: str, quick_help: str,
               argv: list[str] | None = None) -> None:  # fmt: skip
    """``python -m bench.<group> [--device D] [--quick]``: run one group and print its table."""
    import torch

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    args = parser.parse_args(argv)
    print(format_group_table(run(args.device, args.quick)))


def write_outputs(run: BenchRun, out: Path) -> tuple[Path, Path]:
    """Write ``out/results.json`` and ``out/results.md``; returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "results.json", out / "results.md"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(run.to_dict(), indent=2, default=str) + "\n")
    tmp.replace(json_path)
    md_path.write_text(format_markdown(run))
    return json_path, md_path


def append_results(run: BenchRun, results_md: Path) -> None:
    """Append the run (card / date / commit header, then its table) to the curated RESULTS.md log."""
    m = run.meta
    title = f"{m.get('date')}: {machine_label(m)}, commit {commit_label(m)}"
    text = "\n" + format_markdown(run, title=title, level=3)  # under RESULTS.md's "## Run log"
    with open(results_md, "a") as f:
        f.write(text)
