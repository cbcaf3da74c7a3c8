"""Downloads, offline: STL-10 from a local file:// URL or a local HTTP server (a tiny archive in
the release's layout), torchvision weights through --download-weights; broken downloads leave nothing."""

import hashlib
import io
import tarfile

import numpy as np
import pytest
import torch

from deepsim.cli import main
from deepsim.comparators import Comparator, ComparatorWeightsError, allow_weight_downloads
from deepsim.data import download as download_module
from deepsim.data import load_stl10
from deepsim.data.download import ArchiveRelease, DownloadError, download_stl10, stl10_release

IMAGE = 3 * 96 * 96


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _stl10_archive(tmp_path, n_train=2, n_test=2, n_unlabeled=3):
    """A tiny stl10_binary.tar.gz in the release's layout and the ArchiveRelease that describes it."""
    rng = np.random.default_rng(0)
    files = {
        "train_X.bin": rng.integers(0, 256, n_train * IMAGE, dtype=np.uint8).tobytes(),
        "train_y.bin": bytes(range(1, n_train + 1)),
        "unlabeled_X.bin": rng.integers(0, 256, n_unlabeled * IMAGE, dtype=np.uint8).tobytes(),
        "test_X.bin": rng.integers(0, 256, n_test * IMAGE, dtype=np.uint8).tobytes(),
        "test_y.bin": bytes(range(1, n_test + 1)),
        "fold_indices.txt": "0 1\n" * 10,
        "class_names.txt": "airplane\nbird\n",
    }
    archive = tmp_path / "mirror" / "stl10_binary.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in files.items():
            data = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(f"stl10_binary/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    checked = tuple((name, _md5(files[name])) for name, _ in stl10_release().files)
    release = ArchiveRelease(
        archive.as_uri(), archive.name, _md5(archive.read_bytes()), "stl10_binary", checked
    )
    return archive, release


def _left_in(root):
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_release_is_torchvisions_stl10():
    from torchvision.datasets import STL10

    release = stl10_release()
    assert (release.url, release.archive_md5, release.folder) == (STL10.url, STL10.tgz_md5, "stl10_binary")
    assert {name for name, _ in release.files} == {
        "train_X.bin",
        "train_y.bin",
        "unlabeled_X.bin",
        "test_X.bin",
        "test_y.bin",
    }


def test_stl10_download_lands_where_the_loader_reads(tmp_path):
    archive, release = _stl10_archive(tmp_path)
    root = tmp_path / "data"
    folder = download_stl10(root, release=release)
    assert folder == root / "stl10_binary" and _left_in(root) == ["stl10_binary"]  # no archive, no staging
    images, labels = load_stl10(folder, "train")
    assert images.shape == (2, 3, 96, 96) and labels.tolist() == [1, 2]
    assert load_stl10(folder, "unlabeled")[0].shape[0] == 3
    # Already there and verified: nothing is fetched (the URL is now wrong on purpose).
    assert download_stl10(root, release=release, url=(tmp_path / "gone.tar.gz").as_uri()) == folder


@pytest.mark.parametrize("breakage", ["bad-checksum", "truncated", "bad-file-inside", "unreachable"])
def test_broken_stl10_download_is_a_clear_error_and_leaves_nothing(tmp_path, breakage):
    archive, release = _stl10_archive(tmp_path)
    url = archive.as_uri()
    if breakage == "bad-checksum":
        release = ArchiveRelease(release.url, release.archive, "0" * 32, release.folder, release.files)
        expected = r"has MD5 [0-9a-f]{32}, expected 0{32}: truncated or corrupt"
    elif breakage == "truncated":  # the connection dropped half-way: the archive MD5 cannot match
        truncated = tmp_path / "mirror" / "truncated.tar.gz"
        truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
        url, expected = truncated.as_uri(), r"truncated or corrupt; nothing was kept"
    elif breakage == "bad-file-inside":
        files = (("train_X.bin", "f" * 32),) + release.files[1:]
        release = ArchiveRelease(release.url, release.archive, release.archive_md5, release.folder, files)
        expected = r"stl10_binary/train_X.bin in the archive: MD5 [0-9a-f]{32}, expected f{32}"
    else:
        url, expected = (tmp_path / "nowhere.tar.gz").as_uri(), r"downloading file://.*nowhere.tar.gz failed"
    root = tmp_path / "data"
    with pytest.raises(DownloadError, match=expected):
        download_stl10(root, release=release, url=url)
    assert _left_in(root) == []


@pytest.fixture
def http_server():
    """A local HTTP server (127.0.0.1) for torchvision's real fetch: serves ``files[path] = bytes``; a path in
    ``cut`` announces the full Content-Length but the connection drops after half the bytes."""
    import http.server
    import threading

    files, cut = {}, set()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path not in files:
                self.send_error(404)
                return
            data = files[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2] if self.path in cut else data)
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", files, cut
    server.shutdown()
    server.server_close()


def test_stl10_over_http_and_a_dropped_connection(tmp_path, http_server):
    base, files, cut = http_server
    archive, release = _stl10_archive(tmp_path)
    files["/stl10.tar.gz"] = files["/dropped.tar.gz"] = archive.read_bytes()
    cut.add("/dropped.tar.gz")
    expected = (
        r"/dropped.tar.gz failed after 2 attempts: received \d+ of \d+ bytes \(the connection dropped\)"
    )
    with pytest.raises(DownloadError, match=expected):
        download_stl10(
            tmp_path / "a", release=release, url=base + "/dropped.tar.gz", retries=1, retry_wait=0.01
        )
    assert _left_in(tmp_path / "a") == []
    with pytest.raises(DownloadError, match=r"downloading http://.*/missing.tar.gz failed: HTTP Error 404"):
        download_stl10(tmp_path / "a", release=release, url=base + "/missing.tar.gz")
    assert _left_in(tmp_path / "a") == []
    folder = download_stl10(tmp_path / "a", release=release, url=base + "/stl10.tar.gz")
    assert load_stl10(folder, "test")[1].tolist() == [1, 2] and _left_in(tmp_path / "a") == ["stl10_binary"]


def test_a_failed_download_keeps_an_existing_folder_as_it_was(tmp_path):
    archive, release = _stl10_archive(tmp_path)
    old = tmp_path / "data" / "stl10_binary"
    old.mkdir(parents=True)
    (old / "train_X.bin").write_bytes(b"old, incomplete")
    bad = ArchiveRelease(release.url, release.archive, "0" * 32, release.folder, release.files)
    with pytest.raises(DownloadError):
        download_stl10(tmp_path / "data", release=bad)
    assert _left_in(tmp_path / "data") == ["stl10_binary"] and _left_in(old) == ["train_X.bin"]
    assert (old / "train_X.bin").read_bytes() == b"old, incomplete"
    download_stl10(tmp_path / "data", release=release)  # a good download replaces the broken file
    assert load_stl10(old, "train")[0].shape[0] == 2


def test_cli_data_download(tmp_path, monkeypatch, capsys):
    archive, release = _stl10_archive(tmp_path)
    monkeypatch.setattr(download_module, "stl10_release", lambda: release)
    assert main(["data", "download", "stl10", str(tmp_path / "d"), "--keep-archive"]) == 0
    assert "--data " + str(tmp_path / "d" / "stl10_binary") in capsys.readouterr().out
    assert _left_in(tmp_path / "d") == ["stl10_binary", "stl10_binary.tar.gz"]
    broken = tmp_path / "mirror" / "broken.tar.gz"
    broken.write_bytes(archive.read_bytes()[:100])
    assert main(["data", "download", "stl10", str(tmp_path / "e"), "--url", broken.as_uri()]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deepsim data: error: ") and "truncated or corrupt" in err[0]
    assert _left_in(tmp_path / "e") == []


# ------------------------------------------------------------------------------------------ weights


@pytest.fixture
def weights_source(tmp_path, monkeypatch):
    """torchvision's AlexNet entry pointed at a local file holding conv1 only (enough for the conv1 tap),
    named with its own SHA-256 prefix as torchvision's files are; an empty torch cache."""
    from deepsim import comparators

    state = {"features.0.weight": torch.randn(64, 3, 11, 11), "features.0.bias": torch.randn(64)}
    source = tmp_path / "source.pth"
    torch.save(state, source)
    prefix = hashlib.sha256(source.read_bytes()).hexdigest()[:8]
    monkeypatch.setitem(
        comparators.TORCHVISION_FILES, "alexnet", (f"alexnet-test-{prefix}.pth", source.as_uri())
    )
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return source, state, tmp_path / "torch-home" / "hub" / "checkpoints"


def test_missing_weights_say_download_weights(weights_source):
    with pytest.raises(ComparatorWeightsError, match=r"add --download-weights to the command") as error:
        Comparator("alexnet:conv1")
    assert "download=True on a machine" not in str(error.value)


def test_download_weights_fetches_verifies_and_loads(weights_source):
    source, state, cache = weights_source
    with allow_weight_downloads():
        comparator = Comparator("alexnet:conv1")
    assert torch.equal(comparator.layers[0].weight, state["features.0.weight"])
    from deepsim.comparators import TORCHVISION_FILES

    assert [p.name for p in cache.iterdir()] == [TORCHVISION_FILES["alexnet"][0]]
    Comparator("alexnet:conv1")  # now in the cache: no download needed


@pytest.mark.parametrize("breakage", ["bad-checksum", "truncated"])
def test_broken_weights_download_is_a_clear_error_and_leaves_nothing(weights_source, breakage):
    from deepsim import comparators

    source, _, cache = weights_source
    name, url = comparators.TORCHVISION_FILES["alexnet"]
    if breakage == "bad-checksum":
        comparators.TORCHVISION_FILES["alexnet"] = ("alexnet-test-00000000.pth", url)
    else:
        source.write_bytes(source.read_bytes()[:500])
    with (
        allow_weight_downloads(),
        pytest.raises(ComparatorWeightsError, match=r"invalid hash value.*nothing was written"),
    ):
        Comparator("alexnet:conv1")
    assert list(cache.iterdir()) == []  # no weights file, no .partial file


def test_cli_download_weights_flag(weights_source, tmp_path, monkeypatch):
    _, _, cache = weights_source
    common = [
        "train",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--image-size",
        "32",
        "--device",
        "cpu",
        "--no-progress",
        "--no-tensorboard",
        "--comparator",
        "alexnet:conv1",
        "--lambda-adv",
        "0",
        "--out",
        str(tmp_path / "r"),
    ]
    assert main(common) == 2  # the one-line error naming the flag; nothing fetched
    assert not cache.exists() or list(cache.iterdir()) == []
    assert main(common + ["--download-weights"]) == 0
    assert len(list(cache.iterdir())) == 1
    # invert / sample-preimages / eval take the flag too, and run inside the same download permission
    from deepsim.applications import commands
    from deepsim.comparators import _DOWNLOADS_ALLOWED

    seen = []
    monkeypatch.setitem(commands.HANDLERS, "eval", lambda args: seen.append(_DOWNLOADS_ALLOWED.get()) or 0)
    assert main(["eval", "--checkpoint", "c.pt", "--data", "photos", "--download-weights"]) == 0
    assert main(["eval", "--checkpoint", "c.pt", "--data", "photos"]) == 0
    assert seen == [True, False]
    for command in (
        ["invert", "x.png", "--checkpoint", "c", "--out", "o"],
        ["sample-preimages", "x.png", "--checkpoint", "c", "--out", "o"],
    ):
        from deepsim.cli import build_parser

        assert build_parser().parse_args(command + ["--download-weights"]).download_weights is True


# ------------------------------------------------------------------------ stalls, timeouts and signals


@pytest.fixture
def stalling_server():
    """A server on 127.0.0.1 that accepts connections and then stalls: with ``head`` set, it first sends
    those bytes (a response header and part of the body). Yields (url, head list, accepted-connection
    count)."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    head, accepted, held = [b""], [0], []
    stop = threading.Event()

    def serve():
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            accepted[0] += 1
            held.append(conn)  # never answered further, never closed until the end
            if head[0]:
                conn.sendall(head[0])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/stl10_binary.tar.gz", head, accepted
    stop.set()
    thread.join(2)
    for conn in held:
        conn.close()
    listener.close()


@pytest.mark.timeout(60)  # the old fetch had no timeout: it hung here
@pytest.mark.parametrize("partial", [False, True], ids=["no-response", "stalls-mid-body"])
def test_a_stalled_server_times_out_retries_and_leaves_nothing(tmp_path, stalling_server, partial):
    import time

    url, head, accepted = stalling_server
    if partial:
        head[0] = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 5000
    _, release = _stl10_archive(tmp_path)
    root = tmp_path / "data"
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"failed after 3 attempts: no data for --read-timeout 0.3 s"):
        download_stl10(root, release=release, url=url, read_timeout=0.3, retries=2, retry_wait=0.01)
    assert time.monotonic() - start < 10 and accepted[0] == 3
    assert not root.exists()  # the folder this call created is gone too


@pytest.mark.timeout(60)
def test_a_server_that_never_accepts_hits_the_connect_timeout(tmp_path):
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the accept queue: later connection attempts wait (their SYNs are dropped)
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    _, release = _stl10_archive(tmp_path)
    try:
        with pytest.raises(
            DownloadError, match=r"failed after 1 attempt: no connection within --connect-timeout"
        ):
            download_stl10(
                tmp_path / "d",
                release=release,
                url=f"http://127.0.0.1:{port}/x.tar.gz",
                connect_timeout=0.5,
                retries=0,
            )
    finally:
        for s in fillers:
            s.close()
        listener.close()
    assert _left_in(tmp_path / "d") == []


@pytest.mark.timeout(200)
def test_sigterm_during_a_download_leaves_no_partial_archive(tmp_path, stalling_server):
    import os
    import signal
    import subprocess
    import sys
    import time

    url, head, _ = stalling_server
    head[0] = b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 200_000
    root = tmp_path / "data"
    root.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deepsim.cli",
            "data",
            "download",
            "stl10",
            str(root),
            "--url",
            url,
            "--read-timeout",
            "120",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while not any(p.stat().st_size > 0 for p in root.glob(".*/*")):  # the partial archive is on disk
            assert proc.poll() is None and time.monotonic() < deadline, "the download did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines() == ["deepsim data: stopped by SIGTERM; nothing half-written was left"]
    assert _left_in(root) == []


def test_a_killed_downloads_temporary_folder_is_removed_next_time(tmp_path):
    import subprocess

    archive, release = _stl10_archive(tmp_path)
    root = tmp_path / "data"
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    abandoned = root / f".stl10_binary.download-{dead.pid}-abc123"
    abandoned.mkdir(parents=True)
    (abandoned / "stl10_binary.tar.gz").write_bytes(b"partial")
    download_stl10(root, release=release)
    assert _left_in(root) == ["stl10_binary"]


def test_a_stop_signal_during_the_final_renames_waits_for_them(tmp_path, monkeypatch):
    import os
    import signal

    from deepsim.data.interrupt import Interrupted

    archive, release = _stl10_archive(tmp_path)
    real_replace, calls = os.replace, []

    def replace_and_signal(src, dst):  # SIGTERM arrives after the first file moved
        calls.append(dst)
        real_replace(src, dst)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    def unhandled(*_):  # what runs if the download does not handle SIGTERM itself (instead of killing pytest)
        raise RuntimeError("SIGTERM reached the handler outside the download")

    monkeypatch.setattr(download_module.os, "replace", replace_and_signal)
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        with pytest.raises(Interrupted, match="stopped by SIGTERM"):
            download_stl10(tmp_path / "data", release=release)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert _left_in(tmp_path / "data") == ["stl10_binary"] and len(calls) == 7  # every file moved, no staging
    assert load_stl10(tmp_path / "data" / "stl10_binary", "train")[0].shape[0] == 2
