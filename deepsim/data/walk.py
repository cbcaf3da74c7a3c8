"""The one folder walk of the data layer: bounded on folders with symlink loops, each real file listed
once."""

from __future__ import annotations

import os
import pathlib
import stat
from collections.abc import Iterator

__all__ = ["walk_files"]


def _inside(real: str, anchor: str) -> bool:
    return real == anchor or os.path.commonpath([real, anchor]) == anchor


def walk_files(folder: os.PathLike | str) -> Iterator[pathlib.Path]:
    """Every file under ``folder``, depth first in sorted order (a folder's files, then its subfolders), as
    ``os.walk(followlinks=True)`` orders them, but bounded:

    * each real folder is walked once and each real file listed once (a visited set of real paths): a link
      ``a -> .``, a cycle of links or two links to one folder add nothing;
    * a link that leads out of ``folder`` is followed, one hop: inside the tree it leads to, links that leave
      that tree are not followed;
    * FIFOs, sockets and devices are skipped (opening a FIFO blocks); folders that cannot be listed are
      skipped.
      A broken link is listed (its path), so that the caller can report it.

    Yields:
        paths as seen from ``folder`` (through the links), not resolved.
    """
    root = pathlib.Path(folder)
    root_real = os.path.realpath(root)
    seen_dirs, seen_files = {root_real}, set()
    stack = [(root, root_real)]  # (folder to list, real path of the tree it belongs to)
    while stack:
        path, anchor = stack.pop()
        try:
            with os.scandir(path) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError:
            continue
        subdirs = list(_new_subfolders(entries, anchor, root_real, seen_dirs))
        yield from _new_files(entries, seen_files)
        stack.extend((p, tree) for _, p, tree in sorted(subdirs, key=lambda s: s[0], reverse=True))


def _new_subfolders(entries, anchor: str, root_real: str, seen_dirs: set):
    """(name, path, real path of its tree) of each folder among ``entries`` not walked yet (added to
    ``seen_dirs``); a link that leaves ``anchor`` starts its own tree, unless already one hop out."""
    # Real folders first, then links: a link to a folder that is also here does not take its place.
    for entry in sorted(entries, key=lambda e: e.is_symlink()):
        try:
            is_dir = entry.is_dir()
        except OSError:
            is_dir = False
        if not is_dir:
            continue
        real = os.path.realpath(entry.path)
        if real in seen_dirs:
            continue
        tree = anchor
        if entry.is_symlink() and not _inside(real, anchor):
            if anchor != root_real:  # already one hop out of the folder
                continue
            tree = real
        seen_dirs.add(real)
        yield entry.name, pathlib.Path(entry.path), tree


def _new_files(entries, seen_files: set) -> Iterator[pathlib.Path]:
    """The regular files (and broken links) among ``entries`` not listed yet (added to ``seen_files``)."""
    for entry in entries:
        try:
            if entry.is_dir():
                continue
            mode = os.stat(entry.path).st_mode
        except FileNotFoundError:  # a broken link
            mode = stat.S_IFREG
        except OSError:
            continue
        if not stat.S_ISREG(mode):
            continue
        real = os.path.realpath(entry.path)
        if real in seen_files:
            continue
        seen_files.add(real)
        yield pathlib.Path(entry.path)
