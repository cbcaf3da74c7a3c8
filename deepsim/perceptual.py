"""Perceptual distances between two image batches: :class:`PerceptualLoss` (the comparator feature term
alone) and :class:`LPIPS` (Zhang et al. 2018, fused and NaN-safe), with one input convention and one check.

Input convention: images (B, 3, H, W), RGB, floating point, in [-1, 1]; ``normalize=True`` takes [0, 1]
instead (as lpips' flag). See docs/lpips.md.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from deepsim.comparators import TORCHVISION_FILES, Comparator
from deepsim.kernels import feature_distance, lpips_distance

__all__ = ["PerceptualLoss", "LPIPS", "lpips", "check_images", "lpips_weights_path", "LPIPS_TAPS"]

# LPIPS' five taps (lpips' relu1..relu5) in our comparators' names.
LPIPS_TAPS = {
    "alex": ("alexnet", ("conv1", "conv2", "conv3", "conv4", "conv5")),
    "vgg": ("vgg16", ("conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3")),
}
LPIPS_WEIGHTS_URL = "https://github.com/richzhang/PerceptualSimilarity/tree/master/lpips/weights/v0.1"


def check_images(
    name: str, x: torch.Tensor, *, min_side: int = 1, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``x`` checked as an image batch (B, 3, H, W) of a floating dtype with H, W >= ``min_side``; cast to
    ``dtype`` when given (and autocast is off). Raises ValueError naming ``name`` and what was expected."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor (B, 3, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        hint = f"; add the batch dimension with {name}.unsqueeze(0)" if x.dim() == 3 else ""
        raise ValueError(f"{name}: expected a 4-D batch (B, 3, H, W), got shape {tuple(x.shape)}{hint}")
    if x.shape[1] != 3:
        raise ValueError(f"{name}: expected 3 (RGB) channels in dim 1, got shape {tuple(x.shape)}")
    if min(x.shape[2], x.shape[3]) < min_side:
        raise ValueError(
            f"{name}: images of {x.shape[2]}x{x.shape[3]} are smaller than this comparator's minimum "
            f"side {min_side}; resize them or use a comparator with input_size set"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"{name}: expected a floating dtype, got {x.dtype}; convert first (e.g. {name}.float() / 255 "
            "for 0..255 images, then normalize=True)"
        )
    if dtype is not None and x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        x = x.to(dtype)
    return x


class _RangeCheck:
    """Warns once per owner when inputs lie far outside the declared range (a host sync per checked call)."""

    def __init__(self, normalize: bool, enabled: bool, fix: str | None = None):
        self.low, self.high = (0.0, 1.0) if normalize else (-1.0, 1.0)
        self.normalize, self.enabled, self.warned = normalize, enabled, False
        other = "normalize=False for [-1, 1]" if normalize else "normalize=True for [0, 1]"
        self.fix = fix or f"rescale it or pass {other}"

    def __call__(self, owner: str, **tensors: torch.Tensor) -> None:
        if not self.enabled or self.warned or torch.compiler.is_compiling():
            return
        margin = (self.high - self.low) / 4
        for name, t in tensors.items():
            if t.device.type == "meta" or is_fake(t):  # no values to look at (shape tracing, FLOP counting)
                continue
            lo, hi = (float(v) for v in torch.aminmax(t.detach()))
            if lo < self.low - margin or hi > self.high + margin:
                self.warned = True
                warnings.warn(
                    f"{owner}: {name} spans [{lo:.3g}, {hi:.3g}], far outside the declared "
                    f"[{self.low:g}, {self.high:g}] (normalize={self.normalize}); {self.fix}",
                    UserWarning,
                    stacklevel=3,
                )
                return


def _taps(comparator: Comparator, x: torch.Tensor, y: torch.Tensor):
    """Both sides' taps; a side that needs no gradient is computed without a graph."""
    grad = torch.is_grad_enabled()
    taps = []
    for t in (x, y):
        with torch.set_grad_enabled(grad and (t.requires_grad or _trainable(comparator))):
            taps.append(comparator(t))
    return taps


def _trainable(comparator: nn.Module) -> bool:
    return any(p.requires_grad for p in comparator.parameters())


def _param_dtype(module: nn.Module) -> torch.dtype | None:
    p = next(module.parameters(), None)
    return p.dtype if p is not None else None


class PerceptualLoss(nn.Module):
    """The comparator feature distance alone: sum_l w_l ||C_l(x) - C_l(y)||^2 per image.

    Args:
        comparator: a :class:`~deepsim.Comparator` or a spec for one (e.g. ``"alexnet-random:conv3"``).
        reduction: "mean" (over the batch, as DeePSiMLoss's feature term), "sum", or "none": one value per
            image, shape (B,).
        normalize: inputs in [0, 1] instead of [-1, 1].
        check_range: warn once when inputs lie far outside the declared range (one host sync per call until
            it has warned; False: no check).

    Forward: ``(x, y)`` (B, 3, H, W) floating images; gradients flow to whichever side requires them.

    >>> import torch, deepsim
    >>> loss = deepsim.PerceptualLoss("alexnet-random:conv3", reduction="none")
    >>> x = torch.rand(2, 3, 64, 64) * 2 - 1
    >>> loss(x, x).tolist()
    [0.0, 0.0]
    >>> loss(x, x.flip(0)).shape
    torch.Size([2])
    """

    def __init__(
        self,
        comparator: Comparator | str,
        *,
        reduction: str = "mean",
        normalize: bool = False,
        check_range: bool = True,
    ):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"PerceptualLoss: reduction={reduction!r}, expected 'mean', 'sum' or 'none'")
        self.comparator = Comparator(comparator) if isinstance(comparator, str) else comparator
        self.reduction, self.normalize = reduction, normalize
        self._range = _RangeCheck(normalize, check_range)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = _prepare("PerceptualLoss", self.comparator, self._range, self.normalize, x, y)
        fx, fy = _taps(self.comparator, x, y)
        weights = self.comparator.tap_weights
        if self.reduction != "none" and not (y.requires_grad and torch.is_grad_enabled()):
            return feature_distance(fx, fy, weights, reduction=self.reduction)
        per_image = sum(
            w * (a.float() - b.float()).pow(2).flatten(1).sum(1) for a, b, w in zip(fx, fy, weights)
        )
        return {"none": per_image, "sum": per_image.sum(), "mean": per_image.mean()}[self.reduction]


def _prepare(owner, comparator, range_check, normalize, x, y):
    x = check_images("x", x, min_side=comparator.min_side, dtype=_param_dtype(comparator))
    y = check_images("y", y, min_side=comparator.min_side, dtype=_param_dtype(comparator))
    if x.shape != y.shape:
        raise ValueError(f"{owner}: x {tuple(x.shape)} and y {tuple(y.shape)} must have the same shape")
    range_check(owner, x=x, y=y)
    if normalize:
        x, y = x * 2 - 1, y * 2 - 1
    return x, y


def lpips_weights_path(net: str, version: str = "0.1") -> Path | None:
    """The linear-layer weights file the installed lpips package ships (``lpips/weights/v0.1/<net>.pth``),
    found without importing lpips; None when lpips is not installed."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "weights" / f"v{version}" / f"{net}.pth"


class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018, version 0.1) with one fused, NaN-safe distance kernel for all five taps.

    Equal to ``lpips.LPIPS(net=net)`` on the same backbone and linear weights (within 1e-5 relative, value
    and input gradient, as tested), except that the channel norm puts its eps inside the square root:
    all-zero features give finite gradients where lpips gives NaN.

    Args:
        net: "alex" or "vgg".
        version: "0.1" (the only version with the fixed input scaling).
        backbone_weights: None (torchvision's cached ImageNet file; see deepsim.comparators), a path to a
            torchvision-format state dict, or "random" (seeded random backbone: tests and offline runs).
        lin_weights: the linear layers' file (lpips' ``<net>.pth``); None: from the installed lpips package.
        normalize: inputs in [0, 1] instead of [-1, 1] (lpips' flag).
        reduction: "none" (one value per image, shape (B,)) or "mean".
        check_range: warn once when inputs lie far outside the declared range.

    Example (lin weights from the installed lpips package; a random backbone, so it runs offline):

    >>> import torch
    >>> from deepsim.metrics import LPIPS
    >>> metric = LPIPS("alex", backbone_weights="random", normalize=True)
    >>> x = torch.rand(2, 3, 64, 64)
    >>> metric(x, x).tolist()
    [0.0, 0.0]
    >>> metric(x, torch.rand(2, 3, 64, 64)).shape
    torch.Size([2])
    """

    def __init__(
        self,
        net: str = "alex",
        version: str = "0.1",
        *,
        backbone_weights: str | os.PathLike | None = None,
        lin_weights: str | os.PathLike | None = None,
        normalize: bool = False,
        reduction: str = "none",
        check_range: bool = True,
    ):
        super().__init__()
        if net not in LPIPS_TAPS:
            raise ValueError(f"LPIPS: net={net!r}, expected one of {', '.join(LPIPS_TAPS)}")
        if version != "0.1":
            raise ValueError(f"LPIPS: version={version!r}; only '0.1' is supported")
        if reduction not in ("none", "mean"):
            raise ValueError(f"LPIPS: reduction={reduction!r}, expected 'none' or 'mean'")
        arch, taps = LPIPS_TAPS[net]
        if backbone_weights == "random":
            arch, backbone_weights = f"{arch}-random", None
        elif backbone_weights is not None and not Path(backbone_weights).is_file():
            name, url = TORCHVISION_FILES[arch]
            raise FileNotFoundError(
                f"LPIPS backbone_weights file {backbone_weights} does not exist; it is a "
                f"torchvision-format state dict such as {name} ({url})"
            )
        self.comparator = Comparator(f"{arch}:{','.join(taps)}", weights=backbone_weights)
        for i, w in enumerate(_load_lin_weights(net, version, lin_weights)):
            self.register_buffer(f"lin{i}", w)
        self.net, self.normalize, self.reduction = net, normalize, reduction
        self._range = _RangeCheck(normalize, check_range)

    @property
    def lin_weights(self) -> list[torch.Tensor]:
        return [getattr(self, f"lin{i}") for i in range(len(self.comparator.tap_names))]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS distance of x and y (B, 3, H, W): (B,) fp32 ("none") or its mean."""
        x, y = _prepare("LPIPS", self.comparator, self._range, self.normalize, x, y)
        d = self.distance(x, y)
        return d.mean() if self.reduction == "mean" else d

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B,) fp32 distances of checked images in [-1, 1] (no validation, no range check)."""
        fx, fy = _taps(self.comparator, x, y)
        return lpips_distance(fx, fy, self.lin_weights)


def _load_lin_weights(net: str, version: str, path) -> list[torch.Tensor]:
    if path is None:
        path = lpips_weights_path(net, version)
        if path is None:
            raise FileNotFoundError(
                f"LPIPS(net={net!r}) needs lpips' linear-layer weights: pip install lpips (its wheel ships "
                f"lpips/weights/v{version}/{net}.pth), or pass lin_weights=PATH to that file "
                f"({LPIPS_WEIGHTS_URL})"
            )
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"LPIPS lin_weights file {path} does not exist; it is lpips' "
            f"weights/v{version}/{net}.pth (pip install lpips, or {LPIPS_WEIGHTS_URL})"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    channels = [64, 192, 384, 256, 256] if net == "alex" else [64, 128, 256, 512, 512]
    out = []
    for i, c in enumerate(channels):
        key = f"lin{i}.model.1.weight"
        w = state.get(key) if isinstance(state, dict) else None
        if w is None or w.numel() != c:
            raise ValueError(f"LPIPS lin_weights file {path}: expected {key} with {c} values for net={net!r}")
        out.append(w.detach().float().reshape(-1).clone())
    return out


@functools.lru_cache(maxsize=4)
def _cached(net: str, backbone_weights, lin_weights, device: str) -> LPIPS:
    return LPIPS(net, backbone_weights=backbone_weights, lin_weights=lin_weights).to(device)


_FUNCTIONAL_RANGE = {False: _RangeCheck(False, True), True: _RangeCheck(True, True)}


def lpips(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    net: str = "alex",
    normalize: bool = False,
    reduction: str = "none",
    backbone_weights: str | os.PathLike | None = None,
    lin_weights: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Functional :class:`LPIPS` (same arguments, convention and checks); the module is built once per
    (net, weights, device) and kept. Returns (B,) fp32, or its mean with reduction="mean"."""
    if reduction not in ("none", "mean"):
        raise ValueError(f"lpips: reduction={reduction!r}, expected 'none' or 'mean'")
    key = (None if v is None else str(v) for v in (backbone_weights, lin_weights))
    metric = _cached(net, *key, str(x.device))
    x, y = _prepare("lpips", metric.comparator, _FUNCTIONAL_RANGE[bool(normalize)], normalize, x, y)
    d = metric.distance(x, y)
    return d.mean() if reduction == "mean" else d
