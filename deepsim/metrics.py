"""Evaluation metrics: the paper's, and LPIPS (:class:`LPIPS`, :func:`lpips`; see docs/lpips.md)."""

from __future__ import annotations

import torch

from deepsim.kernels import mean_pairwise_distance
from deepsim.perceptual import LPIPS, lpips

__all__ = [
    "normalized_error",
    "mean_pairwise_distance",
    "sharpness_ratio",
    "gradient_energy",
    "LPIPS",
    "lpips",
]


def normalized_error(a: torch.Tensor, b: torch.Tensor, reference_set: torch.Tensor | float) -> torch.Tensor:
    """The paper's normalized Euclidean error: mean_i ||a_i - b_i||_2 / N.

    N is the mean Euclidean distance over all distinct pairs of the test samples (``reference_set``, (M, ...),
    flattened per sample), or a precomputed number. a, b: (B, ...) reconstructions and targets.
    Returns a 0-dim float tensor; 0 for identical sets.
    """
    if a.shape != b.shape:
        raise ValueError(
            f"normalized_error: a {tuple(a.shape)} and b {tuple(b.shape)} must have the same shape"
        )
    if isinstance(reference_set, torch.Tensor):
        if reference_set.shape[0] < 2:
            raise ValueError(
                "normalized_error: the reference set needs at least 2 samples for pairwise distances"
            )
        norm = mean_pairwise_distance(reference_set.flatten(1).float())
    else:
        norm = torch.tensor(float(reference_set))
    dist = (a.flatten(1).double() - b.flatten(1).double()).norm(dim=1).mean()
    return (dist / norm.double()).float()


def sharpness_ratio(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Energy of the image gradient of ``reconstruction`` over that of ``target`` (1 = as sharp, <1 blurrier).

    Energy = sum of squared finite differences along H and W, over the batch. Shapes (B, C, H, W).
    """

    return (gradient_energy(reconstruction) / gradient_energy(target).clamp_min(1e-12)).float()


def gradient_energy(x: torch.Tensor) -> torch.Tensor:
    """Sum of squared finite differences of x (B, C, H, W) along H and W, in float64 (0-dim)."""
    x = x.double()
    return (x[..., 1:, :] - x[..., :-1, :]).pow(2).sum() + (x[..., :, 1:] - x[..., :, :-1]).pow(2).sum()
