"""LoaderSpec: one checked value handed to every loader builder, and the lifecycle every stream shares."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deepsim.data import DataError, build_loader
from deepsim.data.dali import build_dali_loader
from deepsim.data.nvjpeg import build_nvjpeg_loader
from deepsim.data.resident import build_resident_loader
from deepsim.data.spec import LoaderSpec
from deepsim.data.torch_loader import build_torch_loader
from tests.image_folders import write_coord_folder

BUILDERS = {
    "torch": build_torch_loader,
    "dali": build_dali_loader,
    "nvjpeg": build_nvjpeg_loader,
    "resident": build_resident_loader,
}
LOADERS = list(BUILDERS)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_coord_folder(tmp_path_factory.mktemp("spec"), 7, h=40, w=44)


def _kw():
    return dict(batch_size=3, crop_size=24, seed=4, start_sample=5, shard_id=1, num_shards=2)


@pytest.mark.parametrize("loader", LOADERS)
def test_a_builder_handed_a_spec_gives_build_loaders_batches_and_cursor(folder, loader):
    via_front = build_loader(folder, loader=loader, **_kw())
    via_spec = BUILDERS[loader](folder, LoaderSpec(**_kw()).validate())
    via_fields = BUILDERS[loader](folder, **_kw())
    for _ in range(3):
        a, b, c = next(via_front), next(via_spec), next(via_fields)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    assert via_front.state_dict() == via_spec.state_dict() == via_fields.state_dict()
    assert via_front.state_dict()["cursor"] == 5 + 3 * 2 * 3
    for s in (via_front, via_spec, via_fields):
        s.close()


@pytest.mark.parametrize("loader", LOADERS)
def test_next_after_close_stops_and_close_is_idempotent(folder, loader):
    with build_loader(folder, loader=loader, batch_size=2, crop_size=24) as stream:
        next(stream)
    with pytest.raises(StopIteration):
        next(stream)
    stream.close()
    assert list(stream) == []


def test_spec_checks_its_fields_in_build_loaders_order_and_words():
    with pytest.raises(DataError, match=r"^mode='x': expected one of"):
        LoaderSpec(batch_size=2, mode="x", start_step=-1).validate()
    with pytest.raises(DataError, match=r"^start_step=-1: expected >= 0$"):
        LoaderSpec(batch_size=2, start_step=-1).validate()
    with pytest.raises(DataError, match=r"^shard_id=2, num_shards=2"):
        build_torch_loader("photos", batch_size=2, shard_id=2, num_shards=2)
    assert LoaderSpec(batch_size=4, num_shards=3, start_step=2).cursor == 24
    assert LoaderSpec(batch_size=4, start_step=2, start_sample=7).cursor == 7
    spec = LoaderSpec(batch_size=2, mode="resize-center", resize_size=80)
    assert (spec.resize, spec.random) == (80, False)
    assert (LoaderSpec(batch_size=2).resize, LoaderSpec(batch_size=2).random) == (None, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.batch_size = 3


def test_a_spec_and_its_fields_together_are_refused(folder):
    with pytest.raises(TypeError, match="pass a LoaderSpec or its fields, not both"):
        build_torch_loader(folder, LoaderSpec(batch_size=2), crop_size=24)


def test_nvjpeg_called_directly_refuses_channel_padding(folder):
    with pytest.raises(DataError, match=r"pad_channels=4 with loader='nvjpeg'"):
        build_nvjpeg_loader(folder, batch_size=2, crop_size=24, pad_channels=4)


def test_every_spec_field_is_a_build_loader_argument_with_the_same_default():
    import inspect

    params = inspect.signature(build_loader).parameters
    for field in dataclasses.fields(LoaderSpec):
        assert field.name in params, field.name
        default = params[field.name].default
        expected = inspect.Parameter.empty if field.default is dataclasses.MISSING else field.default
        assert default == expected, field.name
