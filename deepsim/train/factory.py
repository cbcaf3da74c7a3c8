"""Build the networks, loss and trainer that a :class:`~deepsim.config.TrainConfig` describes."""

from __future__ import annotations

import torch

from deepsim.comparators import Comparator
from deepsim.config import TrainConfig
from deepsim.losses import DeePSiMLoss, PauseRule
from deepsim.networks import AutoencoderGenerator, Discriminator
from deepsim.train.step import DeePSiMTrainer

__all__ = ["build_trainer", "build_discriminator", "trainer_options", "resolve_device", "TASKS"]

TASKS = ("autoencoder", "vae", "invert")


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else is checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def build_loss(config: TrainConfig, discriminator=None) -> DeePSiMLoss:
    comparator = None
    if config.loss == "deepsim" and config.lambda_feat:
        arch = config.comparator.split(":", 1)[0]
        network = discriminator if arch == "discriminator" else None
        comparator = Comparator(config.comparator, weights=config.comparator_weights, network=network)
    return DeePSiMLoss(
        comparator,
        loss=config.loss,
        lambda_feat=config.lambda_feat,
        lambda_adv=config.lambda_adv,
        lambda_img=config.lambda_img,
        image_kind=config.image_distance,
    )


def build_discriminator(config: TrainConfig, feature_dim: int | None = None) -> Discriminator:
    """D as the config describes it (first stride, padding, activation, initialisation; feature branch)."""
    return Discriminator(
        first_stride=config.disc_first_stride, feature_dim=feature_dim, padding=config.disc_padding,
        activation=config.disc_activation, init=config.disc_init,
    )


def trainer_options(config: TrainConfig) -> dict:
    """The :class:`DeePSiMTrainer` keyword arguments of a config: solver, pause rule, precision, update order."""
    return dict(
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        pause=PauseRule(config.pause_d_below, config.pause_d_resume_above, config.pause_g_above),
        precision=config.precision,
        update_order=config.update_order,
        weight_decay=config.weight_decay,
        weight_decay_scope=config.weight_decay_scope,
        lr_milestones=tuple(config.lr_milestones),
        lr_gamma=config.lr_gamma,
    )


def build_trainer(config: TrainConfig, device: torch.device) -> DeePSiMTrainer:
    """Networks initialised from the current RNG state (seed it first), moved to ``device``."""
    if config.task != "autoencoder":
        from deepsim import applications  # the VAE and inversion tasks

        return applications.build_trainer(config, device)
    if config.image_size % 8:
        raise ValueError(f"--image-size {config.image_size}: the autoencoder needs a multiple of 8")
    generator = AutoencoderGenerator(code_channels=config.code_channels)
    needs_d = config.loss == "deepsim" and (config.lambda_adv != 0 or config.comparator.startswith("discriminator"))
    discriminator = build_discriminator(config) if needs_d else None
    loss = build_loss(config, discriminator)
    trainer = DeePSiMTrainer(generator, discriminator, loss, **trainer_options(config))
    return trainer.to(device)
