"""The GPU-decode loader (loader="nvjpeg") on the CPU: decode_jpeg(device="cpu") gives the torch loader's
pixels exactly; non-JPEG files fall back to the CPU reader (counted, warned once); bad files are named."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from deepsim.data import DataError, build_loader
from tests.conftest import requires_cuda
from tests.image_folders import write_bad_inputs


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """12 smooth RGB JPEGs (quality 90) of 3 sizes, one grayscale JPEG and one CMYK JPEG."""
    folder = tmp_path_factory.mktemp("nvjpeg") / "jpegs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        h, w = [(72, 80), (64, 96), (90, 70)][i % 3]
        small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC).save(
            folder / f"img_{i:02d}.jpg", quality=90
        )
    Image.fromarray(rng.integers(0, 255, (70, 70), dtype=np.uint8), "L").save(folder / "gray.jpg")
    Image.fromarray(rng.integers(0, 255, (70, 70, 4), dtype=np.uint8), "CMYK").save(folder / "cmyk.jpg")
    return folder


def _take(stream, k):
    out = [next(stream) for _ in range(k)]
    stream.close()
    return out


@pytest.mark.parametrize("mode", ["crop", "center"])
def test_cpu_decode_equals_torch_loader_bit_for_bit_on_14_jpegs(jpeg_folder, mode):
    kw = dict(batch_size=5, crop_size=48, mode=mode, seed=4, start_sample=7, shard_id=1, num_shards=2)
    with pytest.warns(UserWarning, match=r"cmyk\.jpg is not a baseline RGB/grayscale JPEG"):
        stream = build_loader(jpeg_folder, loader="nvjpeg", **kw)
        ours = [next(stream) for _ in range(6)]
    assert (
        stream.cpu_decoded == 1 and stream.skipped == 0
    )  # the CMYK file; gray.jpg decodes on the device path
    stream.close()
    theirs = _take(build_loader(jpeg_folder, loader="torch", **kw), 6)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_batch_convention_and_resize_crop_close_to_pil(jpeg_folder):
    kw = dict(batch_size=4, crop_size=56, mode="resize-crop", resize_size=64, seed=2)
    with pytest.warns(UserWarning):
        x = _take(
            build_loader(jpeg_folder, loader="nvjpeg", dtype=torch.bfloat16, channels_last=True, **kw), 3
        )
    ref = _take(build_loader(jpeg_folder, loader="torch", **kw), 3)
    for a, b in zip(x, ref):
        assert a.shape == (4, 3, 56, 56) and a.dtype == torch.bfloat16
        assert a.is_contiguous(memory_format=torch.channels_last) and -1 <= a.min() and a.max() <= 1
        # same windows of the same images; the device resize differs from PIL's by rounding only
        assert (a.float() - b).abs().mean() < 3 / 127.5


def test_truncated_jpeg_is_named_or_substituted(tmp_path):
    folder = write_bad_inputs(tmp_path / "bad", good=3)
    for name in ("gray.png", "cmyk.jpg", "alpha.png", "small.png", "corrupt.jpg"):
        (folder / name).unlink()  # keep good_0..2.jpg, truncated.jpg (passes the header scan) and notes.txt
    with pytest.raises(DataError, match=r"truncated\.jpg: cannot be decoded"):
        _take(build_loader(folder, loader="nvjpeg", batch_size=4, crop_size=64), 2)
    stream = build_loader(folder, loader="nvjpeg", batch_size=4, crop_size=64, on_bad="skip")
    for _ in range(3):
        assert next(stream).shape == (4, 3, 64, 64)
    assert stream.skipped == 1 and stream.ignored == 1 and stream.cpu_decoded == 0
    stream.close()


def _four_pngs(folder):
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((80, 80, 3), 40 * i, np.uint8)).save(folder / f"img_{i}.png")
    return folder


def _grow_after_the_scan(stream, path, side):
    """Replace ``path`` (already scanned by ``stream``'s builder) by a ``side`` x ``side`` PNG."""
    grown = path.with_suffix(".tmp")
    Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(grown, format="PNG")
    os.replace(grown, path)
    return stream


@pytest.mark.filterwarnings("ignore:loader='nvjpeg'")
def test_the_cpu_fallback_refuses_what_the_runs_pixel_limit_refuses(tmp_path):
    """A PNG (decoded by the CPU fallback) that grows past the run's max_image_pixels after the pre-scan is
    refused by the fallback too, naming the run's limit (not read_image's default)."""
    kw = dict(loader="nvjpeg", batch_size=4, crop_size=64, max_image_pixels=100 * 100)
    folder = _four_pngs(tmp_path / "error")
    stream = _grow_after_the_scan(build_loader(folder, **kw), folder / "img_2.png", 120)
    with pytest.raises(DataError, match=r"img_2\.png: cannot be decoded \(.*over the limit of 10000 "):
        _take(stream, 2)
    folder = _four_pngs(tmp_path / "skip")
    stream = _grow_after_the_scan(build_loader(folder, on_bad="skip", **kw), folder / "img_1.png", 120)
    assert all(x.shape == (4, 3, 64, 64) for x in _take(stream, 2))
    assert stream.skipped == 1 and stream.cpu_decoded == 3


def test_stl10_is_an_error_that_points_at_the_other_loaders(tmp_path):
    folder = tmp_path / "stl"
    folder.mkdir()
    np.zeros((2, 3, 96, 96), np.uint8).tofile(folder / "unlabeled_X.bin")
    with pytest.raises(DataError, match="STL-10 is raw pixels.*--loader torch or dali"):
        build_loader(folder, loader="nvjpeg", batch_size=2)


@requires_cuda
@pytest.mark.cuda
def test_gpu_decode_matches_cpu_decode(jpeg_folder):
    kw = dict(batch_size=6, crop_size=48, seed=3)
    with pytest.warns(UserWarning):
        gpu = _take(build_loader(jpeg_folder, loader="nvjpeg", device="cuda", **kw), 3)
        cpu = _take(build_loader(jpeg_folder, loader="nvjpeg", device="cpu", **kw), 3)
    for a, b in zip(gpu, cpu):
        assert a.device.type == "cuda"
        torch.testing.assert_close(
            a.cpu(), b, rtol=0, atol=4 / 127.5
        )  # nvJPEG vs libjpeg-turbo IDCT rounding


# ---- the device pad, the stream protocol, the fallback copy ------------------------------------------------
@pytest.mark.parametrize(
    "shape, crop", [((3, 5, 7), 20), ((3, 1, 4), 6), ((3, 2, 9), 12), ((3, 10, 3), 10), ((3, 9, 9), 9)]
)
def test_device_pad_equals_the_torch_paths_pad(shape, crop):
    from deepsim.data.augment import pad_to
    from deepsim.data.nvjpeg import _pad

    img = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    assert np.array_equal(_pad(torch.from_numpy(img), crop).numpy(), pad_to(img, crop))


def test_pad_mode_reads_no_pixel_back_to_the_host(tmp_path, monkeypatch):
    """on_bad="pad" with images smaller than the crop: the pad runs where the image is (no ``.cpu()`` in the
    loop), and the batches equal the torch loader's."""
    rng = np.random.default_rng(2)
    for i, (h, w) in enumerate([(20, 30), (40, 12), (50, 60)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            tmp_path / f"small_{i}.jpg", quality=95
        )
    kw = dict(batch_size=3, crop_size=48, on_bad="pad", seed=1)
    theirs = _take(build_loader(tmp_path, loader="torch", **kw), 2)
    stream = build_loader(tmp_path, loader="nvjpeg", **kw)

    def no_host_copy(self, *args, **kwargs):
        raise AssertionError("a tensor was copied to the host in the loader's loop")

    monkeypatch.setattr(torch.Tensor, "cpu", no_host_copy)
    ours = _take(stream, 2)
    monkeypatch.undo()
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


class _FakeCuda:
    """torch.cuda's stream API, writing down what is called, in order."""

    def __init__(self, log):
        self.log, self.current = log, _FakeStream("current", log)

    def current_stream(self, device=None):
        return self.current

    def Stream(self, device=None):  # noqa: N802 - the torch.cuda name
        return _FakeStream("side", self.log)

    def Event(self):  # noqa: N802
        return _FakeEvent(self.log)

    def stream(self, stream):
        import contextlib

        @contextlib.contextmanager
        def entered():
            self.log.append(f"enter {stream.name}")
            yield
            self.log.append(f"leave {stream.name}")

        return entered()


class _FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits on {other.name}")


class _FakeEvent:
    def __init__(self, log):
        self.log = log

    def record(self, stream):
        self.log.append(f"event on {stream.name}")

    def synchronize(self):
        self.log.append("host waits on the event")


def test_the_batch_is_made_on_a_side_stream_that_waits_both_ways(jpeg_folder, monkeypatch):
    from deepsim.data.nvjpeg import DecodeStreams

    log = []
    with pytest.warns(UserWarning):
        stream = build_loader(jpeg_folder, loader="nvjpeg", batch_size=4, crop_size=48, seed=2)
        stream._streams = DecodeStreams(torch.device("cpu"), cuda=_FakeCuda(log))
        decode = stream._decoder.decode
        monkeypatch.setattr(stream._decoder, "decode", lambda *a: (log.append("decode"), decode(*a))[1])
        monkeypatch.setattr(
            torch.Tensor, "record_stream", lambda self, s: log.append(f"batch recorded on {s.name}")
        )
        _take(stream, 2)
    one = [
        "side waits on current",
        "enter side",
        "decode",
        "event on side",
        "leave side",
        "current waits on side",
        "batch recorded on current",
    ]
    assert log == one + ["host waits on the event"] + one


@requires_cuda
@pytest.mark.cuda
def test_gpu_batches_survive_long_work_queued_on_the_training_stream(jpeg_folder):
    """Before every batch: a freed block whose last (queued) user is a slow kernel followed by a write, as a
    training step leaves behind. A decode that reused that block would be overwritten by the queued write;
    the batches must equal the CPU decode's over 40 batches (nvJPEG's IDCT rounding aside)."""
    kw = dict(batch_size=6, crop_size=48, seed=5)
    n = 40
    with pytest.warns(UserWarning):
        cpu = _take(build_loader(jpeg_folder, loader="nvjpeg", device="cpu", **kw), n)
        stream = build_loader(jpeg_folder, loader="nvjpeg", device="cuda", **kw)
    gpu = []
    for _ in range(n):
        block = torch.empty(200_000, device="cuda")  # < 1 MB: the small pool, split for the decoded images
        torch.cuda._sleep(20_000_000)  # ~10 ms of queued work on the training stream ...
        block.fill_(-7.0)  # ... then a write to the block, still queued when it is freed below
        del block
        gpu.append(next(stream).clone())  # the GPU a step behind: no synchronise in the loop
    stream.close()
    torch.cuda.synchronize()
    assert stream.cpu_decoded == 1  # the CMYK file: the pinned, non-blocking fallback copy took part
    for t, (a, b) in enumerate(zip(gpu, cpu)):
        assert (a.cpu() - b).abs().max() <= 4 / 127.5, f"batch {t} differs from the CPU decode"


@requires_cuda
@pytest.mark.cuda
def test_exif_rotated_jpegs_decode_unrotated_on_the_gpu(tmp_path):
    """nvJPEG (decode_jpeg without apply_exif_orientation) ignores EXIF orientation like the header pre-scan
    and the torch loader: a JPEG tagged orientation 6 gives the torch loader's crops."""
    rng = np.random.default_rng(4)
    for i, (h, w) in enumerate([(64, 96), (80, 56), (64, 96)]):
        small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC).save(
            tmp_path / f"exif_{i}.jpg", quality=100, subsampling=0, exif=exif
        )
    kw = dict(batch_size=3, crop_size=48, seed=6)
    gpu = _take(build_loader(tmp_path, loader="nvjpeg", device="cuda", **kw), 3)
    cpu = _take(build_loader(tmp_path, loader="torch", **kw), 3)
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=4 / 127.5)
