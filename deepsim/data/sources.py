"""Resolve a ``source`` argument into a list of image files or an STL-10 array."""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np

from .errors import DataError
from .images import list_image_files
from .photos import bundled_photo_paths
from .stl10 import default_split, is_stl10_folder, load_stl10

__all__ = ["ResolvedSource", "resolve_source"]


@dataclasses.dataclass
class ResolvedSource:
    """What a ``source`` argument points at.

    Attributes:
        kind: ``"photos"``, ``"folder"`` or ``"stl10"``.
        location: the folder (None for the bundled photos).
        paths: image files in sample order (empty for STL-10).
        non_images: files in the folder that are not images (ignored).
        array: for STL-10, the uint8 (N, 3, 96, 96) view; else None.
        split: for STL-10, the split read.
    """

    kind: str
    location: pathlib.Path | None
    paths: list[pathlib.Path]
    non_images: list[pathlib.Path]
    array: np.ndarray | None = None
    split: str | None = None

    @property
    def name(self) -> str:
        return "photos (bundled scikit-image photographs)" if self.location is None else str(self.location)


def resolve_source(source: str | os.PathLike, split: str | None = None) -> ResolvedSource:
    """Turn ``"photos"``, an image folder, or an STL-10 binary folder into a :class:`ResolvedSource`.

    The string ``"photos"`` always means the bundled photographs (write ``./photos`` for a folder of
    that name). A folder is an STL-10 folder when it holds ``unlabeled_X.bin`` or ``train_X.bin``;
    otherwise it is searched recursively for images (flat folders and ``train/<wnid>/*.JPEG``).

    Raises:
        DataError: the path does not exist, or a folder holds no image (names the folder).
    """
    if isinstance(source, str) and source == "photos":
        return ResolvedSource("photos", None, bundled_photo_paths(), [])
    folder = pathlib.Path(source)
    if not folder.exists():
        raise DataError(
            f"{folder}: no such file or folder; expected 'photos', an image folder or an STL-10 folder"
        )
    if not folder.is_dir():
        raise DataError(f"{folder}: is a file, expected a folder of images or an STL-10 binary folder")
    if is_stl10_folder(folder):
        split = split or default_split(folder)
        array, _ = load_stl10(folder, split)
        return ResolvedSource("stl10", folder, [], [], array=array, split=split)
    if split is not None:
        raise DataError(f"{folder}: split={split!r} given, but this is not an STL-10 folder (no *_X.bin)")
    images, non_images = list_image_files(folder)
    if not images:
        raise DataError(
            f"{folder}: no image files found (expected .jpg/.jpeg/.png/... files, flat or in subfolders"
            + (f"; {len(non_images)} non-image files ignored)" if non_images else ")")
        )
    return ResolvedSource("folder", folder, images, non_images)
