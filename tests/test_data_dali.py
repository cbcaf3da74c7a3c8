"""The DALI pipelines in CPU mode (device_id=None, CPU decoders): the same checks as the torch path."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from deepsim.data import DataError, build_loader
from deepsim.data.dali import DaliUnavailableError, dali_available
from tests.image_folders import assert_window, to_pixels, write_bad_inputs, write_coord_folder

pytestmark = pytest.mark.skipif(
    not dali_available(), reason="NVIDIA DALI is not importable (pip install nvidia-dali-cuda130)"
)


@pytest.fixture(scope="module")
def coord_folder(tmp_path_factory):
    return write_coord_folder(tmp_path_factory.mktemp("dali") / "coords", 8)


@pytest.mark.parametrize(
    "mode,crop,dtype,channels_last",
    [
        ("crop", 64, torch.float32, False),
        ("resize-crop", 72, torch.bfloat16, True),
        ("center", 48, torch.float32, True),
    ],
)
def test_batch_convention(coord_folder, mode, crop, dtype, channels_last):
    stream = build_loader(
        coord_folder,
        batch_size=4,
        crop_size=crop,
        mode=mode,
        loader="dali",
        dtype=dtype,
        channels_last=channels_last,
        resize_size=80,
    )
    x = next(stream)
    assert x.shape == (4, 3, crop, crop) and x.dtype == dtype and x.device.type == "cpu"
    assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert -1 <= x.min() and x.max() <= 1
    assert stream.num_samples == 8 and stream.steps_per_epoch == 2
    stream.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "channels_last,dtype,static", [(False, torch.float32, False), (True, torch.bfloat16, True)]
)
def test_gpu_pipeline_matches_cpu(coord_folder, channels_last, dtype, static):
    """device="cuda": mixed decoding, batches on the GPU, the same pixels as the CPU pipeline (center
    crops)."""
    kw = dict(
        batch_size=4, crop_size=48, mode="center", loader="dali", dtype=dtype, channels_last=channels_last
    )
    cpu = build_loader(coord_folder, **kw)
    gpu = build_loader(coord_folder, device="cuda", static=static, **kw)
    a, b = next(cpu), next(gpu)
    assert b.device.type == "cuda" and b.dtype == dtype and b.shape == a.shape == (4, 3, 48, 48)
    assert b.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(b.float().cpu(), a.float(), atol=2 / 127.5, rtol=0)
    c = next(gpu)
    assert (c is b) == static and c.device.type == "cuda"
    cpu.close()
    gpu.close()


def test_photos_and_static_buffer():
    stream = build_loader(
        "photos", batch_size=4, crop_size=64, loader="dali", static=True, dtype=torch.bfloat16
    )
    a = next(stream)
    first = a.clone()
    b = next(stream)
    assert a is b and b.dtype == torch.bfloat16 and b.shape == (4, 3, 64, 64)
    assert not torch.equal(first, b)  # new content, same tensor
    stream.close()


def test_crops_are_windows_and_mirror(coord_folder):
    stream = build_loader(coord_folder, batch_size=8, crop_size=48, loader="dali", seed=1)
    flips, ids = [], []
    for _ in range(3):
        for crop in to_pixels(next(stream)):
            flips.append(assert_window(crop, 80, 90)[2])
            ids.append(int(crop[2, 0, 0]))
    assert any(flips) and not all(flips)
    assert set(ids) == set(range(8))


def test_center_mode_is_central(coord_folder):
    stream = build_loader(coord_folder, batch_size=8, crop_size=48, mode="center", loader="dali")
    for crop in to_pixels(next(stream)):
        oy, ox, m = assert_window(crop, 80, 90)
        assert not m and abs(oy - 16) <= 1 and abs(ox - 21) <= 1


def test_same_seed_same_stream(coord_folder):
    def run(seed):
        s = build_loader(coord_folder, batch_size=4, crop_size=32, loader="dali", seed=seed)
        out = [next(s) for _ in range(3)]
        s.close()
        return out

    a, b, c = run(5), run(5), run(6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_shards_disjoint(tmp_path):
    folder = write_coord_folder(tmp_path / "sh", 10, 40, 40)
    seen = []
    for shard in range(2):
        s = build_loader(folder, batch_size=5, crop_size=16, loader="dali", shard_id=shard, num_shards=2)
        assert s.samples_per_shard == 5
        seen.append(set(to_pixels(next(s))[:, 2, 0, 0].tolist()))
        s.close()
    assert len(seen[0]) == 5 and len(seen[1]) == 5 and not seen[0] & seen[1]


def write_stl10(folder, n=9):
    folder.mkdir()
    imgs = np.random.default_rng(0).integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
    np.ascontiguousarray(imgs.transpose(0, 1, 3, 2)).tofile(folder / "unlabeled_X.bin")
    return imgs


@pytest.mark.parametrize("channels_last", [False, True])
def test_stl10_external_source_matches_torch_path(tmp_path, channels_last):
    folder = tmp_path / "stl"
    write_stl10(folder)
    kw = dict(batch_size=4, crop_size=64, seed=3, channels_last=channels_last)
    t = build_loader(folder, loader="torch", **kw)
    d = build_loader(folder, loader="dali", **kw)
    torch_batches = [next(t) for _ in range(5)]
    dali_batches = [next(d) for _ in range(5)]
    for a, b in zip(torch_batches, dali_batches):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    resumed = build_loader(folder, loader="dali", start_step=3, **kw)
    torch.testing.assert_close(next(resumed), dali_batches[3], rtol=0, atol=0)
    d.close()
    resumed.close()


# ----------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def bad_folder(tmp_path):
    return write_bad_inputs(tmp_path / "bad")


@pytest.mark.parametrize("name", ["corrupt.jpg", "small.png"])
def test_prescan_error_names_file(bad_folder, name):
    (bad_folder / ({"corrupt.jpg", "small.png"} - {name}).pop()).unlink()
    with pytest.raises(DataError, match=name.replace(".", r"\.")):
        build_loader(bad_folder, batch_size=4, loader="dali")


def test_full_check_catches_truncated(bad_folder):
    (bad_folder / "corrupt.jpg").unlink()
    (bad_folder / "small.png").unlink()
    with pytest.raises(DataError, match=r"truncated\.jpg"):
        _build_full(bad_folder)


def test_truncated_without_full_check_is_a_data_error(tmp_path, bad_folder):
    sub = tmp_path / "trunc"
    sub.mkdir()
    for name in ["good_0.jpg", "truncated.jpg"]:
        (sub / name).write_bytes((bad_folder / name).read_bytes())
    s = build_loader(sub, batch_size=2, loader="dali")  # header-only pre-scan passes
    with pytest.raises(DataError, match="full_check"):
        next(s)


def _build_full(folder, **kw):
    from deepsim.data.dali import build_dali_loader

    return build_dali_loader(folder, batch_size=4, full_check=True, **kw)


def test_skip_and_conversions(bad_folder):
    s = _build_full(bad_folder, on_bad="skip")
    assert s.skipped == 3 and s.ignored == 1 and s.num_samples == 6  # 3 good + gray, cmyk, alpha
    for _ in range(3):
        assert next(s).shape == (4, 3, 64, 64)
    s.close()


def test_pad_keeps_small_images(tmp_path):
    folder = tmp_path / "small"
    folder.mkdir()
    Image.fromarray(np.full((20, 30, 3), 200, dtype=np.uint8)).save(folder / "small.png")
    s = build_loader(folder, batch_size=2, crop_size=32, loader="dali", on_bad="pad")
    x = next(s)
    assert x.shape == (2, 3, 32, 32) and s.skipped == 0
    assert torch.isclose(x.max(), torch.tensor(200 / 127.5 - 1)) and (x < 0.5).any()  # content + padding
    s.close()


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        build_loader(tmp_path / "empty", batch_size=2, loader="dali")


def test_missing_dali_is_a_clear_error(monkeypatch, coord_folder):
    for mod in ["nvidia.dali", "nvidia.dali.plugin.pytorch"]:
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(
        DaliUnavailableError, match="pip install nvidia-dali-cuda130.*placeholder.*--loader torch"
    ):
        build_loader(coord_folder, batch_size=2, loader="dali")


# ---- EXIF orientation, read-ahead, the pipeline's output stream --------------------------------------------
def write_exif_rotated_folder(folder, n=4):
    """Non-square JPEGs (4:4:4, quality 100), all but the last tagged EXIF orientation 6 (rotate 90 CW)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for i in range(n):
        h, w = [(64, 96), (80, 56)][i % 2]
        small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        exif = Image.Exif()
        if i < n - 1:
            exif[0x0112] = 6
        img.save(folder / f"exif_{i}.jpg", quality=100, subsampling=0, exif=exif)
    return folder


@pytest.mark.parametrize("mode", ["crop", "center"])
def test_exif_rotated_jpegs_give_the_torch_loaders_crops(tmp_path, mode):
    """DALI's decoder rotates by EXIF by default; the header pre-scan (which sizes the crop anchors) and the
    torch loader do not. DALI ignores it too, so its batches are the torch loader's on the same crops."""
    folder = write_exif_rotated_folder(tmp_path / "exif")
    with Image.open(folder / "exif_0.jpg") as img:
        assert img.getexif()[0x0112] == 6 and img.size == (96, 64)
    kw = dict(batch_size=2, crop_size=48, mode=mode, seed=6)
    dali = [next(s) for s in [build_loader(folder, loader="dali", **kw)] for _ in range(4)]
    torch_path = [next(s) for s in [build_loader(folder, loader="torch", **kw)] for _ in range(4)]
    for a, b in zip(dali, torch_path):
        torch.testing.assert_close(a, b, rtol=0, atol=2 / 127.5)  # libjpeg-turbo on both sides: IDCT rounding


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_exif_rotated_jpegs_on_the_gpu_decoder(tmp_path):
    folder = write_exif_rotated_folder(tmp_path / "exif")
    kw = dict(batch_size=2, crop_size=48, seed=6)
    gpu = build_loader(folder, loader="dali", device="cuda", **kw)
    cpu = build_loader(folder, loader="torch", **kw)
    for _ in range(4):
        torch.testing.assert_close(next(gpu).cpu(), next(cpu), rtol=0, atol=4 / 127.5)  # nvJPEG rounding
    gpu.close()


class _Info:
    def __init__(self, iteration):
        self.iteration = iteration


def test_file_reads_run_ahead_of_the_pipeline_off_its_thread(coord_folder, monkeypatch):
    """The external_source callback (run by DALI on the training thread) returns batch t's files and has the
    next batches' files read by the pool meanwhile."""
    import threading

    from deepsim.data.dali import _FileFeed
    from deepsim.data.images import scan_image_files
    from deepsim.data.sampling import EpochSchedule
    from deepsim.data.sources import resolve_source
    from deepsim.data.spec import LoaderSpec

    src = resolve_source(coord_folder, None)
    scan = scan_image_files(src.paths, crop_size=32, resize=None, on_bad="error")
    feed = _FileFeed(
        scan.files,
        scan.sizes,
        2,
        schedule=EpochSchedule(len(scan.files), 0, src.name),
        spec=LoaderSpec(batch_size=3, crop_size=32, seed=0),
    )
    reads = []
    read = feed._read
    monkeypatch.setattr(feed, "_read", lambda i: (reads.append((i, threading.current_thread())), read(i))[1])
    encoded, *_ = feed(_Info(0))
    assert len(encoded) == 3
    feed.pool.shutdown(wait=True)
    _, later = feed.positions(1)
    assert set(later.tolist()) <= {i for i, _ in reads}  # batch 1's files were asked for with batch 0
    assert all(thread is not threading.main_thread() for _, thread in reads)


def test_the_pipeline_returns_its_outputs_on_the_current_cuda_stream(coord_folder, monkeypatch):
    """pipe.run(cuda_stream): the outputs are ordered on the training stream, not host-synchronous."""
    stream = build_loader(coord_folder, loader="dali", batch_size=2, crop_size=32)
    handed = []

    class Pipe:
        def run(self, *args):
            handed.append(args)
            return ("outputs",)

    class Current:
        cuda_stream = 0xC0FFEE

    real_pipe, stream._pipe = stream._pipe, Pipe()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Current())
    stream.device = torch.device("cuda", 0)
    assert stream._run_pipe() == (("outputs",), 0xC0FFEE) and handed == [(0xC0FFEE,)]
    stream.device, stream._pipe = torch.device("cpu"), real_pipe
    stream.close()
