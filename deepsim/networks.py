"""DeePSiM networks: LReLU(0.3) conv blocks, the autoencoder generator and the discriminator.

Every generator ends in a linear layer; every other layer is followed by LReLU with alpha = 0.3 (seed).
The discriminator can use plain ReLU instead (the derived code's D; ``activation="relu"``, alpha 0), and
has the derived code's unpadded layout and MSRA initialisation (:class:`Discriminator`). The conv blocks call
the fused ops of :mod:`deepsim.kernels` (Triton on CUDA, the PyTorch reference
elsewhere; see ``DEEPSIM_KERNELS``), so a block is one kernel instead of conv + bias + activation.
"""

from __future__ import annotations

import math

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
    "msra_init_",
    "pad_input_channels",
]

LRELU_ALPHA = 0.3


class _ZeroPaddedWeight(torch.autograd.Function):
    """``padded`` (the weight with zero input channels appended) in the forward; the backward keeps the
    gradient of the weight's own channels: d/dW conv(x, [W, 0]) = (d/dW' conv(x, W'))[:, :C_in]."""

    @staticmethod
    def forward(ctx, weight, padded):
        ctx.channels = weight.shape[1]
        return padded

    @staticmethod
    def backward(ctx, grad):
        return grad[:, : ctx.channels], None


def pad_input_channels(weight: torch.Tensor, channels: int, cache: dict | None = None) -> torch.Tensor:
    """(O, C, k, k) -> (O, channels, k, k) with zero weights for channels C.., differentiable w.r.t.
    ``weight``.

    With ``cache`` (a dict the caller keeps), the padded copy is made once per parameter version (an optimizer
    step or a load bumps ``weight._version``) and reused until then; under torch.compile it is a plain pad
    (the compiled graph fuses it).
    """
    extra = channels - weight.shape[1]
    if extra == 0:
        return weight
    if cache is None or torch.compiler.is_compiling():
        return F.pad(weight, (0, 0, 0, 0, 0, extra))
    key = (weight._version, weight.data_ptr(), channels, weight.dtype, weight.device)
    if cache.get("key") != key:
        cache["key"], cache["padded"] = key, F.pad(weight.detach(), (0, 0, 0, 0, 0, extra))
    return _ZeroPaddedWeight.apply(weight, cache["padded"])


class ConvLReLU(nn.Conv2d):
    """Conv2d + bias + LReLU(alpha) as one fused op. Square kernels, one stride and padding.

    An input with more channels than ``in_channels`` (a loader's ``pad_channels=4`` or 8 batch, whose pixels
    a kernel streams as 8 or 16 bytes) meets a weight padded with zeros to match (:func:`pad_input_channels`):
    the output and the weight's gradient are those of the first ``in_channels`` channels.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, alpha=LRELU_ALPHA):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self.alpha = alpha
        self._padded_weight: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if x.ndim == 4 and x.shape[1] > self.in_channels:
            weight = pad_input_channels(weight, x.shape[1], self._padded_weight)
        return conv_lrelu(x, weight, self.bias, self.stride[0], self.padding[0], self.alpha)

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
    x may also be a loader's zero-padded (B, 4 or 8, H, W) batch (:class:`ConvLReLU`); the output is the same.
    """

    # Channels the first conv is fed per pixel. 4 or 8: the training loop asks its loader for zero-padded
    # batches (8- or 16-byte bf16 pixels, which a kernel can copy asynchronously); 3: plain RGB batches.
    input_channels: int = 3

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
            raise ValueError(
                f"AutoencoderGenerator needs H and W divisible by 8, got input of shape {tuple(x.shape)}"
            )
        return self.encoder(x)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return self.decoder(code)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def msra_init_(layer: nn.Module, coefficient: float = 1.0, fan_in: int | None = None) -> None:
    """Caffe's "msra" filler with the derived code's ``msra_coeff``, and a zero bias, in place.

    weight ~ N(0, std^2), std = coefficient * sqrt(2 / fan_in). Caffe's MSRAFiller (variance_norm FAN_IN)
    takes fan_in = blob count / blob shape[0]: in_channels * k * k for a conv, in_features for an FC layer and
    out_channels * k * k for a Deconvolution (whose blob is (in, out, k, k), like a ConvTranspose2d weight);
    that is ``weight[0].numel()`` here unless ``fan_in`` is given. Our reading of the coefficient
    (open; the fork of Caffe that defines ``msra_coeff`` is not public): it multiplies the standard deviation,
    as the ``msra_coeff`` argument of the same first author's later TensorFlow code does
    (stddev = msra_coeff * sqrt(2 / fan_in)); on the variance it would be sqrt(0.1) = 0.32 instead of 0.1.
    """
    fan_in = layer.weight[0].numel() if fan_in is None else fan_in
    with torch.no_grad():
        layer.weight.normal_(0.0, coefficient * math.sqrt(2.0 / fan_in))
        if layer.bias is not None:
            layer.bias.zero_()


# The derived code's discriminator.prototxt: msra_coeff 0.1 on Dconv1, Dfc6 (our fc1) and Dfc7 (our fc2).
DISC_MSRA_COEFFICIENTS = {"conv1": 0.1, "fc1": 0.1, "fc2": 0.1}
DISC_PADDINGS = ("code", "padded")
DISC_ACTIVATIONS = {"lrelu": LRELU_ALPHA, "relu": 0.0}
DISC_INITS = ("code", "torch")


class Discriminator(nn.Module):
    """Five convs with occasional stride, global average pooling, two FC layers, a 2-way output (logits;
    the softmax is in the loss), dropout 0.5 after the pooling and after the first FC (seed, code).

    Derived code: conv 7x7/s4 32, 5x5/s1 64, 3x3/s2 128, 3x3/s1 256, 3x3/s2 256, avg pool, FC 256, FC 2;
    the autoencoder version uses first stride 2 (seed). For inversion, ``feature_dim`` adds the feature
    branch (seed; the derived code feeds D no features): the inverted features go through FC 1024 and FC 512
    and are concatenated with the pooled output.

    Args:
        first_stride: 4 for 227x227 inputs (code), 2 for the 64x64 autoencoder (seed).
        feature_dim: size of the flattened features of the feature branch (None: no branch).
        dropout: dropout probability after the pooling and after fc1.
        padding: "code" (the derived code's unpadded convs: 227 -> 56 -> 52 -> 25 -> 23 -> 11 with first
            stride 4; 64 -> 29 -> 25 -> 12 -> 10 -> 4 with first stride 2; the average pool covers the last
            map, 11x11 in the code) or "padded" (every conv padded by k // 2: 227 -> 57 -> 57 -> 29 -> 29 ->
            15,
            64 -> 32 -> 32 -> 16 -> 16 -> 8).
        activation: "lrelu" (LReLU 0.3, the seed: "in all networks") or "relu" (the derived code's D).
        init: "code" (MSRA, coefficient 0.1 on conv1, fc1, fc2 and 1 elsewhere, zero biases; see
            :func:`msra_init_`) or "torch" (PyTorch's default initialisation).

    Shapes: image (B, 3, H, W), features (B, feature_dim) -> logits (B, 2); index 1 means "real".
    """

    conv_names = ("conv1", "conv2", "conv3", "conv4", "conv5")
    # (kernel, stride after the first) of conv1..conv5 (code)
    _layout = ((7, None), (5, 1), (3, 2), (3, 1), (3, 2))

    def __init__(
        self,
        first_stride: int = 2,
        feature_dim: int | None = None,
        dropout: float = 0.5,
        *,
        padding: str = "code",
        activation: str = "lrelu",
        init: str = "code",
    ):
        super().__init__()
        if padding not in DISC_PADDINGS:
            raise ValueError(f"discriminator padding {padding!r}: expected one of {', '.join(DISC_PADDINGS)}")
        if activation not in DISC_ACTIVATIONS:
            raise ValueError(
                f"discriminator activation {activation!r}: expected one of {', '.join(DISC_ACTIVATIONS)}"
            )
        if init not in DISC_INITS:
            raise ValueError(f"discriminator init {init!r}: expected one of {', '.join(DISC_INITS)}")
        self.padding_mode, self.activation, self.init = padding, activation, init
        alpha = DISC_ACTIVATIONS[activation]
        widths = (32, 64, 128, 256, 256)
        in_channels = 3
        for name, (kernel, stride), width in zip(self.conv_names, self._layout, widths):
            stride = first_stride if stride is None else stride
            pad = kernel // 2 if padding == "padded" else 0
            setattr(
                self, name, ConvLReLU(in_channels, width, kernel, stride=stride, padding=pad, alpha=alpha)
            )
            in_channels = width
        self.feature_dim = feature_dim
        if feature_dim:
            self.feature_branch = nn.Sequential(
                LinearLReLU(feature_dim, 1024, alpha=alpha), LinearLReLU(1024, 512, alpha=alpha)
            )
        pooled = 256 + (512 if feature_dim else 0)
        self.drop1 = nn.Dropout(dropout)
        self.fc1 = LinearLReLU(pooled, 256, alpha=alpha)
        self.drop2 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(256, 2)
        self.min_size = self._min_input_size()
        if init == "code":
            for name, layer in self.named_modules():
                if isinstance(layer, (nn.Conv2d, nn.Linear)):
                    msra_init_(layer, DISC_MSRA_COEFFICIENTS.get(name, 1.0))

    def _min_input_size(self) -> int:
        """The smallest input side for which every conv output is at least 1 pixel."""
        side = 1
        for name in reversed(self.conv_names):
            conv = getattr(self, name)
            side = (side - 1) * conv.stride[0] + conv.kernel_size[0] - 2 * conv.padding[0]
        return max(side, 1)

    def code_decayed_parameters(self) -> list[nn.Parameter]:
        """The parameters the derived code decays (decay_mult 1): all of D's."""
        return list(self.parameters())

    def conv_features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The five post-activation conv maps (used by the "discriminator" comparator)."""
        self._check_size(image)
        taps = []
        h = image
        for name in self.conv_names:
            h = getattr(self, name)(h)
            taps.append(h)
        return taps

    def _check_size(self, image: torch.Tensor) -> None:
        if min(image.shape[-2:]) < self.min_size:
            raise ValueError(
                f"Discriminator (padding {self.padding_mode!r}, first stride {self.conv1.stride[0]}) needs "
                "images of "
                f"at least {self.min_size}x{self.min_size} pixels, got {tuple(image.shape)}; use a larger "
                f"--image-size or --disc-padding padded"
            )

    def forward(self, image: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv_features(image)[-1]
        h = h.mean(dim=(2, 3))  # (B, 256) global average pooling (the code's 11x11 average pool at 227)
        if self.feature_dim:
            if features is None:
                raise ValueError("this Discriminator has a feature branch: pass the inverted features too")
            h = torch.cat([h, self.feature_branch(features.flatten(1))], dim=1)  # (B, 768)
        h = self.fc1(self.drop1(h))
        return self.fc2(self.drop2(h))  # (B, 2) logits
