"""Listing image folders and decoding one image file into an RGB uint8 array.

Every decode goes through :func:`read_image`, which is strict: a truncated file raises even when some
other code has set ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True``. Grayscale, 16-bit, palette, CMYK and
alpha images are converted to 3-channel RGB (alpha is dropped, as torchvision's ``convert("RGB")`` does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pathlib
import re
import threading
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from .errors import DataError
from .interrupt import interruptible
from .walk import walk_files

__all__ = [
    "IMAGE_EXTENSIONS",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ImageReadError",
    "ImageTooLargeError",
    "check_max_pixels",
    "list_image_files",
    "read_image",
    "read_image_chw",
    "probe_image",
    "strict_truncation",
    "mode_kind",
    "resized_size",
    "scan_image_files",
    "ScannedFiles",
]

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
)
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
# 8192 x 8192. Training at 227 px resizes the shorter side to 256, so a bigger photo only costs memory: at the
# limit one decode holds up to 0.5 GiB (16-bit RGBA, 8 bytes a pixel), per decoding thread or worker.
# Camera photos (up to ~50 megapixels) and every ImageNet image pass; PIL's own limit is about 179 megapixels.
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192

# PIL warns about odd files (DecompressionBombWarning, palette, corrupt EXIF): one filter on PIL's own
# modules, set once. Not warnings.catch_warnings() per file: that swaps the process-wide filter list and is
# not thread-safe, so reader threads that overlap leave an "ignore every warning" filter behind for the
# process.
warnings.filterwarnings("ignore", module=r"PIL(\.|$)")

_truncation_lock = threading.Lock()
_strict_depth = 0
_saved_flag = False


class ImageReadError(DataError):
    """An image file could not be read. ``kind`` is ``"corrupt"``, ``"truncated"`` or ``"missing"``."""

    def __init__(self, path: os.PathLike | str, kind: str, detail: str):
        self.path = pathlib.Path(path)
        self.kind = kind
        if kind == "missing":  # not a bad image: the file is not there
            super().__init__(f"{path}: no such file")
            return
        super().__init__(f"{path}: {kind} image file, expected a decodable image ({detail})")


class ImageTooLargeError(ImageReadError):
    """An image's header declares more pixels than the limit: it is not decoded (kind ``"too_large"``).
    ``pixels``: the count the header gives."""

    def __init__(self, path: os.PathLike | str, pixels: int, limit: str, size: tuple[int, int] | None = None):
        self.path = pathlib.Path(path)
        self.kind = "too_large"
        self.pixels = pixels
        what = f"is {size[0]}x{size[1]} = {pixels} pixels" if size else f"has {pixels} pixels"
        DataError.__init__(self, f"{path}: image {what}, over {limit}; not decoded")


def _our_limit(max_pixels: int) -> str:
    return f"the limit of {max_pixels} (max_image_pixels, --max-image-pixels)"


def check_max_pixels(max_pixels: int | None) -> None:
    """Raise :class:`DataError` naming ``--max-image-pixels`` unless it is a positive integer (or None)."""
    if max_pixels is None:
        return
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise DataError(f"--max-image-pixels {max_pixels!r}: expected a positive number of pixels")


@contextlib.contextmanager
def open_image(
    path: os.PathLike | str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> Iterator[Image.Image]:
    """``PIL.Image.open`` (header only) that refuses, before any pixel is decoded, an image of more than
    ``max_pixels`` pixels (None: PIL's own decompression-bomb limit only).

    Raises:
        ImageTooLargeError: over the limit (also PIL's ``DecompressionBombError``, which it replaces).
        ImageReadError: the header cannot be parsed (kind ``"corrupt"``).
    """
    try:
        img = Image.open(path)  # PIL's own warnings (DecompressionBombWarning, palette) are filtered above
    except Image.DecompressionBombError as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        pixels = int(found.group(1)) if found else 2 * (Image.MAX_IMAGE_PIXELS or 0)
        if max_pixels is not None and pixels > max_pixels:
            limit = _our_limit(max_pixels)
        else:
            bomb = 2 * Image.MAX_IMAGE_PIXELS
            limit = f"PIL's decompression-bomb limit (2 x PIL.Image.MAX_IMAGE_PIXELS = {bomb})"
        raise ImageTooLargeError(path, pixels, limit) from None
    except FileNotFoundError as e:
        raise ImageReadError(path, "missing", "no such file") from e
    except UnidentifiedImageError as e:
        raise ImageReadError(path, "corrupt", "not a recognised image format") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageReadError(path, "corrupt", str(e) or type(e).__name__) from e
    with img:
        w, h = img.size
        if max_pixels is not None and w * h > max_pixels:
            raise ImageTooLargeError(path, w * h, _our_limit(max_pixels), (w, h))
        yield img


@contextlib.contextmanager
def strict_truncation() -> Iterator[None]:
    """Make PIL raise on truncated files for the duration of the block, whatever the global says."""
    # A depth counter (not a lock held across the decode) so that decoder threads still run in parallel;
    # the first thread in saves the global, the last one out restores it.
    global _strict_depth, _saved_flag
    with _truncation_lock:
        if _strict_depth == 0:
            _saved_flag = ImageFile.LOAD_TRUNCATED_IMAGES
        _strict_depth += 1
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        with _truncation_lock:
            _strict_depth -= 1
            if _strict_depth == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _saved_flag


def mode_kind(img: Image.Image) -> set[str]:
    """The conversions an image needs, as a subset of {"grayscale", "cmyk", "alpha"}."""
    kinds = set()
    mode = img.mode
    if mode in GRAYSCALE_MODES:
        kinds.add("grayscale")
    if mode == "CMYK":
        kinds.add("cmyk")
    if mode in ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        kinds.add("alpha")
    return kinds


def _looks_like_image(path: pathlib.Path) -> bool:
    try:
        with Image.open(path):
            return True
    except Image.DecompressionBombError:  # an image, one too large to decode
        return True
    except Exception:
        return False


def list_image_files(folder: os.PathLike | str) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
    """All image files under ``folder`` (recursively, sorted by path) and the non-image files.

    A file counts as an image when its extension is a known image extension (the file may still be
    corrupt: that is found when it is decoded) or, for other extensions, when PIL can identify it from
    its header. Works for flat folders and for the ImageNet layout ``train/<wnid>/*.JPEG``. The walk is
    :func:`deepsim.data.walk.walk_files` (symlink loops end, every file once); a stop signal (SIGINT, SIGTERM,
    SIGHUP) raises :class:`deepsim.data.interrupt.Interrupted`.

    Returns:
        (images, non_images): two lists of paths.

    Raises:
        DataError: ``folder`` does not exist or is not a folder.
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: expected a folder of images, 'photos', or an STL-10 binary folder")
    images, non_images = [], []
    with interruptible():
        for path in walk_files(folder):
            if path.suffix.lower() in IMAGE_EXTENSIONS or _looks_like_image(path):
                images.append(path)
            else:
                non_images.append(path)
    return images, non_images


def probe_image(path: os.PathLike | str, max_pixels: int | None = None) -> tuple[int, int, str]:
    """(width, height, mode) from the header only, without decoding pixels.

    Raises:
        ImageTooLargeError: more than ``max_pixels`` pixels (None: PIL's decompression-bomb limit only).
        ImageReadError: the header cannot be parsed (kind ``"corrupt"``).
    """
    with open_image(path, max_pixels) as img:
        return img.size[0], img.size[1], img.mode


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        # 16/32-bit grayscale: scale to 8 bits instead of clipping.
        a = np.asarray(img, dtype=np.float64)
        hi = float(a.max()) if a.size else 0.0
        scale = 255.0 / (65535.0 if hi > 255 else 255.0)
        a = np.clip(a * scale + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


def read_image(
    path: os.PathLike | str,
    *,
    resize_shorter: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """Decode an image file fully into RGB.

    Args:
        path: the image file.
        resize_shorter: when given, resize (bilinear, antialiased) so the shorter side equals it,
            keeping the aspect ratio. JPEGs are decoded at a reduced DCT scale when that is enough.
        max_pixels: an image whose header declares more pixels is refused before decoding (None: PIL's
            decompression-bomb limit only).

    Returns:
        np.ndarray uint8 of shape (H, W, 3), C-contiguous, RGB (use :func:`read_image_chw` for (3, H, W)).

    Raises:
        ImageTooLargeError: over ``max_pixels`` (names the file).
        ImageReadError: the file is corrupt or truncated (names the file).
    """
    try:
        with strict_truncation(), open_image(path, max_pixels) as img:
            if resize_shorter is not None:
                w, h = img.size
                s = resize_shorter / min(w, h)
                size = (max(1, round(w * s)), max(1, round(h * s)))
                if img.format == "JPEG" and s < 1:
                    img.draft("RGB", (math.ceil(w * s), math.ceil(h * s)))
                img.load()
                if img.mode not in ("RGB", "L"):
                    img = Image.fromarray(_to_rgb(img))
                if img.size != size:
                    img = img.resize(size, Image.Resampling.BILINEAR)
            else:
                img.load()
            hwc = _to_rgb(img)
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        if isinstance(e, ImageReadError):
            raise
        msg = str(e) or type(e).__name__
        kind = "truncated" if "truncat" in msg.lower() else "corrupt"
        raise ImageReadError(path, kind, msg) from e
    if hwc.ndim == 2:
        hwc = np.repeat(hwc[:, :, None], 3, axis=2)
    return np.ascontiguousarray(hwc)


def read_image_chw(path: os.PathLike | str, **options) -> np.ndarray:
    """:func:`read_image` (same keyword ``options``) in (3, H, W) layout, C-contiguous (what the loaders crop
    from)."""
    hwc = read_image(path, **options)
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))


def resized_size(width: int, height: int, resize_shorter: int | None) -> tuple[int, int]:
    """(width, height) after :func:`read_image`'s ``resize_shorter`` (unchanged when None)."""
    if resize_shorter is None:
        return width, height
    s = resize_shorter / min(width, height)
    return max(1, round(width * s)), max(1, round(height * s))


@dataclasses.dataclass
class ScannedFiles:
    """What :func:`scan_image_files` found.

    Attributes:
        files: the usable files, in source order.
        sizes: int64 (N, 2): each usable image's (height, width) after the resize.
        modes: each usable image's PIL mode ("RGB", "L", "CMYK", ...), from its header.
        bad: the files left out (``on_bad="skip"``/``"pad"``).
        source_sizes: int64 (N, 2): each usable image's (height, width) in the file (before the resize).
    """

    files: list[str]
    sizes: np.ndarray
    modes: list[str]
    bad: list[str]
    source_sizes: np.ndarray | None = None


def scan_image_files(
    paths,
    *,
    crop_size: int,
    resize: int | None,
    on_bad: str,
    full_check: bool = False,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> ScannedFiles:
    """Sort files into usable and bad before a pipeline that cannot skip a file mid-stream starts (DALI, the
    GPU decoder), reading every usable image's size and mode from its header.

    Headers only (PIL) unless ``full_check`` (a full decode: catches truncated data too). An image smaller
    than the crop (after the resize, if any) is bad unless ``on_bad="pad"``; one of more than ``max_pixels``
    pixels is bad (from its header: it is never decoded).

    Raises:
        DataError: with ``on_bad="error"``, naming the first bad file and what was expected.
    """
    good, sizes, modes, bad, source_sizes = [], [], [], [], []
    for p in paths:
        try:
            w, h, mode = probe_image(p, max_pixels)
            if full_check:
                read_image(p, max_pixels=max_pixels)
        except ImageReadError as e:
            if on_bad == "error":
                raise DataError(str(e)) from e
            bad.append(str(p))
            continue
        source_sizes.append((h, w))
        w, h = resized_size(w, h, resize)
        if (w < crop_size or h < crop_size) and on_bad != "pad":
            if on_bad == "error":
                raise DataError(
                    f"{p}: image is {w}x{h}, expected at least {crop_size}x{crop_size} for the crop "
                    "(use on_bad='skip' or 'pad')"
                )
            bad.append(str(p))
            source_sizes.pop()
            continue
        good.append(str(p))
        sizes.append((h, w))
        modes.append(mode)
    return ScannedFiles(
        good,
        np.array(sizes, dtype=np.int64).reshape(-1, 2),
        modes,
        bad,
        np.array(source_sizes, dtype=np.int64).reshape(-1, 2),
    )
