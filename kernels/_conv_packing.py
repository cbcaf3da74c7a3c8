"""Operand layouts of the conv forward kernel: channels_last activations, K-major weights, and why the
weights are not cached.

Design notes: docs/kernels.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_weight_row_stride(k: int, element_size: int) -> int:
    """Row stride of the (C_out, K) conv weight matrix the kernel reads: K rounded up to 16 bytes (the
    widest cp.async), so every row starts aligned."""
    align = max(1, 16 // element_size)
    return -(-k // align) * align


def is_nhwc(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last)


def activation_operand(x: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W) as dense channels_last: x itself if it already is, else one copy."""
    return x if is_nhwc(x) else x.contiguous(memory_format=torch.channels_last)


def conv_weight_operand(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A conv weight (C_out, C_in, KH, KW) as the (C_out, K) matrix the kernel reads, and its row stride.

    K = KH * KW * C_in in (kh, kw, ci) order. A channels_last weight is returned as is (its storage is the
    matrix, row stride K); otherwise a per-call copy. Rows are padded when K is not 16-byte aligned.
    """
    c_out, c_in, kh, kw = weight.shape
    k = kh * kw * c_in
    k_pad = conv_weight_row_stride(k, weight.element_size())
    if k_pad == k:
        return (weight if is_nhwc(weight) else weight.contiguous(memory_format=torch.channels_last)), k
    rows = weight.permute(0, 2, 3, 1).reshape(c_out, k)  # (C_out, K), (kh, kw, ci) order
    return F.pad(rows, (0, k_pad - k)), k_pad


def upconv_weight_operand(weight: torch.Tensor) -> torch.Tensor:
    """An up-conv weight (C_in, C_out, KH, KW) in channels_last storage, (C_in, KH, KW, C_out): itself if it
    already is, else a per-call copy."""
    return weight if is_nhwc(weight) else weight.contiguous(memory_format=torch.channels_last)
