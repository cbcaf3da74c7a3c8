"""DALI ROI decode in CPU mode: only each crop's window is decoded, with the full decode's pixels (crop modes:
equal; resize modes: within one level), the nvImageCodec 0.9.0 guard, padded channels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import deepsim.data.dali as dali
from bench.loader import write_jpegs
from deepsim.data import DataError, build_loader

pytestmark = pytest.mark.skipif(not dali.dali_available(), reason="NVIDIA DALI is not importable")


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """6 noisy JPEGs of 300x225 (4:2:0 chroma: ROI windows cut through chroma blocks) and 2 of 225x300."""
    folder = tmp_path_factory.mktemp("roi")
    write_jpegs(str(folder), 6, (300, 225))
    (folder / "tall").mkdir()
    write_jpegs(str(folder / "tall"), 2, (225, 300))
    return folder


def _pair(folder, **kw):
    full = dali.build_dali_loader(folder, roi=False, **kw)
    roi = dali.build_dali_loader(folder, roi=True, **kw)
    assert roi.roi_decode and not full.roi_decode
    return full, roi


@pytest.mark.parametrize("mode", ["crop", "center"])
def test_roi_decode_of_the_crop_equals_the_full_decode_then_crop(jpegs, mode):
    full, roi = _pair(jpegs, batch_size=8, crop_size=64, mode=mode, seed=4, channels_last=mode == "crop")
    for _ in range(3):
        torch.testing.assert_close(next(roi), next(full), rtol=0, atol=0)
    full.close(), roi.close()


@pytest.mark.parametrize("mode", ["resize-crop", "resize-center"])
def test_roi_decode_in_the_resize_modes_is_within_one_level_of_resize_then_crop(jpegs, mode):
    """The window is resampled on the full resize's exact grid (scale r / shorter side, centred extent), so
    pixels agree up to float rounding: at most one level, in a tiny share of pixels."""
    full, roi = _pair(jpegs, batch_size=8, crop_size=160, resize_size=180, mode=mode, seed=4)
    for _ in range(2):
        diff = (next(roi) - next(full)).abs() * 127.5
        assert diff.max() <= 1.0 + 1e-4 and (diff > 0.5).float().mean() < 1e-3, (diff.max(), diff.mean())
    full.close(), roi.close()


def test_windows_are_the_crop_or_its_preimage_with_the_filters_reach():
    oy, ox = np.array([3, 0]), np.array([5, 10])
    h, w = np.array([70, 40]), np.array([80, 90])
    anchor, shape, _, _ = dali.roi_windows(oy, ox, h, w, h, w, 64)
    np.testing.assert_array_equal(anchor, [[3, 5], [0, 10]])  # an image shorter than the crop: all its rows
    np.testing.assert_array_equal(shape, [[64, 64], [40, 64]])
    # 256-shorter-side resize of 500x375 (W x H): scale 256/375, resized 256x341, a 227 crop at (10, 60)
    anchor, shape, lo, hi = dali.roi_windows(
        np.array([10]),
        np.array([60]),
        np.array([256]),
        np.array([341]),
        np.array([375]),
        np.array([500]),
        227,
    )
    s = 256 / 375
    want_lo = np.array([(375 - 256 / s) / 2 + 10 / s, (500 - 341 / s) / 2 + 60 / s])
    np.testing.assert_allclose(anchor[0] + lo[0], want_lo, atol=1e-3)
    np.testing.assert_allclose(hi[0] - lo[0], [227 / s, 227 / s], atol=1e-3)
    assert (lo[0] >= 2).all() and (anchor[0] + shape[0] <= [375, 500]).all() and (shape[0] - hi[0] >= 0).all()


def test_nvimagecodec_0_9_0_turns_gpu_roi_decode_off_with_a_warning(monkeypatch):
    assert (
        not dali.gpu_roi_decode_ok("0.9.0.20")
        and dali.gpu_roi_decode_ok("0.8.0")
        and dali.gpu_roi_decode_ok(None)
    )
    monkeypatch.setattr(dali, "nvimgcodec_version", lambda: "0.9.0.20")
    with pytest.warns(UserWarning, match=r"nvImageCodec 0.9.0.20: its GPU ROI decode fails"):
        assert dali.use_roi_decode(True, gpu=True) is False
    assert dali.use_roi_decode(True, gpu=False) is True  # the CPU decoder is not affected
    monkeypatch.setattr(dali, "nvimgcodec_version", lambda: "0.8.1")
    assert dali.use_roi_decode(True, gpu=True) is True


def test_pad_channels_4_appends_a_zero_channel_and_bad_settings_name_themselves(jpegs):
    kw = dict(batch_size=4, crop_size=48, seed=1, channels_last=True)
    plain = next(build_loader(jpegs, loader="dali", **kw))
    padded = next(build_loader(jpegs, loader="dali", pad_channels=4, **kw))
    assert padded.shape == (4, 4, 48, 48) and padded.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(padded[:, :3], plain, rtol=0, atol=0)
    assert (padded[:, 3] == 0).all()
    with pytest.raises(DataError, match=r"pad_channels=8: the DALI loader pads to 4"):
        build_loader(jpegs, loader="dali", pad_channels=8, **kw)
    with pytest.raises(DataError, match=r"hw_decoder_load=1.5"):
        dali.build_dali_loader(jpegs, hw_decoder_load=1.5, **kw)
