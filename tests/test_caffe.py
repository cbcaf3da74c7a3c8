"""deepsim.caffe: caffemodels written from scratch (tests/caffe_writer.py) are imported and run against an
independent float64 transcription of the Caffe nets written here (Caffe's InnerProduct, im2col
Convolution, col2im Deconvolution, ReLU with negative_slope, LRN, BGR output on Caffe's scale)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepsim.applications.generators import InversionGenerator
from deepsim.caffe import (
    CaffeModelError,
    import_caffemodel,
    load_caffenet,
    load_generator,
    read_caffemodel,
)
from deepsim.caffe.protobuf import WireFormatError, iter_fields, read_varint, to_signed
from tests import caffe_writer as cw

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

MEAN_BGR = np.array([104.0, 117.0, 123.0])
SLOPE = 0.3

# ------------------------------------------------------------------ the Caffe nets, transcribed (float64)


def t64(array) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array), dtype=torch.float64)


def caffe_relu(x, slope):
    return torch.where(x > 0, x, slope * x)


def caffe_inner_product(x, w, b):
    return x.flatten(1) @ t64(w).T + t64(b)


def caffe_convolution(x, w, b, stride, pad, group=1):
    """im2col + one GEMM per group, as Caffe's ConvolutionLayer computes it."""
    w = t64(w)
    batch, channels, h, width = x.shape
    out_c, _, k, _ = w.shape
    out_h, out_w = (h + 2 * pad - k) // stride + 1, (width + 2 * pad - k) // stride + 1
    cols = F.unfold(x, k, padding=pad, stride=stride)  # (B, C*k*k, L), channel-major like im2col
    cols = cols.view(batch, group, channels // group * k * k, -1)
    out = torch.einsum("gok,bgkl->bgol", w.view(group, out_c // group, -1), cols)
    return out.reshape(batch, out_c, out_h, out_w) + t64(b).view(1, -1, 1, 1)


def caffe_deconvolution(x, w, b, stride, pad):
    """Caffe's DeconvolutionLayer (= ConvolutionLayer's backward): one GEMM W^T x gives every input pixel's
    kernel-weighted columns, then col2im (F.fold) sums them onto the output at the stride, cutting ``pad``."""
    w = t64(w)  # (in, out, k, k)
    batch, channels, h, width = x.shape
    out_c, k = w.shape[1], w.shape[2]
    cols = torch.einsum(
        "cj,bcl->bjl", w.reshape(channels, out_c * k * k), x.reshape(batch, channels, h * width)
    )
    size = ((h - 1) * stride + k - 2 * pad, (width - 1) * stride + k - 2 * pad)
    return F.fold(cols, size, k, padding=pad, stride=stride) + t64(b).view(1, -1, 1, 1)


def caffe_generator(kind, weights, features):
    """The synthesizing generator.prototxt, layer by layer -> BGR image on Caffe's scale (B, 3, 256, 256)."""
    x = t64(features)
    if kind == "fc":
        for name in cw.FC_HEAD:
            x = caffe_relu(caffe_inner_product(x, *weights[name]), SLOPE)
        x = x.reshape(-1, 256, 4, 4)
    else:
        for name, pad in zip(cw.CONV_HEAD, (1, 1, 0)):
            x = caffe_relu(caffe_convolution(x, *weights[name], 1, pad), SLOPE)
    for name, _, stride, pad, _ in cw.UP_STACK:
        x = caffe_deconvolution(x, *weights[name], stride, pad)
        if name != "deconv0":
            x = caffe_relu(x, SLOPE)
    return x


def caffe_lrn(x, size=5, alpha=1e-4, beta=0.75, k=1.0):
    """Caffe's ACROSS_CHANNELS LRN: x / (k + alpha / size * sum of x^2 over the size channels around)^beta."""
    squared = F.pad(x.pow(2), (0, 0, 0, 0, size // 2, size // 2))
    window = sum(squared[:, i : i + x.shape[1]] for i in range(size))
    return x / (k + alpha / size * window).pow(beta)


def caffe_max_pool(x):
    return F.max_pool2d(x, 3, 2, ceil_mode=True)  # Caffe rounds the pooled size up


def caffenet_pool5(weights, bgr_image):
    """BVLC CaffeNet from the (B, 3, 227, 227) BGR mean-subtracted image to pool5 (B, 256, 6, 6)."""
    x = caffe_relu(caffe_convolution(bgr_image, *weights["conv1"], 4, 0), 0.0)
    x = caffe_lrn(caffe_max_pool(x))
    x = caffe_relu(caffe_convolution(x, *weights["conv2"], 1, 2, group=2), 0.0)
    x = caffe_lrn(caffe_max_pool(x))
    x = caffe_relu(caffe_convolution(x, *weights["conv3"], 1, 1), 0.0)
    x = caffe_relu(caffe_convolution(x, *weights["conv4"], 1, 1, group=2), 0.0)
    x = caffe_relu(caffe_convolution(x, *weights["conv5"], 1, 1, group=2), 0.0)
    return caffe_max_pool(x)


def caffe_to_ours(bgr):
    """BGR on Caffe's scale -> RGB in [-1, 1], written out independently of deepsim.caffe."""
    rgb = bgr.flip(1) + t64(MEAN_BGR[::-1].copy()).view(1, 3, 1, 1)
    return rgb / 127.5 - 1.0


def ours_to_caffe(rgb):
    return (rgb.double() + 1.0) * 127.5 - t64(MEAN_BGR[::-1].copy()).view(1, 3, 1, 1)


# ------------------------------------------------------------------------------------------- fixtures


def features_for(kind, batch, rng, in_features=4096):
    shape = (batch, in_features) if kind == "fc" else (batch, 256, 6, 6)
    return np.abs(rng.standard_normal(shape)).astype(np.float32)  # post-ReLU / post-max-pool: >= 0


@pytest.fixture(scope="module")
def fc_weights():
    return cw.random_generator_weights("fc", np.random.default_rng(6), fc_width=48)


@pytest.fixture(scope="module")
def fc6_file(tmp_path_factory, fc_weights):
    path = tmp_path_factory.mktemp("caffe") / "fc6.caffemodel"
    path.write_bytes(cw.generator_caffemodel("fc", fc_weights))
    return path


def write(tmp_path, data: bytes, name="model.caffemodel"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------- generators against Caffe

CASES = [  # (layer, V1 file, legacy blob shapes, packed floats)
    ("fc6", False, False, True),
    ("fc7", True, True, True),
    ("fc6", True, False, False),  # unpacked repeated floats (one field per value)
    ("pool5", False, True, True),
    ("conv5", True, False, True),
    ("fc8", False, False, True),  # the same layout with 1000 inputs
]


@pytest.mark.parametrize("layer, v1, legacy, packed", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_generator_gives_the_caffe_nets_images(tmp_path, layer, v1, legacy, packed):
    rng = np.random.default_rng(100 + CASES.index((layer, v1, legacy, packed)))  # deterministic per case
    kind = "pool5" if layer in ("pool5", "conv5") else "fc"
    in_features = 1000 if layer == "fc8" else 4096
    weights = cw.random_generator_weights(kind, rng, fc_width=40, in_features=in_features)
    path = write(tmp_path, cw.generator_caffemodel(kind, weights, v1=v1, legacy=legacy, packed=packed))
    assert read_caffemodel(path).format == ("V1" if v1 else "V2")
    features = features_for(kind, 2, rng, in_features)
    expected = caffe_to_ours(caffe_generator(kind, weights, features))  # (2, 3, 256, 256)
    assert expected.std() > 0.05  # a real image-scale signal, not a constant

    generator = load_generator(path, layer, image_size=256)
    assert isinstance(generator, InversionGenerator) and not generator.training
    with torch.no_grad():
        got = generator(torch.from_numpy(features))
    assert got.shape == (2, 3, 256, 256)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)


def test_generator_output_is_cropped_like_the_code(fc6_file, fc_weights):
    features = features_for("fc", 1, np.random.default_rng(1))
    expected = caffe_to_ours(caffe_generator("fc", fc_weights, features))[..., 14:241, 14:241]
    generator = load_generator(fc6_file, "fc6")  # image_size 227 (default)
    with torch.no_grad():
        got = generator(torch.from_numpy(features))
    assert got.shape == (1, 3, 227, 227)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)


def test_mean_bgr_changes_only_the_output_offset(fc6_file):
    features = torch.from_numpy(features_for("fc", 1, np.random.default_rng(2)))
    default = load_generator(fc6_file, "fc6", image_size=256)
    shifted = load_generator(fc6_file, "fc6", image_size=256, mean_bgr=(0.0, 0.0, 127.5))  # R shifted by +1
    with torch.no_grad():
        delta = shifted(features) - default(features)
    expected = torch.tensor([127.5 - 123.0, -117.0, -104.0]) / 127.5  # RGB order
    torch.testing.assert_close(delta.mean(dim=(0, 2, 3)), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="mean_bgr"):
        load_generator(fc6_file, "fc6", mean_bgr=(1.0, 2.0))
    with pytest.raises(ValueError, match="image_size 64: the authors' generators output 256x256"):
        load_generator(fc6_file, "fc6", image_size=64)


def test_stride1_deconvolution_is_a_flipped_transposed_convolution():
    rng = np.random.default_rng(3)
    x = t64(rng.standard_normal((2, 5, 7, 6)))
    w = rng.standard_normal((5, 4, 3, 3))  # Caffe Deconvolution (in, out, k, k)
    b = np.zeros(4)
    flipped = np.ascontiguousarray(w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])
    torch.testing.assert_close(caffe_deconvolution(x, w, b, 1, 1), F.conv2d(x, t64(flipped), padding=1))


def test_our_generator_has_the_authors_layer_list():
    """InversionGenerator against synthesizing's generator.prototxt (stride-1 deconvolutions = our 3x3
    convs)."""

    def layout(generator):
        rows = []
        for m in [*generator.head, *generator.decoder.layers]:
            if isinstance(m, nn.Linear):
                rows.append(("fc", m.in_features, m.out_features, getattr(m, "alpha", None)))
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                kind = "deconv" if isinstance(m, nn.ConvTranspose2d) else "conv"
                rows.append(
                    (
                        kind,
                        m.in_channels,
                        m.out_channels,
                        m.kernel_size[0],
                        m.stride[0],
                        m.padding[0],
                        getattr(m, "alpha", None),
                    )
                )
        return rows

    up = [
        ("deconv", 256, 256, 4, 2, 1, 0.3),
        ("conv", 256, 512, 3, 1, 1, 0.3),
        ("deconv", 512, 256, 4, 2, 1, 0.3),
        ("conv", 256, 256, 3, 1, 1, 0.3),
        ("deconv", 256, 128, 4, 2, 1, 0.3),
        ("conv", 128, 128, 3, 1, 1, 0.3),
        ("deconv", 128, 64, 4, 2, 1, 0.3),
        ("deconv", 64, 32, 4, 2, 1, 0.3),
        ("deconv", 32, 3, 4, 2, 1, None),
    ]
    fc = [("fc", 4096, 4096, 0.3)] * 3
    assert layout(InversionGenerator("fc6")) == fc + up
    conv5_head = [
        ("conv", 256, 512, 3, 1, 1, 0.3),
        ("conv", 512, 512, 3, 1, 1, 0.3),
        ("conv", 512, 512, 3, 1, 0, 0.3),
    ]
    up[0] = ("deconv", 512, 256, 4, 2, 1, 0.3)
    assert layout(InversionGenerator("conv5")) == conv5_head + up


# ---------------------------------------------------------------------------------- the wire format


def test_varints_and_signed_values():
    for value in (0, 1, 127, 128, 300, 2**31, 2**63 - 1):
        encoded = cw.varint(value)
        assert read_varint(encoded, 0, len(encoded)) == (value, len(encoded))
    encoded = cw.varint(-5)
    assert len(encoded) == 10 and to_signed(read_varint(encoded, 0, 10)[0]) == -5
    with pytest.raises(WireFormatError, match="past the end"):
        read_varint(b"\x80\x80", 0, 2)


def test_unpacked_float_runs_are_read_whole_and_in_order():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal(5000).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    # field 5 unpacked, another field in between, field 5 again (a second run), then one single value
    message = cw.f_floats(5, a, packed=False) + cw.f_varint(1, 7) + cw.f_floats(5, b, packed=False)
    message += cw.f_float(5, 2.5) + cw.f_bytes(9, b"xy")
    fields = list(iter_fields(message))
    assert [(f, w) for f, w, _ in fields] == [(5, 5), (1, 0), (5, 5), (9, 2)]
    np.testing.assert_array_equal(fields[0][2], a)
    np.testing.assert_array_equal(fields[2][2], np.append(b, np.float32(2.5)))
    assert fields[3][2] == (len(message) - 2, len(message))


def test_blob_shape_encodings_and_double_data(tmp_path):
    rng = np.random.default_rng(5)
    w = rng.standard_normal((4, 6)).astype(np.float32)
    blobs = [cw.blob(w), cw.blob(w, legacy=True), cw.blob(w, packed=False), cw.blob(w, double=True)]
    model = read_caffemodel(
        write(tmp_path, cw.net_message([cw.layer_message("ip", "InnerProduct", ["x"], ["ip"], blobs=blobs)]))
    )
    new, legacy, unpacked, double = model.layer("ip").blobs
    assert (new.dims, new.legacy) == ((4, 6), False) and (legacy.dims, legacy.legacy) == ((1, 1, 4, 6), True)
    assert (
        legacy.shape_as(2) == (4, 6) and new.shape_as(4) == (1, 1, 4, 6) and legacy.shape_as(3) == (1, 4, 6)
    )
    for blob in (new, legacy, unpacked, double):
        np.testing.assert_array_equal(blob.values.reshape(-1).astype(np.float32), w.reshape(-1))
    assert double.values.dtype == np.float64


# ---------------------------------------------------------------------------------------- bad files


def test_truncated_files_are_named(tmp_path, fc6_file):
    data = fc6_file.read_bytes()
    for cut in (len(data) // 2, len(data) - 3, 40):
        path = write(tmp_path, data[:cut], f"cut{cut}.caffemodel")
        with pytest.raises(CaffeModelError, match="truncated") as error:
            load_generator(path, "fc6")
        assert str(path) in str(error.value)
    # cut exactly between two layers: the file parses, and the first missing layer is named
    model = read_caffemodel(fc6_file)
    boundary = [layer.index for layer in model.layers if layer.name == "deconv2"][0]
    cut = _start_of_field(data, 1 + boundary)  # field 0 is the net's name
    path = write(tmp_path, data[:cut], "boundary.caffemodel")
    with pytest.raises(CaffeModelError, match=r"no layer 'deconv2'") as error:
        load_generator(path, "fc6")
    assert str(path) in str(error.value) and "conv3_1 (Deconvolution)" in str(error.value)


def _start_of_field(data: bytes, index: int) -> int:
    """Byte offset where the top-level field number ``index`` (0-based) begins."""
    pos = 0
    for _ in range(index):
        tag, pos = read_varint(data, pos, len(data))
        length, pos = read_varint(data, pos, len(data))
        pos += length
    return pos


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b'name: "CaffeNet"\nlayer {\n  name: "conv1"\n  type: "Convolution"\n}\n', "text file"),
        (b"PK\x03\x04" + bytes(60), "zip archive"),
        (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "cannot be read as a .caffemodel"),
        (b"\x89HDF\r\n\x1a\n" + bytes(100), "HDF5"),
        (b"\x1f\x8b\x08" + bytes(50), "gzip"),
        (cw.f_varint(3, 1) + cw.f_string(5, "no layers here"), "holds no Caffe layers"),
    ],
    ids=["empty", "prototxt", "zip", "png", "hdf5", "gzip", "no-layers"],
)
def test_wrong_files_are_named(tmp_path, content, message):
    path = write(tmp_path, content, "wrong.caffemodel")
    with pytest.raises(CaffeModelError, match=message) as error:
        load_generator(path, "fc6")
    assert str(path) in str(error.value)


def test_a_torch_file_is_not_a_caffemodel(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(3)}, path)
    with pytest.raises(CaffeModelError, match="zip archive"):
        load_caffenet(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_caffenet(tmp_path / "missing.caffemodel")


def test_missing_layer_is_named(tmp_path, fc_weights):
    path = write(tmp_path, cw.generator_caffemodel("fc", fc_weights, omit=("conv4_1",)))
    with pytest.raises(
        CaffeModelError, match=r"has no layer 'conv4_1'; its layers: defc7 \(InnerProduct\)"
    ) as e:
        load_generator(path, "fc6")
    assert str(path) in str(e.value)
    with pytest.raises(CaffeModelError, match="no layer 'Rconv6'"):  # an fc generator read as the pool5 one
        load_generator(write(tmp_path, cw.generator_caffemodel("fc", fc_weights), "fc.caffemodel"), "pool5")


def test_wrong_blob_shape_is_named(tmp_path, fc_weights):
    broken = dict(fc_weights)
    w, b = fc_weights["conv5_1"]
    broken["conv5_1"] = (w[:, :500], b[:500])  # 500 outputs instead of 512
    path = write(tmp_path, cw.generator_caffemodel("fc", broken))
    with pytest.raises(CaffeModelError) as error:
        load_generator(path, "fc6")
    text = str(error.value)
    assert (
        str(path) in text
        and "'conv5_1'" in text
        and "(256, 500, 3, 3)" in text
        and "(256, 512, 3, 3)" in text
    )
    # a bias blob of the wrong length
    broken = dict(fc_weights, deconv3=(fc_weights["deconv3"][0], np.zeros(5, np.float32)))
    with pytest.raises(CaffeModelError, match=r"'deconv3'.*bias blob has shape \(5\), expected \(128,\)"):
        load_generator(write(tmp_path, cw.generator_caffemodel("fc", broken), "bias.caffemodel"), "fc6")
    # a 4096-input generator read as the fc8 one (1000 inputs)
    with pytest.raises(CaffeModelError, match=r"'defc7'.*expected \(48, 1000\)"):
        load_generator(write(tmp_path, cw.generator_caffemodel("fc", fc_weights), "fc.caffemodel"), "fc8")


def test_blob_without_enough_values_is_named(tmp_path, fc_weights):
    w, b = fc_weights["defc6"]
    short = cw.f_bytes(7, cw.f_bytes(1, b"".join(cw.varint(d) for d in w.shape))) + cw.f_floats(
        5, w.ravel()[:-2]
    )
    path = write(
        tmp_path, cw.generator_caffemodel("fc", fc_weights, blob_override={"defc6": [short, cw.blob(b)]})
    )
    with pytest.raises(
        CaffeModelError,
        match=r"layer 'defc6', blob 0: shape \(48, 48\) needs 2304 values, the file "
        r"holds 2302",
    ):
        load_generator(path, "fc6")


def test_wrong_slope_or_geometry_is_named(tmp_path, fc_weights):
    path = write(tmp_path, cw.generator_caffemodel("fc", fc_weights, relu_slope=0.2))
    with pytest.raises(CaffeModelError, match="'defc7'.*negative_slope 0.2, ours is 0.3"):
        load_generator(path, "fc6")
    data = cw.generator_caffemodel("fc", fc_weights)
    # deconv3 with stride 1 instead of 2 (same blob shapes): the conv parameters give it away
    good = cw.conv_param(128, 4, stride=2, pad=1)
    assert data.count(good) == 1
    path = write(tmp_path, data.replace(good, cw.conv_param(128, 4, stride=1, pad=1)), "stride.caffemodel")
    with pytest.raises(CaffeModelError, match=r"'deconv3' \(Deconvolution\): stride \(1, 1\) in the file"):
        load_generator(path, "fc6")


# ------------------------------------------------------------------------------------------ CaffeNet


@pytest.fixture(scope="module")
def caffenet(tmp_path_factory):
    """A random-weight CaffeNet up to conv5 (V1 layers, legacy blob shapes, like BVLC's file)."""
    weights = cw.random_caffenet_weights(np.random.default_rng(7), up_to="conv5")
    folder = tmp_path_factory.mktemp("caffenet")
    path = folder / "caffenet.caffemodel"
    path.write_bytes(cw.caffenet_caffemodel(weights))
    return weights, path


def test_caffenet_state_dict_and_comparator_match_caffe(tmp_path, caffenet):
    from deepsim import Comparator

    weights, path = caffenet
    state = load_caffenet(path, up_to="conv5")
    assert list(state) == [f"conv{i}.{kind}" for i in range(1, 6) for kind in ("weight", "bias")]
    np.testing.assert_array_equal(state["conv2.weight"].numpy(), weights["conv2"][0])
    # the V2 format with BlobShape dims gives the same dict
    v2 = write(tmp_path, cw.caffenet_caffemodel(weights, v1=False, legacy=False), "v2.caffemodel")
    for name, value in load_caffenet(v2, up_to="conv5").items():
        torch.testing.assert_close(value, state[name], atol=0, rtol=0)
    # written by import-caffe, read by the comparator: pool5 equals Caffe's on Caffe's input scale
    out = import_caffemodel(path, "caffenet", tmp_path / "caffenet.pt", up_to="conv5").out
    comparator = Comparator("caffenet:pool5", weights=out)
    image = torch.rand(1, 3, 227, 227) * 2 - 1
    (pool5,) = comparator(image)
    expected = caffenet_pool5(weights, ours_to_caffe(image).flip(1))
    torch.testing.assert_close(pool5.double(), expected, atol=1e-3, rtol=1e-4)


def test_caffenet_missing_layers_are_named(caffenet, tmp_path):
    _, path = caffenet
    with pytest.raises(CaffeModelError, match="has no layer 'fc6'.*--up-to conv5"):
        load_caffenet(path)  # up_to fc8, but the file ends at conv5
    weights = cw.random_caffenet_weights(np.random.default_rng(8), up_to="conv5")
    weights["conv3"] = (weights["conv3"][0][:, :128], weights["conv3"][1])  # ungrouped conv3 needs 256 inputs
    bad = write(tmp_path, cw.caffenet_caffemodel(weights), "bad.caffemodel")
    with pytest.raises(CaffeModelError, match=r"'conv3'.*\(384, 128, 3, 3\), expected \(384, 256, 3, 3\)"):
        load_caffenet(bad, up_to="conv5")


# ------------------------------------------------------------------------------- the CLI, end to end


def write_photo(path, width=300, height=260):
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(x * 3) % 256, (y * 2 + 40) % 256, ((x + y) * 5 // 3) % 256], -1).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    return path


def test_import_caffe_then_invert_runs_the_caffe_pipeline(tmp_path, caffenet, capsys):
    """import-caffe CaffeNet and the pool5 generator, then `deepsim invert` on the imported checkpoint:
    its reconstruction is Caffe's (CaffeNet pool5 of the preprocessed image -> generator -> 227 crop)."""
    from PIL import Image

    from deepsim.applications import load_model
    from deepsim.applications.tools import load_image
    from deepsim.cli import main

    caffenet_weights, caffenet_path = caffenet
    photo = write_photo(tmp_path / "photo.jpg")
    image = load_image(photo, 227)  # what `deepsim invert` feeds: shorter side 256, centre 227 crop
    pool5 = caffenet_pool5(caffenet_weights, ours_to_caffe(image).flip(1))
    gen_weights = cw.random_generator_weights("pool5", np.random.default_rng(9))
    w, b = gen_weights["Rconv6"]
    gen_weights["Rconv6"] = ((w / pool5.std().item()).astype(np.float32), b)  # keep the image in range
    gen_path = write(tmp_path, cw.generator_caffemodel("pool5", gen_weights), "pool5.caffemodel")

    phi, checkpoint = tmp_path / "caffenet.pt", tmp_path / "pool5.pt"
    assert (
        main(
            ["import-caffe", str(caffenet_path), "--layer", "caffenet", "--up-to", "conv5", "--out", str(phi)]
        )
        == 0
    )
    assert (
        main(
            [
                "import-caffe",
                str(gen_path),
                "--layer",
                "pool5",
                "--out",
                str(checkpoint),
                "--invert-network-weights",
                str(phi),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "V1 format" in printed and "V2 format" in printed and "deepsim invert --checkpoint" in printed

    out = tmp_path / "inv"
    assert (
        main(["invert", "--checkpoint", str(checkpoint), str(photo), "--out", str(out), "--device", "cpu"])
        == 0
    )
    expected = caffe_to_ours(caffe_generator("pool5", gen_weights, pool5))[..., 14:241, 14:241]
    assert 0.05 < expected.std() and (expected.abs() < 1).double().mean() > 0.9  # an image, mostly in range
    model, config = load_model(checkpoint)
    assert (config.invert_network, config.invert_layer, config.image_size) == ("caffenet", "conv5", 227)
    torch.testing.assert_close(model.reconstruct(image).double(), expected, atol=1e-4, rtol=1e-4)
    png = np.asarray(Image.open(out / "photo_inversion.png"), dtype=np.float64) / 255
    assert png.shape == (227, 454, 3)
    right = expected.clamp(-1, 1).add(1).div(2)[0].permute(1, 2, 0).numpy()
    assert np.abs(png[:, 227:] - right).max() <= 1 / 255 + 1e-6  # the PNG is that image, to 8 bits

    assert (
        main(
            [
                "sample-preimages",
                "--checkpoint",
                str(checkpoint),
                str(photo),
                "--samples",
                "2",
                "--out",
                str(tmp_path / "pre"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert (tmp_path / "pre" / "photo_preimages.png").is_file()


def test_import_caffe_errors_are_one_line(tmp_path, caffenet, fc6_file, capsys):
    from deepsim.cli import main

    _, caffenet_path = caffenet
    text = write(tmp_path, b'name: "net"\nlayer { name: "defc7" }\n', "generator.prototxt")
    assert main(["import-caffe", str(text), "--layer", "fc6", "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "import-caffe: error:" in err and str(text) in err and "text file" in err
    assert not (tmp_path / "x.pt").exists()
    # Phi's weights must fit the inverted layer: conv1..conv5 cannot give fc6
    phi = tmp_path / "conv.pt"
    assert (
        main(
            ["import-caffe", str(caffenet_path), "--layer", "caffenet", "--up-to", "conv5", "--out", str(phi)]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "import-caffe",
                str(fc6_file),
                "--layer",
                "fc6",
                "--out",
                str(tmp_path / "fc6.pt"),
                "--invert-network-weights",
                str(phi),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert str(phi) in err and "fc6.weight" in err
    # without Phi the checkpoint holds the generator, and `deepsim invert` says what is missing
    assert main(["import-caffe", str(fc6_file), "--layer", "fc6", "--out", str(tmp_path / "fc6.pt")]) == 0
    assert "no --invert-network-weights" in capsys.readouterr().err
    payload = torch.load(tmp_path / "fc6.pt", weights_only=False)
    assert payload["config"]["fc_width"] == 48 and payload["caffe_import"]["format"] == "V2"
    photo = write_photo(tmp_path / "p.jpg")
    assert (
        main(
            [
                "invert",
                "--checkpoint",
                str(tmp_path / "fc6.pt"),
                str(photo),
                "--out",
                str(tmp_path / "o"),
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert "weights" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("DEEPSIM_CAFFE_FULL_SIZE"),
    reason="full-size CaffeNet + fc6 generator (~450 MB of caffemodels, about a minute): "
    "DEEPSIM_CAFFE_FULL_SIZE=1",
)
def test_full_size_caffenet_and_fc6_generator(tmp_path):
    """At the released models' sizes: all of CaffeNet (fc6's flatten order included) and a 4096-wide fc6
    generator fed with CaffeNet's fc6 (opt-in: too large for the default run on 2 shared cores)."""
    from deepsim import Comparator

    rng = np.random.default_rng(10)
    weights = cw.random_caffenet_weights(rng, up_to="fc8")
    path = write(tmp_path, cw.caffenet_caffemodel(weights), "caffenet.caffemodel")
    comparator = Comparator(
        "caffenet:fc6,fc8", weights=import_caffemodel(path, "caffenet", tmp_path / "c.pt").out
    )
    del weights["fc8"], weights["fc7"]  # keep memory down: fc8 checked below from the comparator's own fc7
    image = torch.rand(1, 3, 227, 227) * 2 - 1
    fc6, fc8 = comparator(image)
    pool5 = caffenet_pool5(weights, ours_to_caffe(image).flip(1))
    expected_fc6 = caffe_relu(caffe_inner_product(pool5, *weights["fc6"]), 0.0)
    torch.testing.assert_close(fc6.double(), expected_fc6, atol=1e-3, rtol=1e-4)
    assert fc8.shape == (1, 1000)

    gen_weights = cw.random_generator_weights("fc", rng, fc_width=4096)
    gen_path = write(
        tmp_path, cw.generator_caffemodel("fc", gen_weights, v1=True, legacy=True), "fc6.caffemodel"
    )
    features = (fc6 / fc6.std()).numpy()  # CaffeNet's fc6 after ReLU, rescaled for the random generator
    with torch.no_grad():
        got = load_generator(gen_path, "fc6", image_size=256)(torch.from_numpy(features))
    torch.testing.assert_close(
        got.double(), caffe_to_ours(caffe_generator("fc", gen_weights, features)), atol=1e-5, rtol=0
    )
