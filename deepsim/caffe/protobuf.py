"""A minimal reader of the protocol-buffer wire format: enough to walk a .caffemodel, no schema compiler.

A message is a sequence of fields, each a varint tag ``(field_number << 3) | wire_type`` and a value:

    wire 0  varint            ints, bools, enums (int64/int32 negatives are 10-byte two's complement)
    wire 1  fixed64           little-endian 8 bytes (double)
    wire 2  length-delimited  varint length, then that many bytes: strings, nested messages, packed repeats
    wire 5  fixed32           little-endian 4 bytes (float)

Wire types 3 and 4 (groups, deprecated) and 6, 7 do not occur in Caffe's messages: they are reported as
errors, which is how a file that is not a protocol buffer at all gets caught early.

:func:`iter_fields` yields ``(field_number, wire_type, value)``: an ``int`` for wire 0, a ``(start, end)``
span into the buffer for wire 2 (decode it with :func:`message_span`, :func:`packed_floats`, ... or
recurse with :func:`iter_fields`), and for wire 1 / 5 a NumPy array (float64 / float32) that holds a whole
run of consecutive unpacked values of the same field, read at once (a repeated float written without
``[packed = true]`` is millions of 5-byte fields; reading them one at a time in Python would take minutes).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = [
    "WireFormatError",
    "iter_fields",
    "read_varint",
    "to_signed",
    "packed_floats",
    "packed_doubles",
    "packed_varints",
    "repeated_floats",
    "repeated_varints",
    "decode_string",
]

VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5
_RUN_CHUNK = 4096  # records scanned per step when reading a run of unpacked fixed-width values


class WireFormatError(ValueError):
    """The bytes are not a well-formed protocol buffer (truncated, or not one at all). ``offset`` is the
    byte position in the buffer where reading failed."""

    def __init__(self, message: str, offset: int):
        super().__init__(message)
        self.offset = offset


def read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """The unsigned varint at ``data[pos:]`` (at most 10 bytes, before ``end``) -> (value, next position)."""
    value, shift, start = 0, 0, pos
    while True:
        if pos >= end:
            raise WireFormatError(
                f"a varint starting at byte {start} runs past the end of its message", start
            )
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise WireFormatError(f"the varint at byte {start} is longer than 10 bytes", start)


def to_signed(value: int, bits: int = 64) -> int:
    """A varint read as unsigned -> the int32/int64 it encodes (two's complement)."""
    value &= (1 << 64) - 1
    if bits == 32:
        value &= (1 << 32) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _fixed_run(data: bytes, tag_pos: int, value_pos: int, end: int, width: int) -> tuple[np.ndarray, int]:
    """The run of unpacked fixed-width values of one field starting at ``tag_pos`` (tag bytes repeated
    before every value): every record after the first starts with the same tag bytes, so a record is
    ``len(tag) + width`` bytes and the run ends at the first record whose first bytes are another tag."""
    tag = data[tag_pos:value_pos]
    record = len(tag) + width
    dtype = "<f4" if width == 4 else "<f8"
    if value_pos + width > end:
        raise WireFormatError(
            f"a {width * 8}-bit value at byte {value_pos} runs past the end of its message", value_pos
        )
    if data[value_pos + width : value_pos + width + len(tag)] != tag:  # a single value (the common case)
        return np.frombuffer(data, dtype, count=1, offset=value_pos).copy(), value_pos + width
    tag_array = np.frombuffer(tag, np.uint8)
    pieces, pos = [], tag_pos
    while True:
        rows = min((end - pos) // record, _RUN_CHUNK)
        if rows == 0:
            break
        view = np.frombuffer(data, np.uint8, count=rows * record, offset=pos).reshape(rows, record)
        same = (view[:, : len(tag)] == tag_array).all(axis=1)
        count = rows if same.all() else int(same.argmin())
        pieces.append(view[:count, len(tag) :])
        pos += count * record
        if count < rows:
            break
    values = np.ascontiguousarray(np.concatenate(pieces)).view(dtype).reshape(-1)
    return values, pos


def iter_fields(
    data: bytes, start: int = 0, end: int | None = None
) -> Iterator[tuple[int, int, int | tuple[int, int] | np.ndarray]]:
    """The fields of the message ``data[start:end]``, in file order: (field number, wire type, value).

    Raises :class:`WireFormatError` (with the byte offset) on a truncated field, a field number 0, or a
    wire type a protocol buffer cannot have.
    """
    end = len(data) if end is None else end
    pos = start
    while pos < end:
        tag_pos = pos
        tag, pos = read_varint(data, pos, end)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise WireFormatError(f"field number 0 at byte {tag_pos}", tag_pos)
        if wire == VARINT:
            value, pos = read_varint(data, pos, end)
            yield field, wire, value
        elif wire == LENGTH_DELIMITED:
            length, pos = read_varint(data, pos, end)
            if pos + length > end:
                raise WireFormatError(
                    f"field {field} at byte {tag_pos} says it holds {length} bytes, but only {end - pos} are "
                    "left",
                    tag_pos,
                )
            yield field, wire, (pos, pos + length)
            pos += length
        elif wire in (FIXED32, FIXED64):
            values, pos = _fixed_run(data, tag_pos, pos, end, 4 if wire == FIXED32 else 8)
            yield field, wire, values
        else:
            raise WireFormatError(
                f"wire type {wire} (field {field}) at byte {tag_pos} is not valid here", tag_pos
            )


def packed_floats(data: bytes, span: tuple[int, int]) -> np.ndarray:
    """A packed ``repeated float`` (little-endian float32s) -> float32 array (a read-only view)."""
    return _packed(data, span, "<f4", "floats")


def packed_doubles(data: bytes, span: tuple[int, int]) -> np.ndarray:
    """A packed ``repeated double`` -> float64 array (a read-only view)."""
    return _packed(data, span, "<f8", "doubles")


def _packed(data: bytes, span: tuple[int, int], dtype: str, what: str) -> np.ndarray:
    """The fixed-width values of ``dtype`` in ``span``; a span that is not a whole number of them raises."""
    start, end = span
    width = np.dtype(dtype).itemsize
    if (end - start) % width:
        raise WireFormatError(
            f"packed {what} at byte {start}: {end - start} bytes is not a multiple of {width}", start
        )
    return np.frombuffer(data, dtype, count=(end - start) // width, offset=start)


def packed_varints(data: bytes, span: tuple[int, int]) -> list[int]:
    """A packed ``repeated int64/uint64/int32/bool`` -> list of unsigned ints (apply :func:`to_signed`)."""
    values, pos = [], span[0]
    while pos < span[1]:
        value, pos = read_varint(data, pos, span[1])
        values.append(value)
    return values


def repeated_floats(data: bytes, wire: int, value) -> np.ndarray:
    """One occurrence of a ``repeated float`` field, packed (wire 2) or not (wire 5) -> float32 array."""
    if wire == LENGTH_DELIMITED:
        return packed_floats(data, value)
    if wire == FIXED32:
        return value
    raise WireFormatError(f"a repeated float field has wire type {wire}", -1)


def repeated_varints(data: bytes, wire: int, value) -> list[int]:
    """One occurrence of a repeated integer field, packed (wire 2) or not (wire 0) -> list of ints."""
    if wire == LENGTH_DELIMITED:
        return packed_varints(data, value)
    if wire == VARINT:
        return [value]
    raise WireFormatError(f"a repeated integer field has wire type {wire}", -1)


def decode_string(data: bytes, span: tuple[int, int]) -> str:
    """A ``string`` field (UTF-8) -> str; bytes that are not UTF-8 raise :class:`WireFormatError`."""
    try:
        return bytes(data[span[0] : span[1]]).decode("utf-8")
    except UnicodeDecodeError:
        raise WireFormatError(f"the string at byte {span[0]} is not UTF-8", span[0]) from None
