"""Run the DeePSiM benchmarks and print one table: every variant against its baseline from the same run.

    python -m bench [--groups kernels,loader,step] [--quick] [--out DIR] [--device auto|cpu|cuda]
    python -m bench --append-results            # also append this run's table to bench/RESULTS.md
    python -m bench --from-json DIR/results.json [--compact] [--append-results]   # re-render a saved run
    python -m bench --static                    # the conv kernels' static report (bench/static.py), no GPU
    deepsim bench ...                           # the same

Each group (bench/kernels.py, bench/loader.py, bench/step.py) runs inside its own try/except: a group that
is missing or fails becomes one row saying so, and the others still run. Results go to
DIR/results.json and DIR/results.md (default DIR: bench/out/<timestamp>), rewritten after every group.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

from bench.common import (
    GROUPS,
    REPO_ROOT,
    BenchRun,
    append_results,
    format_compact,
    format_markdown,
    machine_info,
    measure_peaks,
    run_groups,
    write_outputs,
)

RESULTS_MD = REPO_ROOT / "bench" / "RESULTS.md"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--groups", default=",".join(GROUPS),
                   help=f"comma-separated groups to run, in order (default: {','.join(GROUPS)})")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="fewer iterations and smaller peaks (CPU: ~minutes)")
    p.add_argument("--out", type=Path, default=None, help="folder for results.json / results.md "
                   "(default: bench/out/<timestamp>)")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: cuda when available)")
    p.add_argument("--no-peaks", action="store_true", help="skip measuring the peaks (no roofline columns)")
    p.add_argument("--group-timeout", type=float, default=None, metavar="S",
                   help="stop a group after S seconds (it becomes a failed row) and go on")  # fmt: skip
    p.add_argument("--append-results", action="store_true",
                   help="append this run's table (with card/date/commit header) to bench/RESULTS.md")  # fmt: skip
    p.add_argument("--results-file", type=Path, default=RESULTS_MD, help=argparse.SUPPRESS)
    p.add_argument("--from-json", type=Path, default=None, metavar="PATH",
                   help="render (and with --append-results append) a saved results.json; runs nothing")  # fmt: skip
    p.add_argument("--compact", action="store_true", help="print the short fixed-width table instead")
    p.add_argument("--static", action="store_true",
                   help="print the conv kernels' static report (sm_90 compile, no GPU) and run nothing else")  # fmt: skip
    return p


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"python -m bench: --device {device} asked for, but torch sees no CUDA device")
    return device


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.static:
        from bench.static import format_table, static_report

        print(format_table(static_report()))
        return 0
    if args.from_json is not None:
        path = args.from_json / "results.json" if args.from_json.is_dir() else args.from_json
        run = BenchRun.from_dict(json.loads(path.read_text()))
    else:
        groups = [g.strip() for g in args.groups.split(",") if g.strip()]
        unknown = [g for g in groups if g not in GROUPS]
        if unknown:
            print(f"python -m bench: unknown group(s) {unknown}; choose from {list(GROUPS)}", file=sys.stderr)
            return 2
        device = resolve_device(args.device)
        out = args.out or REPO_ROOT / "bench" / "out" / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        meta = machine_info(device)
        peaks = None
        if not args.no_peaks:
            try:
                peaks = measure_peaks(device, quick=args.quick)
            except Exception as e:  # noqa: BLE001 - no peaks means empty roofline columns, not no run
                print(f"python -m bench: peaks not measured ({type(e).__name__}: {e})", file=sys.stderr)
        print(f"python -m bench: device {device}, groups {groups}, {'quick' if args.quick else 'full'} mode, "
              f"writing {out}", file=sys.stderr)  # fmt: skip
        run = run_groups(
            groups, device, args.quick, peaks=peaks, meta=meta, out=out, timeout_s=args.group_timeout
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


if __name__ == "__main__":
    sys.exit(main())
