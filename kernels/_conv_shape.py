"""Conv output sizes and argument normalisation, in one place (configs, ops, dispatcher, roofline).

conv:     out = (size + 2 * padding - k) // stride + 1
up-conv:  out = (size - 1) * stride - 2 * padding + k + output_padding
"""

from __future__ import annotations

__all__ = ["conv_out_size", "normalize_padding", "as_int"]


def conv_out_size(
    size: int, k: int, stride: int, padding: int, transposed: bool, output_padding: int = 0
) -> int:
    """One output side of a conv (or, ``transposed``, an up-conv) over one input side of ``size``."""
    if transposed:
        return (size - 1) * stride - 2 * padding + k + output_padding
    return (size + 2 * padding - k) // stride + 1


def as_int(value, name: str) -> int:
    """Accept an int or a square pair (v, v); anything else is an error naming the argument."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name}={value!r}: only square values are supported (an int or (v, v))")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            if int(value) != value:
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(f"{name}={value!r}: expected an int or a square pair of ints") from None
    return int(value)


def normalize_padding(padding, kernel: tuple[int, int], stride: int, op: str, transposed: bool) -> int:
    """``padding`` as one int: an int, a square pair, or (conv only) "valid" (0) / "same" (stride 1 and an
    odd kernel, where symmetric padding (k - 1) // 2 keeps the size, as F.conv2d's "same" does)."""
    if isinstance(padding, str):
        if transposed:
            raise ValueError(
                f"{op}: padding={padding!r}: string padding is not defined for a transposed conv"
            )
        if padding == "valid":
            return 0
        if padding == "same":
            kh, kw = kernel
            if stride != 1 or kh != kw or kh % 2 == 0:
                raise ValueError(
                    f"{op}: padding='same' needs stride 1 and a square odd kernel, got stride "
                    f"{stride}, kernel {kh}x{kw} (pass an int padding)"
                )
            return (kh - 1) // 2
        raise ValueError(f"{op}: padding={padding!r}: expected an int, (p, p), 'valid' or 'same'")
    padding = as_int(padding, "padding")
    if padding < 0:
        raise ValueError(f"{op}: padding={padding} must be >= 0")
    return padding
