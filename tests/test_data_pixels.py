"""The pixel-count limit: decompression bombs are refused from their header, never decoded, in `data check`,
the training loaders and the DALI/nvjpeg pre-scan; --on-bad decides; memory stays bounded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from deepsim.cli import main
from deepsim.config import TrainConfig
from deepsim.data import DataError, build_loader, check_images, format_report
from deepsim.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageTooLargeError,
    probe_image,
    read_image,
    scan_image_files,
)
from tests.hostile_files import bomb_png, write_image


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    """good.png (72x80) and two bombs: 12000x12000 16-bit (valid, ~280 KB) and 20000x20000 (header + a few
    rows: its check needs the header alone; PIL itself refuses it, with a DecompressionBombError, at open)."""
    folder = tmp_path_factory.mktemp("bombs")
    write_image(folder / "good.png")
    bomb_png(folder / "big.png", 12000, 12000)
    bomb_png(folder / "huge.png", 20000, 20000, rows=16)
    return folder


def test_the_default_is_the_configs_and_below_pils_hard_limit():
    assert TrainConfig().max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS == 8192 * 8192
    assert DEFAULT_MAX_IMAGE_PIXELS < 2 * Image.MAX_IMAGE_PIXELS


def test_the_12000_bomb_is_small_on_disk_and_a_valid_png(bombs):
    assert (bombs / "big.png").stat().st_size < 400_000
    assert probe_image(bombs / "big.png") == (12000, 12000, "I;16")  # no limit on a plain probe


@pytest.mark.parametrize(
    "name, message",
    [
        (
            "big.png",
            r"big.png: image is 12000x12000 = 144000000 pixels, over the limit of 67108864 "
            r"\(max_image_pixels, --max-image-pixels\); not decoded",
        ),
        ("huge.png", r"huge.png: image has 400000000 pixels, over the limit of 67108864"),
    ],
)
def test_read_image_refuses_from_the_header(bombs, name, message):
    with pytest.raises(ImageTooLargeError, match=message):
        read_image(bombs / name)


def test_the_limit_is_inclusive(bombs):
    assert read_image(bombs / "good.png", max_pixels=72 * 80).shape == (72, 80, 3)
    with pytest.raises(
        ImageTooLargeError, match=r"good.png: image is 80x72 = 5760 pixels, over the limit of 5759"
    ):
        read_image(bombs / "good.png", max_pixels=72 * 80 - 1)


def test_data_check_reports_too_large_without_decoding(bombs):
    report = check_images(bombs, min_size=32)
    assert [(os.path.basename(p), n) for p, n in report.too_large] == [
        ("big.png", 144_000_000),
        ("huge.png", 400_000_000),
    ]
    assert report.ok == 1 and report.usable == 1 and report.blocking
    assert "big.png (144000000 pixels)" in format_report(report)
    raised = check_images(bombs, min_size=32, max_image_pixels=150_000_000)
    assert [os.path.basename(p) for p, _ in raised.too_large] == ["huge.png"]


def test_cli_data_check_flag(bombs, capsys):
    assert main(["data", "check", str(bombs), "--min-size", "32", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert len(report["too_large"]) == 2 and report["max_image_pixels"] == DEFAULT_MAX_IMAGE_PIXELS
    assert main(["data", "check", str(bombs), "--max-image-pixels", "0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "deepsim data: error: --max-image-pixels 0: expected a positive number of pixels"
    )


@pytest.mark.parametrize("cache", [True, False], ids=["in-memory", "lazy"])
def test_loaders_skip_or_name_the_bomb(bombs, cache):
    with build_loader(bombs, batch_size=2, crop_size=32, on_bad="skip", cache=cache) as stream:
        assert next(stream).shape == (2, 3, 32, 32)
        assert stream.skipped == 2 if cache else stream.skipped >= 1
    with pytest.raises(
        DataError,
        match=r"(big|huge).png: image (is 12000x12000 = 144000000|has 400000000) pixels, "
        r"over the limit of 67108864",
    ):
        stream = build_loader(
            bombs, batch_size=3, crop_size=32, on_bad="error", cache=cache, mirror=False, mode="center"
        )
        for _ in range(3):  # lazy: the error comes when the file is read
            next(stream)


def test_dali_and_nvjpeg_prescan_leaves_the_bombs_out(bombs):
    paths = sorted(str(p) for p in bombs.iterdir())
    scan = scan_image_files(paths, crop_size=32, resize=None, on_bad="skip")
    assert [os.path.basename(p) for p in scan.files] == ["good.png"]
    assert sorted(os.path.basename(p) for p in scan.bad) == ["big.png", "huge.png"]
    with pytest.raises(DataError, match=r"big.png: image is 12000x12000"):
        scan_image_files(paths, crop_size=32, resize=None, on_bad="error", full_check=True)


_MEASURE = """
import resource, sys
from deepsim.data import build_loader, check_images
folder = sys.argv[1]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report = check_images(folder, min_size=32, num_threads=1)
with build_loader(folder, batch_size=2, crop_size=32, on_bad="skip") as stream:
    next(stream)
with build_loader(folder, batch_size=2, crop_size=32, on_bad="skip", cache=False) as stream:
    next(stream)
print(len(report.too_large), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_memory_stays_bounded(bombs):
    # Decoding the 12000 one takes 288 MB as 16-bit pixels (4.8 GB seen in training); the limit keeps the peak
    # resident memory of a check and of both loaders within 64 MB of what the imports took.
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(bombs)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    too_large, grown_mb = map(int, result.stdout.split())
    assert too_large == 2 and grown_mb < 64, f"peak RSS grew by {grown_mb} MB"
