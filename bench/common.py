"""The names that bench/common.py held before it was split, re-exported for modules written against it.

New code imports each name from the module that owns it:

    bench/rows.py       row keys, units, ratio / baseline / gain columns
    bench/roofline.py   FLOP and byte counts, the roofline columns
    bench/machine.py    machine info, the commit (git, $DEEPSIM_COMMIT or the bench/COMMIT stamp)
    bench/peaks.py      the measured peaks
    bench/timelimit.py  GroupTimeout (a BaseException) and the per-group time limit
    bench/runner.py     running groups (live rows, never raising)
    bench/results.py    BenchRun (a run's rows and groups; reading results.json back)
    bench/outputs.py    writing results.json / results.md
    bench/tables.py     Markdown / compact / per-group tables, extra report sections
    bench/cli.py        python -m bench, and group_main for python -m bench.<group>
"""

from bench.cli import group_main
from bench.machine import REPO_ROOT, commit_label, git_state, machine_info, machine_label
from bench.outputs import write_outputs
from bench.peaks import measure_peaks
from bench.results import BenchRun
from bench.roofline import add_roofline
from bench.rows import ROW_KEYS, fill_ratios, gain, time_seconds
from bench.runner import GROUPS, run_group, run_groups
from bench.tables import append_results, format_compact, format_group_table, format_markdown
from bench.timelimit import GroupTimeout

__all__ = [
    "GROUPS",
    "REPO_ROOT",
    "ROW_KEYS",
    "BenchRun",
    "GroupTimeout",
    "add_roofline",
    "append_results",
    "commit_label",
    "fill_ratios",
    "format_compact",
    "format_group_table",
    "format_markdown",
    "gain",
    "git_state",
    "group_main",
    "machine_info",
    "machine_label",
    "measure_peaks",
    "run_group",
    "run_groups",
    "time_seconds",
    "write_outputs",
]
