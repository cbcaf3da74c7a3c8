"""The dry run: every benchmark phase of bench/gpu.sh on a CPU, at tiny sizes, with CPU stand-ins.

``bash bench/gpu.sh --dry-run OUT`` (and ``python -m bench --dry-run``) set ``DEEPSIM_BENCH_DRY_RUN=1``.
Groups read :func:`dry_run` and then measure the smallest workloads that still go through every code path
of their GPU run (the same variants, rows, time limits and files), with CPU stand-ins where a variant needs
CUDA. The figures of a dry run say nothing about speed: every row of one carries ``stand_in`` notes, and
the run's mode is "dry-run".
"""

from __future__ import annotations

import os

__all__ = ["DRY_RUN_ENV", "dry_run"]

DRY_RUN_ENV = "DEEPSIM_BENCH_DRY_RUN"


def dry_run() -> bool:
    """True inside a dry run (``DEEPSIM_BENCH_DRY_RUN`` set to anything but "", "0")."""
    return os.environ.get(DRY_RUN_ENV, "") not in ("", "0")
