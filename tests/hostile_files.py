"""TEST-ONLY builders of hostile inputs: decompression-bomb PNGs written small on disk, folders with symlink
loops, and a script prefix that makes folder listings slow (to send a signal in the middle of a scan).

Import as ``from tests.hostile_files import ...``.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["bomb_png", "looped_folder", "SLOW_SCANDIR", "write_image"]


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(path: Path, width: int, height: int, *, rows: int | None = None) -> Path:
    """A 16-bit grayscale PNG of ``width`` x ``height`` zeros, streamed through zlib (12000 x 12000 is ~280 KB
    on disk, 288 MB decoded as 16-bit, more once converted). ``rows``: write only that many rows of pixel data
    (the header still declares ``height``): for sizes whose check needs the header alone."""
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)  # bit depth 16, colour type 0 (grayscale)
    compressor = zlib.compressobj(9)
    row = bytes(1 + 2 * width)  # filter byte 0, then the row's 16-bit samples
    data = (
        b"".join(compressor.compress(row) for _ in range(height if rows is None else rows))
        + compressor.flush()
    )
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")
    )
    return path


def write_image(path: Path, h: int = 72, w: int = 80, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)
    return path


def looped_folder(root: Path, kind: str, outside: Path | None = None) -> Path:
    """A folder of 3 images (``a.png``, ``sub/b.png``, ``sub/deep/c.png``) with links:

    * ``"self"``: ``loop -> .`` at the top and ``sub/up -> ..``;
    * ``"cycle"``: ``sub/x -> ../other`` and ``other/y -> ../sub`` (``other`` holds nothing else);
    * ``"out"``: ``ext -> OUTSIDE`` and ``ext2 -> OUTSIDE`` (twice to one folder out of the tree), where
      OUTSIDE holds ``o.png`` and a link ``further -> OUTSIDE/..`` (a second hop out, not followed).
    """
    write_image(root / "a.png", value=1)
    write_image(root / "sub" / "b.png", value=2)
    write_image(root / "sub" / "deep" / "c.png", value=3)
    if kind == "self":
        os.symlink(".", root / "loop")
        os.symlink("..", root / "sub" / "up")
    elif kind == "cycle":
        (root / "other").mkdir()
        os.symlink("../other", root / "sub" / "x")
        os.symlink("../sub", root / "other" / "y")
    elif kind == "out":
        write_image(outside / "o.png", value=4)
        (outside.parent / "beyond").mkdir(exist_ok=True)
        write_image(outside.parent / "beyond" / "far.png", value=5)
        os.symlink(outside, root / "ext")
        os.symlink(outside, root / "ext2")
        os.symlink(outside.parent / "beyond", outside / "further")
    else:
        raise ValueError(kind)
    return root


# A prefix for `python -c` scripts: every os.scandir (which os.walk uses too) of a folder under SLOW_ROOT
# takes
# 0.5 s, and the first one touches SLOW_ROOT/../scan-started, so that
# a test can signal in the middle of a scan.
SLOW_SCANDIR = """
import os, pathlib, sys, time
_slow_root = os.path.realpath(sys.argv[1])
_real_scandir = os.scandir
def _scandir(path="."):
    if os.path.realpath(path).startswith(_slow_root):
        pathlib.Path(_slow_root).parent.joinpath("scan-started").touch()
        time.sleep(0.5)
    return _real_scandir(path)
os.scandir = _scandir
"""
