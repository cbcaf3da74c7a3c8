"""Calibrate lambda_feat for a comparator against a reference comparator (``deepsim calibrate``).

The derived code's lambda_feat = 0.01 (0.005 in deepsim's scale convention,
:data:`deepsim.config.CAFFE_TO_DEEPSIM`)
was tuned for CaffeNet pool5 on Caffe's input scale (BGR, 0..255, mean subtracted). Another comparator, e.g.
torchvision's AlexNet (inputs about 58x smaller per grey level, other weights), gives feature distances of
another size, so the same lambda_feat gives its term another weight in the loss. This module measures the
factor: for real images x and perturbed versions x' of them,

    R = mean_x D_ref(x, x') / mean_x D_cmp(x, x'),   D(x, x') = sum_l w_l ||C_l(x) - C_l(x')||^2

(the per-sample feature distance of the DeePSiM loss, each comparator on its own input convention), and
lambda_feat(cmp) = R * lambda_feat(ref) makes the comparator's term as large as the reference's on those
pairs. R is measured per perturbation (below) and combined as the geometric mean; the per-perturbation
values show how far a single number holds (the two networks need not scale alike for every change).

Perturbations (images in [-1, 1], seeded):

    noise        additive Gaussian noise, sigma 0.1 (about 13 grey levels)
    blur         Gaussian blur, sigma 1.5 px (9x9 kernel, reflect padding)
    shift        translation by 4 px right and 4 px down (reflect padding)
    downsample   2x bilinear downsampling, then bilinear upsampling back (lost fine detail, like an
                 over-smoothed reconstruction)

Images: ImageNet preprocessing (shorter side resized to 256, centre crop of ``size``, 227 by default).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from deepsim.comparators import Comparator
from deepsim.config import CAFFE_TO_DEEPSIM
from deepsim.data import iterate_eval

__all__ = [
    "PERTURBATIONS",
    "CalibrationReport",
    "calibrate_lambda_feat",
    "feature_distances",
    "format_report",
]

REFERENCE_LAMBDA_FEAT = 0.01 * CAFFE_TO_DEEPSIM["feat"]  # the code's 0.01 for CaffeNet, in our convention


def _noise(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
    return images + 0.1 * noise.to(images.device)


def _blur(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    sigma, radius = 1.5, 4
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def _shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    pixels = 4
    padded = F.pad(images, (pixels, 0, pixels, 0), mode="reflect")
    return padded[..., : images.shape[-2], : images.shape[-1]]


def _downsample(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    size = images.shape[-2:]
    small = F.interpolate(images, scale_factor=0.5, mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(small, size=size, mode="bilinear", align_corners=False)


# name -> f(images (B, 3, H, W) in [-1, 1], torch.Generator) -> perturbed images, same shape
PERTURBATIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "noise": _noise,
    "blur": _blur,
    "shift": _shift,
    "downsample": _downsample,
}


@dataclass
class CalibrationReport:
    """What :func:`calibrate_lambda_feat` measured."""

    comparator: str  # the comparator to calibrate
    reference: str  # the comparator whose lambda_feat is known
    images: int  # real images used
    size: int  # their side
    reference_lambda_feat: float  # lambda_feat of the reference (deepsim's scale convention)
    distances: dict[str, dict[str, float]] = field(default_factory=dict)  # perturbation -> mean distances
    ratios: dict[str, float] = field(default_factory=dict)  # perturbation -> R = mean D_ref / mean D_cmp
    ratio: float = math.nan  # geometric mean of the ratios
    lambda_feat: float = math.nan  # reference_lambda_feat * ratio: the comparator's calibrated weight

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def feature_distances(comparator: Comparator, images: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """Per-sample DeePSiM feature distance sum_l w_l ||C_l(x) - C_l(x')||^2: (B,) float32."""
    total = torch.zeros(images.shape[0], dtype=torch.float32, device=images.device)
    for weight, a, b in zip(comparator.tap_weights, comparator(images), comparator(perturbed)):
        total += weight * (a.float() - b.float()).pow(2).flatten(1).sum(1)
    return total


def calibrate_lambda_feat(
    comparator: str | Comparator = "alexnet:pool5",
    reference: str | Comparator = "caffenet:pool5",
    *,
    data: str = "photos",
    comparator_weights: str | None = None,
    reference_weights: str | None = None,
    images: int = 64,
    size: int = 227,
    batch_size: int = 16,
    perturbations: Sequence[str] = tuple(PERTURBATIONS),
    reference_lambda_feat: float = REFERENCE_LAMBDA_FEAT,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> CalibrationReport:
    """Measure the lambda_feat that gives ``comparator`` the feature term's magnitude of ``reference``.

    Args:
        comparator, reference: comparator specs (``"<arch>:<tap>[=w],..."``) or built :class:`Comparator`\\ s.
        data: real images: a folder, ``"photos"`` (the bundled photographs) or an STL-10 binary folder.
        comparator_weights, reference_weights: their weights files (see :class:`Comparator`).
        images: use at most this many images (the first ones, in source order).
        size: side of the centre crop (after resizing the shorter side to max(256, size)).
        batch_size: images per forward pass.
        perturbations: names from :data:`PERTURBATIONS`.
        reference_lambda_feat: the reference's lambda_feat in deepsim's scale convention (default: the code's
            0.01 for CaffeNet, i.e. 0.005).
        device: where the comparators run.
        seed: seed of the random perturbations (noise).

    Returns:
        a :class:`CalibrationReport`; ``lambda_feat`` is the calibrated weight for ``comparator``.

    Raises:
        ValueError: an unknown perturbation, no images, or a zero comparator distance.
        ComparatorWeightsError: a missing or unfit weights file (named).
        DataError: an unreadable data source.
    """
    _check_counts(perturbations, images, batch_size)
    device = torch.device(device)
    comparator = _built(comparator, comparator_weights, device)
    reference = _built(reference, reference_weights, device)
    batches = iterate_eval(
        data,
        batch_size=batch_size,
        crop_size=size,
        mode="resize-center",
        resize_size=max(256, size),
        device=device,
    )
    sums, seen = _summed_distances(comparator, reference, batches, perturbations, images, seed)
    if seen == 0:
        raise ValueError(f"calibrate: no images in {data}")
    return _report(comparator.spec, reference.spec, sums, seen, size, reference_lambda_feat)


def _check_counts(perturbations: Sequence[str], images: int, batch_size: int) -> None:
    """ValueError for an unknown (or no) perturbation, or fewer than one image or one image a batch."""
    unknown = [p for p in perturbations if p not in PERTURBATIONS]
    if unknown or not perturbations:
        raise ValueError(f"perturbations {list(perturbations)}: expected some of {', '.join(PERTURBATIONS)}")
    if images < 1 or batch_size < 1:
        raise ValueError(f"images={images}, batch_size={batch_size}: both must be >= 1")


def _built(comparator: str | Comparator, weights: str | None, device: torch.device) -> Comparator:
    """A spec built with its weights file (a built Comparator as it is), on ``device`` in eval mode."""
    if isinstance(comparator, str):
        comparator = Comparator(comparator, weights=weights)
    return comparator.to(device).eval()


def _report(comparator: str, reference: str, sums, seen: int, size: int, reference_lambda_feat: float):
    """The :class:`CalibrationReport` of the summed distances; a zero comparator sum is a ValueError."""
    report = CalibrationReport(comparator, reference, seen, size, reference_lambda_feat)
    for name, (ref_sum, cmp_sum) in sums.items():
        if cmp_sum <= 0:
            raise ValueError(f"calibrate: comparator {comparator} gives distance 0 under '{name}'")
        report.distances[name] = {"reference": ref_sum / seen, "comparator": cmp_sum / seen}
        report.ratios[name] = ref_sum / cmp_sum
    report.ratio = math.exp(sum(math.log(r) for r in report.ratios.values()) / len(report.ratios))
    report.lambda_feat = reference_lambda_feat * report.ratio
    return report


def _summed_distances(comparator, reference, batches, perturbations, images: int, seed: int):
    """({perturbation: [sum D_ref, sum D_cmp]}, images seen) over the first ``images`` of ``batches``."""
    sums = {name: [0.0, 0.0] for name in perturbations}  # name -> [sum D_ref, sum D_cmp]
    seen = 0
    generator = torch.Generator().manual_seed(seed)
    for batch in batches:
        batch = batch[: images - seen]
        for name in perturbations:
            perturbed = PERTURBATIONS[name](batch, generator)
            sums[name][0] += float(feature_distances(reference, batch, perturbed).sum())
            sums[name][1] += float(feature_distances(comparator, batch, perturbed).sum())
        seen += len(batch)
        if seen >= images:
            break
    return sums, seen


def format_report(report: CalibrationReport) -> str:
    """A plain-text table of the report, ending with the lambda_feat line."""
    lines = [
        f"comparator {report.comparator} against reference {report.reference}: {report.images} images, "
        f"{report.size}x{report.size}",
        f"{'perturbation':<12} {'D_reference':>14} {'D_comparator':>14} {'ratio':>12}",
    ]
    for name, ratio in report.ratios.items():
        d = report.distances[name]
        lines.append(f"{name:<12} {d['reference']:>14.6g} {d['comparator']:>14.6g} {ratio:>12.6g}")
    low, high = min(report.ratios.values()), max(report.ratios.values())
    lines.append(f"ratio (geometric mean) {report.ratio:.6g} (per perturbation {low:.6g} .. {high:.6g})")
    lines.append(
        f"lambda_feat for {report.comparator} = {report.reference_lambda_feat:.6g} x {report.ratio:.6g} = "
        f"{report.lambda_feat:.6g}   (deepsim's scale convention; pass --lambda-feat "
        f"{report.lambda_feat:.3g})"
    )
    return "\n".join(lines)
