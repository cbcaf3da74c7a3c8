"""The device-resident loader on the CPU: the torch loader's batches (same samples, crops, mirrors,
bit-exact), its device-side hash equal to numpy's, mirroring statistics, padded channels, and the memory
check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import deepsim.data.resident as resident
from deepsim.data import DataError, build_loader
from deepsim.data.augment import splitmix64
from tests.image_folders import assert_window, to_pixels, write_coord_folder


@pytest.fixture(scope="module")
def coord_folder(tmp_path_factory):
    sizes = [(48, 56), (52, 48), (70, 40), (40, 90), (64, 64)]
    return write_coord_folder(tmp_path_factory.mktemp("resident") / "coords", 5, sizes=sizes)


@pytest.fixture(scope="module")
def stl10_coords(tmp_path_factory):
    """A 7-image STL-10 binary of coordinate images: pixel (y, x) = (x, y, i)."""
    folder = tmp_path_factory.mktemp("resident") / "stl10"
    folder.mkdir()
    yy, xx = np.mgrid[0:96, 0:96]
    images = np.stack([np.stack([xx, yy, np.full_like(xx, i)]) for i in range(7)]).astype(
        np.uint8
    )  # (7,3,96,96)
    np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tofile(
        folder / "unlabeled_X.bin"
    )  # column-major planes
    return folder


def test_splitmix64_on_int64_tensors_gives_numpy_uint64_bits():
    x = np.random.default_rng(0).integers(0, 2**63 - 1, 1000, dtype=np.int64)
    x[:3] = [0, 1, 2**63 - 1]
    want = splitmix64(x.astype(np.uint64)).view(np.int64)
    got = resident.splitmix64_device(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, want)


CASES = [
    ("coords", dict(mode="crop", batch_size=12, crop_size=32)),  # B > N: one batch spans several epochs
    ("coords", dict(mode="center", batch_size=3, crop_size=40)),
    ("coords", dict(mode="resize-crop", resize_size=48, batch_size=4, crop_size=32, channels_last=True)),
    ("stl10", dict(mode="crop", batch_size=5, crop_size=64, channels_last=True)),
    ("stl10", dict(mode="crop", batch_size=4, crop_size=64, mirror=False, dtype=torch.bfloat16)),
]


@pytest.mark.parametrize("which, kw", CASES, ids=[f"{w}-{i}" for i, (w, _) in enumerate(CASES)])
def test_batches_equal_the_torch_loaders(coord_folder, stl10_coords, which, kw):
    source = coord_folder if which == "coords" else stl10_coords
    common = dict(seed=11, start_sample=3, shard_id=1, num_shards=2, **kw)
    a = build_loader(source, loader="torch", cache=True, **common)
    b = build_loader(source, loader="resident", **common)
    for _ in range(4):
        x, y = next(a), next(b)
        assert y.shape == x.shape and y.dtype == x.dtype and y.stride() == x.stride()
        torch.testing.assert_close(y, x, rtol=0, atol=0)
    assert b.state_dict() == a.state_dict()
    a.close(), b.close()


def test_mirroring_is_a_fair_coin_and_offsets_cover_every_position(stl10_coords):
    flips, offsets = [], set()
    stream = build_loader(stl10_coords, loader="resident", batch_size=50, crop_size=64, seed=5)
    for _ in range(40):  # 2000 crops
        for crop in to_pixels(next(stream)):
            oy, ox, mirrored = assert_window(crop, 96, 96)
            flips.append(mirrored)
            offsets.add(ox)
    rate = np.mean(flips)
    assert abs(rate - 0.5) < 4 * 0.5 / np.sqrt(len(flips)), rate  # 4 sigma of a fair coin
    assert offsets == set(range(96 - 64 + 1))
    never = build_loader(stl10_coords, loader="resident", batch_size=50, crop_size=64, seed=5, mirror=False)
    assert not any(assert_window(c, 96, 96)[2] for c in to_pixels(next(never)))


@pytest.mark.parametrize("pad, channels_last", [(4, True), (8, True), (4, False)])
def test_padded_channels_are_zeros_beside_the_3_channel_batch(stl10_coords, pad, channels_last):
    kw = dict(batch_size=6, crop_size=48, seed=2, dtype=torch.bfloat16, channels_last=channels_last)
    plain = next(build_loader(stl10_coords, loader="resident", **kw))
    for loader in ("resident", "torch"):
        padded = next(build_loader(stl10_coords, loader=loader, pad_channels=pad, **kw))
        assert padded.shape == (6, pad, 48, 48) and padded.dtype == torch.bfloat16
        assert padded.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format
        )
        torch.testing.assert_close(padded[:, :3], plain, rtol=0, atol=0)
        assert (padded[:, 3:] == 0).all()


def test_bad_pad_channels_name_the_argument(stl10_coords):
    with pytest.raises(DataError, match=r"pad_channels=5"):
        build_loader(stl10_coords, loader="resident", batch_size=2, pad_channels=5)
    with pytest.raises(DataError, match=r"pad_channels=4 with loader='nvjpeg'"):
        build_loader(stl10_coords, loader="nvjpeg", batch_size=2, pad_channels=4)


def test_a_data_set_larger_than_the_free_memory_stops_in_one_line_naming_the_loaders_that_fit(
    stl10_coords, monkeypatch
):
    need = 7 * 3 * 96 * 96
    monkeypatch.setattr(resident, "device_free_bytes", lambda device: need + resident.RESERVE_MIN_BYTES - 1)
    with pytest.raises(DataError) as info:
        build_loader(stl10_coords, loader="resident", batch_size=2)
    message = str(info.value)
    assert "\n" not in message and "--loader resident needs 0.00 GiB" in message
    assert "use --loader torch" in message and "nvjpeg" not in message  # STL-10: nothing to decode
    assert not resident.resident_fits(stl10_coords, "cpu")
    monkeypatch.setattr(resident, "device_free_bytes", lambda device: need + resident.RESERVE_MIN_BYTES)
    assert resident.resident_fits(stl10_coords, "cpu")
    assert next(build_loader(stl10_coords, loader="resident", batch_size=2)).shape == (2, 3, 64, 64)
    monkeypatch.setattr(resident, "device_free_bytes", lambda device: 2**20)
    with pytest.raises(
        DataError, match=r"^photos .*: --loader resident needs .*use --loader torch.*--loader nvjpeg$"
    ):
        build_loader("photos", loader="resident", batch_size=2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_batch_never_waits_for_the_device(stl10_coords):
    stream = build_loader(
        stl10_coords,
        loader="resident",
        batch_size=8,
        device="cuda",
        seed=3,
        channels_last=True,
        dtype=torch.bfloat16,
        pad_channels=4,
    )
    reference = build_loader(
        stl10_coords,
        loader="torch",
        batch_size=8,
        seed=3,
        channels_last=True,
        dtype=torch.bfloat16,
        pad_channels=4,
    )
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = [next(stream) for _ in range(4)]  # 32 samples: crosses the 7-sample epochs
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for x in batches:
        torch.testing.assert_close(x.cpu(), next(reference), rtol=0, atol=0)
