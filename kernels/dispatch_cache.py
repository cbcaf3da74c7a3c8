"""The dispatcher's cache file: one JSON file of decisions per user, read once per process, merged on write.

Design notes: docs/kernels.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

__all__ = ["CACHE_ENV", "FORMAT", "cache_path", "contexts", "read", "reset", "store"]

CACHE_ENV = "DEEPSIM_DISPATCH_CACHE"
FORMAT = 1

_files: dict[Path, dict] = {}  # cache file -> its contexts, as read once by this process (plus its writes)
_warned: set[str] = set()


def cache_path() -> Path | None:
    """The cache file, or None when ``$DEEPSIM_DISPATCH_CACHE`` is ``off``."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env.lower() in ("off", "0", "none", "false"):
        return None
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deepsim" / "dispatch.json"


def _warn_once(tag: str, message: str) -> None:
    if tag not in _warned:
        _warned.add(tag)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _parse(text: str) -> dict:
    """The file's {context: {key: entry}}; raises ValueError when it is not a format-1 dispatch cache."""
    data = json.loads(text)
    if (
        not isinstance(data, dict)
        or data.get("format") != FORMAT
        or not isinstance(data.get("contexts"), dict)
    ):
        raise ValueError(
            f"not a format-{FORMAT} dispatch cache (expected {{'format': 1, 'contexts': {{...}}}})"
        )
    parsed = {}
    for context, entries in data["contexts"].items():
        if not isinstance(entries, dict):
            raise ValueError(f"context {context!r} is not a mapping")
        parsed[context] = {
            k: e for k, e in entries.items() if isinstance(e, dict) and isinstance(e.get("choice"), str)
        }
    return parsed


def read(path: Path, *, warn: bool = True) -> dict:
    """{context: {key: entry}} as the file holds them now ({} when there is no file, or it is unreadable)."""
    try:
        return _parse(path.read_text())
    except (FileNotFoundError, NotADirectoryError):  # no file yet (an unwritable folder warns on writing)
        return {}
    except (OSError, ValueError) as error:  # json.JSONDecodeError is a ValueError
        if warn:
            _warn_once(
                f"read {path}",
                f"deepsim dispatch cache {path} is unreadable ({type(error).__name__}: {error}); "
                "ignoring it: layers are timed again and the file rewritten",
            )
        return {}


def contexts(path: Path) -> dict:
    """The file's contexts as this process first read them (once), plus what it has stored since."""
    if path not in _files:
        _files[path] = read(path)
    return _files[path]


def store(path: Path, context: str, key: str, entry: dict) -> None:
    """Merge one entry into the file (re-read first: other processes may have added theirs), atomically."""
    contexts(path).setdefault(context, {})[key] = entry
    current = read(path, warn=False)
    current.setdefault(context, {})[key] = entry
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"format": FORMAT, "contexts": current}, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        _warn_once(
            f"write {path}",
            f"deepsim dispatch cache {path} cannot be written ({error}); "
            "decisions are kept in memory for this process only",
        )


def reset() -> None:
    """Forget what this process has read (the file stays) and which warnings it gave."""
    _files.clear()
    _warned.clear()
