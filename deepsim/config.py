"""Experiment configuration: one dataclass whose fields carry their own facts, and a table of named presets.

Each field's help, choices, CLI group, tasks and source live in its metadata (:func:`field_info`); the CLI's
flags and ``deepsim presets`` are derived from them. Every preset names where its values come from
("paper" = the paper, via PAPER.md, "code" = the public Caffe code derived from the authors' training script,
"ours" = our choice, documented here).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from dataclasses import dataclass

__all__ = [
    "TrainConfig",
    "PRESETS",
    "get_preset",
    "CAFFE_TO_DEEPSIM",
    "LEGACY_VALUES",
    "DEFAULT_SOURCES",
    "PRESET_SOURCES",
    "value_sources",
    "FieldInfo",
    "FIELD_INFO",
    "field_info",
    "field_choices",
    "GROUPS",
    "TASK_NAMES",
    "source_kind",
]

# Scale convention (written once, used everywhere): every loss term is a per-sample SUM over its elements,
# averaged over the batch, on images in [-1, 1]. Caffe's EuclideanLoss is sum / (2N) on 0..255 pixels, so a
# Caffe weight converts as: lambda_img = caffe * 127.5**2 / 2 (pixels), lambda_feat = caffe / 2 (the 1/2 of
# EuclideanLoss only; the features are compared on the comparator's own input scale), lambda_adv unchanged
# (both are batch-mean softmax cross-entropies).
# lambda_feat: the converted 0.01 carries the code's weight over exactly for CaffeNet fed Caffe's input (BGR,
# 0..255, mean subtracted), which our "caffenet" comparator reproduces. torchvision's AlexNet is NOT that
# network: its input is ImageNet-std-normalised [0, 1] (one pixel level is 1 / (255 * 0.226), about 58x
# smaller than Caffe's unit) and its weights were trained separately, so its feature distances have another
# size and lambda_feat = 0.005 is not calibrated for it. `deepsim calibrate` measures the factor
# (deepsim.calibrate).
CAFFE_TO_DEEPSIM = {"img": 127.5**2 / 2, "feat": 0.5, "adv": 1.0}


# ------------------------------------------------------------------------------------------- field metadata
# Every field carries its facts in dataclasses.field(metadata=...), the one place they live (read by
# `field_info`): its CLI flag, help, choices, group and tasks (deepsim.cli derives `deepsim train`'s flags
# from them) and where its default comes from (`deepsim presets`). Sources: "paper" (the paper), "code" (the
# public Caffe code derived from the authors' script, or the authors' released prototxts), "ours" (our choice
# where both are silent or where we differ on purpose); after ":" a note. A field without a source is a run
# setting (output folder, device, logging, loader...).
SOURCES = ("paper", "code", "ours")
LEGACY_SOURCE_NAMES = {"seed": "paper"}  # the paper was once called "seed" in source strings
TASK_NAMES = ("autoencoder", "vae", "invert")
GROUPS = ("data", "model", "loss", "optimisation", "runtime", "output")


@dataclass(frozen=True)
class FieldInfo:
    """The facts of one TrainConfig field (see :func:`field_info`).

    Attributes:
        name: the field.
        flag: its ``deepsim train`` flag without the dashes (None: internal, no flag).
        help: the flag's help text.
        choices: the values the flag accepts, or a reference ``"module:NAME"`` / ``"module:NAME.key"`` to the
            tuple (or dict keys) that the consuming code checks against (resolved by :func:`field_choices`).
        auto: ``"auto"`` is accepted before the choices (deepsim.train.auto resolves it).
        group: the help section (one of :data:`GROUPS`).
        tasks: the tasks the flag applies to (default: every task).
        source: where the default comes from (``"paper|code|ours[: note]"``), None for a run setting.
        parse: the flag's value parser when not the field's type (e.g. comma-separated steps).
        cli: extra ``add_argument`` keywords (a switch's nargs/const/action).
    """

    name: str
    flag: str | None = None
    help: str | None = None
    choices: tuple | str | None = None
    auto: bool = False
    group: str | None = None
    tasks: tuple[str, ...] = TASK_NAMES
    source: str | None = None
    parse: object = None
    cli: dict = dataclasses.field(default_factory=dict)


def _f(default, help=None, *, group=None, flag=True, tasks=TASK_NAMES, **facts):
    """A dataclass field with its facts (:class:`FieldInfo`'s attributes but the name) in the metadata;
    ``flag=True``: the flag is the field's name. The helpers below name the group (``_internal``: no flag)."""
    meta = dict(facts, help=help, group=group, flag=flag, tasks=tuple(tasks))
    return dataclasses.field(default=default, metadata={"deepsim": meta})


def _grouped(group: str):
    return lambda default, help=None, **facts: _f(default, help, group=group, **facts)


_data, _model, _loss = _grouped("data"), _grouped("model"), _grouped("loss")
_optim, _runtime, _output = _grouped("optimisation"), _grouped("runtime"), _grouped("output")


def _internal(default, **facts):
    return _f(default, flag=False, **facts)


def _milestones(text: str) -> tuple[int, ...]:
    """'300000,500000' -> (300000, 500000); 'none' or '' -> ()."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(int(float(item)) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated step counts or 'none', got {text!r}"
        ) from None


_MAX_IMAGE_PIXELS_DEFAULT = (
    "(default: 8192x8192 = 67108864: training resizes to 256 px, so more only costs memory, up to 0.5 GiB a "
    "decode at the limit; camera photos and ImageNet pass; PIL refuses above 178956970 whatever this says)"
)
MAX_IMAGE_PIXELS_HELP = (
    "an image whose header declares more pixels is a bad image (--on-bad decides), never decoded "
    + _MAX_IMAGE_PIXELS_DEFAULT
)
# reconstruct, invert, sample-preimages: no --on-bad, each image named is one the user asked for
MAX_IMAGE_PIXELS_COMMAND_HELP = (
    "an image whose header declares more pixels is an error naming it, never decoded "
    + _MAX_IMAGE_PIXELS_DEFAULT
)
_NOT_CALIBRATED = (
    "code: Caffe's 0.01 for CaffeNet; NOT calibrated for torchvision's AlexNet (deepsim calibrate)"
)
_INV = ("invert",)
_VAE = ("vae",)
_GEN = ("invert", "vae")


@dataclass
class TrainConfig:
    """Everything a training run needs; a preset is one of these, CLI flags override fields.

    Each field's help, choices, CLI group, tasks and source live in its metadata (:func:`field_info`)."""

    # --- what is trained
    task: str = _internal("autoencoder", source="paper: the autoencoder, the first application")
    # the inversion presets: 227
    image_size: int = _data(
        64, "training crop side (autoencoder: 64)", source="paper: 64x64 crops (autoencoder)"
    )
    code_channels: int = _internal(8, source="paper: an 8-channel code 8x smaller than the input")
    invert_layer: str = _model(
        "fc6",
        "invert: the AlexNet layer to invert",
        source="ours: fc6 as default (paper: conv5, fc6, fc7, fc8)",
        tasks=_INV,
        flag="layer",
        choices="deepsim.applications.inversion:LAYER_TAPS",
    )
    noise_dim: int = _model(
        0,
        "invert: K noise values beside the features (extra channels for conv5), for pre-image sampling",
        source="ours: no noise (paper: noise for pre-image sampling)",
        tasks=_INV,
    )
    invert_network: str = _model(
        "alexnet",
        "invert: the fixed AlexNet whose features are inverted",
        source="ours: torchvision's AlexNet (paper/code: CaffeNet; --invert-network caffenet)",
        tasks=_INV,
        choices="deepsim.applications.inversion:INVERTIBLE_NETWORKS",
    )
    invert_network_weights: str | None = _model(
        None, "invert: weights file of that network (default: torchvision's cache)", source="ours", tasks=_INV
    )
    fc_width: int = _model(
        4096,
        "invert/vae: width of the generator's FC layers (paper: 4096)",
        source="code: FC 4096 in the generators",
        tasks=_GEN,
    )
    latent_dim: int = _model(
        4096, "vae: latent size", source="ours: the fc6 size the decoder takes (open)", tasks=_VAE
    )
    lambda_kl: float = _loss(
        1.0, "vae: weight of the KL term", source="ours: a per-sample KL sum, weight 1 (open)", tasks=_VAE
    )

    # --- the loss
    loss: str = _loss(
        "deepsim",
        "DeePSiM, or the image-space baselines se / l1",
        source="paper: the DeePSiM loss",
        choices=("deepsim", "se", "l1"),
    )
    comparator: str = _loss(
        "alexnet-random:conv3",
        "comparator spec '<arch>:<tap>[=w],...', e.g. alexnet:conv3, exemplar:conv3, alexnet-random:conv3",
        source="paper: comparator 3, AlexNet with random weights, at CONV3 (autoencoder)",
    )
    comparator_weights: str | None = _loss(
        None,
        "weights file for the comparator (default: torchvision's cache for alexnet/vgg16)",
        source="ours",
    )
    lambda_feat: float = _loss(
        0.01 * CAFFE_TO_DEEPSIM["feat"],
        "weight of the comparator feature term (scale convention: deepsim.losses)",
        source=_NOT_CALIBRATED,
    )
    lambda_adv: float = _loss(100.0, "weight of the adversarial term", source="code: 100")
    lambda_img: float = _loss(
        2e-6 * CAFFE_TO_DEEPSIM["img"], "weight of the image-space term", source="code: Caffe's 2e-6"
    )
    # "se" (the paper) or "l1"
    image_distance: str = _internal("se", source="paper: squared Euclidean")
    # "squared" (paper) or "lpips" (ours: comparator unused)
    feature_metric: str = _internal(
        "squared", source="paper: squared Euclidean feature distance (lpips: ours, not the paper's)"
    )
    # the pause rule's ratio r = L_D / L_adv
    pause_d_below: float = _internal(0.1, source="code: r < 0.1 stops D (paper: 0.1)")
    pause_d_resume_above: float = _internal(0.5, source="code: r > 0.5 resumes D")
    pause_g_above: float = _internal(10.0, source="code: r > 10 stops G")
    # 4 at 227 (code: the inversion presets)
    disc_first_stride: int = _internal(2, source="paper: stride 2 for the autoencoder")

    # --- training as the authors trained: the derived Caffe code's dynamics (README "Differences from the
    # paper and the derived code"; defaults = the code, the other
    # value = the earlier behaviour or the paper's)
    update_order: str = _optim(
        "code",
        "code: D updates first and G's adversarial term comes from the updated D (derived "
        "code); simultaneous: both from the same D",
        source="code: D first, G's adversarial term from the updated D",
        choices="deepsim.train.step:UPDATE_ORDERS",
    )
    disc_padding: str = _model(
        "code",
        "D's convs: code (unpadded, 227 -> 56-52-25-23-11) or padded (k // 2)",
        source="code: unpadded convs",
        choices="deepsim.networks:DISC_PADDINGS",
    )
    disc_activation: str = _model(
        "lrelu",
        "D's nonlinearity: lrelu (0.3, the paper) or relu (the derived code)",
        source="paper: LReLU 0.3 in all networks (code: ReLU in D)",
        choices="deepsim.networks:DISC_ACTIVATIONS",
    )
    disc_init: str = _model(
        "code",
        "D's initialisation: code (MSRA, coefficient 0.1 on conv1/fc1/fc2, zero biases) or torch",
        source="code: MSRA, coefficient 0.1 on Dconv1/Dfc6/Dfc7 (our reading of the coefficient)",
        choices="deepsim.networks:DISC_INITS",
    )
    upconv_bias: str = _model(
        "zero",
        "invert/vae up-conv biases: zero (fixed, the authors' generators) or learned",
        source="code: Deconvolution biases fixed at 0 (lr_mult 0)",
        tasks=_GEN,
        choices="deepsim.applications.generators:UPCONV_BIASES",
    )
    gen_init: str = _model(
        "code",
        "invert/vae generator initialisation: code (MSRA with the prototxt's coefficients) or torch",
        source="code: MSRA, 1 on FC, 1.8 on 4x4 deconvs, 0.9 on 3x3 (ours: 1 on conv5's convs)",
        tasks=_GEN,
        choices="deepsim.applications.generators:GENERATOR_INITS",
    )
    weight_decay: float = _optim(
        4e-4,
        "L2 weight decay added to the gradient before Adam (derived code: 4e-4)",
        source="code: solver weight_decay 4e-4, coupled",
    )
    weight_decay_scope: str = _optim(
        "code",
        "which parameters decay: code (the prototxts' decay_mult: D, conv5's convs) or all",
        source="code: decay_mult of the prototxts (D; G's conv5 convs)",
        choices="deepsim.train.optim:WEIGHT_DECAY_SCOPES",
    )
    lr_milestones: tuple[int, ...] = _optim(
        (300_000, 500_000, 700_000, 900_000, 1_100_000),
        "steps (each network's own) at which the lr is multiplied by "
        "--lr-gamma, comma-separated, or 'none' (derived code: 300000,500000,"
        "700000,900000,1100000)",
        source="code: multistep at 300k, 500k, 700k, 900k, 1.1M",
        parse=_milestones,
    )
    lr_gamma: float = _optim(0.5, "lr factor at each milestone (derived code: 0.5)", source="code: gamma 0.5")
    mirror: bool = _data(
        False,
        "random horizontal mirroring of the training crops (the derived code does not mirror)",
        source="code: no mirroring",
        cli={"action": "bool"},
    )

    # --- optimisation (paper: Adam, lr 2e-4, betas 0.9/0.999, batch 64)
    lr: float = _optim(
        2e-4, "Adam learning rate (paper: 2e-4)", source="paper: Adam 2e-4 (code: base_lr 2e-4)"
    )
    beta1: float = _internal(0.9, source="paper: 0.9 (code: momentum 0.9)")
    beta2: float = _internal(0.999, source="paper: 0.999 (code: momentum2 0.999)")
    batch_size: int = _optim(64, "images per step (paper: 64)", source="paper: 64")
    steps: int = _optim(500_000, "number of training iterations", source="paper: 500k to 1M iterations")

    # --- data
    data: str = _data(
        "photos",
        "'photos' (bundled sample photographs), a folder of images, or an STL-10 binary folder",
        source="ours: the bundled photos",
    )
    loader: str = _data(
        "auto",
        "data loader: torch (PIL in DataLoader workers), dali (NVIDIA DALI), nvjpeg (torchvision "
        "JPEG decode on the device) or resident (the decoded data set on the device); auto: resident "
        "for STL-10 and the photos on CUDA when they fit, else dali or nvjpeg, torch on the CPU",
        choices="deepsim.train.auto:RUNTIME_CHOICES.loader",
        auto=True,
    )
    num_workers: int = _data(0, "DataLoader worker processes (torch loader)")
    on_bad: str = _data(
        "error",
        "a corrupt, too-small or too-large image: error (stop, naming the file), skip (count and "
        "go on), pad (pad small ones)",
        choices="deepsim.data.sampling:ON_BAD",
    )
    # checked by deepsim.data.images
    max_image_pixels: int = _data(8192 * 8192, MAX_IMAGE_PIXELS_HELP)

    # --- running
    out: str = _output(
        "runs/deepsim",
        "output folder: checkpoint.pt (+ the previous ones), metrics.jsonl, config.json, "
        "samples/*.png; one that already holds a run is refused without --resume",
    )
    device: str = _runtime("auto", "auto | cpu | cuda | cuda:N")
    seed: int = _runtime(0, "seed for initialisation, data order and augmentation")
    precision: str = _runtime(
        "auto",
        "fp32, tf32 (CUDA matmuls) or bf16 autocast; auto: bf16 on CUDA (sm_80+), fp32 on the CPU",
        choices="deepsim.train.auto:RUNTIME_CHOICES.precision",
        auto=True,
    )
    compile: str = _runtime(
        "auto",
        "torch.compile the training step; auto: reduce-overhead (CUDA graphs) on CUDA, off on the CPU",
        choices="deepsim.train.auto:RUNTIME_CHOICES.compile",
        auto=True,
    )
    channels_last: bool | str = _runtime(
        "auto",
        "G, D, C and the batches in channels_last (NHWC) memory format (faster "
        "convolutions on tensor cores); auto: on for CUDA, off on the CPU",
        cli=dict(nargs="?", const="on", choices=["auto", "on", "off"], default=None, action="on-off-auto"),
    )
    # the metrics reads are the loop's only host syncs
    log_every: int = _output(10, "read metrics from the device every N steps")
    sample_every: int = _output(200, "write a PNG grid of inputs and reconstructions every N steps")
    checkpoint_every: int = _output(
        500, "write checkpoint.pt every N steps (and at the end, and on a stop signal)"
    )
    tensorboard: bool | str = _output(
        "auto",
        "TensorBoard event files beside metrics.jsonl (default: on when the "
        "tensorboard package is installed)",
        cli={"action": "bool"},
    )
    keep_checkpoints: int = _output(
        2,
        "keep the K newest checkpoints (checkpoint.pt, checkpoint.step<N>.pt...): a "
        "corrupt newest one falls back",
    )
    # handled by deepsim.train.preemption
    stop_signals: str = _runtime(
        "SIGTERM,SIGINT,SIGUSR1",
        "signals that stop training cleanly: finish the step, write a checkpoint, exit "
        "with status 75 ('' = none)",
    )

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


# The quickstarts' cadence: the bundled photos, mirrored (ours: 15 photos need the variety), on a CPU.
_QUICKSTART = dict(mirror=True, log_every=10, sample_every=100, checkpoint_every=200)
# ILSVRC-2012 at the inversion's resolution (code): 227x227 crops, D with first stride 4, comparator pool5.
_AT_227 = dict(image_size=227, disc_first_stride=4, comparator="alexnet:pool5", data="imagenet/train")


# Presets set what an experiment is (task, data, loss, weights, schedule). They leave the runtime fields
# (compile, precision, loader, channels_last, tensorboard) at "auto", which deepsim.train.auto resolves per
# device; a preset that sets one of them explicitly wins over "auto", and a CLI flag wins over the preset.
PRESETS: dict[str, TrainConfig] = {
    # The quickstart: the bundled photos on 2 CPU cores in a few minutes. Comparator: AlexNet with random
    # weights (the paper's comparator 3), since trained weights cannot be downloaded on every machine;
    # pass --comparator alexnet:conv3 with torchvision's AlexNet weights in the cache for the paper's setup.
    # Loss weights and learning rate (open, measured here): with the derived code's lambda_adv = 100 the
    # adversarial term outweighs the others on 64x64 crops and G reconstructs nothing in the first 300 steps
    # (seen on the bundled photos); lambda_adv = 1, lambda_feat = 0.5 (the random-AlexNet conv3 term then
    # starts at about a third of the image term) and lr 1e-3 give recognisable reconstructions within 100-200
    # steps. Mirroring stays on (ours: 15 photos need the variety); the derived code's dynamics (update order,
    # pause rule, D layout and initialisation, weight decay; the LR
    # milestones lie past 600 steps) are the defaults.
    "autoencoder-photos": _preset(
        steps=600,
        batch_size=32,
        lr=1e-3,
        lambda_adv=1.0,
        lambda_feat=0.5,
        **_QUICKSTART,
        out="runs/autoencoder-photos",
    ),
    # The paper's autoencoder experiments (paper): STL-10 unlabeled (data="stl10_binary": the STL-10 binary
    # folder, pass --data PATH elsewhere), random 64x64 crops, an 8-channel code 8x smaller (8x8x8), batch 64,
    # Adam 2e-4, 500k steps, D with first stride 2. The four losses compared (paper): SE, l1, DeePSiM with
    # AlexNet CONV3, DeePSiM with Exemplar-CNN CONV3. DeePSiM weights: the derived code's (inversion script:
    # feat 0.01, img 2e-6, adv 100 in Caffe's convention, converted by CAFFE_TO_DEEPSIM); the autoencoder's
    # own weights are not published (open). AlexNet = torchvision's layout (the paper used Caffe's: pass
    # --comparator caffenet:conv3 --comparator-weights FILE); Exemplar-CNN needs --comparator-weights FILE.
    # lambda_feat = 0.005 is the code's CaffeNet weight: it is NOT calibrated for torchvision's AlexNet (nor
    # for Exemplar-CNN); measure the factor with `deepsim calibrate` (see CAFFE_TO_DEEPSIM above).
    "autoencoder-stl10-se": _preset(loss="se", data="stl10_binary", out="runs/ae-se"),
    "autoencoder-stl10-l1": _preset(loss="l1", data="stl10_binary", out="runs/ae-l1"),
    "autoencoder-stl10-alexnet": _preset(
        comparator="alexnet:conv3", data="stl10_binary", out="runs/ae-alexnet"
    ),
    "autoencoder-stl10-exemplar": _preset(
        comparator="exemplar:conv3", data="stl10_binary", out="runs/ae-exemplar"
    ),
    # The VAE (paper: DeePSiM replaces the reconstruction term; the decoder is the fc6 inversion generator).
    # Open, our choices: 64x64 images (the decoder's up-conv stack then has 4 stages, 4 -> 64, instead of 6),
    # the conv encoder of deepsim.applications.generators.VAEEncoder, latent 4096 (the fc6 size the decoder
    # copies), lambda_kl 1 (a per-sample KL sum, like every other term), STL-10 unlabeled as for the
    # autoencoder, the autoencoder's comparator AlexNet CONV3 and D (first stride 2); DeePSiM weights: code.
    "vae-stl10": _preset(
        task="vae",
        image_size=64,
        latent_dim=4096,
        lambda_kl=1.0,
        comparator="alexnet:conv3",
        data="stl10_binary",
        out="runs/vae-stl10",
    ),
    # The VAE quickstart (the default of `deepsim train vae`): bundled photos, random-weight AlexNet (as the
    # autoencoder quickstart), a small latent and FC width so that it runs on a laptop CPU (open).
    "vae-photos": _preset(
        task="vae",
        image_size=64,
        latent_dim=256,
        fc_width=1024,
        batch_size=16,
        steps=400,
        **_QUICKSTART,
        out="runs/vae-photos",
    ),
    # The VAE at the inversion's resolution: ILSVRC-2012 train (data="imagenet/train", pass --data PATH),
    # 227x227 crops after resizing the shorter side to 256, the decoder = the fc6 inversion generator with its
    # full up-conv stack (256x256 output, centre-cropped to 227; code), D with first stride 4 (code) and no
    # feature branch, comparator AlexNet pool5 (as the inversion; code), DeePSiM weights of the code
    # (lambda_feat NOT calibrated for torchvision's AlexNet, as for the inversion below). Open, ours: the
    # encoder (VAEEncoder: 227 -> 114 -> 57 -> 29 -> 15 -> 8 -> 4), latent 4096, lambda_kl 1.
    "vae-imagenet": _preset(task="vae", latent_dim=4096, lambda_kl=1.0, **_AT_227, out="runs/vae-imagenet"),
}


def _invert_preset(layer: str) -> TrainConfig:
    # Inverting AlexNet (paper, code): ILSVRC-2012 train (data="imagenet/train": a folder of its JPEGs, pass
    # --data PATH), 227x227 crops after resizing the shorter side to 256, generator output 256 cropped to 227,
    # D with first stride 4 and the feature branch, comparator pool5 (code; torchvision's AlexNet layout, the
    # code used CaffeNet: --comparator caffenet:pool5 --comparator-weights FILE), Phi = the same AlexNet
    # (--invert-network caffenet --invert-network-weights FILE for CaffeNet), weights feat 0.01, img 2e-6,
    # adv 100 in Caffe's convention (code), batch 64, Adam 2e-4 (paper), 500k steps (paper: 500k to 1M).
    # lambda_feat = 0.005 is the code's weight for CaffeNet pool5: NOT calibrated for torchvision's AlexNet,
    # the default comparator here; `deepsim calibrate` measures the factor (or use caffenet:pool5).
    # Ablations (paper): --lambda-adv 0 (no D is built), --lambda-img 0, --lambda-feat 0.
    return _preset(
        task="invert",
        invert_layer=layer,
        invert_network="alexnet",
        batch_size=64,
        lambda_feat=0.01 * CAFFE_TO_DEEPSIM["feat"],
        lambda_adv=100.0,
        lambda_img=2e-6 * CAFFE_TO_DEEPSIM["img"],
        **_AT_227,
        out=f"runs/invert-{layer}",
    )


PRESETS.update({f"invert-{layer}": _invert_preset(layer) for layer in ("conv5", "fc6", "fc7", "fc8")})

# ------------------------------------------------------------------------------------------- provenance
# DEFAULT_SOURCES: the source of every default that shapes the experiment (from the fields' metadata);
# PRESET_SOURCES: every such field a preset changes. `deepsim presets` prints them.


def field_info(name_or_field) -> FieldInfo:
    """The facts of a TrainConfig field (by name or :class:`dataclasses.Field`)."""
    f = name_or_field if isinstance(name_or_field, dataclasses.Field) else _FIELDS[name_or_field]
    meta = f.metadata["deepsim"]
    flag = f.name if meta["flag"] is True else (meta["flag"] or None)
    return FieldInfo(f.name, **{**meta, "flag": flag})


def field_choices(info: FieldInfo) -> tuple | None:
    """The values a field's flag accepts: its own tuple, or the consuming module's (``"auto"`` first when the
    field takes it). Modules are imported here, not at the top: they import this one."""
    choices = info.choices
    if isinstance(choices, str):
        module, _, attr = choices.partition(":")
        attr, _, key = attr.partition(".")
        choices = getattr(importlib.import_module(module), attr)
        choices = choices[key] if key else choices
    if choices is None:
        return None
    return (("auto",) if info.auto else ()) + tuple(choices)


def source_kind(source: str) -> str:
    """``"paper: ..."`` -> ``"paper"``; the legacy name ``"seed"`` reads as ``"paper"``."""
    kind = source.split(":", 1)[0].strip()
    return LEGACY_SOURCE_NAMES.get(kind, kind)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
FIELD_INFO: dict[str, FieldInfo] = {name: field_info(f) for name, f in _FIELDS.items()}
DEFAULT_SOURCES: dict[str, str] = {name: i.source for name, i in FIELD_INFO.items() if i.source is not None}
_STL10 = "paper: STL-10 unlabeled"
_QUICK = "ours: quickstart, a few minutes on a CPU"
_IMAGENET = "paper: ILSVRC-2012 train"
_AT_227_SOURCES = {
    "image_size": "code: 227x227 crops, generator 256 cropped to 227",
    "disc_first_stride": "code: stride 4 at 227",
}
PRESET_SOURCES: dict[str, dict[str, str]] = {
    "autoencoder-photos": {
        "steps": _QUICK,
        "batch_size": _QUICK,
        "lr": "ours: 1e-3, fast progress in few steps",
        "lambda_adv": "ours: 1 (100 swamps the other terms early on 64x64 crops)",
        "lambda_feat": "ours: random-AlexNet conv3 term about a third of the image term",
        "mirror": _QUICK,
    },
    "autoencoder-stl10-se": {"loss": "paper: SE baseline", "data": _STL10},
    "autoencoder-stl10-l1": {"loss": "paper: l1 baseline", "data": _STL10},
    "autoencoder-stl10-alexnet": {
        "comparator": "paper: AlexNet CONV3 (ours: torchvision's layout; caffenet:conv3 for Caffe's)",
        "data": _STL10,
    },
    "autoencoder-stl10-exemplar": {"comparator": "paper: Exemplar-CNN CONV3", "data": _STL10},
    "vae-stl10": {
        "task": "paper: VAE with DeePSiM",
        "comparator": "ours: the autoencoder's AlexNet CONV3",
        "data": _STL10,
    },
    "vae-photos": {
        "task": "paper: VAE with DeePSiM",
        "latent_dim": _QUICK,
        "fc_width": _QUICK,
        "batch_size": _QUICK,
        "steps": _QUICK,
        "mirror": _QUICK,
    },
    "vae-imagenet": {
        "task": "paper: VAE with DeePSiM",
        **_AT_227_SOURCES,
        "comparator": "code: pool5 (ours: torchvision's layout)",
        "data": _IMAGENET,
    },
    **{
        f"invert-{layer}": {
            "task": "paper: inverting AlexNet",
            "invert_layer": f"paper: {layer}",
            **_AT_227_SOURCES,
            "comparator": "code: pool5 (the code used CaffeNet; ours: torchvision's layout)",
            "data": _IMAGENET,
        }
        for layer in ("conv5", "fc6", "fc7", "fc8")
    },
}


def value_sources(name: str) -> dict[str, tuple[object, str]]:
    """Every field of preset ``name`` -> (value, where it comes from: "paper|code|ours[: note]")."""
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
