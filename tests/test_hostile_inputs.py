"""The CLI through each hostile input of the data and Caffe layers: a failure is exactly one line on stderr
naming the file, flag or blob, status 2, and nothing written or changed; a folder with symlink loops is
scanned once and reported as it is."""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from deepsim.cli import main
from tests import caffe_writer as cw
from tests.hostile_files import bomb_png, looped_folder, write_image

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

TRAIN = [
    "--steps",
    "1",
    "--batch-size",
    "2",
    "--loss",
    "se",
    "--device",
    "cpu",
    "--no-progress",
    "--image-size",
    "32",
    "--sample-every",
    "1000",
    "--no-tensorboard",
]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root -> (size, mtime_ns); links as their own entry, not followed."""
    out = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(top) / name
            st = path.lstat()
            out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def stalled_url():
    """http://127.0.0.1:PORT/... of a server that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held, stop = [], threading.Event()

    def serve():
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/stl10_binary.tar.gz"
    stop.set()
    thread.join(2)
    for conn in held:
        conn.close()
    listener.close()


def _bomb_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "bombs"
    for i in range(3):
        write_image(folder / f"good{i}.png", value=i)
    bomb_png(folder / "huge.png", 20000, 20000, rows=16)
    return folder


def _million_dims(tmp_path: Path) -> Path:
    dims = b"".join(cw.varint(3) for _ in range(1_000_000))
    blob = cw.f_bytes(7, cw.f_bytes(1, dims)) + cw.f_floats(5, np.zeros(4, np.float32))
    layer = cw.layer_message(
        "conv1", "Convolution", ["data"], ["conv1"], blobs=[blob], conv=cw.conv_param(96, 11, stride=4)
    )
    path = tmp_path / "dims.caffemodel"
    path.write_bytes(cw.net_message([layer], v1=False))
    return path


def _nan_generator(tmp_path: Path) -> Path:
    weights = cw.random_generator_weights("fc", np.random.default_rng(0), fc_width=16)
    weights["defc6"][0][3, 5] = np.nan
    path = tmp_path / "nan.caffemodel"
    path.write_bytes(cw.generator_caffemodel("fc", weights))
    return path


# id -> (build(tmp_path, url) -> argv, status, the one stderr line as
# a regex). A build's inputs live in tmp_path.
CASES = {
    "bomb-20000-train-error": (
        lambda t, u: ["train", "--data", str(_bomb_folder(t)), "--out", str(t / "run"), *TRAIN],
        2,
        r"deepsim train: error: .*/bombs/huge.png: image has 400000000 pixels, over the limit of 67108864 "
        r"\(max_image_pixels, --max-image-pixels\); not decoded",
    ),
    "max-image-pixels-flag": (
        lambda t, u: [
            "train",
            "--data",
            str(_bomb_folder(t)),
            "--out",
            str(t / "run"),
            "--max-image-pixels",
            "-1",
            *TRAIN,
        ],
        2,
        r"deepsim train: error: --max-image-pixels -1: expected a positive number of pixels",
    ),
    "max-image-pixels-data-check": (
        lambda t, u: ["data", "check", str(_bomb_folder(t)), "--max-image-pixels", "0"],
        2,
        r"deepsim data: error: --max-image-pixels 0: expected a positive number of pixels",
    ),
    "stalled-download": (
        lambda t, u: [
            "data",
            "download",
            "stl10",
            str(t / "stl"),
            "--url",
            u,
            "--read-timeout",
            "0.3",
            "--retries",
            "1",
        ],
        2,
        r"deepsim data: error: downloading http://127.0.0.1:\d+/stl10_binary.tar.gz failed after 2 attempts: "
        r"no data for --read-timeout 0.3 s \(the server stalled\); nothing was kept in .*/stl",
    ),
    "download-timeout-flag": (
        lambda t, u: ["data", "download", "stl10", str(t / "stl"), "--url", u, "--connect-timeout", "0"],
        2,
        r"deepsim data: error: --connect-timeout 0.0: expected a positive number of seconds",
    ),
    "caffe-million-dims": (
        lambda t, u: [
            "import-caffe",
            str(_million_dims(t)),
            "--layer",
            "caffenet",
            "--up-to",
            "conv1",
            "--out",
            str(t / "out.pt"),
        ],
        2,
        r"deepsim import-caffe: error: .*/dims.caffemodel: layer 'conv1', blob 0: shape has more than 32 "
        r"axes \(Caffe's limit\), a corrupt blob",
    ),
    "caffe-nan-weights": (
        lambda t, u: ["import-caffe", str(_nan_generator(t)), "--layer", "fc6", "--out", str(t / "out.pt")],
        2,
        r"deepsim import-caffe: error: .*/nan.caffemodel: layer 'defc6', blob 0: 1 non-finite value\(s\) "
        r"\(NaN or infinity\), the first at flat index 53 \(nan\); expected finite weights",
    ),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_input_is_one_line_status_2_nothing_written(case, tmp_path, stalled_url, capsys):
    build, status, line = CASES[case]
    argv = build(tmp_path, stalled_url)
    before = _tree(tmp_path)
    capsys.readouterr()
    assert main(argv) == status
    err = capsys.readouterr().err.strip().splitlines()
    if argv[0] == "train":  # its two announce lines (the path taken, the run) come before the data is read
        err = [e for e in err if not e.startswith("deepsim train autoencoder: ")]
    assert len(err) == 1 and re.fullmatch(line, err[0]), err
    assert _tree(tmp_path) == before


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["self", "cycle", "out"])
def test_symlink_loops_are_scanned_once(kind, tmp_path, capsys):
    root = looped_folder(tmp_path / "data", kind, outside=tmp_path / "elsewhere" / "outside")
    before = _tree(tmp_path)
    assert main(["data", "check", str(root), "--min-size", "32"]) == 0
    captured = capsys.readouterr()
    images = 4 if kind == "out" else 3
    assert (
        captured.out.startswith(f"{root}: {images} files, {images} images, {images} ok")
        and captured.err == ""
    )
    assert _tree(tmp_path) == before


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bomb_with_on_bad_skip_trains(tmp_path, capsys):
    folder = _bomb_folder(tmp_path)
    assert (
        main(["train", "--data", str(folder), "--out", str(tmp_path / "run"), "--on-bad", "skip", *TRAIN])
        == 0
    )
    err = capsys.readouterr().err
    assert "Traceback" not in err and "DecompressionBomb" not in err
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
