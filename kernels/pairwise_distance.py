"""mean_pairwise_distance: mean Euclidean distance over the N(N-1)/2 distinct row pairs of x (N, D).

    mean_{i<j} ||x_i - x_j||,   ||x_i - x_j||^2 = ||x_i||^2 + ||x_j||^2 - 2 x_i . x_j  (clamped at 0)

Tiles over pairs of row blocks (upper triangle only; the lower tiles skip their work), never builds the
N x N matrix; one partial sum per tile into its own slot, then a one-program fixed-order sum.
A metric: the Triton path has no autograd (an input that requires grad goes through the reference).
"""

from __future__ import annotations

import torch

from ._backend import INTERPRET, backend, can_launch, register_op, tl, triton
from .feature_distance import deterministic_sum

__all__ = ["mean_pairwise_distance", "reference_mean_pairwise_distance", "mean_pairwise_distance_forward"]

_BLOCK_M = 32 if INTERPRET else 64
_BLOCK_D = 32 if INTERPRET else 64


@triton.jit
def _mean_pairwise_distance_fwd_kernel(
    x_ptr, partial_ptr, N, D, sxn, sxd, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr
):
    # Tile (I, J) of row blocks, I <= J:  partial = sum_{i in I, j in J, i < j} sqrt(max(d2_ij, 0)),
    #   d2_ij = ||x_i||^2 + ||x_j||^2 - 2 x_i . x_j  (fp32, IEEE dot: no TF32 here, cancellation matters).
    # (No derivative: metric only. It would be d/dx_i = sum_j (x_i - x_j) / d_ij / num_pairs.)
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    rows_i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_j = pid_j * BLOCK_M + tl.arange(0, BLOCK_M)
    d_end = tl.where(pid_j >= pid_i, D, 0)  # lower-triangle tiles do no loads
    dot = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    sq_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sq_j = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, d_end, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask_d = cols < D
        a = tl.load(
            x_ptr + rows_i[:, None].to(tl.int64) * sxn + cols[None, :] * sxd,
            mask=(rows_i < N)[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        b = tl.load(
            x_ptr + rows_j[:, None].to(tl.int64) * sxn + cols[None, :] * sxd,
            mask=(rows_j < N)[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        dot = tl.dot(a, tl.trans(b), dot, input_precision="ieee")
        sq_i += tl.sum(a * a, axis=1)
        sq_j += tl.sum(b * b, axis=1)
    d2 = tl.maximum(sq_i[:, None] + sq_j[None, :] - 2.0 * dot, 0.0)
    pair = (rows_i[:, None] < rows_j[None, :]) & (rows_j < N)[None, :]  # i < j excludes the diagonal
    dist = tl.where(pair, tl.sqrt(d2), 0.0)
    tl.store(partial_ptr + pid_i * tl.num_programs(1) + pid_j, tl.sum(tl.sum(dist, axis=1), axis=0))


def mean_pairwise_distance_forward(x: torch.Tensor) -> torch.Tensor:
    """x (N, D) -> 0-dim fp32 mean distance over distinct pairs; N >= 2."""
    N, D = x.shape
    tiles = triton.cdiv(N, _BLOCK_M)
    partials = torch.empty(tiles * tiles, device=x.device, dtype=torch.float32)
    _mean_pairwise_distance_fwd_kernel[(tiles, tiles)](
        x, partials, N, D, x.stride(0), x.stride(1), BLOCK_M=_BLOCK_M, BLOCK_D=_BLOCK_D
    )
    return deterministic_sum(partials, 2.0 / (N * (N - 1)))


def _fwd_impl(x: torch.Tensor) -> torch.Tensor:
    if can_launch(x):
        return mean_pairwise_distance_forward(x)
    return reference_mean_pairwise_distance(x)


def _fwd_fake(x):
    return x.new_empty((), dtype=torch.float32)


_forward_op = register_op("mean_pairwise_distance", _fwd_impl, fake=_fwd_fake)


def _check(x):
    if x.dim() < 2 or x.shape[0] < 2:
        raise ValueError(f"mean_pairwise_distance: x must be (N >= 2, D...), got {tuple(x.shape)}")


def reference_mean_pairwise_distance(x):
    """Mean Euclidean distance over all distinct pairs of the rows of x (N, ...), via float64 cdist."""
    _check(x)
    x = x.flatten(1).double()
    n = x.shape[0]
    d = torch.cdist(x, x)
    return (d.sum() / (n * (n - 1))).to(torch.float32)


def mean_pairwise_distance(x):
    """Mean Euclidean distance over the N(N-1)/2 distinct pairs of rows of ``x``.

    Args:
        x: (N, D), or (N, ...) flattened to (N, D); N >= 2; fp32/fp16/bf16, fp32 accumulation.
    Returns:
        0-dim fp32 tensor. The N x N distance matrix is never built on the Triton path.
    No autograd on the Triton path: an ``x`` that requires grad (with grad mode on) takes the reference.
    """
    _check(x)
    if backend(x) == "reference" or (x.requires_grad and torch.is_grad_enabled()):
        return reference_mean_pairwise_distance(x)
    return _forward_op(x.flatten(1))
