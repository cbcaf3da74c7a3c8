"""Experiment configuration: one dataclass with a comment per field, and a table of named presets.

Every preset names where its values come from (PAPER.md: "seed" = the paper summary, "code" = the public
Caffe code derived from the authors' training script, "open" = our choice, documented here).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = ["TrainConfig", "PRESETS", "get_preset", "CAFFE_TO_DEEPSIM"]

# Scale convention (written once, used everywhere): every loss term is a per-sample SUM over its elements,
# averaged over the batch, on images in [-1, 1]. Caffe's EuclideanLoss is sum / (2N) on 0..255 pixels, so a
# Caffe weight converts as: lambda_img = caffe * 127.5**2 / 2 (pixels), lambda_feat = caffe / 2 (comparator
# features are computed on the comparator's own input scale, identical to Caffe's), lambda_adv unchanged
# (both are batch-mean softmax cross-entropies).
CAFFE_TO_DEEPSIM = {"img": 127.5**2 / 2, "feat": 0.5, "adv": 1.0}


@dataclass
class TrainConfig:
    """Everything a training run needs; a preset is one of these, CLI flags override fields."""

    # --- what is trained
    task: str = "autoencoder"  # "autoencoder" | "vae" | "invert"
    image_size: int = 64  # side of the training crop fed to G and D (autoencoder: 64, inversion: 227)
    code_channels: int = 8  # autoencoder code: an 8-channel map 8x smaller than the input (seed)
    invert_layer: str = "fc6"  # inversion: which AlexNet layer is inverted (conv5|fc6|fc7|fc8)
    noise_dim: int = 0  # inversion: noise channels injected beside the features (pre-image sampling)
    latent_dim: int = 4096  # VAE: size of the latent vector (open)
    lambda_kl: float = 1.0  # VAE: weight of the KL term (open)

    # --- the loss
    loss: str = "deepsim"  # "deepsim" | "se" | "l1": DeePSiM or an image-space baseline
    comparator: str = "alexnet-random:conv3"  # "<arch>:<tap>[=w][,<tap>[=w]...]"; see deepsim.Comparator
    comparator_weights: str | None = None  # weights file for the comparator (None: torchvision cache / random)
    lambda_feat: float = 0.01 * CAFFE_TO_DEEPSIM["feat"]  # code: 0.01 in Caffe's convention
    lambda_adv: float = 100.0  # code
    lambda_img: float = 2e-6 * CAFFE_TO_DEEPSIM["img"]  # code: 2e-6 in Caffe's convention
    image_distance: str = "se"  # the image term of DeePSiM: "se" (paper) or "l1"
    pause_d_below: float = 0.1  # code: r = (L_D_real + L_D_fake) / L_adv < 0.1 stops D
    pause_d_resume_above: float = 0.5  # code: r > 0.5 resumes D
    pause_g_above: float = 10.0  # code: r > 10 stops G
    disc_first_stride: int = 2  # discriminator's first conv stride: 2 for 64x64 (seed), 4 for 227x227 (code)

    # --- optimisation (seed: Adam, lr 2e-4, betas 0.9/0.999, batch 64)
    lr: float = 2e-4
    beta1: float = 0.9
    beta2: float = 0.999
    batch_size: int = 64
    steps: int = 500_000  # seed: 500k to 1M iterations

    # --- data
    data: str = "photos"  # "photos" (bundled), a folder of images, or an STL-10 binary folder
    loader: str = "torch"  # "torch" | "dali"
    num_workers: int = 0  # DataLoader workers on the torch path

    # --- running
    out: str = "runs/deepsim"  # output folder: checkpoints, metrics.jsonl, sample grids
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    seed: int = 0
    precision: str = "fp32"  # "fp32" | "tf32" | "bf16"
    compile: str = "off"  # "off" | "default" | "max-autotune" | "reduce-overhead"
    log_every: int = 10  # read metrics from the device every N steps (the only host syncs)
    sample_every: int = 200  # write a PNG grid of inputs beside reconstructions every N steps
    checkpoint_every: int = 500  # write a checkpoint every N steps (and at the end)

    def replace(self, **changes) -> TrainConfig:
        """A copy with some fields changed; unknown names raise a TypeError naming them."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def _preset(**kw) -> TrainConfig:
    return TrainConfig(**kw)


PRESETS: dict[str, TrainConfig] = {
    # The quickstart: the bundled photos on 2 CPU cores in a few minutes. Comparator: AlexNet with random
    # weights (the paper's comparator 3), since trained weights cannot be downloaded on every machine;
    # pass --comparator alexnet:conv3 with torchvision's AlexNet weights in the cache for the paper's setup.
    "autoencoder-photos": _preset(
        steps=600, batch_size=32, log_every=10, sample_every=100, checkpoint_every=200, out="runs/autoencoder-photos"
    ),
    # The paper's autoencoder experiments (seed): STL-10 unlabeled, 64x64 crops, batch 64.
    "autoencoder-stl10-se": _preset(loss="se", data="stl10", out="runs/ae-se"),
    "autoencoder-stl10-l1": _preset(loss="l1", data="stl10", out="runs/ae-l1"),
    "autoencoder-stl10-alexnet": _preset(comparator="alexnet:conv3", data="stl10", out="runs/ae-alexnet"),
    "autoencoder-stl10-exemplar": _preset(comparator="exemplar:conv3", data="stl10", out="runs/ae-exemplar"),
}


def get_preset(name: str) -> TrainConfig:
    """A copy of a named preset; an unknown name lists the valid ones."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return dataclasses.replace(PRESETS[name])
