"""Running benchmark groups: each under its time limit, never raising, rows saved as they are measured.

A *group* is a module ``bench.<name>`` (one of :data:`GROUPS`) with ``run(device: str, quick: bool) ->
list[dict]`` (rows: see bench/rows.py). A group whose ``run`` also takes a ``rows`` keyword gets a
:class:`LiveRows` list to append its rows to as it measures them: the harness then saves results.json
after every row, and a group stopped by its time limit (bench/timelimit.py) or by an error keeps every row
it appended. A group that takes no ``rows`` is saved when it returns.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import inspect
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

from bench.machine import machine_info
from bench.outputs import write_outputs
from bench.results import BenchRun
from bench.roofline import attach_work
from bench.rows import normalise_rows, status_row
from bench.timelimit import GroupTimeout, time_limit

__all__ = ["GROUPS", "LiveRows", "run_group", "run_groups"]

GROUPS = ("kernels", "loader", "step", "lpips")
# Environment settings that change what a group measures; each group's info records those that are set.
SETTINGS = ("DEEPSIM_KERNELS", "DEEPSIM_AUTOTUNE", "TORCHINDUCTOR_CUDAGRAPH_OR_ERROR", "TRITON_INTERPRET")


class LiveRows(list):
    """A list of rows that calls ``on_change(self)`` after every append/extend/+=, so that the harness can
    save each row as soon as a group measures it."""

    def __init__(self, on_change: Callable[[list], None] | None = None):
        super().__init__()
        self._on_change = on_change

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self)

    def append(self, row) -> None:
        super().append(row)
        self._changed()

    def extend(self, rows) -> None:
        super().extend(rows)
        self._changed()

    def __iadd__(self, rows):
        self.extend(rows)
        return self


def _takes_rows(run) -> bool:
    try:
        return "rows" in inspect.signature(run).parameters
    except (TypeError, ValueError):
        return False


def _kept(live: list, group: str) -> list[dict]:
    """The rows a stopped group had appended, those that are rows at all."""
    try:
        return normalise_rows(list(live), group)
    except TypeError:
        return normalise_rows([r for r in live if isinstance(r, dict)], group)


def run_group(
    group: str,
    device: str,
    quick: bool,
    module=None,
    timeout_s: float | None = None,
    on_rows: Callable[[list[dict]], None] | None = None,
) -> tuple[list[dict], dict]:
    """Run one group; never raises (Ctrl-C aside). Returns (rows, info), info = {status, seconds, rows[,
    traceback]}.

    Args:
        module: anything with a ``run(device, quick[, rows])``, instead of ``import bench.<group>`` (tests).
        timeout_s: the group's time limit; past it the group stops and its status is "partial: ...".
        on_rows: called with the group's rows so far each time it appends one (live saving).

    A missing bench/<group>.py gives one row with status "skipped: ..."; an import error or an exception in
    ``run`` gives the rows appended so far and one row with status "failed: <Type>: <message>".
    """
    t0 = time.perf_counter()
    kept_rows: list[dict] = []

    def changed(rows: list) -> None:
        if on_rows is None:
            return
        try:
            on_rows(_kept(rows, group))
        except Exception as e:  # noqa: BLE001 - saving is best effort; the group goes on
            print(
                f"bench: group {group}: could not save its rows so far ({type(e).__name__}: {e})",
                file=sys.stderr,
            )

    live = LiveRows(changed)
    try:
        if module is None:
            try:
                module = importlib.import_module(f"bench.{group}")
            except ModuleNotFoundError as e:
                if e.name == f"bench.{group}":
                    status = f"skipped: bench/{group}.py does not exist"
                    return [status_row(group, status)], {"status": status, "seconds": 0.0, "rows": 0}
                raise
        run = getattr(module, "run", None)
        if not callable(run):
            raise AttributeError(f"bench/{group}.py has no run(device, quick)")
        with time_limit(timeout_s, f"group {group}"):
            result = run(device, quick, rows=live) if _takes_rows(run) else run(device, quick)
        rows = normalise_rows(live if result is None else result, group)
        partial = next((r["status"] for r in rows if str(r.get("status")).startswith("partial")), None)
        info = {"status": partial or "ok"}
    except GroupTimeout as e:
        kept_rows = _kept(live, group)
        status = f"partial: {e}; the {len(kept_rows)} rows measured before it are kept"
        print(f"bench: group {group} {status}", file=sys.stderr)
        rows = kept_rows + [status_row(group, status)]
        info = {"status": status}
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - a broken group must not end the run
        kept_rows = _kept(live, group)
        message = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        status = f"failed: {message}"
        print(f"bench: group {group} {status}", file=sys.stderr)
        rows = kept_rows + [status_row(group, status)]
        info = {"status": status, "traceback": traceback.format_exc()}
    try:
        attach_work(rows, module)
    except Exception as e:  # noqa: BLE001 - counts are a bonus; the rows stand without them
        print(f"bench: group {group}: no FLOP/byte counts ({type(e).__name__}: {e})", file=sys.stderr)
    info["rows"] = sum(r.get("status") == "ok" for r in rows)
    info["seconds"] = time.perf_counter() - t0
    return rows, info


def run_groups(
    groups: Iterable[str],
    device: str,
    quick: bool,
    *,
    modules: dict | None = None,
    peaks: dict | None = None,
    meta: dict | None = None,
    out: Path | None = None,
    timeout_s: float | None = None,
    on_group: Callable | None = None,
    into=None,
    mode: str | None = None,
):
    """Run ``groups`` in order on ``device`` and collect every row; writes ``out`` when a group starts,
    after every row it appends, and when it ends, so that a run cut short keeps what it measured.

    Args:
        modules: {group: module} overriding ``import bench.<group>`` (tests pass fakes here).
        peaks: measured peaks (bench/peaks.py); None leaves the roofline columns empty.
        meta: machine info (default: bench/machine.py's machine_info).
        into: a :class:`~bench.results.BenchRun` to add the groups to (``--merge``); a group run again
            replaces its rows there.
        mode: the run's mode ("quick", "full", "dry-run"; default from ``quick``).

    Returns:
        the :class:`~bench.results.BenchRun`.
    """
    run = (
        into
        if into is not None
        else BenchRun(meta if meta is not None else machine_info(device), peaks, quick, mode)
    )

    def save() -> None:
        if out is not None:
            write_outputs(run, out)

    for group in groups:
        run.begin_group(group, _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"))
        save()

        def live(rows: list[dict], group=group) -> None:
            run.set_rows(group, rows)
            save()

        rows, info = run_group(group, device, quick, (modules or {}).get(group), timeout_s, on_rows=live)
        settings = {k: os.environ[k] for k in SETTINGS if k in os.environ}
        run.add(group, rows, dict(info, settings=settings) if settings else info)
        save()
        if on_group is not None:
            on_group(run)
    return run
