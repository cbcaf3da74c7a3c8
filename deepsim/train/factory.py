"""Build the networks, loss and trainer that a :class:`~deepsim.config.TrainConfig` describes.

Which builder makes which task's trainer is a table handed in (``tasks``), not imported: this module knows
the autoencoder; the VAE and inversion builders live in :mod:`deepsim.applications`, above this layer, and
:data:`deepsim.tasks.TASKS` is the one table with every task (what ``deepsim train`` hands to
:func:`deepsim.train.loop.train`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from deepsim.comparators import Comparator, uses_network
from deepsim.config import TrainConfig
from deepsim.losses import DeePSiMLoss, PauseRule
from deepsim.networks import AutoencoderGenerator, Discriminator
from deepsim.train.distributed import resolve_device
from deepsim.train.step import DeePSiMTrainer

__all__ = [
    "build_trainer",
    "build_autoencoder_trainer",
    "build_loss",
    "build_discriminator",
    "needs_discriminator",
    "trainer_options",
    "resolve_device",
    "TrainerBuilder",
    "AUTOENCODER_TASKS",
]

TrainerBuilder = Callable[[TrainConfig, torch.device], DeePSiMTrainer]


def build_loss(config: TrainConfig, discriminator=None) -> DeePSiMLoss:
    """The loss of ``config``; ``discriminator`` is handed to a comparator that borrows its features."""
    comparator = None
    if config.loss == "deepsim" and config.lambda_feat and config.feature_metric == "squared":
        comparator = Comparator(config.comparator, weights=config.comparator_weights, network=discriminator)
    return DeePSiMLoss(
        comparator,
        loss=config.loss,
        lambda_feat=config.lambda_feat,
        lambda_adv=config.lambda_adv,
        lambda_img=config.lambda_img,
        image_kind=config.image_distance,
        feature_metric=config.feature_metric,
    )


def needs_discriminator(config: TrainConfig) -> bool:
    """A DeePSiM loss with an adversarial term, or with a comparator that borrows D's features
    (:func:`deepsim.comparators.uses_network`), trains a discriminator."""
    return config.loss == "deepsim" and (config.lambda_adv != 0 or uses_network(config.comparator))


def build_discriminator(config: TrainConfig, feature_dim: int | None = None) -> Discriminator:
    """D as the config describes it (first stride, padding, activation, initialisation; feature branch)."""
    return Discriminator(
        first_stride=config.disc_first_stride,
        feature_dim=feature_dim,
        padding=config.disc_padding,
        activation=config.disc_activation,
        init=config.disc_init,
    )


def trainer_options(config: TrainConfig) -> dict:
    """The :class:`DeePSiMTrainer` keyword arguments of a config: solver, pause rule, precision, update
    order."""
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


def build_autoencoder_trainer(config: TrainConfig, device: torch.device) -> DeePSiMTrainer:
    """The autoencoder's trainer; networks initialised from the current RNG state (seed it first)."""
    if config.image_size % 8:
        raise ValueError(f"--image-size {config.image_size}: the autoencoder needs a multiple of 8")
    generator = AutoencoderGenerator(code_channels=config.code_channels)
    discriminator = build_discriminator(config) if needs_discriminator(config) else None
    loss = build_loss(config, discriminator)
    trainer = DeePSiMTrainer(generator, discriminator, loss, **trainer_options(config))
    return trainer.to(device)


AUTOENCODER_TASKS: dict[str, TrainerBuilder] = {"autoencoder": build_autoencoder_trainer}


def build_trainer(
    config: TrainConfig, device: torch.device, tasks: Mapping[str, TrainerBuilder] | None = None
) -> DeePSiMTrainer:
    """The trainer of ``config.task``, made by the builder the task table ``tasks`` holds for it.

    Args:
        config: the run's config; networks are initialised from the current RNG state (seed it first).
        device: where the trainer lives.
        tasks: task name -> builder. None: :data:`AUTOENCODER_TASKS` (this layer's own); pass
            :data:`deepsim.tasks.TASKS` for the VAE and inversion too.

    Raises:
        ValueError: the table has no builder for ``config.task`` (lists the tasks it has).
    """
    table = AUTOENCODER_TASKS if tasks is None else tasks
    if config.task not in table:
        raise ValueError(
            f"task {config.task!r}: the task table handed to build_trainer has {', '.join(sorted(table))}; "
            "deepsim.tasks.TASKS holds every task (autoencoder, vae, invert)"
        )
    return table[config.task](config, device)
