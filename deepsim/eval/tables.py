"""Result tables as Markdown (for reading) and JSON (for machines), written side by side."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

__all__ = ["Column", "markdown_table", "write_table"]

# A column: (key in the row dict, header, format spec for numbers; "" = str()).
Column = tuple[str, str, str]


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if fmt and isinstance(value, (int, float)):
        return format(value, fmt)
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[dict], columns: Sequence[Column], title: str | None = None) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` (missing or NaN values print as "-")."""
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(header for _, header, _ in columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key), fmt) for key, _, fmt in columns) + " |")
    return "\n".join(lines) + "\n"


def write_table(
    rows: Sequence[dict], columns: Sequence[Column], out: str | Path, name: str, title: str | None = None
) -> tuple[Path, Path]:
    """Write ``<out>/<name>.md`` (the Markdown table) and ``<out>/<name>.json`` ({"title", "rows"}).

    Returns (markdown path, JSON path).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / f"{name}.md", out / f"{name}.json"
    md.write_text(markdown_table(rows, columns, title))
    js.write_text(json.dumps({"title": title, "rows": list(rows)}, indent=2, default=str))
    return md, js
