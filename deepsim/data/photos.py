"""The embedded default dataset: real photographs shipped inside the scikit-image wheel.

No download ever happens: the files are read from ``skimage/data`` on local disk. Synthetic images
(colour wheels, logos, text, chessboards, phantoms) and tiny crops are excluded. Grayscale photos are
converted to RGB by the loader like any other grayscale file.
"""

from __future__ import annotations

import pathlib

import skimage

from .errors import DataError

__all__ = ["BUNDLED_PHOTOS", "bundled_photo_paths"]

# Real photographs in skimage/data (checked against scikit-image 0.26). Sizes are (W, H).
BUNDLED_PHOTOS: tuple[str, ...] = (
    "astronaut.png",  # 512x512 RGB
    "coffee.png",  # 600x400 RGB
    "chelsea.png",  # 451x300 RGB (a cat)
    "rocket.jpg",  # 640x427 RGB
    "motorcycle_left.png",  # 741x500 RGB
    "motorcycle_right.png",  # 741x500 RGB
    "hubble_deep_field.jpg",  # 1000x872 RGB
    "ihc.png",  # 512x512 RGB (microscopy)
    "retina.jpg",  # 1411x1411 RGB
    "camera.png",  # 512x512 L
    "coins.png",  # 384x303 L
    "moon.png",  # 512x512 L
    "brick.png",  # 512x512 L
    "grass.png",  # 512x512 L
    "gravel.png",  # 512x512 L
)


def bundled_photo_paths() -> list[pathlib.Path]:
    """Paths of the bundled photographs (15 files: 9 RGB, 6 grayscale), in a fixed order.

    Returns:
        list of existing ``pathlib.Path`` inside the installed ``skimage/data`` folder.

    Raises:
        DataError: when none of the expected files exists (a stripped scikit-image install).
    """
    folder = pathlib.Path(skimage.__file__).parent / "data"
    paths = [folder / name for name in BUNDLED_PHOTOS if (folder / name).is_file()]
    if not paths:
        raise DataError(
            f"{folder}: expected the scikit-image sample photographs ({', '.join(BUNDLED_PHOTOS[:3])}, ...), "
            "found none; reinstall scikit-image from its wheel"
        )
    return paths
