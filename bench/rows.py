"""Benchmark rows: their keys, their units, and the columns derived from a baseline in the same run.

A row is a dict that a group's ``run(device, quick)`` returns, with the keys :data:`ROW_KEYS` (group, name,
variant, baseline, value, unit, ratio_vs_baseline) and optionally :data:`OPTIONAL_KEYS`; any other key a
group sets (``flops``, ``tflops``, ``cudagraph_skips``...) is kept as it is. The harness adds:

* ``status``: "ok", or "failed: ...", "skipped: ...", "partial: ..." on a row that says why a group (or a
  part of it) gave no figure;
* ``ratio_vs_baseline`` where the group left it empty and the baseline row (same group and name,
  ``variant == baseline``) was measured in the same run: value / baseline value;
* ``baseline_value``: the baseline row's value;
* ``gain``: how many times better than the baseline, whatever the unit's direction (baseline / value for
  times, bytes and counts, value / baseline for rates such as images/s).

This module imports no torch: re-rendering a saved run must be quick (bench/gpu.sh does it after every
phase).
"""

from __future__ import annotations

import math

__all__ = [
    "ROW_KEYS",
    "OPTIONAL_KEYS",
    "fill_ratios",
    "finite",
    "gain",
    "lower_is_better",
    "normalise_rows",
    "row_seconds",
    "status_row",
    "time_seconds",
]

ROW_KEYS = ("group", "name", "variant", "baseline", "value", "unit", "ratio_vs_baseline")
OPTIONAL_KEYS = ("flops", "bytes", "peak_memory", "note")

# unit -> seconds per unit, for the roofline (a row needs a time to be placed against the peaks).
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
# Units where a smaller value is better (besides times); rates ("<thing>/s") are bigger-is-better.
_LOWER_IS_BETTER = {
    "bytes",
    "b",
    "kib",
    "mib",
    "gib",
    "kb",
    "mb",
    "gb",
    "graph breaks",
    "breaks",
    "count",
    "recompiles",
    "ops",
    "skips",
}


def finite(x) -> bool:
    """A real number (not a bool, not NaN/inf)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


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
    if finite(row.get("time_s")):
        return float(row["time_s"])
    t = time_seconds(row.get("value"), row.get("unit"))
    if t is not None:
        return t
    if finite(row.get("flops")) and finite(row.get("tflops")) and row["tflops"] > 0:
        return row["flops"] / (row["tflops"] * 1e12)
    return None


def lower_is_better(unit: str | None) -> bool | None:
    """True for times, bytes and counts, False for rates ("images/s"), None when the unit says nothing."""
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
    direction = lower_is_better(row.get("unit"))
    if ratio is None or direction is None or not finite(ratio):
        return None
    if direction:
        return None if ratio == 0 else 1.0 / ratio
    return float(ratio)


def fill_ratios(rows: list[dict]) -> list[dict]:
    """Fill ratio_vs_baseline (value / baseline value, same group and name) where a group left it None,
    and for every row ``baseline_value`` (the baseline row's value, where measured) and ``gain``."""
    index = {
        (r.get("group"), r.get("name"), r.get("variant")): r
        for r in rows
        if r.get("status", "ok") == "ok" and finite(r.get("value"))
    }
    for r in rows:
        base = index.get((r.get("group"), r.get("name"), r.get("baseline")))
        r["baseline_value"] = base["value"] if base is not None else r.get("baseline_value")
        if r.get("ratio_vs_baseline") is None and r.get("status", "ok") == "ok" and finite(r.get("value")):
            if base is not None and base["value"] != 0:
                r["ratio_vs_baseline"] = r["value"] / base["value"]
        r["gain"] = gain(r)
    return rows


def status_row(group: str, status: str, name: str | None = None, variant: str = "") -> dict:
    """A row with no figure that says why: "(<group> group)" by default, with ``status`` filled in."""
    row = {k: None for k in ROW_KEYS}
    row.update(
        group=group, name=name or f"({group} group)", variant=variant, baseline="", unit="", status=status
    )
    return row


def normalise_rows(rows, group: str) -> list[dict]:
    """Check a group's rows and give each every :data:`ROW_KEYS` key (None where missing), ``group`` (the
    group that ran it) and a status ("ok" unless it says otherwise). Raises TypeError naming the group on
    anything but dicts."""
    if not isinstance(rows, (list, tuple)):
        raise TypeError(f"bench/{group}.py run() returned {type(rows).__name__}, expected a list of dicts")
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise TypeError(f"bench/{group}.py run() row {i} is {type(r).__name__}, expected a dict")
        row = {k: r.get(k) for k in ROW_KEYS}
        row.update({k: v for k, v in r.items() if k not in ROW_KEYS})
        row["group"] = group  # the group that ran it: results.json files rows under their group
        row.setdefault("status", "ok")
        out.append(row)
    return out
