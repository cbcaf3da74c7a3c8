"""check_images: every kind of bad input, the report text, and that truncation is never masked."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFile

from deepsim.data import DataError, check_images, format_report
from tests.image_folders import write_bad_inputs


def names(paths):
    return sorted(p.rsplit("/", 1)[-1] for p in paths)


@pytest.mark.parametrize("lenient_global", [False, True])
def test_every_problem_is_reported(tmp_path, lenient_global):
    folder = write_bad_inputs(tmp_path / "data", nested=True)
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = lenient_global
    try:
        report = check_images(folder)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old
    assert report.total == 11
    assert report.ok == 4  # 3 good + the one in the subfolder
    assert names(report.corrupt) == ["corrupt.jpg"]
    assert names(report.truncated) == ["truncated.jpg"]
    assert [(n.rsplit("/", 1)[-1], s) for n, s in report.too_small] == [("small.png", (30, 20))]
    assert names(report.grayscale) == ["gray.png"]
    assert names(report.cmyk) == ["cmyk.jpg"]
    assert names(report.alpha) == ["alpha.png"]
    assert names(report.non_image) == ["notes.txt"]
    assert report.blocking
    text = format_report(report)
    for word in ["corrupt.jpg", "truncated.jpg", "small.png (30x20)", "notes.txt", "stop training"]:
        assert word in text


def test_min_size_and_clean_folder(tmp_path):
    folder = tmp_path / "clean"
    folder.mkdir()
    Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8)).save(folder / "a.png")
    assert check_images(folder, min_size=64).too_small
    report = check_images(folder, min_size=32)
    assert report.ok == 1 and not report.blocking
    assert "no problem that stops training" in format_report(report)


def test_empty_folder_is_blocking(tmp_path):
    (tmp_path / "empty").mkdir()
    report = check_images(tmp_path / "empty")
    assert report.total == 0 and report.blocking
    with pytest.raises(DataError, match="missing"):
        check_images(tmp_path / "missing")


def test_bundled_photos_check():
    report = check_images("photos")
    assert not report.blocking and report.ok + len(report.grayscale) == report.total


def test_stl10_folder_check(tmp_path):
    folder = tmp_path / "stl"
    folder.mkdir()
    np.zeros(3 * 96 * 96 * 2, dtype=np.uint8).tofile(folder / "unlabeled_X.bin")
    assert not check_images(folder).blocking
    np.zeros(100, dtype=np.uint8).tofile(folder / "unlabeled_X.bin")
    report = check_images(folder)
    assert report.blocking and "unlabeled_X.bin" in report.corrupt[0]


def test_cli_data_check_names_every_bad_file(tmp_path, capsys):
    from deepsim.cli import main

    folder = write_bad_inputs(tmp_path / "data")
    assert main(["data", "check", str(folder), "--min-size", "64"]) == 1
    out = capsys.readouterr().out
    for name in ("corrupt.jpg", "truncated.jpg", "small.png", "notes.txt"):
        assert name in out
    good = tmp_path / "good"
    good.mkdir()
    Image.fromarray(np.zeros((80, 80, 3), np.uint8)).save(good / "ok.png")
    assert main(["data", "check", str(good)]) == 0
    assert main(["data", "check", "photos"]) == 0
