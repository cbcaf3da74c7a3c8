"""The DeePSiM loss, its image-space baselines, the discriminator loss and the D/G pause rule (the derived
code's two-flag state machine, :class:`PauseRule`).

Scale convention (see also :data:`deepsim.config.CAFFE_TO_DEEPSIM`): every term is a per-sample SUM over
its elements, averaged over the batch, on images in [-1, 1]:

    L_img  = 1/B sum_i ||G(x_i) - y_i||^2            ("se"; "l1" uses |.|)
    L_feat = 1/B sum_i sum_l w_l ||C_l(G(x_i)) - C_l(y_i)||^2
    L_adv  = 1/B sum_i -log D(G(x_i))                (D is a 2-way softmax; class 1 = real)
    L_D    = 1/B sum_i -[log D(y_i) + log(1 - D(G(x_i)))]  = L_D_real + L_D_fake

Caffe's EuclideanLoss (the derived code's weights) is sum / (2N) on 0..255 pixels, so its lambda_img = 2e-6
becomes 2e-6 * 127.5^2 / 2 here and its lambda_feat = 0.01 becomes 0.005; lambda_adv = 100 is unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from deepsim.comparators import Comparator
from deepsim.config import CAFFE_TO_DEEPSIM
from deepsim.kernels import feature_distance
from deepsim.perceptual import LPIPS, _param_dtype, _RangeCheck, check_images

__all__ = ["DeePSiMLoss", "GeneratorLoss", "DiscriminatorLoss", "PauseRule", "image_distance"]


class GeneratorLoss(NamedTuple):
    """The generator objective and its terms, unweighted (``total`` is the weighted sum)."""

    total: torch.Tensor
    feat: torch.Tensor
    adv: torch.Tensor
    img: torch.Tensor


class DiscriminatorLoss(NamedTuple):
    total: torch.Tensor
    real: torch.Tensor
    fake: torch.Tensor


def image_distance(fake: torch.Tensor, real: torch.Tensor, kind: str = "se") -> torch.Tensor:
    """Per-sample sum of squared ("se") or absolute ("l1") differences, averaged over the batch."""
    diff = fake.float() - real.float()
    if kind == "se":
        return diff.pow(2).sum() / fake.shape[0]
    if kind == "l1":
        return diff.abs().sum() / fake.shape[0]
    raise ValueError(f"image distance must be 'se' or 'l1', got {kind!r}")


class DeePSiMLoss(nn.Module):
    """lambda_feat * L_feat + lambda_adv * L_adv + lambda_img * L_img (the paper's three terms), and the
    discriminator's loss.

    It needs the discriminator's logits on the fakes unless ``lambda_adv=0`` (the default is 100). For a
    perceptual distance alone, like lpips, use :class:`deepsim.PerceptualLoss` (the feature term only,
    per image with ``reduction="none"``) or :class:`deepsim.metrics.LPIPS`: with ``lambda_adv=0`` this
    loss still adds the pixel term, which at the default weights dominates the total.

    Args:
        comparator: a :class:`Comparator`, a spec string for one, or None (only with loss "se"/"l1"); with
            ``feature_metric="lpips"``, an :class:`~deepsim.metrics.LPIPS` or None (LPIPS("alex")).
        loss: "deepsim" (the weighted sum), or the baselines "se" / "l1" (image term alone, weight 1).
        lambda_feat, lambda_adv, lambda_img: the term weights, in this module's scale convention (above).
        image_kind: the image term of DeePSiM: "se" (paper) or "l1".
        feature_metric: "squared" (the paper: weighted squared feature distance) or "lpips" (our extension,
            not the paper's: L_feat = the batch mean of LPIPS, about 0..1 per image; set lambda_feat for it).

    >>> import torch
    >>> from deepsim import DeePSiMLoss
    >>> loss = DeePSiMLoss("alexnet-random:conv3", lambda_adv=0)
    >>> x = torch.rand(2, 3, 64, 64) * 2 - 1
    >>> loss(x, x).total.item()
    0.0
    """

    def __init__(
        self,
        comparator: Comparator | str | None = None,
        *,
        loss: str = "deepsim",
        lambda_feat: float = 0.01 * CAFFE_TO_DEEPSIM["feat"],
        lambda_adv: float = 100.0,
        lambda_img: float = 2e-6 * CAFFE_TO_DEEPSIM["img"],
        image_kind: str = "se",
        feature_metric: str = "squared",
    ):
        super().__init__()
        if loss not in ("deepsim", "se", "l1"):
            raise ValueError(f"loss must be 'deepsim', 'se' or 'l1', got {loss!r}")
        if feature_metric not in ("squared", "lpips"):
            raise ValueError(f"feature_metric must be 'squared' or 'lpips', got {feature_metric!r}")
        self.feature_metric, self.lpips = feature_metric, None
        if feature_metric == "lpips" and loss == "deepsim" and lambda_feat:
            if comparator is not None and not isinstance(comparator, LPIPS):
                raise ValueError(
                    "feature_metric='lpips' takes comparator=None (LPIPS('alex')) or an LPIPS module"
                )
            self.lpips = comparator if comparator is not None else LPIPS("alex")
            comparator = self.lpips.comparator
        elif isinstance(comparator, str):
            comparator = Comparator(comparator)
        if loss == "deepsim" and comparator is None and lambda_feat:
            raise ValueError("loss 'deepsim' with lambda_feat != 0 needs a comparator")
        self.loss, self.image_kind = loss, image_kind
        self.comparator = comparator
        self.lambda_feat, self.lambda_adv, self.lambda_img = lambda_feat, lambda_adv, lambda_img
        uses_comparator = loss == "deepsim" and bool(lambda_feat) and comparator is not None
        self._min_side = comparator.min_side if uses_comparator else 1
        self._range = _RangeCheck(
            normalize=False, enabled=True, fix="rescale it to [-1, 1] (x / 127.5 - 1 for 0..255)"
        )  # checked on the first eager call only
        self._range_checked = False

    @property
    def uses_discriminator(self) -> bool:
        return self.loss == "deepsim" and self.lambda_adv != 0

    def feature_loss(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """L_feat: the weighted comparator feature distance, or the LPIPS batch mean (reals carry no
        gradient)."""
        if self.lpips is not None:
            return self.lpips.distance(fake, real.detach()).mean()
        with torch.no_grad():
            real_taps = self.comparator(real)
        fake_taps = self.comparator(fake)
        return feature_distance(fake_taps, real_taps, self.comparator.tap_weights, reduction="mean")

    def forward(
        self, fake: torch.Tensor, real: torch.Tensor, d_fake_logits: torch.Tensor | None = None
    ) -> GeneratorLoss:
        """The generator loss. fake, real: (B, 3, H, W) in [-1, 1]; d_fake_logits: D's (B, 2) on the fakes,
        required when lambda_adv != 0.

        Raises:
            ValueError: ``fake`` or ``real`` is not a floating (B, 3, H, W) batch of at least the comparator's
                minimum side, or their shapes differ (float64 is cast to the comparator's dtype). Inputs far
                outside [-1, 1] on the first eager call give one warning.
        """
        fake, real = self._checked(fake, real)
        zero = fake.new_zeros((), dtype=torch.float32)
        if self.loss != "deepsim":
            img = image_distance(fake, real, self.loss)
            return GeneratorLoss(img, zero, zero, img)
        img = image_distance(fake, real, self.image_kind) if self.lambda_img else zero
        feat = self.feature_loss(fake, real) if self.lambda_feat else zero
        adv = zero
        if self.lambda_adv:
            if d_fake_logits is None:
                raise ValueError(
                    "DeePSiMLoss with lambda_adv != 0 needs the discriminator's logits on the fakes "
                    "(pass d_fake_logits, or lambda_adv=0; for the feature term alone use "
                    "deepsim.PerceptualLoss)"
                )
            adv = adversarial_loss(d_fake_logits)
        total = self.lambda_feat * feat + self.lambda_adv * adv + self.lambda_img * img
        return GeneratorLoss(total, feat, adv, img)

    def _checked(self, fake: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = _param_dtype(self.comparator) if self._min_side > 1 else None
        fake = check_images("fake", fake, min_side=self._min_side, dtype=dtype)
        real = check_images("real", real, min_side=self._min_side, dtype=dtype)
        if fake.shape != real.shape:
            raise ValueError(
                f"DeePSiMLoss: fake {tuple(fake.shape)} and real {tuple(real.shape)} must have the same shape"
            )
        if not self._range_checked and not torch.compiler.is_compiling():
            self._range_checked = True  # one host sync, on the first call: the training step stays sync-free
            self._range("DeePSiMLoss", real=real)
        return fake, real

    @staticmethod
    def discriminator_loss(d_real_logits: torch.Tensor, d_fake_logits: torch.Tensor) -> DiscriminatorLoss:
        """L_D = -[log D(y) + log(1 - D(G(x)))], batch-mean; logits (B, 2), class 1 = real."""
        real = F.cross_entropy(d_real_logits.float(), _labels(d_real_logits, 1))
        fake = F.cross_entropy(d_fake_logits.float(), _labels(d_fake_logits, 0))
        return DiscriminatorLoss(real + fake, real, fake)


def adversarial_loss(d_fake_logits: torch.Tensor) -> torch.Tensor:
    """L_adv = -log D(G(x)), batch-mean: the generator wants its fakes classified as real (class 1)."""
    return F.cross_entropy(d_fake_logits.float(), _labels(d_fake_logits, 1))


def _labels(logits: torch.Tensor, value: int) -> torch.Tensor:
    return torch.full((logits.shape[0],), value, dtype=torch.long, device=logits.device)


class PauseRule(nn.Module):
    """The derived code's switch between training D and G, as a state machine on the device (no host sync).

    State: two flags, ``train_d`` and ``train_g`` (0-dim bool buffers, both True at the start). After
    iteration t, with r = (L_D_real + L_D_fake) / L_adv of that iteration, the derived code
    (model_training/train.py) applies, in this order::

        if r < d_below and train_d:              train_d, train_g = False, True
        if r > d_resume_above and not train_d:   train_d, train_g = True, True
        if r > g_above and train_g:              train_g, train_d = False, True

    and the flags gate iteration t + 1 (:meth:`gates` reads them before the updates, :meth:`forward`
    applies the rule after). So a G stopped at r > 10 stays stopped until r < 0.1, which also stops D;
    a stopped D resumes at r > 0.5. A non-finite r changes nothing (every comparison is False).

    Checkpoints hold both flags. A legacy state dict (one buffer ``d_paused``, G gated by
    r <= 10 in the same iteration, no G state) loads as ``train_d = not d_paused``, ``train_g = True``.
    """

    def __init__(self, d_below: float = 0.1, d_resume_above: float = 0.5, g_above: float = 10.0):
        super().__init__()
        self.d_below, self.d_resume_above, self.g_above = d_below, d_resume_above, g_above
        self.register_buffer("train_d", torch.ones((), dtype=torch.bool))
        self.register_buffer("train_g", torch.ones((), dtype=torch.bool))

    def gates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(train_d, train_g) for the current iteration: copies of the flags the previous one set."""
        return self.train_d.clone(), self.train_g.clone()

    @staticmethod
    def ratio(d_loss_real, d_loss_fake, g_loss_adv) -> torch.Tensor:
        """r = (L_D_real + L_D_fake) / L_adv (L_adv clamped away from 0), detached, 0-dim."""
        return (d_loss_real.detach() + d_loss_fake.detach()) / g_loss_adv.detach().clamp_min(1e-12)

    def forward(
        self, d_loss_real, d_loss_fake, g_loss_adv
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Apply the rule to this iteration's losses; returns (train_d, train_g, r): the flags for the NEXT
        iteration (also stored in the buffers) and r, all 0-dim device tensors."""
        r = self.ratio(d_loss_real, d_loss_fake, g_loss_adv)
        train_d, train_g = self.train_d, self.train_g
        stop_d = (r < self.d_below) & train_d  # D off, G on
        train_d, train_g = train_d & ~stop_d, train_g | stop_d
        resume = (r > self.d_resume_above) & ~train_d  # both on
        train_d, train_g = train_d | resume, train_g | resume
        stop_g = (r > self.g_above) & train_g  # G off, D on
        train_d, train_g = train_d | stop_g, train_g & ~stop_g
        self.train_d.copy_(train_d)
        self.train_g.copy_(train_g)
        return train_d, train_g, r

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        legacy = prefix + "d_paused"
        if legacy in state_dict and prefix + "train_d" not in state_dict:  # the legacy one-flag rule
            paused = state_dict.pop(legacy)
            state_dict[prefix + "train_d"] = ~paused.to(torch.bool)
            state_dict[prefix + "train_g"] = torch.ones((), dtype=torch.bool)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
