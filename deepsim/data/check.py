"""``deepsim data check PATH``: scan a dataset and report files that would stop or change training.

Every file is fully decoded (``Image.open(...).load()``) with truncation made strict, whatever
``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` says elsewhere in the process, except images whose header declares
more than ``max_image_pixels`` pixels: those are reported as too large and never decoded.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib

from .errors import DataError
from .images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageReadError,
    ImageTooLargeError,
    check_max_pixels,
    list_image_files,
    mode_kind,
    open_image,
    strict_truncation,
)
from .interrupt import interruptible
from .photos import bundled_photo_paths
from .stl10 import STL10_SPLITS, is_stl10_folder, load_stl10

__all__ = ["CheckReport", "check_images", "format_report"]


@dataclasses.dataclass
class CheckReport:
    """What :func:`check_images` found.

    Attributes:
        path: the folder (or "photos").
        total: files scanned (images and non-images).
        ok: images that decode fully, are RGB and at least ``min_size`` on both sides.
        corrupt: files with an image extension (or header) that do not decode.
        truncated: images whose data ends early.
        too_small: (path, (width, height)) of images smaller than ``min_size``.
        too_large: (path, pixels) of images over ``max_image_pixels`` (not decoded; a bad image for
            ``on_bad``).
        upscaled: (path, (width, height)) of images smaller than ``min_size`` that the loader resizes up
            first (``resize`` given: the shorter side goes to ``resize`` before the crop); usable, but
            blurred.
        grayscale, cmyk, alpha: images that decode but are converted to RGB by the loader.
        non_image: files that are not images (ignored by the loader).
        min_size: the size threshold used.
        resize: the shorter side images are resized to before the crop (None: cropped as they are).
    """

    path: str
    total: int = 0
    ok: int = 0
    corrupt: list[str] = dataclasses.field(default_factory=list)
    truncated: list[str] = dataclasses.field(default_factory=list)
    too_small: list[tuple[str, tuple[int, int]]] = dataclasses.field(default_factory=list)
    too_large: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    upscaled: list[tuple[str, tuple[int, int]]] = dataclasses.field(default_factory=list)
    grayscale: list[str] = dataclasses.field(default_factory=list)
    cmyk: list[str] = dataclasses.field(default_factory=list)
    alpha: list[str] = dataclasses.field(default_factory=list)
    non_image: list[str] = dataclasses.field(default_factory=list)
    min_size: int = 64
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    resize: int | None = None

    @property
    def num_images(self) -> int:
        return self.total - len(self.non_image)

    @property
    def usable(self) -> int:
        """Images the loader can train on (decodable, big enough; conversions allowed)."""
        bad = len(self.corrupt) + len(self.truncated) + len(self.too_small) + len(self.too_large)
        return self.num_images - bad

    @property
    def blocking(self) -> bool:
        """True when training with ``on_bad="error"`` would stop: bad files, or no image at all."""
        return bool(self.corrupt or self.truncated or self.too_small or self.too_large) or self.usable <= 0


def _check_one(path: pathlib.Path, min_size: int, max_pixels: int) -> tuple[str, object]:
    try:
        with strict_truncation(), open_image(path, max_pixels) as img:
            img.load()
            kinds = mode_kind(img)
            size = img.size
    except ImageTooLargeError as e:
        return "too_large", e.pixels
    except ImageReadError:
        return "corrupt", None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        return ("truncated" if "truncat" in str(e).lower() else "corrupt"), None
    if size[0] < min_size or size[1] < min_size:
        return "too_small", (size, kinds)
    return "decoded", (size, kinds)


def check_images(
    path: str | os.PathLike,
    *,
    min_size: int = 64,
    num_threads: int | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    resize: int | None = None,
) -> CheckReport:
    """Scan every file under ``path`` (recursively), fully decoding each image.

    Args:
        path: a folder of images, ``"photos"`` for the bundled photographs, or an STL-10 folder (the
            ``*_X.bin``/``*_y.bin`` sizes are validated; a bad file is reported as corrupt).
        min_size: images with a side below this are reported in ``too_small`` (64 = the autoencoder crop;
            use 227 for inversion without resizing).
        num_threads: decoder threads (default: min(8, cpu count)).
        max_image_pixels: images whose header declares more pixels are reported in ``too_large``, not decoded.
        resize: the training preprocessing resizes the shorter side to this before the crop (the inversion:
        256);
            images smaller than ``min_size`` are then reported in ``upscaled`` (usable), not ``too_small``.

    Returns:
        :class:`CheckReport`.

    Raises:
        DataError: ``path`` does not exist or is not a folder, or ``max_image_pixels`` is not positive.
        Interrupted: a stop signal (SIGINT, SIGTERM, SIGHUP) arrived during the scan.
    """
    check_max_pixels(max_image_pixels)
    with interruptible():
        report = _check(path, min_size, num_threads, max_image_pixels)
    if resize is not None and resize >= min_size:  # resized up before the crop: usable
        report.resize, report.upscaled, report.too_small = resize, report.too_small, []
        report.ok += len(report.upscaled) - _converted(report, {p for p, _ in report.upscaled})
    return report


def _converted(report: CheckReport, names: set[str]) -> int:
    """How many of ``names`` are also converted (grayscale, CMYK, alpha): those do not count as ok."""
    return len(names & set(report.grayscale + report.cmyk + report.alpha))


def _check(path, min_size: int, num_threads: int | None, max_pixels: int) -> CheckReport:
    if isinstance(path, str) and path == "photos":
        report = CheckReport(path="photos", min_size=min_size, max_image_pixels=max_pixels)
        files, non_images = bundled_photo_paths(), []
    else:
        folder = pathlib.Path(path)
        if not folder.exists():
            raise DataError(f"{folder}: no such file or folder, expected a folder of images to check")
        report = CheckReport(path=str(folder), min_size=min_size, max_image_pixels=max_pixels)
        if is_stl10_folder(folder):
            for split in STL10_SPLITS:
                if (folder / f"{split}_X.bin").is_file():
                    report.total += 1
                    try:
                        load_stl10(folder, split)
                        report.ok += 1
                    except DataError as e:
                        report.corrupt.append(str(e))
            return report
        files, non_images = list_image_files(folder)
    report.total = len(files) + len(non_images)
    report.non_image = [str(p) for p in non_images]
    threads = num_threads or max(1, min(8, os.cpu_count() or 1))
    pool = concurrent.futures.ThreadPoolExecutor(threads)
    try:
        results = list(pool.map(lambda p: _check_one(p, min_size, max_pixels), files))
    finally:  # on a stop signal: the files in flight finish, the queued ones are dropped
        pool.shutdown(wait=True, cancel_futures=True)
    for p, (status, info) in zip(files, results):
        name = str(p)
        if status == "corrupt":
            report.corrupt.append(name)
            continue
        if status == "truncated":
            report.truncated.append(name)
            continue
        if status == "too_large":
            report.too_large.append((name, info))
            continue
        size, kinds = info
        if status == "too_small":
            report.too_small.append((name, size))
        for kind in sorted(kinds):
            getattr(report, kind).append(name)
        if status == "decoded" and not kinds:
            report.ok += 1
    return report


def format_report(report: CheckReport, *, max_listed: int = 20) -> str:
    """A human-readable summary: counts, then up to ``max_listed`` files per problem."""
    lines = [
        f"{report.path}: {report.total} files, {report.num_images} images, {report.ok} ok, "
        f"{report.usable} usable for training (min size {report.min_size}"
        + (f", shorter side resized to {report.resize} first)" if report.resize else ")")
    ]
    sections = [
        ("corrupt", report.corrupt, "cannot be decoded (stops training; on_bad='skip' drops them)"),
        ("truncated", report.truncated, "data ends early (stops training; on_bad='skip' drops them)"),
        (
            "too_small",
            [f"{p} ({w}x{h})" for p, (w, h) in report.too_small],
            f"smaller than {report.min_size}x{report.min_size} (stops training; on_bad='skip' or 'pad')",
        ),
        (
            "too_large",
            [f"{p} ({n} pixels)" for p, n in report.too_large],
            f"over {report.max_image_pixels} pixels, not decoded (stops training; on_bad='skip' drops them; "
            "--max-image-pixels)",
        ),
        (
            "upscaled",
            [f"{p} ({w}x{h})" for p, (w, h) in report.upscaled],
            f"smaller than {report.min_size}x{report.min_size}, resized up to {report.resize} before the "
            "crop (usable, blurred)",
        ),
        ("grayscale", report.grayscale, "converted to RGB"),
        ("cmyk", report.cmyk, "converted to RGB"),
        ("alpha", report.alpha, "alpha channel dropped"),
        ("non_image", report.non_image, "not images, ignored"),
    ]
    for name, items, what in sections:
        if not items:
            continue
        lines.append(f"  {name}: {len(items)} file(s) {what}")
        lines += [f"    {item}" for item in items[:max_listed]]
        if len(items) > max_listed:
            lines.append(f"    ... and {len(items) - max_listed} more")
    if report.usable <= 0:
        lines.append("  no usable image: training cannot start")
    lines.append("problems found that stop training" if report.blocking else "no problem that stops training")
    return "\n".join(lines)
