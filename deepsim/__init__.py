"""DeePSiM: generating images with perceptual similarity metrics based on deep networks.

Dosovitskiy & Brox, 2016. The loss is
``lambda_feat * ||C(G(x)) - C(y)||^2 + lambda_adv * L_adv + lambda_img * ||G(x) - y||^2`` with a comparator
network C and a discriminator D trained alongside the generator G.

Public API::

    import deepsim
    comparator = deepsim.Comparator("alexnet:conv3")
    loss = deepsim.DeePSiMLoss(comparator)          # the paper's three terms (needs D's logits)
    distance = deepsim.PerceptualLoss(comparator)   # the feature term alone, like lpips
    generator = deepsim.load_generator("G.safetensors")   # a `deepsim export` file, checkpoint or run folder
"""

from deepsim.comparators import Comparator
from deepsim.config import PRESETS, TrainConfig, get_preset
from deepsim.export import load_generator
from deepsim.losses import DeePSiMLoss, PauseRule
from deepsim.perceptual import PerceptualLoss

__version__ = "0.1.0"

__all__ = [
    "Comparator",
    "DeePSiMLoss",
    "PerceptualLoss",
    "PauseRule",
    "TrainConfig",
    "PRESETS",
    "get_preset",
    "load_generator",
    "__version__",
]
