"""Run the DeePSiM benchmarks and print one table: every variant against its baseline from the same run.

    python -m bench [--groups kernels,loader,step,lpips] [--quick] [--out DIR] [--device auto|cpu|cuda]
    python -m bench --append-results            # also append this run's table to bench/RESULTS.md
    python -m bench --from-json DIR/results.json [--compact] [--append-results]   # re-render a saved run
    python -m bench --groups step --out DIR --merge --group-timeout 150   # add a group to DIR's run
    python -m bench --dry-run --out DIR         # CPU stand-ins at tiny sizes (bench/dryrun.py)
    python -m bench --stamp-commit              # write bench/COMMIT for a copy without .git
    python -m bench --static                    # the conv kernels' static report (bench/static.py), no GPU
    deepsim bench ...                           # the same

Each group (bench/kernels.py, bench/loader.py, bench/step.py, bench/lpips.py) runs under its own time limit
and
try/except: a group that is missing or fails becomes one row saying so, and the others still run. Results
go to DIR/results.json and DIR/results.md (default DIR: bench/out/<timestamp>), rewritten after every row.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from bench.dryrun import DRY_RUN_ENV
from bench.machine import COMMIT_STAMP, REPO_ROOT, commit_label, machine_info, write_commit_stamp
from bench.outputs import write_outputs
from bench.peaks import measure_peaks
from bench.results import load_run
from bench.runner import GROUPS, run_groups
from bench.static import format_table, static_report
from bench.tables import append_results, format_compact, format_group_table, format_markdown

__all__ = ["build_parser", "group_main", "main", "resolve_device"]

RESULTS_MD = REPO_ROOT / "bench" / "RESULTS.md"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument(
        "--groups",
        default=",".join(GROUPS),
        help=f"comma-separated groups to run, in order (default: {','.join(GROUPS)})",
    )
    p.add_argument("--quick", action="store_true", help="fewer iterations and smaller peaks (CPU: ~minutes)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for results.json / results.md (default: bench/out/<timestamp>)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: cuda when available)")
    p.add_argument("--no-peaks", action="store_true", help="skip measuring the peaks (no roofline columns)")
    p.add_argument(
        "--group-timeout",
        type=float,
        default=None,
        metavar="S",
        help="stop a group after S seconds; it keeps the rows it measured, marked partial",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="add the groups to OUT/results.json if it exists (its machine info and peaks are "
        "kept; a group run again replaces its rows)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU stand-ins at tiny sizes: checks every code path of a GPU run in seconds; the "
        "figures say nothing about speed (implies --device cpu --quick)",
    )
    p.add_argument(
        "--append-results",
        action="store_true",
        help="append this run's table (with card/date/commit header) to bench/RESULTS.md",
    )
    p.add_argument("--results-file", type=Path, default=RESULTS_MD, help=argparse.SUPPRESS)
    p.add_argument(
        "--from-json",
        type=Path,
        default=None,
        metavar="PATH",
        help="render (and with --append-results append) a saved results.json; runs nothing",
    )
    p.add_argument("--compact", action="store_true", help="print the short fixed-width table instead")
    p.add_argument(
        "--static",
        action="store_true",
        help="print the conv kernels' static report (sm_90 compile, no GPU) and run nothing else",
    )
    p.add_argument(
        "--stamp-commit",
        action="store_true",
        help=f"write {COMMIT_STAMP.relative_to(REPO_ROOT)} (commit, uncommitted changes, a "
        "fingerprint of the files) from git, for a copy without .git; runs nothing",
    )
    return p


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" where torch sees a GPU, else "cpu"; "cuda..." without one is an error."""

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"python -m bench: --device {device} asked for, but torch sees no CUDA device")
    return device


def _measure(args, device: str, existing) -> dict | None:
    if existing is not None and existing.peaks:
        return existing.peaks  # measured once per run, by its first phase
    if args.no_peaks:
        return None
    try:
        return measure_peaks(device, quick=args.quick)
    except Exception as e:  # noqa: BLE001 - no peaks means empty roofline columns, not no run
        print(f"python -m bench: peaks not measured ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.static:
        print(format_table(static_report()))
        return 0
    if args.stamp_commit:
        stamp = write_commit_stamp()
        print(
            f"python -m bench: wrote {COMMIT_STAMP}: {commit_label(stamp)}, fingerprint "
            f"{stamp['fingerprint']}"
        )
        return 0
    if args.from_json is not None:
        try:
            run = load_run(args.from_json)
        except ValueError as e:
            print(f"python -m bench: {e}", file=sys.stderr)
            return 2
    else:
        groups = [g.strip() for g in args.groups.split(",") if g.strip()]
        unknown = [g for g in groups if g not in GROUPS]
        if unknown:
            print(f"python -m bench: unknown group(s) {unknown}; choose from {list(GROUPS)}", file=sys.stderr)
            return 2
        if args.dry_run:
            os.environ[DRY_RUN_ENV] = "1"  # read by the groups (and their worker processes)
            args.device, args.quick = "cpu", True
        device = resolve_device(args.device)
        out = args.out or REPO_ROOT / "bench" / "out" / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        existing = None
        if args.merge and (Path(out) / "results.json").exists():
            existing = load_run(out)
        peaks = _measure(args, device, existing)
        mode = "dry-run" if args.dry_run else ("quick" if args.quick else "full")
        if existing is not None:
            existing.peaks = existing.peaks or peaks
        print(
            f"python -m bench: device {device}, groups {groups}, {mode} mode, writing {out}"
            + (" (merging into the run there)" if existing is not None else ""),
            file=sys.stderr,
        )
        run = run_groups(
            groups,
            device,
            args.quick,
            peaks=peaks,
            meta=None if existing else machine_info(device),
            out=out,
            timeout_s=args.group_timeout,
            into=existing,
            mode=mode,
        )
        json_path, md_path = write_outputs(run, out)
        print(f"python -m bench: wrote {json_path} and {md_path}", file=sys.stderr)
    print(format_compact(run) if args.compact else format_markdown(run))
    kernels = sys.modules.get("bench.kernels") if args.from_json is None else None
    if getattr(kernels, "dispatch_table", None) is not None:  # the kernel dispatcher's decisions, this run
        print(kernels.dispatch_table())
    if args.append_results:
        append_results(run, args.results_file)
        print(f"python -m bench: appended the table to {args.results_file}", file=sys.stderr)
    return 0


def group_main(
    run: Callable[[str, bool], list[dict]], description: str, quick_help: str, argv: list[str] | None = None
) -> None:
    """``python -m bench.<group> [--device D] [--quick]``: run one group and print its table."""

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    args = parser.parse_args(argv)
    print(format_group_table(run(args.device, args.quick)))
