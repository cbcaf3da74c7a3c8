"""The shared epoch schedule: an epoch interrupted and resumed at another world size sees every sample exactly
once, with every loader; W ranks of B samples read what one process of W*B reads; mirroring can be turned
off."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepsim.data import build_loader
from deepsim.data.dali import dali_available
from tests.image_folders import assert_window, to_pixels, write_coord_folder

N = 30

LOADERS = [
    pytest.param(dict(loader="torch", cache=True), id="torch-in-memory"),
    pytest.param(dict(loader="torch", cache=False), id="torch-lazy-files"),
    pytest.param(
        dict(loader="dali"),
        id="dali",
        marks=pytest.mark.skipif(not dali_available(), reason="DALI not importable"),
    ),
    pytest.param(dict(loader="nvjpeg"), id="nvjpeg"),
    pytest.param(dict(loader="resident"), id="resident"),
]


@pytest.fixture(scope="module")
def coord_folder(tmp_path_factory):
    """30 PNG coordinate images of two sizes: channel 2 of every pixel is the image's index."""
    sizes = [(48, 56) if i % 2 else (52, 48) for i in range(N)]
    return write_coord_folder(tmp_path_factory.mktemp("sampling") / "coords", N, sizes=sizes)


@pytest.fixture(scope="module")
def stl10_folder(tmp_path_factory):
    """A 30-image STL-10 binary whose image i is the constant i (any crop says which sample it is)."""
    folder = tmp_path_factory.mktemp("sampling") / "stl10"
    folder.mkdir()
    images = np.broadcast_to(np.arange(N, dtype=np.uint8)[:, None, None, None], (N, 3, 96, 96))
    np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tofile(folder / "unlabeled_X.bin")
    return folder


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _ids(batch: torch.Tensor) -> list[int]:
    return to_pixels(batch)[:, 2, 0, 0].tolist()


def _read(source, kw, *, world, batch, steps, start):
    """``steps`` steps of a job of ``world`` ranks x ``batch`` samples from cursor ``start``: the samples in
    the job's order (rank 0's batch, rank 1's, ... per step), the batches in that order, and the cursor
    after."""
    streams = [
        build_loader(
            source,
            batch_size=batch,
            crop_size=32,
            seed=7,
            start_sample=start,
            shard_id=r,
            num_shards=world,
            **kw,
        )
        for r in range(world)
    ]
    ids, batches = [], []
    for _ in range(steps):
        for stream in streams:
            x = next(stream)
            ids += _ids(x)
            batches.append(x.clone())
    cursors = {s.state_dict()["cursor"] for s in streams}
    for stream in streams:
        stream.close()
    assert len(cursors) == 1, f"ranks disagree on the cursor: {cursors}"
    return ids, torch.cat(batches), cursors.pop()


def _accounting(source, kw):
    ids_a, x_a, cursor = _read(source, kw, world=2, batch=3, steps=2, start=0)  # 12 samples, then "preempted"
    assert cursor == 12
    ids_b, x_b, cursor = _read(source, kw, world=3, batch=2, steps=3, start=cursor)  # resumed on 3 ranks
    assert cursor == N
    assert sorted(ids_a + ids_b) == list(range(N)), "epoch 0: every sample exactly once"
    ids_c, x_c, cursor = _read(source, kw, world=1, batch=5, steps=6, start=cursor)  # epoch 1, one process
    assert cursor == 2 * N and sorted(ids_c) == list(range(N)), "epoch 1: every sample exactly once"
    # the job's stream does not depend on how it was split: one process of 6 samples reads the same
    ids_one, x_one, _ = _read(source, kw, world=1, batch=6, steps=10, start=0)
    assert ids_one == ids_a + ids_b + ids_c
    torch.testing.assert_close(torch.cat([x_a, x_b, x_c]), x_one, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kw", LOADERS)
def test_30_samples_read_2x3_then_resumed_3x2_then_1x5_see_each_sample_once_per_epoch(coord_folder, kw):
    with pytest.warns(UserWarning, match="nvjpeg") if kw["loader"] == "nvjpeg" else _nothing():
        _accounting(coord_folder, kw)


@pytest.mark.parametrize("loader", ["torch", "resident", pytest.param("dali", marks=LOADERS[2].marks)])
def test_stl10_30_samples_resumed_at_another_world_size_see_each_once(stl10_folder, loader):
    _accounting(stl10_folder, dict(loader=loader))


@pytest.mark.parametrize("kw", LOADERS)
def test_mirror_false_never_mirrors_in_120_crops(coord_folder, kw):
    with pytest.warns(UserWarning) if kw["loader"] == "nvjpeg" else _nothing():
        for mirror in (True, False):
            stream = build_loader(coord_folder, batch_size=30, crop_size=32, seed=1, mirror=mirror, **kw)
            flips = []
            for _ in range(4):
                for crop in to_pixels(next(stream)):
                    h, w = (48, 56) if int(crop[2, 0, 0]) % 2 else (52, 48)
                    flips.append(assert_window(crop, h, w)[2])
            stream.close()
            assert len(flips) == 120 and any(flips) == mirror, (mirror, sum(flips))
