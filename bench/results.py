"""The record of a benchmark run (:class:`BenchRun`), as saved in results.json (bench/outputs.py writes it).

A run holds the machine info (``meta``), the measured peaks, one info dict per group (status, seconds, row
count) and the rows of every group, in the order the groups ran. It is written after every row
(bench/outputs.py, each file replaced atomically), so a run that is cut short keeps what it measured:

* a group stopped by its time limit keeps its rows, and its status says "partial: ...";
* a process killed in a group leaves that group's status "running" in results.json; reading the file back
  (:meth:`BenchRun.from_dict`) turns it into "partial: the process ended ..." with one row saying so.

``python -m bench --merge`` adds groups to an existing results.json (bench/gpu.sh runs every group in its own
process and phase, all into one file). Imports no torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.roofline import add_roofline
from bench.rows import fill_ratios, status_row

__all__ = ["BenchRun", "KILLED", "load_run"]

RUNNING = "running"
KILLED = "partial: the process ended before the group finished (killed at its phase's limit, or crashed)"


class BenchRun:
    """The state of one run: meta, peaks, per-group info and rows; serialisable with :meth:`to_dict`.

    Args:
        meta: machine info (bench/machine.py: machine_info).
        peaks: measured peaks (bench/peaks.py), or None (no roofline columns).
        quick: quick mode.
        mode: "quick" | "full" | "dry-run" (default from ``quick``).
    """

    def __init__(self, meta: dict, peaks: dict | None, quick: bool, mode: str | None = None):
        self.meta, self.peaks, self.quick = meta, peaks, quick
        self.mode = mode or ("quick" if quick else "full")
        self.groups: dict[str, dict] = {}
        self._rows: dict[str, list[dict]] = {}

    @property
    def rows(self) -> list[dict]:
        """Every row, group by group in the order the groups ran."""
        return [r for group in self._rows for r in self._rows[group]]

    def begin_group(self, group: str, started: str | None = None) -> None:
        """Mark ``group`` as running (a run again replaces its earlier rows)."""
        self.groups.pop(group, None)
        self._rows.pop(group, None)
        self.groups[group] = {"status": RUNNING, "rows": 0, "seconds": None, "started": started}
        self._rows[group] = []

    def set_rows(self, group: str, rows: list[dict]) -> None:
        """The rows ``group`` has measured so far (it is still running)."""
        self._rows[group] = list(rows)
        self.groups.setdefault(group, {"status": RUNNING})["rows"] = sum(
            r.get("status") == "ok" for r in rows
        )
        self._derive()

    def add(self, group: str, rows: list[dict], info: dict) -> None:
        """The finished ``group``: its rows and info ({status, seconds, rows[, traceback]})."""
        started = self.groups.get(group, {}).get("started")
        self.groups[group] = dict(info, **({"started": started} if started else {}))
        self._rows[group] = list(rows)
        self._derive()

    def _derive(self) -> None:
        rows = self.rows
        fill_ratios(rows)
        peaks = None if self.mode == "dry-run" else self.peaks  # a dry run's tiny "peaks" are no ceiling
        for r in rows:
            add_roofline(r, peaks)

    def to_dict(self) -> dict:
        return {
            "meta": self.meta,
            "mode": self.mode,
            "peaks": self.peaks,
            "groups": self.groups,
            "rows": self.rows,
        }

    @classmethod
    def from_dict(cls, data: dict) -> BenchRun:
        """A saved run. A group still "running" in it (its process was killed) becomes partial, with a row
        saying so after the rows it had written."""
        mode = data.get("mode") or "full"
        run = cls(data.get("meta", {}), data.get("peaks"), mode != "full", mode)
        run.groups = {g: dict(info) for g, info in (data.get("groups") or {}).items()}
        for row in data.get("rows", []):
            group = row.get("group") or "?"
            run._rows.setdefault(group, []).append(row)
            run.groups.setdefault(group, {"status": "ok"})
        for group, info in run.groups.items():
            run._rows.setdefault(group, [])
            if info.get("status") == RUNNING:
                info["status"] = KILLED
                run._rows[group].append(status_row(group, KILLED))
        run._rows = {g: run._rows[g] for g in run.groups}  # the groups' order
        run._derive()
        return run


def load_run(path: Path) -> BenchRun:
    """The run saved at ``path`` (a results.json, or the folder holding one)."""
    path = Path(path)
    path = path / "results.json" if path.is_dir() else path
    try:
        return BenchRun.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable bench results.json ({type(e).__name__}: {e})") from None
