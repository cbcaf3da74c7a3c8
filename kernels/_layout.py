"""Tensor-layout facts the op files share."""

import torch


def is_dense(t: torch.Tensor) -> bool:
    """t's elements fill its storage span with no gap or overlap (some permutation of a contiguous tensor),
    so empty_like(t) has t's strides and one flat index walks both alike."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda p: p[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def in_layout_of(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """g (like's shape) in empty_like(like)'s layout, copied only where its strides differ: the layout a
    custom op's fake implementation promises torch.compile."""
    target = torch.empty_like(like)
    return g if g.stride() == target.stride() else target.copy_(g)
