"""Output shapes of every network against the paper's layouts."""

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


@pytest.mark.parametrize("first_stride,size", [(2, 64), (4, 227)])
def test_discriminator_layout(first_stride, size):
    d = Discriminator(first_stride=first_stride)
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
