"""deepsim.PerceptualLoss (the feature term alone) and DeePSiMLoss's contract without D."""

import importlib.util
import warnings

import pytest
import torch

import deepsim
from deepsim.losses import DeePSiMLoss

SPEC = "alexnet-random:conv2,conv3=0.5"


def _images(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) * 2 - 1


def test_reductions_agree_with_deepsim_feature_term():
    x, y = _images(3, 3, 64, 64), _images(3, 3, 64, 64, seed=1)
    per_image = deepsim.PerceptualLoss(SPEC, reduction="none")(x, y)
    assert per_image.shape == (3,) and (per_image > 0).all()
    torch.testing.assert_close(
        deepsim.PerceptualLoss(SPEC, reduction="sum")(x, y), per_image.sum(), rtol=1e-5, atol=0
    )
    mean = deepsim.PerceptualLoss(SPEC)(x, y)
    torch.testing.assert_close(mean, per_image.mean(), rtol=1e-5, atol=0)
    feat = DeePSiMLoss(SPEC, lambda_adv=0).feature_loss(x, y)
    torch.testing.assert_close(mean, feat, rtol=1e-6, atol=0)
    one = deepsim.PerceptualLoss(SPEC, reduction="none")(x[1:2], y[1:2])
    torch.testing.assert_close(one, per_image[1:2], rtol=1e-5, atol=0)  # per image: independent of the batch


def test_normalize_takes_unit_range_inputs():
    x, y = _images(2, 3, 64, 64), _images(2, 3, 64, 64, seed=1)
    a = deepsim.PerceptualLoss(SPEC, reduction="none")(x, y)
    b = deepsim.PerceptualLoss(SPEC, reduction="none", normalize=True)((x + 1) / 2, (y + 1) / 2)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradients_flow_to_each_side_that_needs_them():
    x = _images(2, 3, 64, 64).requires_grad_()
    y = _images(2, 3, 64, 64, seed=1).requires_grad_()
    deepsim.PerceptualLoss(SPEC)(x, y).backward()
    assert x.grad is not None and y.grad is not None and x.grad.abs().sum() > 0 and y.grad.abs().sum() > 0


def test_validation_and_range_warning():
    loss = deepsim.PerceptualLoss(SPEC)
    with pytest.raises(ValueError, match=r"^x: expected a 4-D batch \(B, 3, H, W\), got shape \(3, 64, 64\)"):
        loss(_images(3, 64, 64), _images(3, 64, 64))
    with pytest.raises(ValueError, match=r"^y: expected 3 \(RGB\) channels"):
        loss(_images(2, 3, 64, 64), _images(2, 1, 64, 64))
    with pytest.raises(
        ValueError, match=r"^x: images of 8x8 are smaller than this comparator's minimum side 31"
    ):
        loss(_images(2, 3, 8, 8), _images(2, 3, 8, 8))
    with pytest.warns(
        UserWarning,
        match=r"x spans \[.*\], far outside the declared \[-1, 1\] \(normalize=False\); .*normalize=True",
    ):
        value = loss((_images(2, 3, 64, 64) + 1) * 127.5, _images(2, 3, 64, 64))
    assert torch.isfinite(value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss((_images(2, 3, 64, 64) + 1) * 127.5, _images(2, 3, 64, 64))  # warned once already
    with pytest.raises(ValueError, match="reduction='batch', expected 'mean', 'sum' or 'none'"):
        deepsim.PerceptualLoss(SPEC, reduction="batch")


def test_deepsim_loss_needs_logits_unless_lambda_adv_zero():
    x = _images(2, 3, 64, 64)
    with pytest.raises(
        ValueError, match=r"needs the discriminator's logits .*lambda_adv=0.*deepsim.PerceptualLoss"
    ):
        DeePSiMLoss(SPEC)(x, x)
    assert DeePSiMLoss(SPEC, lambda_adv=0)(x, x).total.item() == 0.0
    assert "Usable alone" not in DeePSiMLoss.__doc__ and "unless ``lambda_adv=0``" in DeePSiMLoss.__doc__


@pytest.mark.skipif(
    importlib.util.find_spec("lpips") is None, reason="LPIPS' lin weights come with the lpips package"
)
def test_deepsim_loss_lpips_feature_metric():
    from deepsim.metrics import LPIPS

    metric = LPIPS("alex", backbone_weights="random")
    loss = DeePSiMLoss(metric, feature_metric="lpips", lambda_adv=0, lambda_img=0, lambda_feat=1.0)
    fake = _images(2, 3, 64, 64).requires_grad_()
    real = _images(2, 3, 64, 64, seed=1)
    out = loss(fake, real)
    torch.testing.assert_close(out.feat, metric(fake, real).mean(), rtol=1e-6, atol=0)
    out.total.backward()
    assert torch.isfinite(fake.grad).all() and fake.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="feature_metric='lpips' takes comparator=None"):
        DeePSiMLoss(SPEC, feature_metric="lpips")


def test_config_feature_metric_reaches_the_loss(tmp_path, monkeypatch):
    from deepsim.comparators import ComparatorWeightsError
    from deepsim.config import TrainConfig
    from deepsim.train.factory import build_loss

    assert build_loss(TrainConfig()).feature_metric == "squared"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no torchvision AlexNet: LPIPS' backbone is asked for
    with pytest.raises((ComparatorWeightsError, FileNotFoundError), match="alexnet-owt-7be5be79.pth|lpips"):
        build_loss(TrainConfig(feature_metric="lpips"))
