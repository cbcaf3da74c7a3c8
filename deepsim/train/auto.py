"""``auto`` runtime settings: the fast path on a CUDA device, the simple path on the CPU.

Five :class:`~deepsim.config.TrainConfig` fields may be ``"auto"`` (their default): ``compile``,
``precision``, ``loader``, ``channels_last`` and ``tensorboard``. :func:`resolve_runtime` turns each
``"auto"`` into a concrete value for the device the run uses and says why; a field that holds anything
else (a CLI flag, a preset value, a library caller's choice) is kept as it is and only checked.

=================  ===============================================  ==========================
field              auto on a CUDA device                            auto on the CPU
=================  ===============================================  ==========================
compile            ``reduce-overhead``: the compiled step under      ``off`` (eager)
                   CUDA graphs (:mod:`deepsim.train.compiled`);
                   ``default`` (no CUDA graphs) with world > 1
precision          ``bf16`` autocast (sm_80 and newer; older         ``fp32``
                   GPUs: ``fp32``)
channels_last      on (sm_70 and newer: tensor-core convolutions)    off
loader             ``resident`` for the bundled photos and STL-10    ``torch``
                   binaries when they fit in the device's free
                   memory (decoded once onto the GPU); else
                   ``dali`` when NVIDIA DALI is installed, else
                   ``nvjpeg`` (JPEG decode on the GPU through
                   torchvision); ``torch`` for the photos and for
                   STL-10 without DALI (raw pixels: no decode)
tensorboard        on when the ``tensorboard`` package is installed  the same
=================  ===============================================  ==========================

An ``auto`` choice is tried before the run commits to it (:func:`try_runtime`): the loader builds and
delivers one tiny batch on the device (an import alone does not show that DALI runs with this driver), and
the compiled step's first call falls back to the eager step if it fails to compile
(:class:`CompileFallback`); each fallback is said in one line. A value set explicitly is not tried: it
fails where it fails.

Presets leave these fields at ``"auto"``; a preset (or flag) that sets one explicitly wins over ``auto``,
like any explicit value. A config that was never resolved (a trainer built directly with
:func:`deepsim.train.factory.build_trainer`) runs ``precision="auto"`` as fp32: the plain path.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import deepsim.data
from deepsim.config import TrainConfig
from deepsim.data import dali, resident, stl10

__all__ = [
    "AUTO",
    "RUNTIME_CHOICES",
    "resolve_runtime",
    "describe_runtime",
    "data_kind",
    "tensorboard_available",
    "try_runtime",
    "loader_trial",
    "CompileFallback",
    "allow_tf32",
]

AUTO = "auto"
# field -> the values it may take besides "auto" (deepsim.cli offers the same choices)
RUNTIME_CHOICES: dict[str, tuple] = {
    "compile": ("off", "default", "max-autotune", "reduce-overhead"),
    "precision": ("fp32", "tf32", "bf16"),
    "loader": ("torch", "dali", "nvjpeg", "resident"),
    "channels_last": (True, False),
    "tensorboard": (True, False),
}


def tensorboard_available() -> bool:
    """True when the ``tensorboard`` package (needed by ``torch.utils.tensorboard``) can be imported."""
    return importlib.util.find_spec("tensorboard") is not None


def _dali_available() -> bool:
    return dali.dali_available()


def data_kind(data: str | os.PathLike) -> str:
    """``"photos"`` (the bundled photographs), ``"stl10"`` (an STL-10 binary folder) or ``"folder"``."""
    if str(data) == "photos":
        return "photos"
    return "stl10" if stl10.is_stl10_folder(Path(data)) else "folder"


def _check(config: TrainConfig) -> None:
    for name, valid in RUNTIME_CHOICES.items():
        value = getattr(config, name)
        if value != AUTO and value not in valid:
            shown = ", ".join(str(v).lower() if isinstance(v, bool) else v for v in (AUTO,) + valid)
            raise ValueError(f"{name}={value!r}: expected one of {shown}")


def resolve_runtime(
    config: TrainConfig,
    device: torch.device | str,
    *,
    dali_available: bool | None = None,
    tensorboard_installed: bool | None = None,
    cuda_capability: tuple[int, int] | None = None,
    kind: str | None = None,
    resident_fits: bool | None = None,
    world: int = 1,
) -> tuple[TrainConfig, list[str]]:
    """Replace every ``"auto"`` runtime field of ``config`` by the choice for ``device``.

    Args:
        config: the run's config; fields other than the five runtime ones are untouched.
        device: the training device (only its type and, on CUDA, its compute capability matter).
        dali_available: whether NVIDIA DALI can be imported (None: try the import, only when it matters).
        tensorboard_installed: whether the tensorboard package is there (None: look it up).
        cuda_capability: (major, minor) of the CUDA device (None: ask the driver); lets tests fake a GPU.
        kind: what ``config.data`` is, as :func:`data_kind` says (None: look at the path).
        resident_fits: whether the photos / STL-10 decoded fit in the device's free memory (None: ask the
            device, :func:`deepsim.data.resident.resident_fits`, only when it matters).
        world: the number of ranks; with more than one, ``compile`` auto on CUDA is ``default``.

    Returns:
        (the config with concrete values, one reason per field: ``"loader=dali (auto: DALI is installed)"``,
        or ``"precision=fp32 (set)"`` for a value that was not ``auto``).

    Raises:
        ValueError: a field holds a value outside :data:`RUNTIME_CHOICES`, or ``tensorboard=True`` without
            the tensorboard package.
    """
    _check(config)
    device = torch.device(device)
    cuda = device.type == "cuda"
    capability = (cuda_capability or torch.cuda.get_device_capability(device)) if cuda else (0, 0)
    where = f"CUDA device, sm_{capability[0]}{capability[1]}" if cuda else f"{device.type} device"
    tensorboard_installed = _tensorboard_installed(config, tensorboard_installed)
    rules = _rules(
        config,
        device,
        where,
        capability,
        world=world,
        tensorboard_installed=tensorboard_installed,
        kind=kind,
        resident_fits=resident_fits,
        dali_available=dali_available,
    )
    return _apply(config, rules)


def _tensorboard_installed(config: TrainConfig, installed: bool | None) -> bool:
    """Whether the tensorboard package is there (None: look it up); a ValueError when ``config`` asks for
    TensorBoard without it."""
    if installed is None:
        installed = tensorboard_available()
    if config.tensorboard is True and not installed:
        raise ValueError(
            "--tensorboard: the tensorboard package is not installed (pip install 'deepsim[tensorboard]'), "
            "or pass --no-tensorboard"
        )
    return installed


def _apply(config: TrainConfig, rules: dict) -> tuple[TrainConfig, list[str]]:
    """``config`` with each ``"auto"`` field replaced by its rule's choice, and one reason per field."""
    chosen: dict = {}
    reasons: list[str] = []
    for name, rule in rules.items():
        if getattr(config, name) == AUTO:
            chosen[name], why = rule()
            reasons.append(f"{name}={_show(chosen[name])} (auto: {why})")
        else:
            reasons.append(f"{name}={_show(getattr(config, name))} (set)")
    return config.replace(**chosen), reasons


def _rules(
    config: TrainConfig,
    device: torch.device,
    where: str,
    capability: tuple[int, int],
    *,
    world: int,
    tensorboard_installed: bool,
    kind,
    resident_fits,
    dali_available,
) -> dict:
    """field -> () -> (value, why): the ``auto`` choice of each runtime field (called only for an ``auto``
    one)."""
    cuda = device.type == "cuda"
    bf16, tensor_cores = capability >= (8, 0), capability >= (7, 0)
    return {
        "compile": lambda: _choose_compile(cuda, where, world),
        "precision": lambda: (
            ("bf16", f"{where} has bf16 tensor cores")
            if bf16
            else ("fp32", where + (": no bf16" if cuda else ""))
        ),
        "channels_last": lambda: (
            (True, f"{where}: NHWC tensor-core convolutions") if tensor_cores else (False, where)
        ),
        "loader": lambda: _choose_loader(
            config, device, where, kind=kind, resident_fits=resident_fits, dali_available=dali_available
        ),
        "tensorboard": lambda: (
            tensorboard_installed,
            "the tensorboard package is " + ("installed" if tensorboard_installed else "not installed"),
        ),
    }


def _choose_compile(cuda: bool, where: str, world: int) -> tuple[str, str]:
    if not cuda:
        return "off", f"{where}: eager step"
    if world > 1:  # NCCL all-reduces inside inductor's CUDA-graph trees: not measured here yet
        return "default", f"{where}, {world} ranks: the compiled step without CUDA graphs"
    return "reduce-overhead", f"{where}: the compiled step under CUDA graphs"


def _choose_loader(
    config: TrainConfig, device: torch.device, where: str, *, kind, resident_fits, dali_available
) -> tuple[str, str]:
    """The loader ``auto`` picks (see the module table) and why; None arguments are looked up."""
    if device.type != "cuda":
        return "torch", f"{where}: the PyTorch loader"
    data = kind or data_kind(config.data)
    if data in ("photos", "stl10"):
        fits = resident_fits
        if fits is None:
            fits = resident.resident_fits(config.data, device)
        if fits:
            return "resident", "the decoded data set fits on the GPU: crops gathered there, no host work"
    if data == "photos":
        return (
            "torch",
            "the bundled photos are decoded once and kept in memory: nothing to decode per step",
        )
    if dali_available if dali_available is not None else _dali_available():
        return "dali", "DALI is installed: decode and crop on the GPU"
    if data == "stl10":
        return "torch", "DALI is not installed; STL-10 binaries are raw pixels: nothing to decode"
    return "nvjpeg", "DALI is not installed: JPEG decode on the GPU through torchvision (nvJPEG)"


def _show(value) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def describe_runtime(config: TrainConfig, device: torch.device | str, reasons: list[str]) -> str:
    """One line naming the path a run takes and why: ``"fast path on cuda:0: compile=... (auto: ...), ..."``.

    "fast path" = compiled step, bf16, channels_last; "simple path" = eager, fp32, NCHW; else "custom path".
    """
    fast = config.compile != "off" and config.precision == "bf16" and config.channels_last is True
    simple = config.compile == "off" and config.precision == "fp32" and config.channels_last is False
    path = "fast path" if fast else ("simple path" if simple else "custom path")
    return f"{path} on {device}: " + ", ".join(reasons)


# ------------------------------------------------------------------------------------------------ trials


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def loader_trial(loader: str, device: torch.device | str) -> None:
    """Build loader ``loader`` on ``device`` over one tiny JPEG and take one batch from it; raises what fails.

    Not the run's dataset (a pre-scan of a large folder would cost minutes): what it shows is that the
    loader's library imports, builds and decodes on this device with this driver.
    """
    with tempfile.TemporaryDirectory(prefix="deepsim-loader-trial-") as folder:
        pixels = np.linspace(0, 255, 24 * 24 * 3).reshape(24, 24, 3).astype(np.uint8)
        Image.fromarray(pixels).save(Path(folder) / "trial.jpg", quality=90)
        stream = deepsim.data.build_loader(
            folder, loader=loader, batch_size=1, crop_size=16, mode="center", device=device, num_workers=1
        )
        try:
            batch = next(stream)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)  # an asynchronous decode error shows here, not in the run
        finally:
            stream.close()
    if tuple(batch.shape) != (1, 3, 16, 16):
        raise RuntimeError(f"the trial batch has shape {tuple(batch.shape)}, expected (1, 3, 16, 16)")


_LOADER_FALLBACK = {"dali": "nvjpeg", "nvjpeg": "torch"}


def try_runtime(
    config: TrainConfig,
    device: torch.device | str,
    reasons: list[str],
    auto_fields,
    *,
    trial: Callable[[str, torch.device], None] | None = None,
    kind: str | None = None,
) -> tuple[TrainConfig, list[str]]:
    """Try the loader that ``auto`` chose (a field in ``auto_fields``) on one tiny batch; on failure the next
    one (dali -> nvjpeg -> torch; nvjpeg only for image folders), its reason saying why in one line.

    Args:
        config, reasons: what :func:`resolve_runtime` returned.
        auto_fields: the names of the fields that were ``"auto"`` before resolving (explicit values are kept).
        trial: ``trial(loader, device)`` raises when the loader does not work (None: :func:`loader_trial`).
        kind: as for :func:`resolve_runtime`.

    Returns:
        (the config, the reasons), the loader's entry replaced where it fell back.
    """
    if "loader" not in auto_fields or config.loader == "torch":
        return config, reasons
    device, trial = torch.device(device), trial or loader_trial
    loader, failures = config.loader, []
    while loader != "torch":
        try:
            trial(loader, device)
            break
        except Exception as error:  # noqa: BLE001 - any failure of the trial means: not this loader
            failures.append(f"{loader} failed a one-batch trial ({_first_line(error)})")
            loader = _LOADER_FALLBACK[loader]
            if loader == "nvjpeg" and (kind or data_kind(config.data)) != "folder":
                loader = "torch"  # nvjpeg decodes image files only
    if not failures:
        return config, reasons
    why = "; ".join(failures) + f": the {loader} loader instead"
    reasons = [f"loader={loader} (auto: {why})" if r.startswith("loader=") else r for r in reasons]
    return config.replace(loader=loader), reasons


class CompileFallback:
    """A compiled step whose first call, if it raises, gives way to the eager step for good.

    Args:
        compiled: the compiled step (compiles on its first call).
        eager: the eager step (``trainer.step``) of the same trainer.
        mode: the compile mode, for the message.
        say: called once with one line when it falls back.

    A compile error is raised before the compiled graph runs, so the trainer's state is untouched and the
    eager step takes the same batch.
    """

    def __init__(self, compiled, eager, mode: str, say: Callable[[str], None]):
        self.compiled, self.eager, self.mode, self.say = compiled, eager, mode, say
        self.fell_back = False
        self._first = True

    def __call__(self, batch):
        if not self._first:
            return self.eager(batch) if self.fell_back else self.compiled(batch)
        self._first = False
        try:
            return self.compiled(batch)
        except Exception as error:  # noqa: BLE001 - any failure of the first compile
            self.fell_back = True
            self.say(
                f"compile={self.mode} (auto) failed on the first step ({_first_line(error)}): the eager step "
                f"(compile=off) instead; pass --compile {self.mode} to make this an error"
            )
            return self.eager(batch)


def allow_tf32() -> None:
    """Precision "tf32": TF32 for fp32 matmuls and convolutions, through the current API where this torch has
    it (``torch.backends.cuda.matmul.fp32_precision``, ``torch.backends.cudnn.conv.fp32_precision``), else the
    legacy ``allow_tf32`` flags (on recent torch, touching those once the new API is in use raises)."""
    matmul, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        matmul.fp32_precision = "tf32"
        conv.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
