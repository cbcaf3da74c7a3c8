"""STL-10 binaries written by the test: Fortran-order layout, labels, folds, truncation, vectorised crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepsim.data import DataError, build_loader, iterate_eval, load_stl10, stl10_folds
from deepsim.data.augment import crop_batch, crop_one


def write_stl10(folder, n_unlabeled=7, n_train=6, n_test=3, seed=0):
    """Write tiny STL-10 files; returns the (N, 3, 96, 96) row-major arrays and labels written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in [("unlabeled", n_unlabeled), ("train", n_train), ("test", n_test)]:
        imgs = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        # The format stores each 96x96 plane column-major: write the transpose in C order.
        np.ascontiguousarray(imgs.transpose(0, 1, 3, 2)).tofile(folder / f"{split}_X.bin")
        labels = None
        if split != "unlabeled":
            labels = rng.integers(1, 11, n, dtype=np.uint8)
            labels.tofile(folder / f"{split}_y.bin")
        out[split] = (imgs, labels)
    folds = [rng.permutation(n_train)[:3] for _ in range(10)]
    (folder / "fold_indices.txt").write_text("\n".join(" ".join(map(str, f)) for f in folds) + "\n")
    out["folds"] = folds
    return out


@pytest.fixture
def stl(tmp_path):
    folder = tmp_path / "stl10_binary"
    return folder, write_stl10(folder)


def test_read_back_fortran_layout(stl):
    folder, written = stl
    for split in ("unlabeled", "train", "test"):
        images, labels = load_stl10(folder, split)
        assert images.shape == written[split][0].shape and images.dtype == np.uint8
        np.testing.assert_array_equal(images, written[split][0])
        if split == "unlabeled":
            assert labels is None
        else:
            np.testing.assert_array_equal(labels, written[split][1])


def test_layout_matches_known_pixel(tmp_path):
    # A single image whose first plane has a bright pixel at row 2, column 5.
    folder = tmp_path / "one"
    folder.mkdir()
    img = np.zeros((1, 3, 96, 96), dtype=np.uint8)
    img[0, 0, 2, 5] = 255
    raw = np.zeros(3 * 96 * 96, dtype=np.uint8)
    raw[5 * 96 + 2] = 255  # column-major: column 5, row 2
    raw.tofile(folder / "unlabeled_X.bin")
    images, _ = load_stl10(folder)
    np.testing.assert_array_equal(images, img)


def test_folds(stl):
    folder, written = stl
    folds = stl10_folds(folder)
    assert len(folds) == 10
    for a, b in zip(folds, written["folds"]):
        np.testing.assert_array_equal(a, b)
    (folder / "fold_indices.txt").write_text("0 1\n" * 9)
    with pytest.raises(DataError, match="fold_indices.txt.*expected 10"):
        stl10_folds(folder)
    (folder / "fold_indices.txt").write_text("0 99\n" * 10)
    with pytest.raises(DataError, match="outside"):
        stl10_folds(folder)


def test_truncated_bin_names_file_and_size(stl):
    folder, _ = stl
    path = folder / "unlabeled_X.bin"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(DataError, match=r"unlabeled_X\.bin.*multiple of 27648"):
        load_stl10(folder)
    with pytest.raises(DataError, match=r"unlabeled_X\.bin"):
        build_loader(folder, batch_size=2)


def test_label_count_mismatch(stl):
    folder, _ = stl
    (folder / "train_y.bin").write_bytes(b"\x01\x02")
    with pytest.raises(DataError, match=r"train_y\.bin.*expected 6"):
        load_stl10(folder, "train")
    with pytest.raises(DataError, match="split"):
        load_stl10(folder, "valid")


def test_vectorised_crop_matches_reference():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 3, 20, 24), dtype=np.uint8)
    idx = np.array([4, 0, 0, 2])
    oy, ox = np.array([0, 3, 8, 2]), np.array([10, 0, 4, 1])
    flip = np.array([False, True, False, True])
    out = crop_batch(images, idx, oy, ox, flip, 12)
    for b in range(4):
        np.testing.assert_array_equal(out[b], crop_one(images[idx[b]], oy[b], ox[b], flip[b], 12))


def test_loader_on_stl10(stl):
    folder, written = stl
    stream = build_loader(folder, batch_size=7, crop_size=64, seed=5)
    assert stream.num_samples == 7 and stream.steps_per_epoch == 1
    x = next(stream)
    assert x.shape == (7, 3, 64, 64) and x.dtype == torch.float32
    pix = torch.round((x + 1) * 127.5).to(torch.uint8).numpy()
    src = written["unlabeled"][0]
    # Each crop is a window of one of the source images (possibly mirrored); the epoch covers all 7.
    found = set()
    for crop in pix:
        hits = [
            i
            for i in range(7)
            for oy in range(33)
            for ox in range(33)
            for f in (False, True)
            if crop[0, 0, 0] == crop_one(src[i], oy, ox, f, 64)[0, 0, 0]
            and np.array_equal(crop, crop_one(src[i], oy, ox, f, 64))
        ]
        assert hits, "crop not found in any source image"
        found.add(hits[0])
    assert found == set(range(7))
    resumed = build_loader(folder, batch_size=7, crop_size=64, seed=5, start_step=3)
    for _ in range(2):
        next(stream)
    assert torch.equal(next(stream), next(resumed))


def test_eval_on_stl10_test_split(stl):
    folder, written = stl
    batches = list(iterate_eval(folder, batch_size=2, crop_size=64, split="test"))
    assert [b.shape[0] for b in batches] == [2, 1]
    pix = torch.round((torch.cat(batches) + 1) * 127.5).to(torch.uint8).numpy()
    np.testing.assert_array_equal(pix, written["test"][0][:, :, 16:80, 16:80])
