"""The paper's normalized Euclidean error and the sharpness figure."""

import pytest
import torch

from deepsim.metrics import normalized_error, sharpness_ratio


def test_identical_sets_give_zero():
    x = torch.randn(5, 3, 4, 4)
    assert normalized_error(x, x, x).item() == 0.0


def test_known_pairs():
    # Reference set: 3 points on a line at 0, 1, 3 -> pair distances 1, 3, 2 -> N = 2.
    ref = torch.tensor([[0.0], [1.0], [3.0]])
    a = torch.tensor([[0.0], [0.0]])
    b = torch.tensor([[1.0], [3.0]])  # distances 1 and 3 -> mean 2
    assert normalized_error(a, b, ref).item() == pytest.approx(1.0)
    assert normalized_error(a, b, 4.0).item() == pytest.approx(0.5)


def test_shape_mismatch_and_tiny_reference():
    with pytest.raises(ValueError, match="same shape"):
        normalized_error(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="at least 2"):
        normalized_error(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(1, 3))


def test_sharpness_of_blur_is_below_one():
    x = torch.randn(2, 3, 16, 16)
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)
    assert sharpness_ratio(x, x).item() == pytest.approx(1.0)
    assert sharpness_ratio(blurred, x).item() < 0.5
