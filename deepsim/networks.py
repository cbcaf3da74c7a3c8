"""DeePSiM networks: LReLU(0.3) conv blocks, the autoencoder generator and the discriminator.

Every generator ends in a linear layer; every other layer is followed by LReLU with alpha = 0.3 (seed).
The conv blocks call the fused ops of :mod:`deepsim.kernels` (Triton on CUDA, the PyTorch reference
elsewhere; see ``DEEPSIM_KERNELS``), so a block is one kernel instead of conv + bias + activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepsim.kernels import conv_lrelu, conv_transpose_lrelu

__all__ = [
    "LRELU_ALPHA",
    "ConvLReLU",
    "UpConvLReLU",
    "LinearLReLU",
    "AutoencoderGenerator",
    "Discriminator",
]

LRELU_ALPHA = 0.3


class ConvLReLU(nn.Conv2d):
    """Conv2d + bias + LReLU(alpha) as one fused op. Square kernels, one stride and padding."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, alpha=LRELU_ALPHA):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_lrelu(x, self.weight, self.bias, self.stride[0], self.padding[0], self.alpha)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", alpha={self.alpha}"


class UpConvLReLU(nn.ConvTranspose2d):
    """ConvTranspose2d + bias + LReLU(alpha) as one fused op (the paper's "up-conv")."""

    def __init__(self, in_channels, out_channels, kernel_size=4, stride=2, padding=1, alpha=LRELU_ALPHA):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_transpose_lrelu(x, self.weight, self.bias, self.stride[0], self.padding[0], self.alpha)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", alpha={self.alpha}"


class LinearLReLU(nn.Linear):
    """Linear + LReLU(alpha)."""

    def __init__(self, in_features, out_features, alpha=LRELU_ALPHA):
        super().__init__(in_features, out_features)
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(super().forward(x), self.alpha)


class AutoencoderGenerator(nn.Module):
    """The paper's autoencoder: strided convs down to an 8-channel code 8x smaller than the input, up-convs
    back to the image (seed). All layers are conv or up-conv; the code layer and the output are linear.

    Layer widths and kernel sizes are not given in the seed (open): encoder 5x5/2 32, 5x5/2 64, 3x3/2 128,
    3x3 code; decoder 3x3 128, then three 4x4/2 up-convs (64, 32, 3) with a 3x3 conv after the first two.

    Shapes: x (B, 3, H, W) with H, W divisible by 8 -> code (B, code_channels, H/8, W/8) -> (B, 3, H, W).
    """

    def __init__(self, code_channels: int = 8, width: int = 32):
        super().__init__()
        w = width
        self.encoder = nn.Sequential(
            ConvLReLU(3, w, 5, stride=2, padding=2),  # (B, 32, H/2, W/2)
            ConvLReLU(w, 2 * w, 5, stride=2, padding=2),  # (B, 64, H/4, W/4)
            ConvLReLU(2 * w, 4 * w, 3, stride=2, padding=1),  # (B, 128, H/8, W/8)
            nn.Conv2d(4 * w, code_channels, 3, padding=1),  # (B, 8, H/8, W/8) linear code
        )
        self.decoder = nn.Sequential(
            ConvLReLU(code_channels, 4 * w, 3, padding=1),  # (B, 128, H/8, W/8)
            UpConvLReLU(4 * w, 2 * w),  # (B, 64, H/4, W/4)
            ConvLReLU(2 * w, 2 * w, 3, padding=1),
            UpConvLReLU(2 * w, w),  # (B, 32, H/2, W/2)
            ConvLReLU(w, w, 3, padding=1),
            nn.ConvTranspose2d(w, 3, 4, stride=2, padding=1),  # (B, 3, H, W) linear output
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 8 or x.shape[-2] % 8:
            raise ValueError(f"AutoencoderGenerator needs H and W divisible by 8, got input of shape {tuple(x.shape)}")
        return self.encoder(x)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return self.decoder(code)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


class Discriminator(nn.Module):
    """Five convs with occasional stride, global average pooling, two FC layers, a 2-way output (logits;
    the softmax is in the loss), dropout 0.5 after the pooling and after the first FC (seed, code).

    Derived code: conv 7x7/s4 32, 5x5/s1 64, 3x3/s2 128, 3x3/s1 256, 3x3/s2 256, avg pool, FC 256, FC 2;
    the autoencoder version uses first stride 2 (seed). For inversion, ``feature_dim`` adds the feature
    branch: the inverted features go through FC 1024 and FC 512 and are concatenated with the pooled output.

    Shapes: image (B, 3, H, W), features (B, feature_dim) -> logits (B, 2); index 1 means "real".
    """

    conv_names = ("conv1", "conv2", "conv3", "conv4", "conv5")

    def __init__(self, first_stride: int = 2, feature_dim: int | None = None, dropout: float = 0.5):
        super().__init__()
        self.conv1 = ConvLReLU(3, 32, 7, stride=first_stride, padding=3)
        self.conv2 = ConvLReLU(32, 64, 5, stride=1, padding=2)
        self.conv3 = ConvLReLU(64, 128, 3, stride=2, padding=1)
        self.conv4 = ConvLReLU(128, 256, 3, stride=1, padding=1)
        self.conv5 = ConvLReLU(256, 256, 3, stride=2, padding=1)
        self.feature_dim = feature_dim
        if feature_dim:
            self.feature_branch = nn.Sequential(LinearLReLU(feature_dim, 1024), LinearLReLU(1024, 512))
        pooled = 256 + (512 if feature_dim else 0)
        self.drop1 = nn.Dropout(dropout)
        self.fc1 = LinearLReLU(pooled, 256)
        self.drop2 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(256, 2)

    def conv_features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The five post-LReLU conv maps (used by the "discriminator" comparator)."""
        taps = []
        h = image
        for name in self.conv_names:
            h = getattr(self, name)(h)
            taps.append(h)
        return taps

    def forward(self, image: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        h = image
        for name in self.conv_names:
            h = getattr(self, name)(h)
        h = h.mean(dim=(2, 3))  # (B, 256) global average pooling
        if self.feature_dim:
            if features is None:
                raise ValueError("this Discriminator has a feature branch: pass the inverted features too")
            h = torch.cat([h, self.feature_branch(features.flatten(1))], dim=1)  # (B, 768)
        h = self.fc1(self.drop1(h))
        return self.fc2(self.drop2(h))  # (B, 2) logits
