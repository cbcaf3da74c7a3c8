"""Inverting AlexNet (PAPER.md, "Inverting AlexNet"): x = Phi(I) from a fixed AlexNet layer, y = I.

The fixed network Phi is a :class:`deepsim.Comparator` tapped at the inverted layer (conv5 -> ``pool5``,
fc6, fc7 -> post-ReLU ``fc6``/``fc7``, fc8 -> the logits), in either layout (torchvision ``alexnet``,
Caffe's ``caffenet``, or their ``-random`` variants), always fed 227x227 images (other sizes are resized
bilinearly first, so the features keep the paper's shapes: (256, 6, 6), 4096, 4096, 1000). It does the
ImageNet mean subtraction itself, from images in [-1, 1].
"""

from __future__ import annotations

import torch
from torch import nn

from deepsim.comparators import Comparator, ComparatorWeightsError
from deepsim.train.step import DeePSiMTrainer

from .generators import LAYER_FEATURE_SHAPES, InversionGenerator

__all__ = ["LAYER_TAPS", "INVERTIBLE_NETWORKS", "FeatureExtractor", "InversionTrainer", "Inverter"]

LAYER_TAPS = {"conv5": "pool5", "fc6": "fc6", "fc7": "fc7", "fc8": "fc8"}  # inverted layer -> comparator tap
INVERTIBLE_NETWORKS = ("alexnet", "caffenet", "alexnet-random", "caffenet-random")
PHI_INPUT_SIZE = 227


class FeatureExtractor(nn.Module):
    """Phi: the fixed AlexNet features of one layer.

    Args:
        network: "alexnet" (torchvision layout, weights from torchvision's cache or ``weights``), "caffenet"
            (Caffe layout, ``weights`` required), or "alexnet-random" / "caffenet-random" (seeded random
            weights).
        layer: conv5 | fc6 | fc7 | fc8.
        weights: a weights file (see :class:`deepsim.Comparator`).

    Forward: images (B, 3, H, W) in [-1, 1] -> conv5: (B, 256, 6, 6); fc6/fc7: (B, 4096); fc8: (B, 1000).
    Always frozen and in eval mode.
    """

    def __init__(self, network: str = "alexnet", layer: str = "fc6", weights: str | None = None):
        super().__init__()
        if network not in INVERTIBLE_NETWORKS:
            raise ValueError(
                f"inverted network {network!r}: expected one of {', '.join(INVERTIBLE_NETWORKS)}"
            )
        if layer not in LAYER_TAPS:
            raise ValueError(f"inverted layer {layer!r}: expected one of {', '.join(LAYER_TAPS)}")
        self.network, self.layer = network, layer
        try:
            self.net = Comparator(
                f"{network}:{LAYER_TAPS[layer]}", weights=weights, input_size=PHI_INPUT_SIZE
            )
        except ComparatorWeightsError as error:
            raise ComparatorWeightsError(
                f"the inverted network Phi: {error} For Phi the flags are --invert-network-weights PATH, or "
                f"--invert-network {network.split('-')[0]}-random for random weights."
            ) from None
        self.shape = LAYER_FEATURE_SHAPES[layer]

    @property
    def flat_dim(self) -> int:
        """Size of the flattened features (the discriminator's feature branch input)."""
        size = 1
        for s in self.shape:
            size *= s
        return size

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        (features,) = self.net(images.float())
        return features if self.layer == "conv5" else features.flatten(1)


class InversionTrainer(DeePSiMTrainer):
    """DeePSiM training of an :class:`InversionGenerator`: G(Phi(I)) ~ I; D also sees Phi(I) (its feature
    branch). Noise (``noise_dim``) is drawn inside the generator, so pre-image samples differ per call."""

    def __init__(
        self, extractor: FeatureExtractor, generator: InversionGenerator, discriminator, loss, **kwargs
    ):
        super().__init__(generator, discriminator, loss, **kwargs)
        self.extractor = extractor

    def prepare(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        features = self.extractor(batch)  # (B, D) or (B, 256, 6, 6), no grad
        condition = features.flatten(1) if self.uses_discriminator else None
        return features, batch, condition

    def generate(self, g_input: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.generator(g_input), {}


class Inverter(nn.Module):
    """A trained inversion: Phi and G together, for reconstruction and pre-image sampling.

    ``reconstruct(images)`` uses noise = 0 (the mean of the noise prior) when G takes noise;
    ``sample(images, n)`` draws n noise vectors per image.
    """

    def __init__(self, extractor: FeatureExtractor, generator: InversionGenerator):
        super().__init__()
        self.extractor, self.generator = extractor, generator

    @property
    def image_size(self) -> int:
        return self.generator.image_size

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> reconstructions (B, 3, image_size, image_size)."""
        features = self.extractor(images)
        noise = self.generator.sample_noise(features.shape[0], device=features.device)
        return self.generator(features, None if noise is None else torch.zeros_like(noise))

    @torch.no_grad()
    def sample(
        self, images: torch.Tensor, n: int, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """n pre-image samples per image: (B, n, 3, image_size, image_size), each from its own noise draw."""
        features = self.extractor(images)
        b = features.shape[0]
        repeated = features.repeat_interleave(n, dim=0)  # (B * n, ...)
        noise = self.generator.sample_noise(b * n, device="cpu", generator=generator)
        if noise is not None:
            noise = noise.to(features.device)
        out = self.generator(repeated, noise)
        return out.view(b, n, *out.shape[1:])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(images)
