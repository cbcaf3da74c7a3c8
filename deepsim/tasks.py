"""The task table: which builder makes the trainer of each ``TrainConfig.task``.

It sits above both :mod:`deepsim.train` (the autoencoder, and the loop that takes a table) and
:mod:`deepsim.applications` (the VAE and AlexNet inversion), so neither imports the other for it: the CLI
hands this table to :func:`deepsim.train.loop.train`; a library user does the same::

    from deepsim import get_preset
    from deepsim.tasks import TASKS
    from deepsim.train.loop import train
    train(get_preset("vae-photos"), tasks=TASKS)
"""

from __future__ import annotations

from deepsim.applications import build_trainer as build_application_trainer
from deepsim.train.factory import AUTOENCODER_TASKS, TrainerBuilder

__all__ = ["TASKS"]

TASKS: dict[str, TrainerBuilder] = {
    **AUTOENCODER_TASKS,
    "vae": build_application_trainer,
    "invert": build_application_trainer,
}
