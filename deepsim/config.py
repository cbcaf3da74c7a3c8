"""Experiment configuration: one dataclass with a comment per field, and a table of named presets.

Every preset names where its values come from (PAPER.md: "seed" = the paper summary, "code" = the public
Caffe code derived from the authors' training script, "open" = our choice, documented here).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

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
    invert_network: str = "alexnet"  # inversion: the fixed network Phi: alexnet|caffenet|alexnet-random|caffenet-random
    invert_network_weights: str | None = None  # inversion: Phi's weights file (None: torchvision cache / random)
    fc_width: int = 4096  # inversion and VAE generators: width of the FC layers before the 256x4x4 reshape (code)
    latent_dim: int = 4096  # VAE: size of the latent vector (open; 4096 = the fc6 input the decoder copies)
    lambda_kl: float = 1.0  # VAE: weight of the KL term, a per-sample sum like every other term (open)

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
    on_bad: str = "error"  # a corrupt or too-small image: "error" (name it and stop), "skip" (count it), "pad"
    mirror: bool = True  # random horizontal mirror (the derived code does not mirror)

    # --- running
    out: str = "runs/deepsim"  # output folder: checkpoints, metrics.jsonl, sample grids
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    seed: int = 0
    precision: str = "fp32"  # "fp32" | "tf32" | "bf16"
    compile: str = "off"  # "off" | "default" | "max-autotune" | "reduce-overhead"
    channels_last: bool = False  # G, D, C weights and the batches in channels_last (NHWC) memory format
    log_every: int = 10  # read metrics from the device every N steps (the only host syncs)
    sample_every: int = 200  # write a PNG grid of inputs beside reconstructions every N steps
    checkpoint_every: int = 500  # write a checkpoint every N steps (and at the end)
    keep_checkpoints: int = 2  # checkpoints kept in out: checkpoint.pt and the K-1 before it (a corrupt one falls back)
    stop_signals: str = "SIGTERM,SIGINT,SIGUSR1"  # finish the step, checkpoint, exit 75 ("" = none; deepsim.train.preemption)

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
    # Loss weights and learning rate (open, measured here): with the derived code's lambda_adv = 100 the
    # adversarial term outweighs the others on 64x64 crops and G reconstructs nothing in the first 300 steps
    # (seen on the bundled photos); lambda_adv = 1, lambda_feat = 0.5 (the random-AlexNet conv3 term then starts
    # at about a third of the image term) and lr 1e-3 give recognisable reconstructions within 100-200 steps.
    "autoencoder-photos": _preset(
        steps=600, batch_size=32, lr=1e-3, lambda_adv=1.0, lambda_feat=0.5,
        log_every=10, sample_every=100, checkpoint_every=200, out="runs/autoencoder-photos",
    ),
    # The paper's autoencoder experiments (seed): STL-10 unlabeled (data="stl10_binary": the STL-10 binary folder,
    # pass --data PATH elsewhere), random 64x64 crops, an 8-channel code 8x smaller (8x8x8), batch 64, Adam
    # 2e-4, 500k steps, D with first stride 2. The four losses compared (seed): SE, l1, DeePSiM with AlexNet
    # CONV3, DeePSiM with Exemplar-CNN CONV3. DeePSiM weights: the derived code's (inversion script:
    # feat 0.01, img 2e-6, adv 100 in Caffe's convention, converted by CAFFE_TO_DEEPSIM); the autoencoder's
    # own weights are not published (open). AlexNet = torchvision's layout (the paper used Caffe's: pass
    # --comparator caffenet:conv3 --comparator-weights FILE); Exemplar-CNN needs --comparator-weights FILE.
    "autoencoder-stl10-se": _preset(loss="se", data="stl10_binary", out="runs/ae-se"),
    "autoencoder-stl10-l1": _preset(loss="l1", data="stl10_binary", out="runs/ae-l1"),
    "autoencoder-stl10-alexnet": _preset(comparator="alexnet:conv3", data="stl10_binary", out="runs/ae-alexnet"),
    "autoencoder-stl10-exemplar": _preset(comparator="exemplar:conv3", data="stl10_binary", out="runs/ae-exemplar"),
    # The VAE (seed: DeePSiM replaces the reconstruction term; the decoder is the fc6 inversion generator).
    # Open, our choices: 64x64 images (the decoder's up-conv stack then has 4 stages, 4 -> 64, instead of 6),
    # the conv encoder of deepsim.applications.generators.VAEEncoder, latent 4096 (the fc6 size the decoder
    # copies), lambda_kl 1 (a per-sample KL sum, like every other term), STL-10 unlabeled as for the
    # autoencoder, the autoencoder's comparator AlexNet CONV3 and D (first stride 2); DeePSiM weights: code.
    "vae-stl10": _preset(
        task="vae", image_size=64, latent_dim=4096, lambda_kl=1.0, comparator="alexnet:conv3", data="stl10_binary",
        out="runs/vae-stl10",
    ),
    # The VAE quickstart (the default of `deepsim train vae`): bundled photos, random-weight AlexNet (as the
    # autoencoder quickstart), a small latent and FC width so that it runs on a laptop CPU (open).
    "vae-photos": _preset(
        task="vae", image_size=64, latent_dim=256, fc_width=1024, batch_size=16, steps=400, log_every=10,
        sample_every=100, checkpoint_every=200, out="runs/vae-photos",
    ),
}


def _invert_preset(layer: str) -> TrainConfig:
    # Inverting AlexNet (seed, code): ILSVRC-2012 train (data="imagenet/train": a folder of its JPEGs, pass
    # --data PATH), 227x227 crops after resizing the shorter side to 256, generator output 256 cropped to 227,
    # D with first stride 4 and the feature branch, comparator pool5 (code; torchvision's AlexNet layout, the
    # code used CaffeNet: --comparator caffenet:pool5 --comparator-weights FILE), Phi = the same AlexNet
    # (--invert-network caffenet --invert-network-weights FILE for CaffeNet), weights feat 0.01, img 2e-6,
    # adv 100 in Caffe's convention (code), batch 64, Adam 2e-4 (seed), 500k steps (seed: 500k to 1M).
    # Ablations (seed): --lambda-adv 0 (no D is built), --lambda-img 0, --lambda-feat 0.
    return _preset(
        task="invert", invert_layer=layer, invert_network="alexnet", image_size=227, disc_first_stride=4,
        comparator="alexnet:pool5", batch_size=64, lambda_feat=0.01 * CAFFE_TO_DEEPSIM["feat"], lambda_adv=100.0,
        lambda_img=2e-6 * CAFFE_TO_DEEPSIM["img"], data="imagenet/train", out=f"runs/invert-{layer}",
    )


PRESETS.update({f"invert-{layer}": _invert_preset(layer) for layer in ("conv5", "fc6", "fc7", "fc8")})


def get_preset(name: str) -> TrainConfig:
    """A copy of a named preset; an unknown name lists the valid ones."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return dataclasses.replace(PRESETS[name])
