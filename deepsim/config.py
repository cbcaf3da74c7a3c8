"""Experiment configuration: one dataclass with a comment per field, and a table of named presets.

Every preset names where its values come from (PAPER.md: "seed" = the paper summary, "code" = the public
Caffe code derived from the authors' training script, "open" = our choice, documented here).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = [
    "TrainConfig", "PRESETS", "get_preset", "CAFFE_TO_DEEPSIM", "LEGACY_VALUES", "DEFAULT_SOURCES", "PRESET_SOURCES",
    "value_sources",
]

# Scale convention (written once, used everywhere): every loss term is a per-sample SUM over its elements,
# averaged over the batch, on images in [-1, 1]. Caffe's EuclideanLoss is sum / (2N) on 0..255 pixels, so a
# Caffe weight converts as: lambda_img = caffe * 127.5**2 / 2 (pixels), lambda_feat = caffe / 2 (the 1/2 of
# EuclideanLoss only; the features are compared on the comparator's own input scale), lambda_adv unchanged
# (both are batch-mean softmax cross-entropies).
# lambda_feat: the converted 0.01 carries the code's weight over exactly for CaffeNet fed Caffe's input (BGR,
# 0..255, mean subtracted), which our "caffenet" comparator reproduces. torchvision's AlexNet is NOT that
# network: its input is ImageNet-std-normalised [0, 1] (one pixel level is 1 / (255 * 0.226), about 58x smaller
# than Caffe's unit) and its weights were trained separately, so its feature distances have another size and
# lambda_feat = 0.005 is not calibrated for it. `deepsim calibrate` measures the factor (deepsim.calibrate).
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
    feature_metric: str = "squared"  # feature term: "squared" (paper) or "lpips" (ours: LPIPS alex, comparator unused)
    pause_d_below: float = 0.1  # code: r = (L_D_real + L_D_fake) / L_adv < 0.1 stops D
    pause_d_resume_above: float = 0.5  # code: r > 0.5 resumes D
    pause_g_above: float = 10.0  # code: r > 10 stops G
    disc_first_stride: int = 2  # discriminator's first conv stride: 2 for 64x64 (seed), 4 for 227x227 (code)

    # --- training as the authors trained: the derived Caffe code's dynamics (README "Differences from the
    # paper and the derived code"; defaults = the code, the other value = our earlier behaviour or the seed)
    update_order: str = "code"  # "code": D steps first, G's L_adv (and r) from the updated D | "simultaneous"
    disc_padding: str = "code"  # D convs "code": unpadded (227: 56-52-25-23-11; 64: 29-25-12-10-4) | "padded"
    disc_activation: str = "lrelu"  # D: "lrelu" (seed: LReLU 0.3 in all networks) | "relu" (the code's D)
    disc_init: str = "code"  # D: "code" (MSRA, coefficient 0.1 on conv1/fc1/fc2, zero biases) | "torch"
    upconv_bias: str = "zero"  # inversion/VAE up-conv stack: "zero" (code: fixed 0, lr_mult 0) | "learned"
    gen_init: str = "code"  # inversion/VAE decoder: "code" (MSRA, 1.8 on 4x4 deconvs, 0.9 on 3x3) | "torch"
    weight_decay: float = 4e-4  # code: the solver's L2 weight decay, added to the gradient before Adam (coupled)
    weight_decay_scope: str = "code"  # "code": the prototxts' decay_mult (all of D; of G only conv5's convs) | "all"
    lr_milestones: tuple[int, ...] = (300_000, 500_000, 700_000, 900_000, 1_100_000)  # code: multistep policy
    lr_gamma: float = 0.5  # code: the lr is multiplied by gamma at each milestone (each network's own step count)
    mirror: bool = False  # random horizontal mirroring of training crops (code: none; loaders: deepsim.data)

    # --- optimisation (seed: Adam, lr 2e-4, betas 0.9/0.999, batch 64)
    lr: float = 2e-4
    beta1: float = 0.9
    beta2: float = 0.999
    batch_size: int = 64
    steps: int = 500_000  # seed: 500k to 1M iterations

    # --- data
    data: str = "photos"  # "photos" (bundled), a folder of images, or an STL-10 binary folder
    loader: str = "auto"  # "auto" | "torch" | "dali" | "nvjpeg" | "resident" (auto: deepsim.train.auto)
    num_workers: int = 0  # DataLoader workers on the torch path
    on_bad: str = "error"  # a corrupt or too-small image: "error" (name it and stop), "skip" (count it), "pad"
    max_image_pixels: int = 8192 * 8192  # more: a bad image, refused from its header (deepsim.data.images)

    # --- running
    out: str = "runs/deepsim"  # output folder: checkpoints, metrics.jsonl, sample grids
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    seed: int = 0
    precision: str = "auto"  # "auto" | "fp32" | "tf32" | "bf16" (auto: bf16 on CUDA, fp32 on the CPU)
    compile: str = "auto"  # "auto" | "off" | "default" | "max-autotune" | "reduce-overhead" (auto: CUDA graphs on CUDA)
    channels_last: bool | str = "auto"  # G, D, C and the batches in NHWC memory format; "auto": on CUDA only
    log_every: int = 10  # read metrics from the device every N steps (the only host syncs)
    sample_every: int = 200  # write a PNG grid of inputs beside reconstructions every N steps
    checkpoint_every: int = 500  # write a checkpoint every N steps (and at the end)
    tensorboard: bool | str = "auto"  # TensorBoard event files beside metrics.jsonl; "auto": when installed
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
        """A config from its ``to_dict`` form (e.g. a checkpoint's). Fields the dict lacks (a checkpoint
        written before they existed) take :data:`LEGACY_VALUES`, the behaviour of that earlier code, so an old
        run resumes or loads as it was trained; others take the defaults. Unknown keys are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        values = {**{k: v for k, v in LEGACY_VALUES.items() if k not in values}, **values}
        if "lr_milestones" in values:
            values["lr_milestones"] = tuple(int(m) for m in values["lr_milestones"])  # JSON gives a list
        return cls(**values)


# What the code did before a field existed (for configs saved then, see TrainConfig.from_dict).
LEGACY_VALUES = {
    "update_order": "simultaneous",
    "disc_padding": "padded",
    "disc_activation": "lrelu",
    "disc_init": "torch",
    "upconv_bias": "learned",
    "gen_init": "torch",
    "weight_decay": 0.0,
    "lr_milestones": (),
    "mirror": True,
}


def _preset(**kw) -> TrainConfig:
    return TrainConfig(**kw)


# Presets set what an experiment is (task, data, loss, weights, schedule). They leave the runtime fields
# (compile, precision, loader, channels_last, tensorboard) at "auto", which deepsim.train.auto resolves per
# device; a preset that sets one of them explicitly wins over "auto", and a CLI flag wins over the preset.
PRESETS: dict[str, TrainConfig] = {
    # The quickstart: the bundled photos on 2 CPU cores in a few minutes. Comparator: AlexNet with random
    # weights (the paper's comparator 3), since trained weights cannot be downloaded on every machine;
    # pass --comparator alexnet:conv3 with torchvision's AlexNet weights in the cache for the paper's setup.
    # Loss weights and learning rate (open, measured here): with the derived code's lambda_adv = 100 the
    # adversarial term outweighs the others on 64x64 crops and G reconstructs nothing in the first 300 steps
    # (seen on the bundled photos); lambda_adv = 1, lambda_feat = 0.5 (the random-AlexNet conv3 term then starts
    # at about a third of the image term) and lr 1e-3 give recognisable reconstructions within 100-200 steps.
    # Mirroring stays on (ours: 15 photos need the variety); the derived code's dynamics (update order, pause
    # rule, D layout and initialisation, weight decay; the LR milestones lie past 600 steps) are the defaults.
    "autoencoder-photos": _preset(
        steps=600, batch_size=32, lr=1e-3, lambda_adv=1.0, lambda_feat=0.5, mirror=True,
        log_every=10, sample_every=100, checkpoint_every=200, out="runs/autoencoder-photos",
    ),
    # The paper's autoencoder experiments (seed): STL-10 unlabeled (data="stl10_binary": the STL-10 binary folder,
    # pass --data PATH elsewhere), random 64x64 crops, an 8-channel code 8x smaller (8x8x8), batch 64, Adam
    # 2e-4, 500k steps, D with first stride 2. The four losses compared (seed): SE, l1, DeePSiM with AlexNet
    # CONV3, DeePSiM with Exemplar-CNN CONV3. DeePSiM weights: the derived code's (inversion script:
    # feat 0.01, img 2e-6, adv 100 in Caffe's convention, converted by CAFFE_TO_DEEPSIM); the autoencoder's
    # own weights are not published (open). AlexNet = torchvision's layout (the paper used Caffe's: pass
    # --comparator caffenet:conv3 --comparator-weights FILE); Exemplar-CNN needs --comparator-weights FILE.
    # lambda_feat = 0.005 is the code's CaffeNet weight: it is NOT calibrated for torchvision's AlexNet (nor for
    # Exemplar-CNN); measure the factor with `deepsim calibrate` (see CAFFE_TO_DEEPSIM above).
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
        task="vae", image_size=64, latent_dim=256, fc_width=1024, batch_size=16, steps=400, mirror=True,
        log_every=10, sample_every=100, checkpoint_every=200, out="runs/vae-photos",
    ),
    # The VAE at the inversion's resolution: ILSVRC-2012 train (data="imagenet/train", pass --data PATH), 227x227
    # crops after resizing the shorter side to 256, the decoder = the fc6 inversion generator with its full
    # up-conv stack (256x256 output, centre-cropped to 227; code), D with first stride 4 (code) and no feature
    # branch, comparator AlexNet pool5 (as the inversion; code), DeePSiM weights of the code (lambda_feat NOT
    # calibrated for torchvision's AlexNet, as for the inversion below). Open, ours: the encoder (VAEEncoder:
    # 227 -> 114 -> 57 -> 29 -> 15 -> 8 -> 4), latent 4096, lambda_kl 1.
    "vae-imagenet": _preset(
        task="vae", image_size=227, disc_first_stride=4, latent_dim=4096, lambda_kl=1.0, comparator="alexnet:pool5",
        data="imagenet/train", out="runs/vae-imagenet",
    ),
}


def _invert_preset(layer: str) -> TrainConfig:
    # Inverting AlexNet (seed, code): ILSVRC-2012 train (data="imagenet/train": a folder of its JPEGs, pass
    # --data PATH), 227x227 crops after resizing the shorter side to 256, generator output 256 cropped to 227,
    # D with first stride 4 and the feature branch, comparator pool5 (code; torchvision's AlexNet layout, the
    # code used CaffeNet: --comparator caffenet:pool5 --comparator-weights FILE), Phi = the same AlexNet
    # (--invert-network caffenet --invert-network-weights FILE for CaffeNet), weights feat 0.01, img 2e-6,
    # adv 100 in Caffe's convention (code), batch 64, Adam 2e-4 (seed), 500k steps (seed: 500k to 1M).
    # lambda_feat = 0.005 is the code's weight for CaffeNet pool5: NOT calibrated for torchvision's AlexNet,
    # the default comparator here; `deepsim calibrate` measures the factor (or use caffenet:pool5).
    # Ablations (seed): --lambda-adv 0 (no D is built), --lambda-img 0, --lambda-feat 0.
    return _preset(
        task="invert", invert_layer=layer, invert_network="alexnet", image_size=227, disc_first_stride=4,
        comparator="alexnet:pool5", batch_size=64, lambda_feat=0.01 * CAFFE_TO_DEEPSIM["feat"], lambda_adv=100.0,
        lambda_img=2e-6 * CAFFE_TO_DEEPSIM["img"], data="imagenet/train", out=f"runs/invert-{layer}",
    )


PRESETS.update({f"invert-{layer}": _invert_preset(layer) for layer in ("conv5", "fc6", "fc7", "fc8")})

# ------------------------------------------------------------------------------------------- provenance
# Where each value comes from: "seed" (the paper, via the seed summary), "code" (the public Caffe code derived
# from the authors' script, or the authors' released prototxts), "ours" (our choice where both are silent or
# where we differ on purpose); after ":" a note. DEFAULT_SOURCES covers the defaults of every field that shapes
# the experiment, PRESET_SOURCES every such field a preset changes; the other fields (output folder, device,
# logging, loader...) are run settings (ours). `deepsim presets` prints them.
SOURCES = ("seed", "code", "ours")
_NOT_CALIBRATED = "code: Caffe's 0.01 for CaffeNet; NOT calibrated for torchvision's AlexNet (deepsim calibrate)"
DEFAULT_SOURCES: dict[str, str] = {
    "task": "seed: the autoencoder, the first application",
    "image_size": "seed: 64x64 crops (autoencoder)",
    "code_channels": "seed: an 8-channel code 8x smaller than the input",
    "invert_layer": "ours: fc6 as default (seed: conv5, fc6, fc7, fc8)",
    "noise_dim": "ours: no noise (seed: noise for pre-image sampling)",
    "invert_network": "ours: torchvision's AlexNet (seed/code: CaffeNet; --invert-network caffenet)",
    "invert_network_weights": "ours",
    "fc_width": "code: FC 4096 in the generators",
    "latent_dim": "ours: the fc6 size the decoder takes (open)",
    "lambda_kl": "ours: a per-sample KL sum, weight 1 (open)",
    "loss": "seed: the DeePSiM loss",
    "comparator": "seed: comparator 3, AlexNet with random weights, at CONV3 (autoencoder)",
    "comparator_weights": "ours",
    "lambda_feat": _NOT_CALIBRATED,
    "lambda_adv": "code: 100",
    "lambda_img": "code: Caffe's 2e-6",
    "image_distance": "seed: squared Euclidean",
    "feature_metric": "seed: squared Euclidean feature distance (lpips: ours, not the paper's)",
    "pause_d_below": "code: r < 0.1 stops D (seed: 0.1)",
    "pause_d_resume_above": "code: r > 0.5 resumes D",
    "pause_g_above": "code: r > 10 stops G",
    "disc_first_stride": "seed: stride 2 for the autoencoder",
    "update_order": "code: D first, G's adversarial term from the updated D",
    "disc_padding": "code: unpadded convs",
    "disc_activation": "seed: LReLU 0.3 in all networks (code: ReLU in D)",
    "disc_init": "code: MSRA, coefficient 0.1 on Dconv1/Dfc6/Dfc7 (our reading of the coefficient)",
    "upconv_bias": "code: Deconvolution biases fixed at 0 (lr_mult 0)",
    "gen_init": "code: MSRA, 1 on FC, 1.8 on 4x4 deconvs, 0.9 on 3x3 (ours: 1 on conv5's convs)",
    "weight_decay": "code: solver weight_decay 4e-4, coupled",
    "weight_decay_scope": "code: decay_mult of the prototxts (D; G's conv5 convs)",
    "lr_milestones": "code: multistep at 300k, 500k, 700k, 900k, 1.1M",
    "lr_gamma": "code: gamma 0.5",
    "mirror": "code: no mirroring",
    "lr": "seed: Adam 2e-4 (code: base_lr 2e-4)",
    "beta1": "seed: 0.9 (code: momentum 0.9)",
    "beta2": "seed: 0.999 (code: momentum2 0.999)",
    "batch_size": "seed: 64",
    "steps": "seed: 500k to 1M iterations",
    "data": "ours: the bundled photos",
}
_STL10 = "seed: STL-10 unlabeled"
_QUICK = "ours: quickstart, a few minutes on a CPU"
_IMAGENET = "seed: ILSVRC-2012 train"
PRESET_SOURCES: dict[str, dict[str, str]] = {
    "autoencoder-photos": {
        "steps": _QUICK, "batch_size": _QUICK, "lr": "ours: 1e-3, fast progress in few steps",
        "lambda_adv": "ours: 1 (100 swamps the other terms early on 64x64 crops)",
        "lambda_feat": "ours: random-AlexNet conv3 term about a third of the image term", "mirror": _QUICK,
    },
    "autoencoder-stl10-se": {"loss": "seed: SE baseline", "data": _STL10},
    "autoencoder-stl10-l1": {"loss": "seed: l1 baseline", "data": _STL10},
    "autoencoder-stl10-alexnet": {
        "comparator": "seed: AlexNet CONV3 (ours: torchvision's layout; caffenet:conv3 for Caffe's)", "data": _STL10,
    },
    "autoencoder-stl10-exemplar": {"comparator": "seed: Exemplar-CNN CONV3", "data": _STL10},
    "vae-stl10": {
        "task": "seed: VAE with DeePSiM", "comparator": "ours: the autoencoder's AlexNet CONV3", "data": _STL10,
    },
    "vae-photos": {
        "task": "seed: VAE with DeePSiM", "latent_dim": _QUICK, "fc_width": _QUICK, "batch_size": _QUICK,
        "steps": _QUICK, "mirror": _QUICK,
    },
    "vae-imagenet": {
        "task": "seed: VAE with DeePSiM", "image_size": "code: 227x227 crops, generator 256 cropped to 227",
        "disc_first_stride": "code: stride 4 at 227", "comparator": "code: pool5 (ours: torchvision's layout)",
        "data": _IMAGENET,
    },
    **{
        f"invert-{layer}": {
            "task": "seed: inverting AlexNet", "invert_layer": f"seed: {layer}",
            "image_size": "code: 227x227 crops, generator 256 cropped to 227",
            "disc_first_stride": "code: stride 4 at 227",
            "comparator": "code: pool5 (the code used CaffeNet; ours: torchvision's layout)", "data": _IMAGENET,
        }
        for layer in ("conv5", "fc6", "fc7", "fc8")
    },
}


def value_sources(name: str) -> dict[str, tuple[object, str]]:
    """Every field of preset ``name`` -> (value, where it comes from: "seed|code|ours[: note]")."""
    preset, default = get_preset(name), TrainConfig()
    listed = PRESET_SOURCES.get(name, {})
    out = {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(preset, f.name)
        if f.name in listed:
            source = listed[f.name]
        elif f.name not in DEFAULT_SOURCES:
            source = "ours: run setting"
        elif value == getattr(default, f.name):
            source = DEFAULT_SOURCES[f.name]
        else:  # a changed model setting without a note (tests/test_config.py forbids it)
            source = "ours"
        out[f.name] = (value, source)
    return out


def get_preset(name: str) -> TrainConfig:
    """A copy of a named preset; an unknown name lists the valid ones."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return dataclasses.replace(PRESETS[name])
