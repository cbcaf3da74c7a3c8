"""Hostile caffemodels: a blob with a million packed dims, huge axes, NaN weights, and property-based fuzzing
(bytes flipped, files truncated, varint lengths inflated): only CaffeModelError comes out, within a time and
memory bound. The default run takes a small example budget; ``-m fuzz`` runs the large one."""

from __future__ import annotations

import re
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepsim.caffe import CaffeModelError, read_caffemodel
from deepsim.caffe.caffemodel import MAX_BLOB_AXES, MAX_BLOB_COUNT
from deepsim.caffe.convert import caffenet_from_caffemodel
from deepsim.caffe.protobuf import read_varint
from tests import caffe_writer as cw


def _blob_with_dims(dims: bytes, values=None) -> bytes:
    values = np.zeros(4, np.float32) if values is None else values
    return cw.f_bytes(7, cw.f_bytes(1, dims)) + cw.f_floats(5, values)


def _net_with_blob(blob: bytes) -> bytes:
    layer = cw.layer_message(
        "fc6", "InnerProduct", ["data"], ["fc6"], blobs=[blob], ip=cw.inner_product_param(2)
    )
    return cw.net_message([layer])


def _read_all(path):
    model = read_caffemodel(path)
    return [blob for layer in model.layers for blob in layer.blobs]


@pytest.mark.timeout(60)  # before: 138 s of CPU, then an error naming no file
def test_a_million_packed_dims_is_refused_at_once(tmp_path):
    path = tmp_path / "dims.caffemodel"
    path.write_bytes(_net_with_blob(_blob_with_dims(b"".join(cw.varint(7) for _ in range(1_000_000)))))
    start = time.process_time()
    with pytest.raises(CaffeModelError) as error:
        _read_all(path)
    assert time.process_time() - start < 1.0
    assert str(error.value) == (
        f"{path}: layer 'fc6', blob 0: shape has more than {MAX_BLOB_AXES} axes (Caffe's limit), a corrupt "
        "blob"
    )


@pytest.mark.parametrize(
    "dims, message",
    [
        ([2] * 33, "shape has 33 axes, more than 32"),
        ([2**40], f"shape has an axis of over {MAX_BLOB_COUNT} size (1099511627776)"),
        ([65536, 65536], f"shape (65536, 65536) has more than {MAX_BLOB_COUNT} values"),
        ([-1 & (2**64 - 1)], "shape has an axis of negative size (-1)"),
    ],
)
def test_blob_shapes_are_bounded_and_named(tmp_path, dims, message):
    path = tmp_path / "shape.caffemodel"
    path.write_bytes(_net_with_blob(_blob_with_dims(b"".join(cw.varint(d) for d in dims))))
    with pytest.raises(CaffeModelError, match="^" + re.escape(f"{path}: layer 'fc6', blob 0: {message}")):
        _read_all(path)


def test_legacy_dims_are_bounded_too(tmp_path):
    blob = b"".join(cw.f_varint(n, d) for n, d in zip((1, 2, 3, 4), (1, 2**31, 2**31, 2**31)))
    path = tmp_path / "legacy.caffemodel"
    path.write_bytes(_net_with_blob(blob + cw.f_floats(5, np.zeros(4, np.float32))))
    with pytest.raises(
        CaffeModelError, match=r"layer 'fc6', blob 0: num/channels/height/width has an axis of over"
    ):
        _read_all(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_name_the_blob(tmp_path, bad):
    values = np.ones(4, np.float32)
    values[2] = bad
    path = tmp_path / "nan.caffemodel"
    path.write_bytes(_net_with_blob(_blob_with_dims(cw.varint(2) + cw.varint(2), values)))
    with pytest.raises(
        CaffeModelError,
        match=(
            rf"^{path}: layer 'fc6', blob 0: 1 non-finite value\(s\) \(NaN or infinity\), the first at flat "
            r"index 2"
        ),
    ):
        _read_all(path)


# ------------------------------------------------------------------------------------------------ fuzzing


def _tiny_net(extra_axes: int = 0, bad_value: float | None = None) -> bytes:
    """Every encoding the reader takes, small: V2 layers with packed and unpacked floats, legacy and new
    shapes, double data, convolution / inner-product / ReLU parameters. ``extra_axes``: that many axes of size
    2 appended to conv1's weight shape; ``bad_value``: written over fc's first weight."""
    rng = np.random.default_rng(0)
    weight = cw.f_bytes(7, cw.f_bytes(1, b"".join(cw.varint(d) for d in (2, 3, 3, 3, *[2] * extra_axes))))
    weight += cw.f_floats(5, rng.standard_normal(54))
    conv = cw.layer_message(
        "conv1",
        "Convolution",
        ["data"],
        ["conv1"],
        conv=cw.conv_param(2, 3, stride=2, pad=1, group=1),
        blobs=[weight, cw.blob(rng.standard_normal(2), legacy=True)],
    )
    relu = cw.layer_message("relu1", "ReLU", ["conv1"], ["conv1"], relu_slope=0.3)
    fc_weight = rng.standard_normal((4, 3))
    if bad_value is not None:
        fc_weight[0, 0] = bad_value
    fc = cw.layer_message(
        "fc",
        "InnerProduct",
        ["conv1"],
        ["fc"],
        ip=cw.inner_product_param(3, transpose=True),
        blobs=[cw.blob(fc_weight, packed=False), cw.blob(rng.standard_normal(3), double=True)],
    )
    return cw.net_message([conv, relu, fc])


def _caffenet_conv1() -> bytes:
    weights = cw.random_caffenet_weights(np.random.default_rng(1), up_to="conv1")
    return cw.caffenet_caffemodel(weights)  # V1 layers, legacy 4-D shapes, as BVLC's file


def _length_fields(
    data: bytes, start: int = 0, end: int | None = None, depth: int = 0
) -> list[tuple[int, int]]:
    """(offset, size) of every length varint of a length-delimited field, nested messages included.
    Raises ValueError where ``data[start:end]`` is not a message (a string, packed numbers)."""
    end = len(data) if end is None else end
    found, pos = [], start
    while pos < end:
        tag, pos = read_varint(data, pos, end)
        wire = tag & 7
        if tag >> 3 == 0 or wire not in (0, 1, 2, 5):
            raise ValueError("not a message")
        if wire == 0:
            _, pos = read_varint(data, pos, end)
        elif wire == 2:
            at = pos
            length, pos = read_varint(data, pos, end)
            found.append((at, pos - at))
            if depth < 4:
                try:
                    found += _length_fields(data, pos, pos + length, depth + 1)
                except ValueError:
                    pass
            pos += length
        else:
            pos += 8 if wire == 1 else 4
    return found


CAFFENET_CONV1 = _caffenet_conv1()
CAFFENET_LENGTHS = _length_fields(CAFFENET_CONV1)


@st.composite
def mutations(draw):
    """A valid file (the tiny net, with a drawn number of extra axes and perhaps a NaN or infinite weight; or
    CaffeNet's conv1), then 1-4 mutations: a byte flipped (often in a length varint), the file truncated, a
    length varint inflated, a few hostile bytes inserted."""
    name = draw(st.sampled_from(["tiny", "caffenet-conv1"]))
    if name == "tiny":
        extra = draw(st.sampled_from([0, 0, 0, 1, 30, 16_000]))  # 2**16000 has over 4300 digits
        bad = draw(st.sampled_from([None, None, np.nan, np.inf, -np.inf]))
        seed = _tiny_net(extra, bad)
        lengths = _length_fields(seed)
    else:
        seed, lengths = CAFFENET_CONV1, CAFFENET_LENGTHS
    data = bytearray(seed)
    for _ in range(draw(st.integers(0 if seed != CAFFENET_CONV1 else 1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "inflate", "insert"]))
        if not data:
            break
        if op == "flip":
            starts = [at for at, _ in lengths if at < len(data)]
            pos = draw(
                st.sampled_from(starts) if starts and draw(st.booleans()) else st.integers(0, len(data) - 1)
            )
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[draw(st.integers(0, len(data) - 1)) :]
        elif op == "inflate":  # a length varint made larger (up to 2**63), re-encoded in place
            at, size = draw(st.sampled_from(lengths))
            if at + size > len(data):
                continue
            old, _ = read_varint(seed, at, at + size)  # the length as the valid file has it
            grow = draw(st.sampled_from([1, 7, 1000, 2**20, 2**31, 2**62]) | st.integers(1, 2**63 - 1 - old))
            data[at : at + size] = cw.varint(old + grow)
        else:  # bytes of a varint, a tag or a huge length inserted anywhere
            pos = draw(st.integers(0, len(data)))
            data[pos:pos] = draw(
                st.sampled_from(
                    [
                        b"\xff" * 10,
                        b"\x80" * 9 + b"\x01",
                        b"\x3a\xff\xff\xff\xff\x0f",
                        cw.varint(2**63),
                        b"\x00",
                        b"\x0b",
                    ]
                )
            )
    return name, bytes(data)


def _check(tmp_path, name: str, data: bytes) -> None:
    path = tmp_path / f"{name}.caffemodel"
    path.write_bytes(data)
    tracemalloc.reset_peak()
    start = time.process_time()
    try:
        blobs = _read_all(path)
        if name == "caffenet-conv1":
            caffenet_from_caffemodel(read_caffemodel(path), up_to="conv1")
        assert all(np.isfinite(b.values).all() for b in blobs)
    except CaffeModelError as error:
        assert str(path) in str(error) and "\n" not in str(error)
    seconds = time.process_time() - start
    peak = tracemalloc.get_traced_memory()[1]
    assert seconds < 2.0, f"{seconds:.1f} s of CPU on a {len(data)}-byte file"
    assert peak < 32 * 2**20 + 8 * len(data), f"{peak / 2**20:.0f} MB peak on a {len(data)}-byte file"


def _fuzz(tmp_path, examples: int) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=examples < 200,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(mutations())
    def run(case):
        _check(tmp_path, *case)

    tracemalloc.start()
    try:
        run()
    finally:
        tracemalloc.stop()


def test_mutated_caffemodels_give_only_caffemodelerror(tmp_path):
    _fuzz(tmp_path, 60)


@pytest.mark.fuzz
def test_mutated_caffemodels_give_only_caffemodelerror_large_budget(tmp_path):
    _fuzz(tmp_path, 3000)
