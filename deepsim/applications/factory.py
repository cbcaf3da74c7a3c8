"""Build the VAE and inversion trainers from a :class:`~deepsim.config.TrainConfig`, and load their trained
models back from a checkpoint (``payload["trainer"]["generator"]``, config in ``payload["config"]``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from deepsim.config import TrainConfig
from deepsim.networks import AutoencoderGenerator
from deepsim.train.checkpoint import CheckpointError, load_checkpoint
from deepsim.train.factory import build_discriminator, build_loss, needs_discriminator, trainer_options
from deepsim.train.step import DeePSiMTrainer

from .generators import InversionGenerator, VariationalAutoencoder
from .inversion import FeatureExtractor, InversionTrainer, Inverter
from .vae import VAETrainer

__all__ = [
    "APPLICATION_TASKS",
    "build_trainer",
    "build_generator",
    "build_extractor",
    "load_model",
    "model_from_payload",
]

APPLICATION_TASKS = ("vae", "invert")


def build_extractor(config: TrainConfig) -> FeatureExtractor:
    """Phi for an inversion config (network, layer, weights file)."""
    return FeatureExtractor(config.invert_network, config.invert_layer, config.invert_network_weights)


def build_generator(config: TrainConfig) -> nn.Module:
    """The trained network of a config: InversionGenerator (invert), VariationalAutoencoder (vae), or
    AutoencoderGenerator (autoencoder). Initialised from the current RNG state."""
    if config.task == "invert":
        return InversionGenerator(
            config.invert_layer,
            image_size=config.image_size,
            noise_dim=config.noise_dim,
            fc_width=config.fc_width,
            upconv_bias=config.upconv_bias,
            init=config.gen_init,
        )
    if config.task == "vae":
        return VariationalAutoencoder(
            config.image_size,
            config.latent_dim,
            config.fc_width,
            upconv_bias=config.upconv_bias,
            init=config.gen_init,
        )
    if config.task == "autoencoder":
        return AutoencoderGenerator(code_channels=config.code_channels)
    raise ValueError(f"task {config.task!r}: expected autoencoder, vae or invert")


def _check_weights(config: TrainConfig) -> None:
    if config.loss == "deepsim" and not (config.lambda_feat or config.lambda_adv or config.lambda_img):
        raise ValueError(
            "--lambda-feat, --lambda-adv and --lambda-img are all 0: the generator has no loss to train on "
            "(keep at least one term, or use --loss se / l1)"
        )


def build_trainer(config: TrainConfig, device: torch.device) -> DeePSiMTrainer:
    """The trainer of a "vae" or "invert" config, on ``device``; networks initialised from the current RNG.

    A zero adversarial weight (``--lambda-adv 0``, the paper's ablation) builds no discriminator; a zero
    feature weight builds no comparator.
    """
    if config.task not in APPLICATION_TASKS:
        raise ValueError(
            f"deepsim.applications builds tasks {', '.join(APPLICATION_TASKS)}, not {config.task!r}"
        )
    _check_weights(config)
    generator = build_generator(config)
    needs_d = needs_discriminator(config)
    extractor = None
    if config.task == "invert":
        extractor = build_extractor(config)
        discriminator = build_discriminator(config, extractor.flat_dim) if needs_d else None
    else:
        discriminator = build_discriminator(config) if needs_d else None
    loss = build_loss(config, discriminator)
    common = trainer_options(config)
    if config.task == "invert":
        trainer = InversionTrainer(extractor, generator, discriminator, loss, **common)
    else:
        trainer = VAETrainer(generator, discriminator, loss, lambda_kl=config.lambda_kl, **common)
    return trainer.to(device)


def model_from_payload(
    payload: dict, device: str | torch.device = "cpu", source: str = "checkpoint"
) -> tuple[nn.Module, TrainConfig]:
    """:func:`load_model` on an already-read checkpoint payload (``source`` names it in errors)."""
    config = TrainConfig.from_dict(payload["config"])
    if not isinstance(payload.get("trainer"), dict) or "generator" not in payload["trainer"]:
        raise CheckpointError(f"{source} holds no trained generator (payload['trainer']['generator'])")
    generator = build_generator(config)
    try:
        generator.load_state_dict(payload["trainer"]["generator"])
    except (RuntimeError, TypeError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise CheckpointError(
            f"{source} does not fit the {config.task!r} generator: {' '.join(lines[:3])}"
        ) from None
    model = Inverter(build_extractor(config), generator) if config.task == "invert" else generator
    return model.to(device).eval(), config


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig]:
    """The trained model of a checkpoint (or its folder), in eval mode, and the run's config.

    Returns an :class:`Inverter` (Phi + G) for "invert", a :class:`VariationalAutoencoder` for "vae",
    an :class:`~deepsim.networks.AutoencoderGenerator` for "autoencoder".
    """
    return model_from_payload(load_checkpoint(checkpoint), device, f"checkpoint {checkpoint}")
