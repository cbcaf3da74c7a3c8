"""The paper's other applications of DeePSiM: the variational autoencoder and inverting AlexNet.

    deepsim train vae                                     VAE, DeePSiM instead of the reconstruction term
    deepsim sample-vae --checkpoint C --out F.png         decode samples from the prior N(0, I) (training also
                                                          writes <out>/prior_samples.png at its end)
    deepsim train invert --layer conv5|fc6|fc7|fc8        generator from AlexNet features to the image
    deepsim invert --checkpoint C IMAGE... --out DIR      reconstruct images from their features
    deepsim sample-preimages --checkpoint C IMAGE...      pre-images from features + noise (--noise-dim K)

Library entry points: :func:`build_trainer` (the builder :data:`deepsim.tasks.TASKS` holds for
tasks other than "autoencoder"), :func:`load_model`, and the networks in :mod:`.generators`.
"""

from . import factory
from .factory import *  # noqa: F403 - factory.__all__ is part of the package's
from .generators import (
    LAYER_FEATURE_SHAPES,
    InversionGenerator,
    UpConvDecoder,
    VAEEncoder,
    VariationalAutoencoder,
    decoder_side,
    kl_divergence,
)
from .inversion import LAYER_TAPS, FeatureExtractor, InversionTrainer, Inverter
from .tools import invert_files, sample_preimages, sample_vae_prior
from .vae import VAETrainer

__all__ = [
    *factory.__all__,
    "LAYER_FEATURE_SHAPES",
    "LAYER_TAPS",
    "UpConvDecoder",
    "InversionGenerator",
    "VAEEncoder",
    "VariationalAutoencoder",
    "decoder_side",
    "kl_divergence",
    "FeatureExtractor",
    "InversionTrainer",
    "Inverter",
    "VAETrainer",
    "invert_files",
    "sample_preimages",
    "sample_vae_prior",
]
