"""Generators of the VAE and AlexNet-inversion experiments.

Layouts (PAPER.md, "code" = the derived Caffe code):

* :class:`UpConvDecoder` -- the up-conv stack shared by every inversion generator and the VAE decoder,
  from a (B, C, 4, 4) map to a (B, 3, S, S) image, S = 4 * 2**n. For S = 256 it is the code's stack:

      deconv 4x4/s2 256; conv 3x3 512; deconv 256; conv 256; deconv 128; conv 128; deconv 64; deconv 32;
      deconv 3

  (4 -> 8 -> 16 -> 32 -> 64 -> 128 -> 256; deconvs 4x4, stride 2, padding 1; LReLU 0.3 everywhere but the
  linear last deconv). Smaller outputs keep the first n - 1 stages and the final linear deconv to 3 channels
  (S = 64: 256/512, 256/256, 128/128, then deconv 3): our choice (open), so the VAE can run at 64x64.
  Every layer of the stack is a Caffe Deconvolution in the authors' generators, with its bias fixed at 0
  (lr_mult 0): ``bias="zero"`` (config ``upconv_bias``, the default) or ``"learned"``.
* :class:`InversionGenerator` -- FC6/FC7 (code): FC in -> 4096 -> 4096 -> 4096, reshape 256x4x4, the
  up-conv stack, centre crop (256 -> 227). FC8: the same with 1000 inputs. CONV5: 3x3 convs 512, 512, 512
  (the last unpadded, 6x6 -> 4x4) replace the FC layers. Noise for pre-image sampling is concatenated to
  the feature vector (FC) or added as extra 6x6 channels (CONV5). The authors' released Caffe generators
  load into it with :func:`deepsim.caffe.load_generator` (which lists where the two layouts differ).
* :class:`VariationalAutoencoder` -- a conv encoder to (mean, log-variance) and, as decoder, the FC6
  inversion generator taking the latent (seed: "the VAE decoder is the same network as the fc6 inversion
  generator"). The encoder is ours (open): strided convs 5x5/2 32, 5x5/2 64, 3x3/2 128, 3x3/2 256, (3x3/2
  256 ...) down to 4x4 (sides rounded up: 227 -> 114 -> 57 -> 29 -> 15 -> 8 -> 4), then one linear layer to
  2 * latent_dim. At 227 (preset vae-imagenet) the decoder makes 256x256 and the centre 227 is kept (code).
"""

from __future__ import annotations

import torch
from torch import nn

from deepsim.networks import ConvLReLU, LinearLReLU, UpConvLReLU, msra_init_

__all__ = [
    "LAYER_FEATURE_SHAPES",
    "UpConvDecoder",
    "InversionGenerator",
    "VAEEncoder",
    "VariationalAutoencoder",
    "decoder_side",
    "centre_crop",
    "kl_divergence",
    "code_init_",
]

# (deconv width, conv width or None) of the code's up-conv stages before the final linear deconv to 3.
_UP_STAGES = ((256, 512), (256, 256), (128, 128), (64, None), (32, None))

# What AlexNet gives at a 227x227 input, per inverted layer (both torchvision and CaffeNet layouts).
LAYER_FEATURE_SHAPES = {"conv5": (256, 6, 6), "fc6": (4096,), "fc7": (4096,), "fc8": (1000,)}


def decoder_side(image_size: int) -> int:
    """The up-conv stack's output side for a ``image_size`` target: the smallest 4 * 2**n >= image_size
    (n >= 1): 227 -> 256 (then centre-cropped to 227, code), 64 -> 64. At most 256 (the code's stack)."""
    if not 1 <= image_size <= 256:
        raise ValueError(
            f"image size {image_size}: the up-conv generators produce 8..256 pixels (227 for inversion)"
        )
    side = 8
    while side < image_size:
        side *= 2
    return side


def centre_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size), the centre (offset (H - size) // 2, like the code's crop)."""
    h, w = images.shape[-2:]
    if h == size and w == size:
        return images
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top : top + size, left : left + size]


UPCONV_BIASES = ("zero", "learned")
GENERATOR_INITS = ("code", "torch")
# msra_coeff of the derived code's generator.prototxt: FC layers 1 (defc7, defc6, defc5), 4x4 stride-2
# Deconvolutions 1.8 (deconv5 .. deconv0), 3x3 stride-1 Deconvolutions 0.9 (conv5_1, conv4_1, conv3_1).
_CODE_INIT_COEFFICIENTS = {"fc": 1.0, "up": 1.8, "conv": 0.9, "head_conv": 1.0}


def code_init_(generator: nn.Module) -> None:
    """The derived code's initialisation of an inversion generator, in place: MSRA with the prototxt's
    coefficients (:data:`_CODE_INIT_COEFFICIENTS`, see :func:`deepsim.networks.msra_init_`), zero biases.

    The 3x3 "convN_1" layers are stride-1 Deconvolutions in Caffe, so their fan-in is out_channels * 9 (ours
    are convolutions: the same map, another weight layout). The conv5 generator's Rconv6..8 are Caffe
    Convolutions whose filler the released prototxt does not give: MSRA, coefficient 1 (ours).
    """
    for module in generator.modules():
        if isinstance(module, nn.Linear):
            msra_init_(module, _CODE_INIT_COEFFICIENTS["fc"])
        elif isinstance(module, nn.ConvTranspose2d):
            msra_init_(module, _CODE_INIT_COEFFICIENTS["up"])
    for module in generator.decoder.layers:
        if isinstance(module, nn.Conv2d) and not isinstance(module, nn.ConvTranspose2d):
            msra_init_(module, _CODE_INIT_COEFFICIENTS["conv"], fan_in=module.weight[:, 0].numel())
    for module in generator.head:
        if isinstance(module, nn.Conv2d):
            msra_init_(module, _CODE_INIT_COEFFICIENTS["head_conv"])


class UpConvDecoder(nn.Module):
    """The up-conv stack: (B, in_channels, 4, 4) -> (B, 3, out_side, out_side), out_side = 4 * 2**n <= 256.

    Args:
        in_channels: channels of the 4x4 input map (256 after the FC reshape, 512 after the CONV5 convs).
        out_side: 8, 16, ..., 256; it fixes the number of up-conv stages (n = log2(out_side / 4)).
        bias: "zero" (the authors' generators: every layer of the stack is a Caffe Deconvolution whose bias
            has lr_mult 0 and a constant-0 filler, i.e. fixed at 0) or "learned" (trained biases). Both keep a
            ``bias`` parameter per layer (same state-dict keys, so weights load into either); "zero"
            zeroes it and sets ``requires_grad=False``, so no optimizer or weight decay touches it.
    """

    def __init__(self, in_channels: int = 256, out_side: int = 256, *, bias: str = "learned"):
        super().__init__()
        if bias not in UPCONV_BIASES:
            raise ValueError(f"up-conv bias {bias!r}: expected one of {', '.join(UPCONV_BIASES)}")
        stages = out_side.bit_length() - 3  # log2(out_side / 4)
        if out_side < 8 or out_side > 256 or out_side != 4 << stages:
            raise ValueError(f"UpConvDecoder: out_side must be 4 * 2**n in 8..256, got {out_side}")
        layers: list[nn.Module] = []
        c = in_channels
        for deconv, conv in _UP_STAGES[: stages - 1]:
            layers.append(UpConvLReLU(c, deconv))  # side doubles
            c = deconv
            if conv is not None:
                layers.append(ConvLReLU(c, conv, 3, padding=1))
                c = conv
        layers.append(nn.ConvTranspose2d(c, 3, 4, stride=2, padding=1))  # linear output
        self.layers = nn.Sequential(*layers)
        self.in_channels, self.out_side, self.bias = in_channels, out_side, bias
        if bias == "zero":
            for layer in self.layers:
                with torch.no_grad():
                    layer.bias.zero_()
                layer.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # (B, 3, out_side, out_side)


class InversionGenerator(nn.Module):
    """Generator from AlexNet features (``layer`` conv5|fc6|fc7|fc8) to an image (code, PAPER.md).

    Args:
        layer: the inverted layer; it sets the input shape (``LAYER_FEATURE_SHAPES``) and the first stage.
        image_size: the output side: the up-conv stack produces :func:`decoder_side` (256 for 227) and the
            centre is cropped to ``image_size``.
        noise_dim: K noise values concatenated to the feature vector (FC layers), or K extra 6x6 channels
            (conv5); 0 = no noise (the plain inversion).
        fc_width: width of the first two FC layers (code: 4096; the third always gives 4096 = 256x4x4).
        in_features: override the FC input size (the VAE decoder passes its latent size).
        upconv_bias: "zero" (fixed, the authors' generators) or "learned"; see :class:`UpConvDecoder`.
        init: "code" (the derived code's MSRA fillers, :func:`code_init_`) or "torch" (PyTorch's defaults).

    Forward: features (B, D) or (B, 256, 6, 6), noise (B, K) / (B, K, 6, 6) or None -> (B, 3, S, S).
    """

    def __init__(
        self,
        layer: str = "fc6",
        *,
        image_size: int = 227,
        noise_dim: int = 0,
        fc_width: int = 4096,
        in_features: int | None = None,
        upconv_bias: str = "learned",
        init: str = "torch",
    ):
        super().__init__()
        if layer not in LAYER_FEATURE_SHAPES:
            raise ValueError(f"inverted layer {layer!r}: expected one of {', '.join(LAYER_FEATURE_SHAPES)}")
        self.layer, self.image_size, self.noise_dim = layer, image_size, noise_dim
        self.feature_shape = LAYER_FEATURE_SHAPES[layer] if in_features is None else (in_features,)
        if layer == "conv5":
            channels = self.feature_shape[0] + noise_dim
            self.head = nn.Sequential(
                ConvLReLU(channels, 512, 3, padding=1),  # (B, 512, 6, 6)
                ConvLReLU(512, 512, 3, padding=1),
                ConvLReLU(512, 512, 3, padding=0),  # (B, 512, 4, 4) unpadded
            )
            head_channels = 512
        else:
            inputs = self.feature_shape[0] + noise_dim
            self.head = nn.Sequential(
                LinearLReLU(inputs, fc_width),
                LinearLReLU(fc_width, fc_width),
                LinearLReLU(fc_width, 256 * 4 * 4),
                nn.Unflatten(1, (256, 4, 4)),  # (B, 256, 4, 4)
            )
            head_channels = 256
        self.decoder = UpConvDecoder(head_channels, decoder_side(image_size), bias=upconv_bias)
        if init not in GENERATOR_INITS:
            raise ValueError(f"generator init {init!r}: expected one of {', '.join(GENERATOR_INITS)}")
        if init == "code":
            code_init_(self)

    def code_decayed_parameters(self) -> list[nn.Parameter]:
        """The parameters the authors' generator.prototxt decays (decay_mult 1): the weights of the conv5
        generator's three convs (Rconv6..8); every other parameter has decay_mult 0."""
        if self.layer != "conv5":
            return []
        return [m.weight for m in self.head if isinstance(m, nn.Conv2d)]

    def sample_noise(
        self, batch: int, *, device=None, generator: torch.Generator | None = None
    ) -> torch.Tensor | None:
        """Standard normal noise of this generator's noise shape for ``batch`` samples (None when K = 0)."""
        if not self.noise_dim:
            return None
        shape = (batch, self.noise_dim) + ((6, 6) if self.layer == "conv5" else ())
        return torch.randn(shape, device=device, generator=generator)

    def forward(self, features: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        expected = self.feature_shape
        if tuple(features.shape[1:]) != tuple(expected):
            raise ValueError(
                f"InversionGenerator({self.layer}): features of shape {tuple(features.shape)}, expected (B, "
                f"{', '.join(map(str, expected))})"
            )
        if self.noise_dim:
            if noise is None:
                noise = self.sample_noise(features.shape[0], device=features.device)
            features = torch.cat([features, noise.to(features.dtype)], dim=1)
        image = self.decoder(self.head(features))  # (B, 3, S, S)
        return centre_crop(image, self.image_size)  # (B, 3, image_size, image_size)


class VAEEncoder(nn.Module):
    """Strided convs down to at most 4x4 (widths 32, 64, 128, 256, 256, ...), flatten, linear to (mean,
    log-variance).

    Our layout (open). Each conv (5x5 for the first two, then 3x3, padding k // 2, stride 2) halves the side,
    rounding up: 64 -> 32 -> 16 -> 8 -> 4; 227 -> 114 -> 57 -> 29 -> 15 -> 8 -> 4.
    Input (B, 3, S, S), 8 <= S <= 256 -> (mu, logvar), each (B, latent_dim).
    """

    def __init__(self, image_size: int = 64, latent_dim: int = 4096):
        super().__init__()
        if not 8 <= image_size <= 256:
            raise ValueError(
                f"VAE image size {image_size}: expected 8..256 (the decoder makes at most 256x256)"
            )
        layers: list[nn.Module] = []
        c, side, index = 3, image_size, 0
        while side > 4:
            width = min(32 << index, 256)
            kernel = 5 if index < 2 else 3
            layers.append(ConvLReLU(c, width, kernel, stride=2, padding=kernel // 2))
            c, side, index = width, (side + 1) // 2, index + 1
        self.convs = nn.Sequential(*layers)  # (B, c, side, side), side <= 4
        self.to_moments = nn.Linear(c * side * side, 2 * latent_dim)  # linear: mean and log-variance
        self.image_size, self.latent_dim = image_size, latent_dim

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(
                f"VAEEncoder: images of shape {tuple(images.shape)}, expected (B, 3, {self.image_size}, "
                f"{self.image_size})"
            )
        moments = self.to_moments(self.convs(images).flatten(1))  # (B, 2 * latent)
        mu, logvar = moments.chunk(2, dim=1)
        return mu, logvar


class VariationalAutoencoder(nn.Module):
    """Encoder to (mu, logvar); decoder = the FC6 inversion generator taking the latent (seed).

    ``forward(x)`` returns (reconstruction, mu, logvar) with z = mu + exp(logvar / 2) * eps in training mode
    and z = mu in eval mode. ``decode(z)`` maps latents (B, latent_dim) to images (B, 3, S, S).
    """

    def __init__(
        self,
        image_size: int = 64,
        latent_dim: int = 4096,
        fc_width: int = 4096,
        *,
        upconv_bias: str = "learned",
        init: str = "torch",
    ):
        super().__init__()
        self.encoder = VAEEncoder(image_size, latent_dim)  # ours: PyTorch's initialisation
        self.decoder = InversionGenerator(
            "fc6",
            image_size=image_size,
            fc_width=fc_width,
            in_features=latent_dim,
            upconv_bias=upconv_bias,
            init=init,
        )
        self.image_size, self.latent_dim = image_size, latent_dim

    def code_decayed_parameters(self) -> list[nn.Parameter]:
        """None: the decoder is the fc6 generator (decay_mult 0 throughout); the encoder follows it (open)."""
        return []

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(images)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return mu
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(images)
        return self.decode(self.reparameterize(mu, logvar)), mu, logvar

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images decoded from the prior N(0, I): (n, 3, S, S)."""
        device = next(self.parameters()).device
        z = torch.randn(
            n, self.latent_dim, generator=generator, device=generator.device if generator else device
        )
        return self.decode(z.to(device))


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over the latent, averaged over the batch (the house scale
    convention): 1/B sum_i 0.5 * sum_j (mu^2 + exp(logvar) - 1 - logvar)."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum() / mu.shape[0]
