"""Image folders the data tests read: coordinate images (crops reveal where they came from, see
``assert_window``) and a folder holding one file of each kind of bad input.

Import as ``from tests.image_folders import ...`` (tests/conftest.py puts the repository root on sys.path).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["assert_window", "coord_image", "to_pixels", "write_bad_inputs", "write_coord_folder"]


def coord_image(h: int, w: int, ident: int) -> np.ndarray:
    """(H, W, 3) uint8 image whose pixel (y, x) is (x, y, ident): crops reveal where they came from."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx, yy, np.full_like(xx, ident)], axis=2).astype(np.uint8)


def write_coord_folder(folder: Path, n: int, h: int = 80, w: int = 90, sizes=None) -> Path:
    """``n`` PNG coordinate images img_000.png ... (image i has ident i), each h x w or ``sizes[i]``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        hh, ww = sizes[i] if sizes else (h, w)
        Image.fromarray(coord_image(hh, ww, i)).save(folder / f"img_{i:03d}.png")
    return folder


def to_pixels(batch: torch.Tensor) -> np.ndarray:
    """Back from [-1, 1] to uint8 pixels, (B, 3, H, W)."""
    return torch.round((batch.float() + 1) * 127.5).to(torch.uint8).numpy()


def assert_window(crop: np.ndarray, img_h: int, img_w: int) -> tuple[int, int, bool]:
    """Check that a (3, c, c) crop of a coord image is a contiguous window; return (oy, ox, mirrored)."""
    c = crop.shape[1]
    xs, ys = crop[0].astype(int), crop[1].astype(int)
    assert (ys == ys[:, :1]).all() and (np.diff(ys[:, 0]) == 1).all(), "rows must be consecutive"
    assert (xs == xs[:1, :]).all(), "every row must hold the same columns"
    row = xs[0]
    mirrored = row[0] > row[-1]
    step = -1 if mirrored else 1
    assert (np.diff(row) == step).all(), "columns must be consecutive (or reversed when mirrored)"
    oy, ox = int(ys[0, 0]), int(row.min())
    assert 0 <= oy <= img_h - c and 0 <= ox <= img_w - c
    return oy, ox, bool(mirrored)


def write_bad_inputs(folder: Path, good: int = 3, quality: int = 75, nested: bool = False) -> Path:
    """``good`` RGB JPEGs good_<i>.jpg (JPEG ``quality``) beside one file of each kind of bad input:
    gray.png, cmyk.jpg, alpha.png, small.png (20x30), notes.txt, corrupt.jpg and truncated.jpg (half of
    good_0.jpg). ``nested`` adds an ImageNet-style subfolder n01440764/x.JPEG (scanned recursively)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(good):
        Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(
            folder / f"good_{i}.jpg", quality=quality
        )
    if nested:
        sub = folder / "n01440764"
        sub.mkdir()
        Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(sub / "x.JPEG")
    Image.fromarray(rng.integers(0, 255, (80, 80), dtype=np.uint8), "L").save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 255, (80, 80, 4), dtype=np.uint8), "CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 255, (80, 80, 4), dtype=np.uint8), "RGBA").save(folder / "alpha.png")
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(folder / "small.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "corrupt.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    data = (folder / "good_0.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return folder
