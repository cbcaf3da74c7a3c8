"""Read a binary .caffemodel (a serialized ``caffe.NetParameter``) into layers, parameters and blobs.

Only the fields a weight import needs are decoded (field numbers from Caffe's src/caffe/proto/caffe.proto):

    NetParameter        name = 1, layer = 100 (LayerParameter, "V2"), layers = 2 (V1LayerParameter, "V1")
    LayerParameter      name = 1, type = 2 (a string), bottom = 3, top = 4, blobs = 7,
                        convolution_param = 106, inner_product_param = 117, relu_param = 123
    V1LayerParameter    bottom = 2, top = 3, name = 4, type = 5 (an enum, see V1_LAYER_TYPES), blobs = 6,
                        convolution_param = 10, inner_product_param = 17, relu_param = 30,
                        layer = 1 (a V0LayerParameter: the 2014 format, not supported)
    BlobProto           shape = 7 (BlobShape: dim = 1, packed int64), data = 5 (float), double_data = 8,
                        legacy 4-D shape: num = 1, channels = 2, height = 3, width = 4
    ConvolutionParameter num_output = 1, bias_term = 2, pad = 3, kernel_size = 4, group = 5, stride = 6,
                        pad_h/pad_w = 9/10, kernel_h/kernel_w = 11/12, stride_h/stride_w = 13/14, dilation =
                        18
    InnerProductParameter num_output = 1, bias_term = 2, axis = 5, transpose = 6
    ReLUParameter       negative_slope = 1

Repeated numbers are read packed or unpacked. Every error is a :class:`CaffeModelError` that names the file
and says what is wrong (truncated, not a caffemodel, a blob whose values do not fill its shape, ...).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .protobuf import (
    FIXED32,
    FIXED64,
    LENGTH_DELIMITED,
    VARINT,
    WireFormatError,
    decode_string,
    iter_fields,
    packed_doubles,
    repeated_floats,
    repeated_varints,
    to_signed,
)

__all__ = [
    "CaffeModelError",
    "CaffeBlob",
    "CaffeLayer",
    "CaffeModel",
    "ConvolutionParam",
    "InnerProductParam",
    "read_caffemodel",
    "V1_LAYER_TYPES",
]

# V1LayerParameter.LayerType enum -> the V2 type string Caffe's upgrade gives it (upgrade_proto.cpp).
V1_LAYER_TYPES = {
    0: "None",
    1: "Accuracy",
    2: "BNLL",
    3: "Concat",
    4: "Convolution",
    5: "Data",
    6: "Dropout",
    7: "EuclideanLoss",
    8: "Flatten",
    9: "HDF5Data",
    10: "HDF5Output",
    11: "Im2col",
    12: "ImageData",
    13: "InfogainLoss",
    14: "InnerProduct",
    15: "LRN",
    16: "MultinomialLogisticLoss",
    17: "Pooling",
    18: "ReLU",
    19: "Sigmoid",
    20: "Softmax",
    21: "SoftmaxWithLoss",
    22: "Split",
    23: "TanH",
    24: "WindowData",
    25: "Eltwise",
    26: "Power",
    27: "SigmoidCrossEntropyLoss",
    28: "HingeLoss",
    29: "MemoryData",
    30: "ArgMax",
    31: "Threshold",
    32: "DummyData",
    33: "Slice",
    34: "MVN",
    35: "AbsVal",
    36: "Silence",
    37: "ContrastiveLoss",
    38: "Exp",
    39: "Deconvolution",
}

# Field numbers of the two layer messages: (name, type, bottom, top, blobs, convolution, inner product, relu).
_V2_FIELDS = dict(name=1, type=2, bottom=3, top=4, blobs=7, convolution=106, inner_product=117, relu=123)
_V1_FIELDS = dict(name=4, type=5, bottom=2, top=3, blobs=6, convolution=10, inner_product=17, relu=30)
_V0_LAYER = 1  # V1LayerParameter.layer: a V0LayerParameter
MAX_BLOB_AXES = 32  # Caffe's kMaxBlobAxes
MAX_BLOB_COUNT = 2**31 - 1  # Caffe's Blob::Reshape: CHECK_LE(count, INT_MAX)


class CaffeModelError(ValueError):
    """A .caffemodel that cannot be read or does not hold what the import needs; the message names the
    file."""


@dataclass(frozen=True)
class ConvolutionParam:
    """A (De)Convolution layer's geometry as the file states it (Caffe's defaults where a field is absent)."""

    num_output: int | None
    kernel: tuple[int, int] | None  # (h, w); None when the file gives no kernel size
    stride: tuple[int, int] = (1, 1)
    pad: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    group: int = 1
    bias_term: bool = True


@dataclass(frozen=True)
class InnerProductParam:
    """An InnerProduct layer's parameters (``transpose``: the weight blob is stored (in, out))."""

    num_output: int | None
    bias_term: bool = True
    transpose: bool = False
    axis: int = 1


@dataclass(frozen=True)
class CaffeBlob:
    """One parameter blob: its shape as stored and its values (flat, float32 or float64).

    ``legacy`` is True for the deprecated 4-D encoding (num, channels, height, width), where e.g. an
    InnerProduct weight (N, K) is stored as (1, 1, N, K) and a bias (N,) as (1, 1, 1, N).
    """

    dims: tuple[int, ...]
    legacy: bool
    values: np.ndarray

    def shape_as(self, rank: int) -> tuple[int, ...] | None:
        """The shape as a ``rank``-D array, the way Caffe matches a blob to a layer: leading axes of size
        1 are dropped (or added) to reach ``rank``; None when the extra leading axes are not all 1."""
        dims = self.dims
        if len(dims) < rank:
            return (1,) * (rank - len(dims)) + dims
        if any(d != 1 for d in dims[: len(dims) - rank]):
            return None
        return dims[len(dims) - rank :]

    def describe(self) -> str:
        kind = "num/channels/height/width" if self.legacy else "shape"
        return f"{kind} ({', '.join(map(str, self.dims))})"


@dataclass
class CaffeLayer:
    """One layer of the file: its name, type (V2 spelling, also for V1 files), connections, parameters and
    blobs (decoded on first access)."""

    name: str
    type: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    convolution: ConvolutionParam | None
    inner_product: InnerProductParam | None
    relu_negative_slope: float | None  # None: not a ReLU; 0.0 for a plain ReLU
    index: int  # position in the file, from 0
    _data: bytes = field(repr=False, compare=False, default=b"")
    _blob_spans: tuple[tuple[int, int], ...] = field(repr=False, compare=False, default=())
    _source: str = field(repr=False, compare=False, default="")

    @functools.cached_property
    def blobs(self) -> list[CaffeBlob]:
        blobs = []
        for i, span in enumerate(self._blob_spans):
            try:
                blobs.append(_read_blob(self._data, span))
            except (WireFormatError, _BlobError) as error:
                raise CaffeModelError(f"{self._source}: layer {self.name!r}, blob {i}: {error}") from None
        return blobs


@dataclass
class CaffeModel:
    """A parsed .caffemodel: the net's name, its layer format ("V2" = ``layer``, "V1" = ``layers``) and
    layers."""

    path: Path
    name: str
    format: str
    layers: list[CaffeLayer]

    def layer(self, name: str) -> CaffeLayer:
        """The layer called ``name``; a missing one raises an error that lists the layers the file has."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        have = ", ".join(f"{layer.name} ({layer.type})" for layer in self.layers) or "none"
        raise CaffeModelError(f"{self.path} has no layer {name!r}; its layers: {have}")

    def has_layer(self, name: str) -> bool:
        return any(layer.name == name for layer in self.layers)

    def consumers(self, blob_name: str) -> list[CaffeLayer]:
        """The layers that take the blob ``blob_name`` as a bottom (in file order)."""
        return [layer for layer in self.layers if blob_name in layer.bottoms]


class _BlobError(ValueError):
    pass


def _expect_wire(field_name: str, wire: int, expected: tuple[int, ...], where: str) -> None:
    if wire not in expected:
        raise WireFormatError(f"{where}: field {field_name!r} has wire type {wire}, expected {expected}", -1)


def _add_dims(dims: list[int], data: bytes, wire: int, value) -> None:
    """Append one occurrence of ``BlobShape.dim``, refusing more than :data:`MAX_BLOB_AXES` before decoding
    them all (a packed field of N bytes holds at least N / 10 varints)."""
    if wire == LENGTH_DELIMITED and value[1] - value[0] > 10 * MAX_BLOB_AXES:
        raise _BlobError(f"shape has more than {MAX_BLOB_AXES} axes (Caffe's limit), a corrupt blob")
    dims.extend(to_signed(v) for v in repeated_varints(data, wire, value))
    if len(dims) > MAX_BLOB_AXES:
        raise _BlobError(
            f"shape has {len(dims)} axes, more than {MAX_BLOB_AXES} (Caffe's limit), a corrupt blob"
        )


def _count(shape: tuple[int, ...], kind: str) -> int:
    """The element count of ``shape``, each axis and the product bounded by :data:`MAX_BLOB_COUNT`."""
    count = 1
    for d in shape:
        if d < 0 or d > MAX_BLOB_COUNT:
            what = "negative" if d < 0 else f"over {MAX_BLOB_COUNT}"
            raise _BlobError(f"{kind} has an axis of {what} size ({d}), a corrupt blob")
        count *= d
        if count > MAX_BLOB_COUNT:
            raise _BlobError(
                f"{kind} ({', '.join(map(str, shape))}) has more than {MAX_BLOB_COUNT} values (Caffe's "
                "limit), "
                "a corrupt blob"
            )
    return count


def _read_blob(data: bytes, span: tuple[int, int]) -> CaffeBlob:
    dims: list[int] | None = None
    legacy = {1: 0, 2: 0, 3: 0, 4: 0}
    floats: list[np.ndarray] = []
    doubles: list[np.ndarray] = []
    for number, wire, value in iter_fields(data, *span):
        if number == 7:  # shape: BlobShape { repeated int64 dim = 1 }
            _expect_wire("shape", wire, (LENGTH_DELIMITED,), "BlobProto")
            dims = dims or []
            for dim_number, dim_wire, dim_value in iter_fields(data, *value):
                if dim_number == 1:
                    _add_dims(dims, data, dim_wire, dim_value)
        elif number == 5:  # data
            floats.append(repeated_floats(data, wire, value))
        elif number == 8:  # double_data
            if wire == LENGTH_DELIMITED:
                doubles.append(packed_doubles(data, value))
            else:
                _expect_wire("double_data", wire, (FIXED64,), "BlobProto")
                doubles.append(value)
        elif number in legacy:
            _expect_wire("num/channels/height/width", wire, (VARINT,), "BlobProto")
            legacy[number] = to_signed(value)
    is_legacy = dims is None
    shape = tuple(legacy[i] for i in (1, 2, 3, 4)) if is_legacy else tuple(dims)
    kind = "num/channels/height/width" if is_legacy else "shape"
    count = _count(shape, kind)
    if floats and doubles:
        raise _BlobError("holds both float data and double_data")
    pieces = floats or doubles
    if not pieces:
        values = np.zeros(0, np.float32)
    else:  # one piece (packed data): a read-only view into the file's bytes, no copy
        values = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
    if values.size != count:
        raise _BlobError(
            f"{kind} ({', '.join(map(str, shape))}) needs {count} values, the file holds {values.size} "
            "(a truncated or corrupt blob)"
        )
    finite = np.isfinite(values)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        first = int(np.argmin(finite))
        raise _BlobError(
            f"{bad} non-finite value(s) (NaN or infinity), the first at flat index {first} "
            f"({values[first]}); "
            "expected finite weights"
        )
    return CaffeBlob(shape, is_legacy, values)


def _pair(values: list[int], h: int | None, w: int | None, default: int | None, what: str):
    """Caffe's pad/kernel_size/stride: one value for both axes, one per axis, or the *_h/*_w fields."""
    if h is not None or w is not None:
        if h is None or w is None:
            raise _BlobError(f"{what}_h and {what}_w must be given together")
        return (h, w)
    if not values:
        return None if default is None else (default, default)
    if len(values) == 1:
        return (values[0], values[0])
    if len(values) == 2:
        return (values[0], values[1])
    raise _BlobError(f"{len(values)} values for {what} (a 2-D layer takes 1 or 2)")


def _read_convolution(data: bytes, span: tuple[int, int]) -> ConvolutionParam:
    repeated: dict[int, list[int]] = {3: [], 4: [], 6: [], 18: []}
    single: dict[int, int] = {}
    for number, wire, value in iter_fields(data, *span):
        if number in repeated:
            repeated[number].extend(repeated_varints(data, wire, value))
        elif number in (1, 2, 5, 9, 10, 11, 12, 13, 14):
            _expect_wire(f"field {number}", wire, (VARINT,), "ConvolutionParameter")
            single[number] = value
    return ConvolutionParam(
        num_output=single.get(1),
        kernel=_pair(repeated[4], single.get(11), single.get(12), None, "kernel"),
        stride=_pair(repeated[6], single.get(13), single.get(14), 1, "stride"),
        pad=_pair(repeated[3], single.get(9), single.get(10), 0, "pad"),
        dilation=_pair(repeated[18], None, None, 1, "dilation"),
        group=single.get(5, 1),
        bias_term=bool(single.get(2, 1)),
    )


def _read_inner_product(data: bytes, span: tuple[int, int]) -> InnerProductParam:
    values: dict[int, int] = {}
    for number, wire, value in iter_fields(data, *span):
        if number in (1, 2, 5, 6):
            _expect_wire(f"field {number}", wire, (VARINT,), "InnerProductParameter")
            values[number] = value
    return InnerProductParam(
        num_output=values.get(1),
        bias_term=bool(values.get(2, 1)),
        transpose=bool(values.get(6, 0)),
        axis=to_signed(values.get(5, 1)),
    )


def _read_relu(data: bytes, span: tuple[int, int]) -> float:
    slope = 0.0
    for number, wire, value in iter_fields(data, *span):
        if number == 1:
            _expect_wire("negative_slope", wire, (FIXED32,), "ReLUParameter")
            slope = float(value[-1])
    return slope


def _read_layer(data: bytes, span: tuple[int, int], v1: bool, index: int, source: str) -> CaffeLayer:
    fields = _V1_FIELDS if v1 else _V2_FIELDS
    name, type_name = None, None
    bottoms, tops, blob_spans = [], [], []
    conv_span = ip_span = relu_span = None
    for number, wire, value in iter_fields(data, *span):
        if number == fields["name"]:
            _expect_wire("name", wire, (LENGTH_DELIMITED,), "layer")
            name = decode_string(data, value)
        elif number == fields["type"]:
            if v1:
                _expect_wire("type", wire, (VARINT,), "V1 layer")
                type_name = V1_LAYER_TYPES.get(value, f"V1 type {value}")
            else:
                _expect_wire("type", wire, (LENGTH_DELIMITED,), "layer")
                type_name = decode_string(data, value)
        elif number in (fields["bottom"], fields["top"]):
            _expect_wire("bottom/top", wire, (LENGTH_DELIMITED,), "layer")
            (bottoms if number == fields["bottom"] else tops).append(decode_string(data, value))
        elif number == fields["blobs"]:
            _expect_wire("blobs", wire, (LENGTH_DELIMITED,), "layer")
            blob_spans.append(value)
        elif number == fields["convolution"]:
            _expect_wire("convolution_param", wire, (LENGTH_DELIMITED,), "layer")
            conv_span = value
        elif number == fields["inner_product"]:
            _expect_wire("inner_product_param", wire, (LENGTH_DELIMITED,), "layer")
            ip_span = value
        elif number == fields["relu"]:
            _expect_wire("relu_param", wire, (LENGTH_DELIMITED,), "layer")
            relu_span = value
        elif v1 and number == _V0_LAYER:
            raise CaffeModelError(
                f"{source} uses Caffe's V0 layer format (2014 and earlier), which this reader does not take; "
                "convert it with Caffe's tools/upgrade_net_proto_binary first"
            )
    label = name if name is not None else f"#{index}"
    try:
        convolution = _read_convolution(data, conv_span) if conv_span else None
        inner_product = _read_inner_product(data, ip_span) if ip_span else None
        relu = _read_relu(data, relu_span) if relu_span else (0.0 if type_name == "ReLU" else None)
    except (WireFormatError, _BlobError) as error:
        raise CaffeModelError(f"{source}: layer {label!r}: {error}") from None
    return CaffeLayer(
        name=name if name is not None else "",
        type=type_name or "",
        bottoms=tuple(bottoms),
        tops=tuple(tops),
        convolution=convolution,
        inner_product=inner_product,
        relu_negative_slope=relu,
        index=index,
        _data=data,
        _blob_spans=tuple(blob_spans),
        _source=source,
    )


def _sniff(data: bytes, path: Path) -> None:
    """Name the common wrong files before parsing (an archive, HDF5, a text prototxt...)."""
    if not data:
        raise CaffeModelError(f"{path} is empty, not a .caffemodel")
    if data[:4] == b"PK\x03\x04":
        raise CaffeModelError(
            f"{path} is a zip archive (a PyTorch .pt file, or the release zip: unzip it and pass "
            "<layer>/generator.caffemodel), not a .caffemodel"
        )
    if data[:2] == b"\x1f\x8b":
        raise CaffeModelError(f"{path} is gzip-compressed: decompress it first (gunzip)")
    if data[:8] == b"\x89HDF\r\n\x1a\n":
        raise CaffeModelError(
            f"{path} is an HDF5 file (.caffemodel.h5); only the binary protobuf .caffemodel is read"
        )
    head = data[:256]
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head) and any(b not in b" \t\r\n" for b in head):
        raise CaffeModelError(
            f"{path} is a text file (a .prototxt net definition?), not the binary .caffemodel with the "
            "weights"
        )


def read_caffemodel(path: str | Path) -> CaffeModel:
    """Parse a binary .caffemodel.

    Args:
        path: the file (``release_deepsim_v0/<layer>/generator.caffemodel``,
        ``bvlc_reference_caffenet.caffemodel``).

    Returns:
        a :class:`CaffeModel`; blobs are decoded when a layer's ``blobs`` is first read.

    Raises:
        FileNotFoundError: no such file.
        CaffeModelError: the file is truncated, not a caffemodel, holds no layers, or mixes both formats.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caffemodel {path} does not exist")
    data = path.read_bytes()
    _sniff(data, path)
    source = str(path)
    name, v2_spans, v1_spans = "", [], []
    try:
        for number, wire, value in iter_fields(data):
            if number in (1, 2, 100) and wire != LENGTH_DELIMITED:
                raise WireFormatError(f"NetParameter field {number} has wire type {wire}", -1)
            if number == 1:
                name = decode_string(data, value)
            elif number == 100:
                v2_spans.append(value)
            elif number == 2:
                v1_spans.append(value)
        v1 = bool(v1_spans)
        if v1 and v2_spans:
            raise CaffeModelError(
                f"{path} has both 'layer' (V2) and 'layers' (V1) entries; Caffe itself refuses such a net"
            )
        layers = [_read_layer(data, span, v1, i, source) for i, span in enumerate(v1_spans or v2_spans)]
    except WireFormatError as error:
        raise CaffeModelError(
            f"{path} cannot be read as a .caffemodel ({len(data)} bytes; truncated, or not a Caffe model): "
            f"{error}"
        ) from None
    if not layers:
        raise CaffeModelError(
            f"{path} holds no Caffe layers (no NetParameter 'layer' or 'layers' field): not a .caffemodel"
        )
    return CaffeModel(path=path, name=name, format="V1" if v1 else "V2", layers=layers)
