"""Comparator networks C: the feature extractors whose distance defines the DeePSiM loss.

One entry point, :class:`Comparator`, takes a spec ``"<arch>:<tap>[=weight][,<tap>[=weight]...]"``:

=================  ====================================================  ===========================
arch               layout                                                weights
=================  ====================================================  ===========================
``alexnet``        torchvision's AlexNet (64-192-384-256-256)            torchvision cache or a path
``caffenet``       Caffe's CaffeNet (96-256-384-384-256, groups, LRN)    a path (state dict, see below)
``alexnet-random`` torchvision's AlexNet, random weights (seeded)        none
``caffenet-random`` CaffeNet layout, random weights (seeded)             none
``exemplar``       Exemplar-CNN (3 conv + 1 FC)                          a path
``vgg16``          torchvision's VGG16                                   torchvision cache or a path
``vgg16-random``   torchvision's VGG16, random weights (seeded)          none
``discriminator``  the discriminator's own conv features (trained)       pass ``network=D``
=================  ====================================================  ===========================

Tap names follow the paper: ``conv1``..``conv5`` are post-ReLU outputs (Caffe's in-place ReLU), ``pool1``,
``pool2``, ``pool5``, ``fc6``, ``fc7`` (post-ReLU), ``fc8``. VGG16 taps are ``conv1_1``..``conv5_3``,
``pool1``..``pool5``, ``fc6``..``fc8``; Exemplar-CNN taps ``conv1``..``conv3``, ``pool1``..``pool3``, ``fc4``.

Input: images in [-1, 1], RGB, (B, 3, H, W). Each comparator converts them to its own input convention with
registered buffers (torchvision: ImageNet mean/std on [0, 1]; Caffe: BGR, 0..255, minus the ImageNet mean).

CaffeNet and Exemplar-CNN weights are read from a PyTorch state dict whose keys are the layer names of this
module (``conv1.weight``, ``conv1.bias``, ..., ``fc8.bias``), with Caffe's blob shapes.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import urllib.error
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deepsim.train.checkpoint import CheckpointError, safe_torch_load
from deepsim.train.tensorfile import is_safetensors, read_metadata, read_safetensors

__all__ = [
    "uses_network",
    "Comparator",
    "ComparatorWeightsError",
    "ARCHITECTURES",
    "torchvision_weights_path",
    "download_torchvision_weights",
    "allow_weight_downloads",
]

IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (104.0, 117.0, 123.0)

# torchvision's published weight files (what `torchvision.models.*_Weights.IMAGENET1K_V1` downloads).
TORCHVISION_FILES = {
    "alexnet": ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "vgg16": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
}
RANDOM_SEED = 1234  # the "random AlexNet" comparator is the same network on every machine


class ComparatorWeightsError(FileNotFoundError):
    """A comparator's weights file is missing or does not fit its layout."""


def torchvision_weights_path(arch: str) -> Path:
    """Where torchvision's cache keeps the weights of ``arch`` ($TORCH_HOME/hub/checkpoints/<file>)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_FILES[arch][0]


# Set by `allow_weight_downloads` (the CLI's --download-weights): missing torchvision files are fetched.
_DOWNLOADS_ALLOWED = contextvars.ContextVar("deepsim_weight_downloads", default=False)


@contextlib.contextmanager
def allow_weight_downloads(enabled: bool = True):
    """Within this block, a comparator (or inverted network) whose torchvision weights file is missing from
    the cache downloads it (:func:`download_torchvision_weights`) instead of stopping with an error. This is
    what ``--download-weights`` does for ``deepsim train``, ``invert``, ``sample-preimages`` and ``eval``."""
    token = _DOWNLOADS_ALLOWED.set(enabled)
    try:
        yield
    finally:
        _DOWNLOADS_ALLOWED.reset(token)


def download_torchvision_weights(arch: str, *, progress: bool = True) -> Path:
    """Fetch torchvision's weights file of ``arch`` ("alexnet" | "vgg16") into its cache; returns the path.

    The file's SHA-256 is checked against the prefix in its name (torchvision's convention, e.g.
    ``alexnet-owt-7be5be79.pth``). The download goes to a temporary file beside the target, renamed only
    once complete and verified (``torch.hub.download_url_to_file``): a broken or truncated download leaves
    no file behind. An existing file is kept as it is.

    Raises:
        ComparatorWeightsError: unknown ``arch``, or the download failed (the URL and the reason named).
    """
    if arch not in TORCHVISION_FILES:
        raise ComparatorWeightsError(
            f"no torchvision weights to download for {arch!r}; known: {', '.join(TORCHVISION_FILES)}"
        )
    name, url = TORCHVISION_FILES[arch]
    path = torchvision_weights_path(arch)
    if path.is_file():
        return path
    match = torch.hub.HASH_REGEX.search(name)  # the sha256 prefix in the file name
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(
            url, str(path), hash_prefix=match.group(1) if match else None, progress=progress
        )
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        raise ComparatorWeightsError(
            f"downloading {arch!r} weights from {url} to {path} failed: {error}; nothing was written. Check "
            "the connection and retry, or put the file there yourself."
        ) from error
    return path


# --------------------------------------------------------------------------------------------- layouts
# Each builder returns (stages, input_kind): stages is an ordered list of (tap_name or None, module); the
# output of a stage with a name can be tapped. input_kind selects the input normalization.


def _torchvision_alexnet_stages():
    relu = lambda: nn.ReLU(inplace=False)  # noqa: E731 - taps must not be overwritten in place
    return [
        ("features.0", None, nn.Conv2d(3, 64, 11, stride=4, padding=2)),
        (None, "conv1", relu()),
        (None, "pool1", nn.MaxPool2d(3, 2)),
        ("features.3", None, nn.Conv2d(64, 192, 5, padding=2)),
        (None, "conv2", relu()),
        (None, "pool2", nn.MaxPool2d(3, 2)),
        ("features.6", None, nn.Conv2d(192, 384, 3, padding=1)),
        (None, "conv3", relu()),
        ("features.8", None, nn.Conv2d(384, 256, 3, padding=1)),
        (None, "conv4", relu()),
        ("features.10", None, nn.Conv2d(256, 256, 3, padding=1)),
        (None, "conv5", relu()),
        (None, "pool5", nn.MaxPool2d(3, 2)),
        (None, None, _FlattenTo(6)),
        ("classifier.1", None, nn.Linear(256 * 6 * 6, 4096)),
        (None, "fc6", relu()),
        ("classifier.4", None, nn.Linear(4096, 4096)),
        (None, "fc7", relu()),
        ("classifier.6", "fc8", nn.Linear(4096, 1000)),
    ], "imagenet"


def _caffenet_stages():
    return [
        ("conv1", None, nn.Conv2d(3, 96, 11, stride=4)),
        (None, "conv1", nn.ReLU()),
        (None, "pool1", nn.MaxPool2d(3, 2, ceil_mode=True)),
        (None, "norm1", nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75)),
        ("conv2", None, nn.Conv2d(96, 256, 5, padding=2, groups=2)),
        (None, "conv2", nn.ReLU()),
        (None, "pool2", nn.MaxPool2d(3, 2, ceil_mode=True)),
        (None, "norm2", nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75)),
        ("conv3", None, nn.Conv2d(256, 384, 3, padding=1)),
        (None, "conv3", nn.ReLU()),
        ("conv4", None, nn.Conv2d(384, 384, 3, padding=1, groups=2)),
        (None, "conv4", nn.ReLU()),
        ("conv5", None, nn.Conv2d(384, 256, 3, padding=1, groups=2)),
        (None, "conv5", nn.ReLU()),
        (None, "pool5", nn.MaxPool2d(3, 2, ceil_mode=True)),
        (None, None, _FlattenTo(6)),
        ("fc6", None, nn.Linear(256 * 6 * 6, 4096)),
        (None, "fc6", nn.ReLU()),
        ("fc7", None, nn.Linear(4096, 4096)),
        (None, "fc7", nn.ReLU()),
        ("fc8", "fc8", nn.Linear(4096, 1000)),
    ], "caffe"


def _exemplar_stages():
    # Exemplar-CNN "64c5-128c5-256c5-512f" (Dosovitskiy et al. 2014), trained on 32x32 surrogate-class
    # patches; ReLU after every conv, 3x3/2 max pooling (open: pooling and padding as in the common port).
    return [
        ("conv1", None, nn.Conv2d(3, 64, 5, padding=2)),
        (None, "conv1", nn.ReLU()),
        (None, "pool1", nn.MaxPool2d(3, 2, ceil_mode=True)),
        ("conv2", None, nn.Conv2d(64, 128, 5, padding=2)),
        (None, "conv2", nn.ReLU()),
        (None, "pool2", nn.MaxPool2d(3, 2, ceil_mode=True)),
        ("conv3", None, nn.Conv2d(128, 256, 5, padding=2)),
        (None, "conv3", nn.ReLU()),
        (None, "pool3", nn.MaxPool2d(3, 2, ceil_mode=True)),
        (None, None, _FlattenTo(4)),
        ("fc4", "fc4", nn.Linear(256 * 4 * 4, 512)),
    ], "imagenet"


def _vgg16_stages():
    stages = []
    cfg = [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]
    index, in_ch = 0, 3
    for block, (width, convs) in enumerate(cfg, start=1):
        for c in range(1, convs + 1):
            stages.append((f"features.{index}", None, nn.Conv2d(in_ch, width, 3, padding=1)))
            stages.append((None, f"conv{block}_{c}", nn.ReLU()))
            index += 2
            in_ch = width
        stages.append((None, f"pool{block}", nn.MaxPool2d(2, 2)))
        index += 1
    stages += [
        (None, None, _FlattenTo(7)),
        ("classifier.0", None, nn.Linear(512 * 7 * 7, 4096)),
        (None, "fc6", nn.ReLU()),
        ("classifier.3", None, nn.Linear(4096, 4096)),
        (None, "fc7", nn.ReLU()),
        ("classifier.6", "fc8", nn.Linear(4096, 1000)),
    ]
    return stages, "imagenet"


class _FlattenTo(nn.Module):
    """Adaptive average pooling to side x side (a no-op at the network's native size), then flatten."""

    def __init__(self, side: int):
        super().__init__()
        self.side = side

    def forward(self, x):
        if x.shape[-1] != self.side or x.shape[-2] != self.side:
            x = F.adaptive_avg_pool2d(x, self.side)
        return x.flatten(1)


def _output_side(layers, side: int) -> int:
    """The spatial side after ``layers`` (convs and max pools; other layers keep it) for an input side."""
    for m in layers:
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            k, s, p, d = (
                v if isinstance(v, int) else v[0] for v in (m.kernel_size, m.stride, m.padding, m.dilation)
            )
            span = side + 2 * p - d * (k - 1) - 1
            ceil = isinstance(m, nn.MaxPool2d) and m.ceil_mode
            out = (-(-span // s) if ceil else span // s) + 1
            if ceil and (out - 1) * s >= side + p:  # PyTorch's rule: the last window starts inside the input
                out -= 1
            if out < 1:
                return 0
            side = out
    return side


# arch -> (builder, weights kind: "torchvision" | "file" | "random" | "network")
ARCHITECTURES = {
    "alexnet": (_torchvision_alexnet_stages, "torchvision"),
    "caffenet": (_caffenet_stages, "file"),
    "alexnet-random": (_torchvision_alexnet_stages, "random"),
    "caffenet-random": (_caffenet_stages, "random"),
    "exemplar": (_exemplar_stages, "file"),
    "vgg16": (_vgg16_stages, "torchvision"),
    "vgg16-random": (_vgg16_stages, "random"),
    "discriminator": (None, "network"),
}


def uses_network(spec: str) -> bool:
    """True when the comparator ``spec`` names takes its features from a network handed in (``network=``: the
    discriminator D, which the run must then build and train) instead of weights of its own."""
    arch = spec.split(":", 1)[0].strip()
    return arch in ARCHITECTURES and ARCHITECTURES[arch][1] == "network"


def parse_spec(spec: str) -> tuple[str, dict[str, float]]:
    """``"alexnet:conv3=1,conv5=0.5"`` -> ("alexnet", {"conv3": 1.0, "conv5": 0.5})."""
    if ":" not in spec:
        raise ValueError(f"comparator spec {spec!r} needs '<arch>:<tap>', e.g. 'alexnet:conv3'")
    arch, taps_text = spec.split(":", 1)
    taps: dict[str, float] = {}
    for item in filter(None, (t.strip() for t in taps_text.replace("+", ",").split(","))):
        name, _, weight = item.partition("=")
        try:
            taps[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"comparator spec {spec!r}: tap weight {weight!r} is not a number") from None
    if not taps:
        raise ValueError(f"comparator spec {spec!r} names no tap")
    return arch.strip(), taps


def check_weights_file(path, flag: str = "--comparator-weights") -> None:
    """Raise :class:`ComparatorWeightsError` naming ``flag`` and the file unless ``path`` is a file that opens
    safely (only its header and pickle are read: tensors stay on disk)."""
    path = Path(path)
    if not path.is_file():
        raise ComparatorWeightsError(f"{flag}: weights file {path} does not exist")
    try:
        if is_safetensors(path):
            read_metadata(path)
        else:
            safe_torch_load(path, trust=False, mmap=True)
    except CheckpointError as error:
        raise ComparatorWeightsError(f"{flag} {path}: {_why(error)}") from None


def _why(error) -> str:
    """Why a weights file was not read: its corruption, or what its pickle needs (never fully unpickled)."""
    needs = getattr(error, "needs", None)
    if needs is not None:
        what = ", ".join(needs[:4]) or "objects other than tensors"
        return (
            f"its pickle needs {what}, which could run code when unpickled; a weights file holds tensors only"
        )
    return getattr(error, "reason", None) or str(error)


def _read_weights(path: Path, arch: str):
    """A weights file's contents, read without running any code of it (safetensors or weights-only pickle)."""
    try:
        return read_safetensors(path) if is_safetensors(path) else safe_torch_load(path, trust=False)
    except CheckpointError as error:
        raise ComparatorWeightsError(f"comparator {arch!r}: weights file {path}: {_why(error)}") from None


class Comparator(nn.Module):
    """A comparator network C returning the features of the requested taps.

    Args:
        spec: ``"<arch>:<tap>[=w][,<tap>[=w]...]"``, e.g. ``"alexnet:conv3"`` or
        ``"vgg16:conv2_2,conv4_3=0.5"``.
        weights: a weights file (state dict). ``None``: torchvision's cache for ``alexnet``/``vgg16``,
            nothing for the random layouts; ``caffenet`` and ``exemplar`` need a path.
        network: the :class:`~deepsim.networks.Discriminator` whose conv features are used by an arch that
            borrows a network (:func:`uses_network`: ``discriminator``); ignored by the others.
        trainable: keep the parameters trainable (the paper: C "can be fixed or trained"). Default: frozen.
        input_size: resize the images (bilinear) to this side before the network (None: as given).
        download: fetch torchvision's file into its cache when it is missing (needs internet; checked, see
            :func:`download_torchvision_weights`). ``with allow_weight_downloads():`` does the same for
            every comparator built inside the block.

    Forward: images (B, 3, H, W) in [-1, 1] -> list of tap tensors, in the order of ``tap_names``.
    ``tap_weights`` holds the per-tap loss weights.
    """

    def __init__(
        self,
        spec: str,
        *,
        weights: str | os.PathLike | None = None,
        network: nn.Module | None = None,
        trainable: bool = False,
        input_size: int | None = None,
        download: bool = False,
    ):
        super().__init__()
        arch, taps = parse_spec(spec)
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown comparator architecture {arch!r}; valid: {', '.join(ARCHITECTURES)}")
        self.spec, self.arch, self.input_size = spec, arch, input_size
        self.tap_names = list(taps)
        self.tap_weights = [taps[n] for n in self.tap_names]
        builder, weights_kind = ARCHITECTURES[arch]
        self.uses_network = (
            weights_kind == "network"
        )  # D's features: D's optimizer trains them, D's state saves them
        if self.uses_network:
            self._borrow(network)
            return

        stages, input_kind = builder()
        valid = [tap for _, tap, _ in stages if tap]
        self._check_taps(valid)
        last = max(i for i, (_, tap, _) in enumerate(stages) if tap in taps)
        stages = stages[: last + 1]  # never run layers past the deepest tap
        self.layers = nn.ModuleList(m for _, _, m in stages)
        self._stage_taps = [tap for _, tap, _ in stages]
        self._param_names = {key: i for i, (key, _, _) in enumerate(stages) if key}

        # Input normalization as buffers: x_net = x * scale + shift (per channel), on images in [-1, 1].
        if input_kind == "caffe":  # BGR, 0..255, minus the mean
            scale = torch.full((3,), 127.5)
            shift = 127.5 - torch.tensor(CAFFE_MEAN_BGR[::-1])  # in RGB order; flipped to BGR in forward
            self.bgr = True
        else:  # ((x + 1) / 2 - mean) / std
            std, mean = torch.tensor(IMAGENET_STD_RGB), torch.tensor(IMAGENET_MEAN_RGB)
            scale, shift = 0.5 / std, (0.5 - mean) / std
            self.bgr = False
        self.register_buffer("scale", scale.view(1, 3, 1, 1))
        self.register_buffer("shift", shift.view(1, 3, 1, 1))

        if weights_kind == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_SEED)
                for m in self.layers:
                    if isinstance(m, (nn.Conv2d, nn.Linear)):
                        m.reset_parameters()
        else:
            self._load_weights(weights_kind, weights, download)
        self.frozen = not trainable
        if self.frozen:
            self.requires_grad_(False)
        self.train(False)

    def _borrow(self, network: nn.Module | None) -> None:
        """Taps of ``network``'s conv features (D's): shared with D, trained by D's optimizer, not frozen
        here."""
        if network is None or not hasattr(network, "conv_features"):
            raise ValueError(
                "comparator 'discriminator' needs network=<Discriminator> (it uses D's features)"
            )
        valid = list(network.conv_names)
        self._check_taps(valid)
        self.network = network
        self._tap_index = [valid.index(n) for n in self.tap_names]
        self.frozen = False
        self.register_buffer("scale", torch.ones(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", torch.zeros(1, 3, 1, 1), persistent=False)
        self.bgr = False

    def _check_taps(self, valid: list[str]) -> None:
        wrong = [n for n in self.tap_names if n not in valid]
        if wrong:
            raise ValueError(
                f"comparator {self.arch!r} has no tap {', '.join(map(repr, wrong))}; valid taps: "
                f"{', '.join(valid)}"
            )

    def _load_weights(self, weights_kind: str, weights, download: bool) -> None:
        if weights is None and weights_kind == "torchvision":
            path = torchvision_weights_path(self.arch)
            if not path.is_file() and (download or _DOWNLOADS_ALLOWED.get()):
                download_torchvision_weights(self.arch)
            if not path.is_file():
                raise ComparatorWeightsError(
                    f"comparator {self.arch!r} needs trained weights, and {path} does not exist. On a "
                    "machine with internet, add --download-weights to the command (library: download=True) "
                    f"to fetch {TORCHVISION_FILES[self.arch][1]} there; or put that file there yourself, or "
                    "pass --comparator-weights PATH (library: weights=PATH)."
                    + (
                        f" Without trained weights, use the '{self.arch}-random' comparator."
                        if self.arch == "alexnet"
                        else ""
                    )
                )
        elif weights is None:
            raise ComparatorWeightsError(
                f"comparator {self.arch!r} needs a weights file: pass weights=PATH (CLI: "
                "--comparator-weights PATH), a PyTorch state dict with keys "
                f"{', '.join(sorted(self._param_names)[:3])}, ... (see deepsim.comparators' docstring)"
            )
        else:
            path = Path(weights)
            if not path.is_file():
                raise ComparatorWeightsError(f"comparator {self.arch!r}: weights file {path} does not exist")
        state = _read_weights(path, self.arch)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ComparatorWeightsError(
                f"weights file {path} holds a {type(state).__name__}, not a state dict"
            )
        own = {}
        for key, index in self._param_names.items():
            for kind in ("weight", "bias"):
                name = f"{key}.{kind}"
                if name not in state:
                    raise ComparatorWeightsError(
                        f"weights file {path} has no entry {name!r} for comparator {self.arch!r}"
                    )
                if not isinstance(state[name], torch.Tensor):
                    raise ComparatorWeightsError(f"weights file {path}: entry {name!r} is not a tensor")
                own[f"layers.{index}.{kind}"] = state[name]
        try:
            self.load_state_dict(own, strict=False)
        except RuntimeError as error:
            raise ComparatorWeightsError(
                f"weights file {path} does not fit comparator {self.arch!r}: {error}"
            ) from None

    def train(self, mode: bool = True):
        # A frozen comparator stays in eval mode (no dropout, fixed statistics) whatever its owner does.
        return super().train(mode and not getattr(self, "frozen", False))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = images
        if self.input_size is not None and x.shape[-1] != self.input_size:
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False
            )
        x = x * self.scale + self.shift
        if self.bgr:
            x = x.flip(1)
        if self.uses_network:
            maps = self.network.conv_features(x)
            return [maps[i] for i in self._tap_index]
        found: dict[str, torch.Tensor] = {}
        for layer, tap in zip(self.layers, self._stage_taps):
            x = layer(x)
            if tap in self.tap_names:
                found[tap] = x
        return [found[n] for n in self.tap_names]

    @property
    def min_side(self) -> int:
        """The smallest input side (H and W) whose deepest tap is at least 1x1 (1 with ``input_size`` set or
        for the discriminator, whose features take any size its convs accept)."""
        if self.input_size is not None or self.uses_network:
            return 1
        for side in range(1, 4097):
            if _output_side(self.layers, side) >= 1:
                return side
        raise ValueError(f"comparator {self.spec!r}: no input side up to 4096 reaches its deepest tap")

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, frozen={self.frozen}"
