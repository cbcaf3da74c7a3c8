"""The PyTorch data path: batch convention, crop placement, determinism, resume, shards, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import ImageFile

from deepsim.data import DataError, build_loader, bundled_photo_paths, iterate_eval, to_model_batch
from tests.image_folders import assert_window, to_pixels, write_bad_inputs, write_coord_folder


@pytest.fixture
def coord_folder(tmp_path):
    return write_coord_folder(tmp_path / "coords", 10)


# ----------------------------------------------------------------------------------------------- convention


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize(
    "mode,crop,dtype,channels_last",
    [
        ("crop", 64, torch.float32, False),
        ("center", 32, torch.bfloat16, True),
        ("resize-crop", 72, torch.float32, True),
    ],
)
def test_batch_convention(coord_folder, cache, mode, crop, dtype, channels_last):
    stream = build_loader(
        coord_folder,
        batch_size=4,
        crop_size=crop,
        mode=mode,
        dtype=dtype,
        channels_last=channels_last,
        cache=cache,
        resize_size=80,
    )
    x = next(stream)
    assert x.shape == (4, 3, crop, crop) and x.dtype == dtype and x.device.type == "cpu"
    if channels_last:
        assert x.is_contiguous(memory_format=torch.channels_last)
    else:
        assert x.is_contiguous()
    assert -1 <= x.min() and x.max() <= 1
    stream.close()


def test_normalisation_is_pixel_over_127_5_minus_1():
    u8 = (
        torch.tensor([0, 1, 127, 128, 255], dtype=torch.uint8)
        .view(1, 1, 1, 5)
        .expand(1, 3, 1, 5)
        .contiguous()
    )
    x = to_model_batch(u8)
    expected = torch.tensor([0, 1, 127, 128, 255], dtype=torch.float32) / 127.5 - 1
    torch.testing.assert_close(x[0, 0, 0], expected, rtol=0, atol=0)


def test_bundled_photos():
    paths = bundled_photo_paths()
    names = {p.name for p in paths}
    assert {"astronaut.png", "coffee.png", "camera.png"} <= names
    assert not names & {"color.png", "logo.png", "text.png", "phantom.png", "chessboard_RGB.png"}
    assert all(p.is_file() for p in paths)
    stream = build_loader("photos", batch_size=len(paths) + 3, crop_size=64)
    assert stream.num_samples == len(paths) and stream.skipped == 0
    x = next(stream)
    assert x.shape == (len(paths) + 3, 3, 64, 64)


# ----------------------------------------------------------------------------------------------- placement


@pytest.mark.parametrize("cache", [True, False])
def test_crop_is_a_window_and_mirrors(coord_folder, cache):
    stream = build_loader(coord_folder, batch_size=10, crop_size=48, cache=cache)
    flips, offsets = [], set()
    for _ in range(4):
        for crop in to_pixels(next(stream)):
            oy, ox, m = assert_window(crop, 80, 90)
            flips.append(m)
            offsets.add((oy, ox))
    assert any(flips) and not all(flips), "random mirroring should give both orientations"
    assert len(offsets) > 10, "offsets should vary"


def test_mixed_sizes_and_center_crop(tmp_path):
    folder = write_coord_folder(tmp_path / "mixed", 3, sizes=[(70, 100), (64, 64), (120, 80)])
    batches = list(iterate_eval(folder, batch_size=2, crop_size=64, mode="center"))
    assert [b.shape[0] for b in batches] == [2, 1]
    crops = to_pixels(torch.cat(batches))
    for crop, (h, w), ident in zip(crops, [(70, 100), (64, 64), (120, 80)], range(3)):
        oy, ox, m = assert_window(crop, h, w)
        assert (oy, ox, m) == ((h - 64) // 2, (w - 64) // 2, False)
        assert (crop[2] == ident).all()


# ----------------------------------------------------------------------------------------------- determinism


def take(stream, k):
    out = [next(stream) for _ in range(k)]
    stream.close()
    return out


def test_same_seed_same_batches_other_seed_differs(coord_folder):
    a = take(build_loader(coord_folder, batch_size=4, crop_size=32, seed=3), 3)
    b = take(build_loader(coord_folder, batch_size=4, crop_size=32, seed=3), 3)
    c = take(build_loader(coord_folder, batch_size=4, crop_size=32, seed=4), 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("cache", [True, False])
def test_start_step_equals_consuming(coord_folder, cache):
    # batch_size 4 over 10 samples: batches span epoch boundaries.
    full = take(build_loader(coord_folder, batch_size=4, crop_size=32, seed=1, cache=cache), 7)
    resumed = take(
        build_loader(coord_folder, batch_size=4, crop_size=32, seed=1, cache=cache, start_step=4), 3
    )
    for x, y in zip(full[4:], resumed):
        assert torch.equal(x, y)


def test_independent_of_num_workers_and_cache(coord_folder):
    cached = take(build_loader(coord_folder, batch_size=4, crop_size=32, seed=2, cache=True), 4)
    lazy0 = take(
        build_loader(coord_folder, batch_size=4, crop_size=32, seed=2, cache=False, num_workers=0), 4
    )
    lazy2 = take(
        build_loader(coord_folder, batch_size=4, crop_size=32, seed=2, cache=False, num_workers=2), 4
    )
    for a, b, c in zip(cached, lazy0, lazy2):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_every_sample_once_per_epoch(coord_folder):
    stream = build_loader(coord_folder, batch_size=5, crop_size=16)
    assert stream.steps_per_epoch == 2
    for _epoch in range(3):
        ids = np.concatenate([to_pixels(next(stream))[:, 2, 0, 0] for _ in range(2)])
        assert sorted(ids.tolist()) == list(range(10))


def test_two_shards_split_each_epoch_of_11_without_dropping_any(tmp_path):
    """11 samples, 2 ranks x 5: steps 1-2 cover global positions 0-19; the first 11 (epoch 0) hold every
    sample once, split between the ranks (nothing dropped to even out the shards)."""
    folder = write_coord_folder(tmp_path / "shards", 11, h=40, w=40)
    per_rank = []
    for shard in range(2):
        stream = build_loader(folder, batch_size=5, crop_size=16, shard_id=shard, num_shards=2, seed=9)
        assert stream.samples_per_shard == 5 and stream.num_samples == 11
        per_rank.append([to_pixels(next(stream))[:, 2, 0, 0].tolist() for _ in range(2)])
        assert stream.state_dict()["cursor"] == 20
        stream.close()
    job_order = per_rank[0][0] + per_rank[1][0] + per_rank[0][1] + per_rank[1][1]  # positions 0..19
    assert sorted(job_order[:11]) == list(range(11)) and len(set(job_order[11:])) == 9


def test_iterate_eval_shards_cover_everything(coord_folder):
    ids = []
    for shard in range(3):
        for b in iterate_eval(coord_folder, batch_size=3, crop_size=16, shard_id=shard, num_shards=3):
            ids += to_pixels(b)[:, 2, 0, 0].tolist()
    assert sorted(ids) == list(range(10))


# ----------------------------------------------------------------------------------------------- bad input


def only(folder, *names):
    """A folder holding just the named files of ``folder``."""
    sub = folder.parent / ("only_" + "_".join(n.replace(".", "_") for n in names))
    sub.mkdir()
    for n in names:
        (sub / n).write_bytes((folder / n).read_bytes())
    return sub


@pytest.fixture
def bad_folder(tmp_path):
    return write_bad_inputs(tmp_path / "bad", good=4, quality=90)


@pytest.mark.parametrize("cache", [True, False])
def test_conversions_give_rgb(bad_folder, cache):
    sub = only(bad_folder, "gray.png", "cmyk.jpg", "alpha.png", "good_0.jpg", "notes.txt")
    stream = build_loader(sub, batch_size=8, crop_size=64, cache=cache)
    assert stream.num_samples == 4 and stream.ignored == 1 and stream.skipped == 0
    x = next(stream)
    assert x.shape == (8, 3, 64, 64)
    stream.close()


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("name", ["corrupt.jpg", "truncated.jpg", "small.png"])
def test_bad_file_errors_naming_it(bad_folder, name, cache):
    sub = only(bad_folder, name, "good_0.jpg")
    with pytest.raises(DataError, match=name.replace(".", r"\.")):
        stream = build_loader(sub, batch_size=4, crop_size=64, cache=cache)
        next(stream)  # lazy datasets find the bad file when it is read


@pytest.mark.parametrize("cache", [True, False])
def test_skip_counts_and_substitutes(bad_folder, cache):
    stream = build_loader(bad_folder, batch_size=16, crop_size=64, on_bad="skip", cache=cache)
    for _ in range(3):
        x = next(stream)
        assert x.shape == (16, 3, 64, 64)
    assert stream.skipped == 3  # corrupt, truncated, small
    assert stream.ignored == 1  # notes.txt
    stream.close()


def test_skip_is_deterministic_for_lazy(bad_folder):
    a = take(build_loader(bad_folder, batch_size=6, crop_size=64, on_bad="skip", cache=False), 3)
    b = take(
        build_loader(bad_folder, batch_size=6, crop_size=64, on_bad="skip", cache=False, start_step=2), 1
    )
    assert torch.equal(a[2], b[0])


def test_pad_small_images(bad_folder):
    sub = only(bad_folder, "small.png", "corrupt.jpg", "good_1.jpg")
    stream = build_loader(sub, batch_size=4, crop_size=64, on_bad="pad")
    assert stream.num_samples == 2 and stream.skipped == 1
    assert next(stream).shape == (4, 3, 64, 64)


def test_truncated_not_masked_by_pil_global(bad_folder):
    sub = only(bad_folder, "truncated.jpg", "good_0.jpg")
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with pytest.raises(DataError, match="truncated"):
            build_loader(sub, batch_size=2, crop_size=64)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def test_empty_folder_and_non_images_only(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty.*no image files"):
        build_loader(empty, batch_size=2)
    (empty / "readme.txt").write_text("hello")
    with pytest.raises(DataError, match="1 non-image files ignored"):
        build_loader(empty, batch_size=2)
    with pytest.raises(DataError, match="no such file"):
        build_loader(tmp_path / "missing", batch_size=2)


def test_bad_arguments(coord_folder):
    with pytest.raises(DataError, match="mode"):
        build_loader(coord_folder, batch_size=2, mode="zoom")
    with pytest.raises(DataError, match="shard_id"):
        build_loader(coord_folder, batch_size=2, shard_id=2, num_shards=2)
    with pytest.raises(DataError, match="loader"):
        build_loader(coord_folder, batch_size=2, loader="tf")


def test_reading_images_in_threads_leaves_the_warning_filters_as_they_were(tmp_path, monkeypatch):
    """The photo preload and the loaders read images in thread pools. A per-file warnings.catch_warnings()
    there swaps the process-wide filter list from several threads at once: two reads that overlap and end
    in the order they began leave an "ignore every warning" filter behind for the whole process (which
    silenced, among others, DDP's gradient-stride warning). Here two reads overlap in exactly that order."""
    import threading
    import warnings

    from PIL import Image

    import deepsim.data.images as images

    path = tmp_path / "img.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(path)
    both_inside, first_done = threading.Barrier(2, timeout=10), threading.Event()
    real_open = images.Image.open

    def overlapping_open(*args, **kwargs):
        both_inside.wait()  # both reads have begun
        if threading.current_thread().name == "second":
            first_done.wait(10)  # ... and the first one ends first
        return real_open(*args, **kwargs)

    monkeypatch.setattr(images.Image, "open", overlapping_open)

    def first():
        images.read_image(path)
        first_done.set()

    with warnings.catch_warnings():
        before = list(warnings.filters)
        threads = [
            threading.Thread(target=first, name="first"),
            threading.Thread(target=images.read_image, args=(path,), name="second"),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert warnings.filters == before
