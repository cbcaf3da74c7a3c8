"""The roofline: FLOP and byte counts for the kernel benchmarks, and the roofline columns of any row.

:func:`add_roofline` places a row with ``flops`` and/or ``bytes`` and the time they took (a ``time_s`` key, a
value in a time unit such as s, ms, us, ms/step, or achieved ``tflops`` beside ``flops``) against the peaks
measured at the start of the run (bench/peaks.py): ``flop_floor_s`` = flops / peak FLOP/s,
``byte_floor_s`` = bytes / peak bytes/s, and ``roofline_fraction`` = max(floors) / measured time (1.0 = at
the roofline).

A row that already carries ``flops`` / ``bytes`` keeps them; otherwise :func:`attach_work` derives them from
the row's name and the shape tables of its group module (``CONV_LAYERS``, ``UPCONV_LAYERS``,
``FEATURE_TAPS`` in bench/kernels.py). Counts are the *compulsory* work of forward + backward:

conv / transposed conv + bias + LReLU, forward + backward (dgrad and wgrad each cost one forward):
    flops = 3 * 2 * B * C_out * H_out * W_out * C_in * k * k            (conv)
    flops = 3 * 2 * B * C_in  * H_in  * W_in  * C_out * k * k           (transposed conv)
    bytes = elem * (3|x| + 3|w| + 3|y| + 2 C_out): x read twice (fwd, wgrad) and dx written; w read twice
            and dw written; y written, read back (the LReLU sign) and grad_y read once.
feature_distance, forward + backward over taps of N elements each:
    flops = 5 N (diff, square, sum, scaled gradient; then grad * upstream)
    bytes = elem * 5 N (fwd reads fake + real and writes the gradient; bwd reads it and writes grad_fake)
"""

from __future__ import annotations

from deepsim.kernels._conv_shape import conv_out_size

from bench.rows import finite, row_seconds

__all__ = ["add_roofline", "attach_work", "conv_work", "feature_distance_work"]

ELEMENT_SIZE = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2}


def conv_work(batch, c_in, c_out, h_in, k, stride, padding, transposed, elem) -> tuple[float, float]:
    """(flops, bytes) of one conv(+transposed) + bias + LReLU block, forward + backward, square input."""
    h_out = conv_out_size(h_in, k, stride, padding, transposed)
    if transposed:
        fwd = 2.0 * batch * c_in * h_in * h_in * c_out * k * k
    else:
        fwd = 2.0 * batch * c_out * h_out * h_out * c_in * k * k
    x = batch * c_in * h_in * h_in
    w = c_in * c_out * k * k
    y = batch * c_out * h_out * h_out
    return 3.0 * fwd, float(elem * (3 * x + 3 * w + 3 * y + 2 * c_out))


def feature_distance_work(taps, elem) -> tuple[float, float]:
    """(flops, bytes) of feature_distance forward + backward over ``taps`` (shapes of the fake features)."""
    n = 0
    for shape in taps:
        size = 1
        for d in shape:
            size *= d
        n += size
    return 5.0 * n, float(5 * n * elem)


def _parse(name: str):
    """'conv_lrelu/enc1 3->32 k5s2 64/b64/bfloat16/fwd+bwd' -> (op, layer, batch, dtype); else None."""
    parts = name.split("/")
    if len(parts) != 5 or parts[4] != "fwd+bwd" or not parts[2].startswith("b"):
        return None
    try:
        batch = int(parts[2][1:])
    except ValueError:
        return None
    return parts[0], parts[1], batch, parts[3]


def attach_work(rows: list[dict], module) -> list[dict]:
    """Fill ``flops`` and ``bytes`` for the timed kernel rows that lack them; other rows are left alone."""
    layers = {}
    for table, transposed in (("CONV_LAYERS", False), ("UPCONV_LAYERS", True)):
        for entry in getattr(module, table, None) or ():
            layers[entry[0]] = (*entry[1:], transposed)
    taps = getattr(module, "FEATURE_TAPS", None)
    for row in rows:
        if row.get("flops") is not None or row.get("bytes") is not None:
            continue
        parsed = _parse(row.get("name") or "")
        if parsed is None:
            continue
        op, layer, batch, dtype = parsed
        elem = ELEMENT_SIZE.get(dtype)
        if elem is None:
            continue
        if op in ("conv_lrelu", "conv_transpose_lrelu") and layer in layers:
            c_in, c_out, h_in, k, s, p, transposed = layers[layer]
            row["flops"], row["bytes"] = conv_work(batch, c_in, c_out, h_in, k, s, p, transposed, elem)
        elif op == "feature_distance" and taps:
            row["flops"], row["bytes"] = feature_distance_work(taps, elem)
    return rows


def add_roofline(row: dict, peaks: dict | None) -> dict:
    """Add flop_floor_s, byte_floor_s, roofline_fraction to ``row`` (in place) where it has the inputs."""
    row.setdefault("flop_floor_s", None)
    row.setdefault("byte_floor_s", None)
    row.setdefault("roofline_fraction", None)
    if not peaks or row.get("status", "ok") != "ok":
        return row
    t = row_seconds(row)
    flops, nbytes = row.get("flops"), row.get("bytes")
    if finite(flops) and finite(peaks.get("flops_per_s")) and peaks["flops_per_s"] > 0:
        row["flop_floor_s"] = flops / peaks["flops_per_s"]
    if finite(nbytes) and finite(peaks.get("bytes_per_s")) and peaks["bytes_per_s"] > 0:
        row["byte_floor_s"] = nbytes / peaks["bytes_per_s"]
    floors = [f for f in (row["flop_floor_s"], row["byte_floor_s"]) if f is not None]
    if floors and t is not None and t > 0:
        row["roofline_fraction"] = max(floors) / t
    return row
