"""The published PyTorch port of the authors' generators (``upconvGAN`` in GAN_utils.py, weights released as
DeePSiM_DosovitskiyBrox2016) -> our :class:`~deepsim.applications.generators.InversionGenerator`.

Their state dict names the layers as the Caffe prototxt does (docs/files.md has the table)::

    fc6 / fc7 / fc8: defc7, defc6, defc5 (Linear)      pool5: Rconv6, Rconv7, Rconv8 (Conv2d 3x3)
    then deconv5, conv5_1, deconv4, conv4_1, deconv3, conv3_1, deconv2, deconv1, deconv0 (ConvTranspose2d)

Keys may carry the module prefix ``G.`` and the stray ``.1.`` their loader strips. Linear, Conv2d and the
4x4 ConvTranspose2d weights have our layout and are copied; the stride-1 3x3 ``convN_1`` are transposed
convolutions there and convolutions here (transposed in <-> out and flipped in space, as for Caffe); their
output is BGR on the 0..255 scale minus the mean (their ``visualize`` adds RGB 123, 117, 104), 256 px, which
is
folded into deconv0 (ours: RGB in [-1, 1]) by :func:`deepsim.caffe.fold_output_convention`.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

from deepsim.applications.generators import InversionGenerator
from deepsim.comparators import CAFFE_MEAN_BGR

from .convert import CONV5_HEAD, FC_HEAD, UP_STACK, fold_output_convention

__all__ = ["UPCONVGAN_LAYERS", "is_upconvgan_state", "normalize_upconvgan_keys", "generator_from_upconvgan"]

UPCONVGAN_LAYERS = {"pool5": "conv5", "fc6": "fc6", "fc7": "fc7", "fc8": "fc8"}  # their name -> ours


def normalize_upconvgan_keys(state: dict) -> dict[str, torch.Tensor]:
    """Their keys as ``<layer>.weight`` / ``<layer>.bias``: without a ``G.`` prefix or the stray ``.1.``."""
    out = {}
    for key, value in state.items():
        if not isinstance(key, str):
            continue
        name = key[2:] if key.startswith("G.") else key
        name = re.sub(r"\.1\.", ".", name)
        out[name] = value
    return out


def is_upconvgan_state(state) -> bool:
    """True for a dict of tensors in their key layout (it has ``deconv0.weight`` and ``defc7``/``Rconv6``)."""
    if not isinstance(state, dict):
        return False
    keys = normalize_upconvgan_keys(state)
    return "deconv0.weight" in keys and ("defc7.weight" in keys or "Rconv6.weight" in keys)


def _fail(source: str, message: str) -> ValueError:
    return ValueError(f"{source}: {message}")


def _tensor(state: dict, key: str, shape: tuple[int, ...], source: str) -> torch.Tensor:
    if key not in state:
        raise _fail(
            source, f"no tensor {key!r} (an upconvGAN state dict has {', '.join(sorted(state)[:4])}, ...)"
        )
    value = state[key]
    if not isinstance(value, torch.Tensor):
        raise _fail(source, f"{key!r} is a {type(value).__name__}, not a tensor")
    if tuple(value.shape) != tuple(shape):
        raise _fail(source, f"tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
        raise _fail(source, f"tensor {key!r} holds non-finite or non-float values")
    return value.detach().to(torch.float32)


def generator_from_upconvgan(
    state: dict,
    layer: str | None = None,
    *,
    image_size: int = 256,
    mean_bgr=CAFFE_MEAN_BGR,
    source: str = "upconvGAN state dict",
) -> InversionGenerator:
    """Our generator with the weights of an ``upconvGAN`` state dict, in eval mode.

    Args:
        state: their state dict (``defc7.weight`` ... ``deconv0.bias``, optionally prefixed ``G.``).
        layer: "pool5", "fc6", "fc7" or "fc8"; None: pool5 if it has Rconv6, fc8 if defc7 takes 1000 inputs,
            else fc6 (fc6 and fc7 have the same shapes: pass "fc7" for the fc7 generator).
        image_size: our output side: 256 = their whole output, 227 = its centre (the code's crop).
        mean_bgr: the per-channel mean their output is relative to (B, G, R on 0..255).

    Raises:
        ValueError: a tensor is missing, has another shape, is not finite, or the dict has keys no layer takes
            (each message names the tensor).
    """
    keys = normalize_upconvgan_keys(state)
    if layer is None:
        layer = _guess_layer(keys)
    if layer not in UPCONVGAN_LAYERS:
        raise ValueError(f"upconvGAN layer {layer!r}: expected one of {', '.join(UPCONVGAN_LAYERS)}")
    ours = UPCONVGAN_LAYERS[layer]
    head_names = CONV5_HEAD if ours == "conv5" else FC_HEAD
    fc_width = 4096
    if ours != "conv5":
        first = keys.get("defc7.weight")
        if not isinstance(first, torch.Tensor) or first.ndim != 2:
            raise _fail(source, "no matrix 'defc7.weight' (out, in)")
        fc_width = int(first.shape[0])
    known = {f"{name}.{kind}" for name in head_names + UP_STACK for kind in ("weight", "bias")}
    extra = sorted(set(keys) - known)
    if extra:
        raise _fail(source, f"unexpected tensors {', '.join(extra[:4])} for the {layer} generator")
    generator = InversionGenerator(ours, image_size=image_size, fc_width=fc_width)
    modules = [m for m in generator.head if isinstance(m, (nn.Linear, nn.Conv2d))] + list(
        generator.decoder.layers
    )
    last = len(modules) - 1
    with torch.no_grad():
        for i, (name, module) in enumerate(zip(head_names + UP_STACK, modules)):
            _load_layer(module, name, keys, source, mean_bgr, output=i == last)
    return generator.eval()


def _guess_layer(keys: dict) -> str:
    """pool5 if the dict has Rconv6, fc8 if defc7 takes 1000 inputs, else fc6."""
    if "Rconv6.weight" in keys:
        return "pool5"
    first = keys.get("defc7.weight")
    return "fc8" if isinstance(first, torch.Tensor) and first.ndim == 2 and first.shape[1] == 1000 else "fc6"


def _load_layer(module: nn.Module, name: str, keys: dict, source: str, mean_bgr, *, output: bool) -> None:
    """Copy their ``name`` weight and bias into ``module``; the ``output`` layer's also take our output
    convention (from ``mean_bgr``)."""
    ours_w = tuple(module.weight.shape)
    stride1_deconv = (
        isinstance(module, nn.Conv2d) and not isinstance(module, nn.ConvTranspose2d) and name in UP_STACK
    )
    theirs_w = (ours_w[1], ours_w[0], *ours_w[2:]) if stride1_deconv else ours_w
    weight = _tensor(keys, f"{name}.weight", theirs_w, source)
    out_channels = theirs_w[1] if isinstance(module, nn.ConvTranspose2d) or stride1_deconv else theirs_w[0]
    bias = _tensor(keys, f"{name}.bias", (out_channels,), source) if f"{name}.bias" in keys else None
    if stride1_deconv:  # transposed conv, stride 1, padding 1 == conv with W^T flipped, padding 1
        weight = weight.transpose(0, 1).flip(2, 3)
    if output:
        w, b = fold_output_convention(
            weight.numpy(), None if bias is None else bias.numpy(), mean_bgr=mean_bgr
        )
        weight, bias = torch.from_numpy(w), torch.from_numpy(b)
    module.weight.copy_(weight)
    module.bias.copy_(bias if bias is not None else torch.zeros_like(module.bias))


def upconvgan_reference_output(images_bgr_minus_mean: torch.Tensor, mean_bgr=CAFFE_MEAN_BGR) -> torch.Tensor:
    """Their raw output (B, 3, H, W), BGR on 0..255 minus ``mean_bgr`` -> ours: RGB in [-1, 1]."""
    mean = torch.tensor(np.asarray(mean_bgr, np.float32)).view(1, 3, 1, 1)
    return (images_bgr_minus_mean + mean).flip(1) / 127.5 - 1.0
