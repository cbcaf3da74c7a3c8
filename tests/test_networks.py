"""Output shapes of every network against the paper's layouts."""

import math

import pytest
import torch

from deepsim.networks import LRELU_ALPHA, AutoencoderGenerator, ConvLReLU, Discriminator, UpConvLReLU


def test_autoencoder_code_is_8_channels_8x_smaller():
    g = AutoencoderGenerator()
    x = torch.randn(2, 3, 64, 64)
    code = g.encode(x)
    assert code.shape == (2, 8, 8, 8)
    assert g(x).shape == x.shape


def test_autoencoder_ends_linear_and_uses_lrelu_03():
    g = AutoencoderGenerator()
    assert type(g.decoder[-1]) is torch.nn.ConvTranspose2d  # linear output, no activation
    assert type(g.encoder[-1]) is torch.nn.Conv2d  # linear code
    blocks = [m for m in g.modules() if isinstance(m, (ConvLReLU, UpConvLReLU))]
    assert blocks and all(b.alpha == LRELU_ALPHA == 0.3 for b in blocks)


def test_autoencoder_rejects_size_not_divisible_by_8():
    with pytest.raises(ValueError, match="divisible by 8"):
        AutoencoderGenerator().encode(torch.randn(1, 3, 60, 60))


@pytest.mark.parametrize("padding", ["code", "padded"])
@pytest.mark.parametrize("first_stride,size", [(2, 64), (4, 227)])
def test_discriminator_layout(first_stride, size, padding):
    d = Discriminator(first_stride=first_stride, padding=padding)
    strides = [getattr(d, n).stride[0] for n in d.conv_names]
    widths = [getattr(d, n).out_channels for n in d.conv_names]
    kernels = [getattr(d, n).kernel_size[0] for n in d.conv_names]
    assert strides == [first_stride, 1, 2, 1, 2]
    assert widths == [32, 64, 128, 256, 256]
    assert kernels == [7, 5, 3, 3, 3]
    assert d.fc1.out_features == 256 and d.fc2.out_features == 2
    assert d(torch.randn(3, 3, size, size)).shape == (3, 2)


def test_discriminator_feature_branch():
    d = Discriminator(first_stride=4, feature_dim=4096)
    assert [m.out_features for m in d.feature_branch] == [1024, 512]
    assert d.fc1.in_features == 256 + 512
    assert d(torch.randn(2, 3, 227, 227), torch.randn(2, 4096)).shape == (2, 2)
    with pytest.raises(ValueError, match="feature branch"):
        d(torch.randn(2, 3, 227, 227))


def test_discriminator_dropout_only_in_training():
    d = Discriminator()
    x = torch.randn(4, 3, 64, 64)
    d.eval()
    assert torch.equal(d(x), d(x))
    assert d.drop1.p == 0.5 and d.drop2.p == 0.5


# Conv map sides before the average pool: the derived code's unpadded convs and the padded layout.
MAP_SIDES = {
    ("code", 4, 227): [56, 52, 25, 23, 11],  # discriminator.prototxt, 11x11 average pool
    ("code", 2, 64): [29, 25, 12, 10, 4],
    ("padded", 4, 227): [57, 57, 29, 29, 15],
    ("padded", 2, 64): [32, 32, 16, 16, 8],
}


@pytest.mark.parametrize("padding,first_stride,size", list(MAP_SIDES))
def test_discriminator_map_sizes(padding, first_stride, size):
    d = Discriminator(first_stride=first_stride, padding=padding)
    taps = d.conv_features(torch.randn(1, 3, size, size))
    assert [t.shape[-1] for t in taps] == MAP_SIDES[padding, first_stride, size]
    assert [getattr(d, n).padding[0] for n in d.conv_names] == (
        [0] * 5 if padding == "code" else [3, 2, 1, 1, 1]
    )


def test_code_discriminator_names_its_smallest_input():
    d = Discriminator(first_stride=2)
    assert d.min_size == 35
    d(torch.randn(1, 3, 35, 35))
    with pytest.raises(ValueError, match="at least 35x35 .*--disc-padding padded"):
        d(torch.randn(1, 3, 32, 32))
    assert Discriminator(first_stride=4).min_size == 63


def test_discriminator_relu_and_lrelu():
    relu, lrelu = Discriminator(activation="relu"), Discriminator()
    assert {m.alpha for m in relu.modules() if hasattr(m, "alpha")} == {0.0}
    assert {m.alpha for m in lrelu.modules() if hasattr(m, "alpha")} == {LRELU_ALPHA}
    x = torch.randn(2, 3, 64, 64)
    assert (relu.conv_features(x)[0] >= 0).all() and (lrelu.conv_features(x)[0] < 0).any()
    with pytest.raises(ValueError, match="activation 'tanh'"):
        Discriminator(activation="tanh")


def test_discriminator_code_init_is_msra_with_the_prototxt_coefficients():
    torch.manual_seed(0)
    d = Discriminator(first_stride=4, feature_dim=64, init="code")
    for name, layer in d.named_modules():
        if not isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
            continue
        coefficient = 0.1 if name in ("conv1", "fc1", "fc2") else 1.0
        fan_in = layer.weight[0].numel()  # in_channels * k * k, or in_features
        expected = coefficient * math.sqrt(2.0 / fan_in)
        measured = layer.weight.std().item()
        tolerance = 0.35 if layer.weight.numel() < 1000 else 0.08  # fc2 has 512 weights
        assert abs(measured / expected - 1) < tolerance, (name, measured, expected)
        assert abs(layer.weight.mean().item()) < 3 * expected / math.sqrt(layer.weight.numel()) + 1e-9, name
        assert torch.count_nonzero(layer.bias) == 0, name
    torch.manual_seed(0)
    default = Discriminator(first_stride=4, init="torch")
    assert torch.count_nonzero(default.conv1.bias) > 0  # PyTorch's uniform bias init
