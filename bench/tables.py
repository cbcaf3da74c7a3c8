"""The tables a run prints and saves: Markdown (results.md, RESULTS.md), a compact terminal table, and one
group's fixed-width table (``python -m bench.<group>``).

Extra report sections: any module can add a table of its own to the Markdown and compact output by
registering a function ``section(run) -> str | None`` with :func:`report_section` (or by appending it to
:data:`REPORT_SECTIONS`); it reads ``run.rows`` (every key a group puts in a row is kept in results.json),
``run.groups`` and ``run.meta``, and returns Markdown (a "### title" line, then a table), or None to stay
out. Sections are rendered in the order they were registered, after the main table. Examples of what
belongs there: the kernel dispatcher's decisions (triton vs cuDNN per layer), a static report of the
compiled kernels (registers, spills, shared memory).

Imports no torch: re-rendering a saved run (``python -m bench --from-json``) must be quick.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from bench.machine import commit_label, machine_label

if TYPE_CHECKING:
    from bench.results import BenchRun

__all__ = [
    "COLUMNS",
    "REPORT_SECTIONS",
    "append_results",
    "format_compact",
    "format_group_table",
    "format_markdown",
    "header_lines",
    "report_section",
    "table_cells",
]

Section = Callable[["BenchRun"], "str | None"]
REPORT_SECTIONS: list[Section] = []


def report_section(fn: Section) -> Section:
    """Register ``fn`` as an extra report section (usable as a decorator); returns it unchanged."""
    if fn not in REPORT_SECTIONS:
        REPORT_SECTIONS.append(fn)
    return fn


def _sections(run: BenchRun) -> list[str]:
    out = []
    for section in REPORT_SECTIONS:
        try:
            text = section(run)
        except Exception as e:  # noqa: BLE001 - a broken section must not hide the main table
            text = f"(report section {getattr(section, '__name__', section)} failed: {type(e).__name__}: {e})"
        if text:
            out.append(text.rstrip("\n"))
    return out


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


def _mode_label(run: BenchRun) -> str:
    if run.mode == "dry-run":
        return "dry-run (CPU stand-ins at tiny sizes: the figures say nothing about speed)"
    return run.mode


def header_lines(run: BenchRun) -> list[str]:
    """The run's header: machine, card, versions, commit, date and mode, peaks, one line per group."""
    m, p = run.meta, run.peaks
    lines = [
        f"- machine: {machine_label(m)}; {m.get('platform')}, Python {m.get('python')}",
        f"- card: {m.get('card')}" + (f" (CUDA {m['cuda']})" if m.get("cuda") else ""),
        f"- torch {m.get('torch')}, triton {m.get('triton')}, DALI {m.get('dali')}"
        + (f", numpy {m['numpy']}" if m.get("numpy") else ""),
        f"- commit: {commit_label(m)}"
        + (f" (from {m['commit_source']})" if m.get("commit_source") not in (None, "git") else ""),
        f"- date: {m.get('date')}; device {m.get('device')}; mode {_mode_label(run)}",
    ]
    if p:
        lines.append(
            f"- measured peaks: {p['flops_per_s'] / 1e9:.4g} GFLOP/s ({p['dtype']} matmul "
            f"n={p['matmul_n']}), "
            f"{p['bytes_per_s'] / 1e9:.4g} GB/s (copy, read + write)"
            + (" at dry-run sizes: no ceiling, so no roofline columns" if run.mode == "dry-run" else "")
        )
    else:
        lines.append("- measured peaks: not measured (roofline columns empty)")
    for g, info in run.groups.items():
        seconds = info.get("seconds")
        took = "" if seconds is None else f", {seconds:.1f} s"
        settings = "".join(f"; {k}={v}" for k, v in (info.get("settings") or {}).items())
        lines.append(f"- group {g}: {info.get('status')} ({info.get('rows', 0)} rows{took}{settings})")
    return lines


COLUMNS = (
    "group",
    "benchmark",
    "variant",
    "baseline",
    "value",
    "baseline value",
    "unit",
    "ratio",
    "gain",
    "FLOP floor",
    "byte floor",
    "of roofline",
    "status",
)


def table_cells(r: dict) -> list[str]:
    """One row's cells, in :data:`COLUMNS` order."""
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
    """The run as Markdown: a header (machine, card, versions, commit, peaks, groups), one table, then the
    registered report sections."""
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
    for text in _sections(run):
        lines += ["", text]
    return "\n".join(lines) + "\n"


def format_compact(run: BenchRun, width: int = 56) -> str:
    """A short fixed-width table (one line per row) for a terminal, e.g. the end of bench/gpu.sh, then the
    registered report sections."""
    m = run.meta
    lines = [
        f"{machine_label(m)} | torch {m.get('torch')} triton {m.get('triton')} DALI {m.get('dali')} | "
        f"{commit_label(m)}" + (" | DRY RUN (CPU stand-ins)" if run.mode == "dry-run" else "")
    ]
    for r in run.rows:
        name = r.get("name") or ""
        name = name if len(name) <= width else name[: width - 1] + "~"
        if r.get("status", "ok") != "ok":
            lines.append(
                f"{r.get('group', ''):<8} {name:<{width}} {str(r.get('variant') or ''):<22} "
                f"{r['status'][:100]}"
            )
            continue
        value = f"{_fmt(r.get('value'))} {r.get('unit') or ''}"
        ratio = "" if r.get("gain") is None else f"gain {r['gain']:.3g}x"
        frac = "" if r.get("roofline_fraction") is None else f"roof {100 * r['roofline_fraction']:.3g}%"
        lines.append(
            f"{r.get('group', ''):<8} {name:<{width}} {str(r.get('variant') or ''):<22} "
            f"{value:>22} {ratio:>12} {frac:>10}"
        )
    for text in _sections(run):
        lines += ["", text]
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
        status = r.get("status", "ok")
        line += "".join(f" {'' if r.get(k) is None else fmt(r[k]):>9}" for k, _, fmt in extras)
        lines.append(line + ("" if status == "ok" else f"  {status}"))
    return "\n".join(lines)


def append_results(run: BenchRun, results_md: Path) -> None:
    """Append the run (card / date / commit header, then its table) to the curated RESULTS.md log."""
    m = run.meta
    title = f"{m.get('date')}: {machine_label(m)}, commit {commit_label(m)}"
    text = "\n" + format_markdown(run, title=title, level=3)  # under RESULTS.md's "## Run log"
    with open(results_md, "a") as f:
        f.write(text)
