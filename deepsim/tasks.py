"""The task table: what each ``TrainConfig.task`` is, in one place.

Each :class:`Task` names its trainer builder, its default preset, its data preprocessing and what runs after
training. The table sits above both :mod:`deepsim.train` (the autoencoder, and the loop that takes a table)
and :mod:`deepsim.applications` (the VAE and AlexNet inversion), so neither imports the other for it: the CLI
hands :data:`TASKS` (task -> builder) to :func:`deepsim.train.loop.train`; a library user does the same::

    from deepsim import get_preset
    from deepsim.tasks import TASKS
    from deepsim.train.loop import train
    train(get_preset("vae-photos"), tasks=TASKS)

Which ``deepsim train`` flags apply to a task is a fact of each config field (``deepsim.config.field_info``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import torch

from deepsim.applications import build_trainer as build_application_trainer
from deepsim.applications.factory import build_generator
from deepsim.applications.generators import LAYER_FEATURE_SHAPES
from deepsim.applications.inversion import INVERTIBLE_NETWORKS
from deepsim.applications.tools import sample_vae_prior
from deepsim.comparators import ARCHITECTURES, ComparatorWeightsError, parse_spec, torchvision_weights_path
from deepsim.config import TrainConfig, get_preset
from deepsim.train.factory import AUTOENCODER_TASKS, TrainerBuilder, build_discriminator

__all__ = [
    "TASKS",
    "TASK_TABLE",
    "Task",
    "data_mode",
    "default_preset",
    "crop_size",
    "resize_side",
    "RESIZE_SIDE",
    "with_random_weights",
    "missing_weights",
    "check_weights",
    "checkpoint_bytes",
]


def _vae_prior_samples(checkpoint: Path, out: Path, config: TrainConfig) -> str:
    path = sample_vae_prior(checkpoint, out / "prior_samples.png", device=config.device)
    return f"prior samples: {path}"


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of the table.

    Attributes:
        name: the ``TrainConfig.task`` value (and ``deepsim train`` positional).
        build: makes its trainer: ``build(config, device) -> DeePSiMTrainer``.
        preset: the preset ``deepsim train <name>`` starts from.
        summary: one line for the CLI's help.
        resize: ImageNet preprocessing (shorter side to 256, then the crop) instead of a plain crop.
        after: run after training on rank 0 as ``after(checkpoint, out, config)``; returns a line to print.
    """

    name: str
    build: TrainerBuilder
    preset: str
    summary: str
    resize: bool = False
    after: Callable[[Path, Path, TrainConfig], str] | None = None


TASK_TABLE: dict[str, Task] = {
    "autoencoder": Task(
        "autoencoder",
        AUTOENCODER_TASKS["autoencoder"],
        "autoencoder-photos",
        "the autoencoder: image -> 8-channel code -> image (default: the bundled photos)",
    ),
    "invert": Task(
        "invert",
        build_application_trainer,
        "invert-fc6",
        "invert AlexNet: features of --layer conv5|fc6|fc7|fc8 -> image (preset invert-<layer>)",
        resize=True,
    ),
    "vae": Task(
        "vae",
        build_application_trainer,
        "vae-photos",
        "the variational autoencoder with the DeePSiM loss; writes <out>/prior_samples.png at the end",
        after=_vae_prior_samples,
    ),
}
TASKS: dict[str, TrainerBuilder] = {name: task.build for name, task in TASK_TABLE.items()}


def default_preset(task: str, layer: str | None = None) -> str:
    """The preset of ``deepsim train <task>`` (``invert --layer L``: ``invert-L``)."""
    return f"invert-{layer}" if task == "invert" and layer else TASK_TABLE[task].preset


def data_mode(config: TrainConfig) -> str:
    """The training loader's mode: ``"resize-crop"`` (ImageNet preprocessing, code: shorter side to 256) for
    the inversion and for 227x227 crops (vae-imagenet), else ``"crop"``."""
    task = TASK_TABLE.get(config.task)
    return "resize-crop" if (task is not None and task.resize) or config.image_size == 227 else "crop"


def crop_size(task: str) -> int:
    """The training crop side of a task's default preset (what ``data check --task`` checks against)."""
    return get_preset(TASK_TABLE[task].preset).image_size


RESIZE_SIDE = 256  # the shorter side in the resize modes: deepsim.data.build_loader's resize_size (code)


def resize_side(task: str) -> int | None:
    """The shorter side a task's images are resized to before the crop, or None (cropped as they are)."""
    return RESIZE_SIDE if TASK_TABLE[task].resize else None


# ------------------------------------------------------------------------------------------- weights
def with_random_weights(config: TrainConfig) -> tuple[TrainConfig, str]:
    """The offline run: every comparator and the inverted network take random weights (``<arch>-random``).

    Returns:
        (the config, a note naming what changed).

    Raises:
        ValueError: a weights file is given as well, or an architecture has no random variant.
    """
    for flag, path in (
        ("--comparator-weights", config.comparator_weights),
        ("--invert-network-weights", config.invert_network_weights),
    ):
        if path:
            raise ValueError(f"--random-weights and {flag} {path}: choose one")
    arch, rest = config.comparator.split(":", 1)
    if ARCHITECTURES.get(arch, (None, ""))[1] in ("torchvision", "file"):
        if f"{arch}-random" not in ARCHITECTURES:
            raise ValueError(
                f"--random-weights: comparator {arch!r} has no random variant; pass --comparator"
            )
        arch = f"{arch}-random"
    changes = {"comparator": f"{arch}:{rest}"}
    network = config.invert_network
    if config.task == "invert" and not network.endswith("-random"):
        network = f"{network}-random"
        if network not in INVERTIBLE_NETWORKS:
            raise ValueError(
                f"--random-weights: inverted network {config.invert_network!r} has no random variant"
            )
        changes["invert_network"] = network
    config = config.replace(**changes)
    note = f"random weights (--random-weights): comparator {config.comparator}"
    if config.task == "invert":
        note += f", inverted network {config.invert_network}"
    return config, note


def _uses_comparator(config: TrainConfig) -> bool:
    return config.loss == "deepsim" and bool(config.lambda_feat) and config.feature_metric == "squared"


def missing_weights(config: TrainConfig) -> list[str]:
    """What the run needs and does not have: one entry per network whose trained weights are neither given
    nor in torchvision's cache, each naming the flag that provides them."""
    needs = []
    wanted = []
    if _uses_comparator(config):
        wanted.append(
            (
                "comparator",
                parse_spec(config.comparator)[0],
                config.comparator_weights,
                "--comparator-weights",
            )
        )
    if config.task == "invert":
        wanted.append(
            (
                "inverted network",
                config.invert_network,
                config.invert_network_weights,
                "--invert-network-weights",
            )
        )
    for what, arch, weights, flag in wanted:
        kind = ARCHITECTURES.get(arch, (None, "random"))[1]
        if weights or kind in ("random", "network"):
            continue
        if kind == "torchvision":
            path = torchvision_weights_path(arch)
            if not path.is_file():
                needs.append(f"{what} {arch}: {flag} PATH or --download-weights (into {path})")
        else:
            needs.append(f"{what} {arch}: {flag} PATH")
    return needs


def check_weights(config: TrainConfig, downloads: bool) -> None:
    """Raise one :class:`ComparatorWeightsError` listing every missing weights file (see
    :func:`missing_weights`) and the flags that provide them, unless ``downloads`` fetches the torchvision
    ones."""
    needs = [n for n in missing_weights(config) if not (downloads and "--download-weights" in n)]
    if needs:
        raise ComparatorWeightsError(
            f"this {config.task} run needs trained weights it does not have: {'; '.join(needs)}. "
            "Or add --random-weights to run offline with random weights"
        )


# ------------------------------------------------------------------------------------------- disk use
def _needs_discriminator(config: TrainConfig) -> bool:
    return config.loss == "deepsim" and (
        config.lambda_adv != 0 or config.comparator.startswith("discriminator")
    )


def checkpoint_bytes(config: TrainConfig) -> int:
    """An estimate of one checkpoint's size: G's and D's state (fp32) plus Adam's two moments per trained
    parameter. The networks are built on the meta device (no memory, no weights read)."""
    with torch.device("meta"):
        networks = [build_generator(config)]
        if _needs_discriminator(config):
            feature_dim = (
                math.prod(LAYER_FEATURE_SHAPES[config.invert_layer]) if config.task == "invert" else None
            )
            networks.append(build_discriminator(config, feature_dim))
    total = 0
    for net in networks:
        total += sum(t.numel() * t.element_size() for t in net.state_dict().values())
        total += sum(2 * p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
    return total
