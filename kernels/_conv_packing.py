"""Operand layouts of the conv forward kernel: channels_last activations, K-major weights, and why the
weights are not cached.

Activations. The kernel reads x as dense channels_last (NHWC): a K tile (tap, ci..ci+BLOCK_K) is one
contiguous, 16-byte aligned run per output pixel, which Triton turns into cp.async copies. A channels_last
caller pays nothing; an NCHW caller gets one conversion of x (``activation_operand``) and one of the output
back to NCHW (``conv_igemm_forward`` in ``_conv_igemm``). deepsim runs its networks channels_last on CUDA
(``DeePSiMTrainer.to_channels_last``), so its convs take the copy-free path.

Weights, "packed once per parameter version". The GEMM wants W as a K-major matrix: rows of
K = KH * KW * C_in contiguous values per output channel. For a conv that matrix is exactly the storage of
a channels_last weight, (C_out, KH, KW, C_in): a module converted with
``.to(memory_format=torch.channels_last)`` *stores its parameter packed*, and the kernel reads the
parameter itself. There is no packed copy, hence nothing that can go stale:
  * a cache keyed on (data_ptr, _version) would be wrong under CUDA-graph replay (a cache hit during
    capture skips the packing kernel, so every replay reads the weights of capture time while the
    optimizer updates the parameter in place) and under torch.compile (inductor may write parameters in
    place without bumping ``_version``);
  * reading the parameter's own storage is always current: eager, captured, compiled, or after any
    in-place optimizer step (tests/kernels/test_conv_forward.py checks eager and torch.compile).
An up-conv weight (C_in, C_out, KH, KW) in channels_last storage, (C_in, KH, KW, C_out), gives per tap a
(C_in, C_out) slice with C_out contiguous: the kernel reads it as it is (a K x N operand, N-major, which
wgmma takes for 16-bit types).
A weight in the default (contiguous) layout is converted on every call (one small copy, the size of the
weight: at most a few MB, against a conv of GFLOPs) - correct for the same reason, just not free.
Where K is not a multiple of 16 bytes' worth of elements (the 3-channel first layers: K = 75, 147), the
rows would be misaligned for vector / cp.async loads, so those weights are copied per call into rows
padded to the next multiple (C_out x K_pad, at most a few KB).
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
