"""The data layer's folder walk on hostile folders: symlink loops end, every image is counted once, a link out
of the folder is followed once and one hop only; the same listing reaches `deepsim data check` and the
training loaders; a stop signal ends a long scan (subprocesses, bounded in time)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from deepsim.data import build_loader, check_images
from deepsim.data.images import list_image_files
from deepsim.data.walk import walk_files
from tests.hostile_files import SLOW_SCANDIR, looped_folder, write_image

EXPECTED = {
    "self": ["a.png", "sub/b.png", "sub/deep/c.png"],
    "cycle": ["a.png", "sub/b.png", "sub/deep/c.png"],
    "out": ["a.png", "ext/o.png", "sub/b.png", "sub/deep/c.png"],
}


def _relative(paths, root):
    return [str(p.relative_to(root)) for p in paths]


@pytest.fixture(params=sorted(EXPECTED))
def hostile(request, tmp_path):
    kind = request.param
    root = looped_folder(tmp_path / "data", kind, outside=tmp_path / "elsewhere" / "outside")
    return kind, root


@pytest.mark.timeout(60)  # os.walk(followlinks=True) never ended on two self-links
def test_walk_ends_and_lists_each_image_once(hostile):
    kind, root = hostile
    assert _relative(walk_files(root), root) == EXPECTED[kind]
    images, non_images = list_image_files(root)
    assert _relative(images, root) == EXPECTED[kind] and non_images == []


@pytest.mark.timeout(60)
def test_data_check_counts_each_image_once(hostile):
    kind, root = hostile
    report = check_images(root, min_size=32)
    assert (report.total, report.ok, report.blocking) == (len(EXPECTED[kind]), len(EXPECTED[kind]), False)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cache", [True, False], ids=["in-memory", "lazy"])
def test_training_loaders_list_each_image_once(hostile, cache):
    kind, root = hostile
    with build_loader(root, batch_size=2, crop_size=32, cache=cache) as stream:
        assert stream.num_samples == len(EXPECTED[kind])
        assert next(stream).shape == (2, 3, 32, 32)


def test_plain_tree_order_is_os_walks(tmp_path):
    for rel in ["b.png", "a/z.png", "a/b/c.png", "a/a.png", "c/x.png", "0.png"]:
        write_image(tmp_path / "t" / rel, 8, 8)
    expected = []
    for top, dirs, files in os.walk(tmp_path / "t"):
        dirs.sort()
        expected += [os.path.join(top, f) for f in sorted(files)]
    assert [str(p) for p in walk_files(tmp_path / "t")] == expected


def test_special_files_are_skipped_and_broken_links_listed(tmp_path):
    root = tmp_path / "d"
    write_image(root / "a.png")
    os.mkfifo(root / "pipe.dat")  # opening it to sniff its header would block forever
    os.symlink(root / "gone.png", root / "broken.png")
    os.symlink("self.png", root / "self.png")  # a link to itself (ELOOP)
    os.symlink("a.png", root / "same.png")  # a second name for a.png: counted once
    assert [p.name for p in walk_files(root)] == ["a.png", "broken.png"]
    report = check_images(root, min_size=32)
    assert report.ok == 1 and [os.path.basename(p) for p in report.corrupt] == ["broken.png"]


def _slow_tree(tmp_path, n=200):
    root = tmp_path / "slow"
    for i in range(n):
        write_image(root / f"d{i:03d}" / "x.png", 8, 8)
    return root


def _signal_mid_scan(tmp_path, root, argv, sig=signal.SIGTERM):
    """Run the CLI with slow folder listings, signal it once the scan started; (status, stderr lines,
    seconds)."""
    script = SLOW_SCANDIR + f"\nfrom deepsim.cli import main\nsys.exit(main({argv!r}))\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(root)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "scan-started").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the scan did not start"
            time.sleep(0.05)
        sent = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)  # the whole scan would take 100 s
        return proc.returncode, err.strip().splitlines(), time.monotonic() - sent
    finally:
        proc.kill()


@pytest.mark.timeout(200)
@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)], ids=["SIGTERM", "SIGINT"]
)
def test_a_stop_signal_ends_data_check_mid_scan(tmp_path, sig):
    root = _slow_tree(tmp_path)
    status, err, seconds = _signal_mid_scan(tmp_path, root, ["data", "check", str(root)], sig)
    assert status == 128 + sig and seconds < 10
    assert err == [f"deepsim data: stopped by {signal.Signals(sig).name}; nothing half-written was left"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_ends_train_mid_scan(tmp_path):
    # Before: train's stop handler only asked the loop to stop after a
    # step; the scan went on (forever on a loop).
    root = _slow_tree(tmp_path)
    out = tmp_path / "run"
    tiny = "--steps 1 --batch-size 2 --loss se --device cpu --no-progress --image-size 8".split()
    argv = ["train", "--data", str(root), "--out", str(out), *tiny]
    status, err, seconds = _signal_mid_scan(tmp_path, root, argv)
    assert status == 128 + signal.SIGTERM and seconds < 10
    assert err[-1] == "deepsim train: stopped by SIGTERM; nothing half-written was left"
    assert not any(line.startswith("Traceback") for line in err)
    assert not list(out.glob("checkpoint*"))
