"""TEST-ONLY: write .caffemodel files from scratch (protobuf wire format by hand), and random weights for the
authors' generator layouts and BVLC's CaffeNet. Field numbers from Caffe's caffe.proto; written here
independently of deepsim.caffe's reader (which must not share code with its own test oracle).

Layer layouts follow Evolving-AI-Lab/synthesizing nets/upconv/{conv5,fc6,fc7}/generator.prototxt and
BVLC's bvlc_reference_caffenet deploy.prototxt.
"""

from __future__ import annotations

import struct

import numpy as np

# --------------------------------------------------------------------------------------------- wire format


def varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int32/int64 negatives: 10-byte two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def key(field: int, wire: int) -> bytes:
    return varint((field << 3) | wire)


def f_varint(field: int, value: int) -> bytes:
    return key(field, 0) + varint(int(value))


def f_bytes(field: int, payload: bytes) -> bytes:
    return key(field, 2) + varint(len(payload)) + payload


def f_string(field: int, text: str) -> bytes:
    return f_bytes(field, text.encode())


def f_float(field: int, value: float) -> bytes:
    return key(field, 5) + struct.pack("<f", value)


def f_floats(field: int, values: np.ndarray, packed: bool = True) -> bytes:
    values = np.ascontiguousarray(values, dtype="<f4").reshape(-1)
    if packed:
        return f_bytes(field, values.tobytes())
    # unpacked: every value is its own field (tag + 4 bytes)
    tag = np.frombuffer(key(field, 5), np.uint8)
    records = np.empty((values.size, tag.size + 4), np.uint8)
    records[:, : tag.size] = tag
    records[:, tag.size :] = values.view(np.uint8).reshape(-1, 4)
    return records.tobytes()


def f_doubles(field: int, values: np.ndarray) -> bytes:
    return f_bytes(field, np.ascontiguousarray(values, dtype="<f8").reshape(-1).tobytes())


# ----------------------------------------------------------------------------------------------- messages


def blob(array: np.ndarray, *, legacy: bool = False, packed: bool = True, double: bool = False) -> bytes:
    """BlobProto: shape { dim } (or the legacy num/channels/height/width, leading 1s), then the data."""
    array = np.asarray(array)
    if legacy:
        dims = (1,) * (4 - array.ndim) + tuple(array.shape)
        out = b"".join(f_varint(n, d) for n, d in zip((1, 2, 3, 4), dims))
    else:
        out = f_bytes(7, f_bytes(1, b"".join(varint(d) for d in array.shape)))  # packed dims
    return out + (f_doubles(8, array) if double else f_floats(5, array, packed))


def conv_param(num_output, kernel, stride=None, pad=None, group=None, bias_term=None) -> bytes:
    out = f_varint(1, num_output)
    if bias_term is not None:
        out += f_varint(2, int(bias_term))
    if pad is not None:
        out += f_varint(3, pad)
    out += f_varint(4, kernel)
    if group is not None:
        out += f_varint(5, group)
    if stride is not None:
        out += f_varint(6, stride)
    return out


def inner_product_param(num_output, transpose=False) -> bytes:
    return f_varint(1, num_output) + (f_varint(6, 1) if transpose else b"")


V1_TYPES = {
    "Convolution": 4,
    "Deconvolution": 39,
    "InnerProduct": 14,
    "ReLU": 18,
    "Pooling": 17,
    "LRN": 15,
    "Dropout": 6,
}
V2 = dict(name=1, type=2, bottom=3, top=4, blobs=7, conv=106, ip=117, relu=123)
V1 = dict(name=4, type=5, bottom=2, top=3, blobs=6, conv=10, ip=17, relu=30)


def layer_message(
    name, type_, bottoms, tops, *, blobs=(), conv=None, ip=None, relu_slope=None, v1=False
) -> bytes:
    f = V1 if v1 else V2
    out = f_string(f["name"], name)
    out += f_varint(f["type"], V1_TYPES[type_]) if v1 else f_string(f["type"], type_)
    out += b"".join(f_string(f["bottom"], b) for b in bottoms) + b"".join(f_string(f["top"], t) for t in tops)
    if conv is not None:
        out += f_bytes(f["conv"], conv)
    if ip is not None:
        out += f_bytes(f["ip"], ip)
    if relu_slope is not None:
        out += f_bytes(f["relu"], f_float(1, relu_slope))
    return out + b"".join(f_bytes(f["blobs"], b) for b in blobs)


def net_message(layers: list[bytes], *, v1: bool = False, name: str = "net") -> bytes:
    return f_string(1, name) + b"".join(f_bytes(2 if v1 else 100, layer) for layer in layers)


# ------------------------------------------------------------------------------------ the generator layout

FC_HEAD = ("defc7", "defc6", "defc5")
CONV_HEAD = ("Rconv6", "Rconv7", "Rconv8")
# name, kernel, stride, pad, outputs (all Deconvolution)
UP_STACK = (
    ("deconv5", 4, 2, 1, 256),
    ("conv5_1", 3, 1, 1, 512),
    ("deconv4", 4, 2, 1, 256),
    ("conv4_1", 3, 1, 1, 256),
    ("deconv3", 4, 2, 1, 128),
    ("conv3_1", 3, 1, 1, 128),
    ("deconv2", 4, 2, 1, 64),
    ("deconv1", 4, 2, 1, 32),
    ("deconv0", 4, 2, 1, 3),
)


def random_generator_weights(kind: str, rng: np.random.Generator, fc_width: int = 64, in_features=4096):
    """{caffe layer name: (weight, bias)} in Caffe's blob layouts, He-scaled so activations stay O(1); the
    output layer scaled so the image spans tens of Caffe units. ``kind``: "fc" or "pool5"."""
    weights = {}

    def normal(shape, fan_in, gain=1.0):
        return (rng.standard_normal(shape) * gain * np.sqrt(2.0 / fan_in)).astype(np.float32)

    if kind == "fc":
        sizes = [in_features, fc_width, fc_width, 4096]
        for name, n_in, n_out in zip(FC_HEAD, sizes[:-1], sizes[1:]):
            weights[name] = (
                normal((n_out, n_in), n_in),
                (0.1 * rng.standard_normal(n_out)).astype(np.float32),
            )
        channels = 256
    else:
        for name, n_in in zip(CONV_HEAD, (256, 512, 512)):
            weights[name] = (
                normal((512, n_in, 3, 3), 9 * n_in),
                (0.1 * rng.standard_normal(512)).astype(np.float32),
            )
        channels = 512
    for name, k, s, _, n_out in UP_STACK:
        taps = (k // s) ** 2
        gain = 20.0 if name == "deconv0" else 1.0
        weights[name] = (
            normal((channels, n_out, k, k), taps * channels, gain),
            (0.1 * rng.standard_normal(n_out)).astype(np.float32),
        )
        channels = n_out
    return weights


def generator_caffemodel(
    kind: str,
    weights: dict,
    *,
    v1: bool = False,
    legacy: bool = False,
    packed: bool = True,
    relu_slope: float = 0.3,
    omit: tuple[str, ...] = (),
    blob_override: dict | None = None,
) -> bytes:
    """A generator .caffemodel in the synthesizing layout (input blob "feat"). ``omit`` drops layers,
    ``blob_override`` replaces a layer's blob list (raw BlobProto bytes) to build broken files."""
    layers, bottom = [], "feat"

    def add(name, type_, blobs, **params):
        nonlocal bottom
        if name in omit:
            return
        w, b = blobs
        encoded = (blob_override or {}).get(name) or [
            blob(w, legacy=legacy, packed=packed),
            blob(b, legacy=legacy, packed=packed),
        ]
        layers.append(layer_message(name, type_, [bottom], [name], blobs=encoded, v1=v1, **params))
        bottom = name

    def relu(name):
        layers.append(layer_message(f"relu_{name}", "ReLU", [name], [name], relu_slope=relu_slope, v1=v1))

    if kind == "fc":
        for name in FC_HEAD:
            add(name, "InnerProduct", weights[name], ip=inner_product_param(weights[name][0].shape[0]))
            relu(name)
        if not v1:  # V1 has no Reshape type; the V1 file goes straight on
            shape = f_bytes(1, b"".join(varint(d) for d in (1, 256, 4, 4)))
            layers.append(
                layer_message("reshape", "Reshape", [bottom], ["reshape_defc5"], v1=False)
                + f_bytes(133, shape)
            )
            bottom = "reshape_defc5"
    else:
        for name, pad in zip(CONV_HEAD, (1, 1, 0)):
            add(name, "Convolution", weights[name], conv=conv_param(512, 3, pad=pad))
            relu(name)
    for name, k, s, p, n_out in UP_STACK:
        add(name, "Deconvolution", weights[name], conv=conv_param(n_out, k, stride=s, pad=p))
        if name != "deconv0":
            relu(name)
    return net_message(layers, v1=v1, name="generator")


# ------------------------------------------------------------------------------------------------ CaffeNet

CAFFENET = (  # name, weight shape, kernel, stride, pad, group
    ("conv1", (96, 3, 11, 11), 11, 4, 0, 1),
    ("conv2", (256, 48, 5, 5), 5, 1, 2, 2),
    ("conv3", (384, 256, 3, 3), 3, 1, 1, 1),
    ("conv4", (384, 192, 3, 3), 3, 1, 1, 2),
    ("conv5", (256, 192, 3, 3), 3, 1, 1, 2),
    ("fc6", (4096, 9216)),
    ("fc7", (4096, 4096)),
    ("fc8", (1000, 4096)),
)


def random_caffenet_weights(rng: np.random.Generator, up_to: str = "conv5") -> dict:
    weights = {}
    for spec in CAFFENET:
        name, shape = spec[0], spec[1]
        fan_in = int(np.prod(shape[1:]))
        weights[name] = (
            (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32),
            (0.1 * rng.standard_normal(shape[0])).astype(np.float32),
        )
        if name == up_to:
            break
    return weights


def caffenet_caffemodel(weights: dict, *, v1: bool = True, legacy: bool = True) -> bytes:
    """BVLC CaffeNet's layer list (V1 with legacy blob shapes, as bvlc_reference_caffenet was written)."""
    layers, bottom = [], "data"
    for spec in CAFFENET:
        name = spec[0]
        if name not in weights:
            break
        w, b = weights[name]
        blobs = [blob(w, legacy=legacy), blob(b, legacy=legacy)]
        if name.startswith("conv"):
            _, _, k, s, p, g = spec
            conv = conv_param(w.shape[0], k, stride=s, pad=p, group=g)
            layers.append(layer_message(name, "Convolution", [bottom], [name], blobs=blobs, conv=conv, v1=v1))
        else:
            ip = inner_product_param(w.shape[0])
            layers.append(layer_message(name, "InnerProduct", [bottom], [name], blobs=blobs, ip=ip, v1=v1))
        if name != "fc8":
            layers.append(layer_message(f"relu{name[-1]}", "ReLU", [name], [name], v1=v1))
        bottom = name
        if name in ("conv1", "conv2", "conv5"):
            pool = f"pool{name[-1]}"
            layers.append(layer_message(pool, "Pooling", [name], [pool], v1=v1))
            bottom = pool
            if name != "conv5":
                layers.append(layer_message(f"norm{name[-1]}", "LRN", [pool], [f"norm{name[-1]}"], v1=v1))
                bottom = f"norm{name[-1]}"
    return net_message(layers, v1=v1, name="CaffeNet")
