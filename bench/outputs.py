"""The files of a run: results.json and results.md, each replaced whole (a temporary file, then a rename),
so that a reader, or a kill in the middle of a write, never sees half a file. Imports no torch."""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench.results import BenchRun
from bench.tables import format_markdown

__all__ = ["write_outputs"]


def _replace(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file and a rename: a reader (or a kill) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_outputs(run: BenchRun, out: Path) -> tuple[Path, Path]:
    """Write ``out/results.json`` and ``out/results.md``; returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "results.json", out / "results.md"
    _replace(json_path, json.dumps(run.to_dict(), indent=2, default=str) + "\n")
    _replace(md_path, format_markdown(run))
    return json_path, md_path
