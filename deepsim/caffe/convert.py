"""Caffe layers -> our modules: the authors' inversion generators and BVLC's CaffeNet.

Generators (Evolving-AI-Lab/synthesizing nets/upconv/*/generator.prototxt, the layout of release_deepsim_v0):

    Caffe layer            type            blob 0 (weights)          ours (InversionGenerator)
    defc7, defc6, defc5    InnerProduct    (out, in)                 head[0..2] LinearLReLU: copied
    Rconv6, Rconv7, Rconv8 Convolution     (out, in, 3, 3)           head[0..2] ConvLReLU (pool5): copied
    deconv5 .. deconv1     Deconvolution   (in, out, 4, 4), s2 p1    decoder UpConvLReLU: copied
    conv5_1, conv4_1,      Deconvolution   (in, out, 3, 3), s1 p1    decoder ConvLReLU 3x3 p1: transposed
      conv3_1                                                        (in <-> out) and flipped in space
    deconv0                Deconvolution   (32, 3, 4, 4), s2 p1      decoder ConvTranspose2d: copied, then
                                                                     the output convention folded in

Why the stride-1 flip holds: a stride-1 transposed convolution with kernel W (in, out, k, k) and padding p
is the cross-correlation with W' = W.transpose(0, 1) flipped in both spatial axes and padding k - 1 - p
(3x3, p = 1 -> p' = 1).

Output convention: Caffe's generator gives a BGR image on Caffe's scale (0..255 minus the per-channel
ImageNet mean); ours is RGB in [-1, 1]: rgb[c] = (bgr[2 - c] + mean_bgr[2 - c]) / 127.5 - 1, an affine
map per channel, folded into deconv0 (output channels reversed, weights / 127.5, bias (b + mean) / 127.5 - 1).

Every weight and bias blob is checked against the shape our module needs, and every (De)Convolution's
kernel, stride, padding, group and dilation, and every ReLU's negative slope, against our layer where the
file states them (Caffe writes them all; a weights-only file without ReLU layers is taken as it is).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from deepsim.applications.generators import InversionGenerator
from deepsim.comparators import CAFFE_MEAN_BGR

from .caffemodel import CaffeLayer, CaffeModel, CaffeModelError, read_caffemodel

__all__ = [
    "GENERATOR_LAYERS",
    "FC_HEAD",
    "CONV5_HEAD",
    "UP_STACK",
    "CAFFENET_LAYERS",
    "CAFFENET_WEIGHT_SHAPES",
    "generator_from_caffemodel",
    "caffenet_from_caffemodel",
    "load_generator",
    "load_caffenet",
    "fold_output_convention",
]

# --layer (the Caffe side's name) -> the inverted layer of our InversionGenerator.
GENERATOR_LAYERS = {"pool5": "conv5", "conv5": "conv5", "fc6": "fc6", "fc7": "fc7", "fc8": "fc8"}
FC_HEAD = ("defc7", "defc6", "defc5")
CONV5_HEAD = ("Rconv6", "Rconv7", "Rconv8")
UP_STACK = ("deconv5", "conv5_1", "deconv4", "conv4_1", "deconv3", "conv3_1", "deconv2", "deconv1", "deconv0")

# BVLC's bvlc_reference_caffenet: weight blob shapes (Caffe's layout = our comparator's) and conv geometry.
CAFFENET_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
CAFFENET_WEIGHT_SHAPES = {
    "conv1": (96, 3, 11, 11),
    "conv2": (256, 48, 5, 5),
    "conv3": (384, 256, 3, 3),
    "conv4": (384, 192, 3, 3),
    "conv5": (256, 192, 3, 3),
    "fc6": (4096, 9216),
    "fc7": (4096, 4096),
    "fc8": (1000, 4096),
}
_CAFFENET_CONV = {  # kernel, stride, pad, group
    "conv1": (11, 4, 0, 1),
    "conv2": (5, 1, 2, 2),
    "conv3": (3, 1, 1, 1),
    "conv4": (3, 1, 1, 2),
    "conv5": (3, 1, 1, 2),
}


def _fail(model: CaffeModel, layer: CaffeLayer, message: str) -> CaffeModelError:
    return CaffeModelError(f"{model.path}: layer {layer.name!r} ({layer.type}): {message}")


def _fmt(shape) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _blobs(model: CaffeModel, layer: CaffeLayer, weight_shape: tuple[int, ...], layout: str, outputs: int):
    """The weight blob reshaped to ``weight_shape`` (float32) and the bias blob (``outputs``,) or None."""
    blobs = layer.blobs
    if not blobs:
        raise _fail(model, layer, f"no weight blob; expected weights {_fmt(weight_shape)} {layout}")
    if len(blobs) > 2:
        raise _fail(model, layer, f"{len(blobs)} blobs; a layer here has weights and at most a bias")
    weight = blobs[0]
    if weight.shape_as(len(weight_shape)) != tuple(weight_shape):
        raise _fail(
            model, layer, f"weight blob has {weight.describe()}, expected {_fmt(weight_shape)} {layout}"
        )
    w = weight.values.reshape(weight_shape).astype(np.float32)  # always a copy: writable, owns its memory
    b = None
    if len(blobs) == 2:
        if blobs[1].shape_as(1) != (outputs,):
            raise _fail(model, layer, f"bias blob has {blobs[1].describe()}, expected ({outputs},)")
        b = blobs[1].values.astype(np.float32)
    return w, b


def _check_geometry(model, layer, *, kernel, stride, pad, group, num_output, target: str) -> None:
    """Compare the file's ConvolutionParameter (when present) with what our module computes."""
    conv = layer.convolution
    if conv is None:
        return
    stated = {
        "num_output": (conv.num_output, num_output),
        "kernel": (conv.kernel, tuple(kernel)),
        "stride": (conv.stride, tuple(stride)),
        "pad": (conv.pad, tuple(pad)),
        "group": (conv.group, group),
        "dilation": (conv.dilation, (1, 1)),
    }
    for what, (theirs, ours) in stated.items():
        if theirs is not None and theirs != ours:
            raise _fail(model, layer, f"{what} {theirs} in the file, but {target} needs {ours}")


def _convert(model: CaffeModel, layer: CaffeLayer, module: nn.Module):
    """(weight, bias or None) for ``module`` from ``layer``, in the module's own layout."""
    if isinstance(module, nn.Linear):
        return _convert_linear(model, layer, module)
    if isinstance(module, nn.ConvTranspose2d):
        return _convert_deconv(model, layer, module)
    if isinstance(module, nn.Conv2d):
        return _convert_conv(model, layer, module)
    raise TypeError(f"no Caffe mapping for {type(module).__name__}")


def _convert_linear(model: CaffeModel, layer: CaffeLayer, module: nn.Linear):
    """An InnerProduct layer (optionally stored transposed) -> our Linear's (out, in) weight and bias."""
    if layer.type != "InnerProduct":
        raise _fail(model, layer, f"expected an InnerProduct layer for our {module}")
    out_f, in_f = module.weight.shape
    param = layer.inner_product
    transpose = bool(param and param.transpose)
    if param is not None and param.axis != 1:
        raise _fail(
            model, layer, f"InnerProduct axis {param.axis}; only axis 1 (flatten all but the batch) maps"
        )
    if param is not None and param.num_output not in (None, out_f):
        raise _fail(model, layer, f"num_output {param.num_output} in the file, but our layer has {out_f}")
    stored = (in_f, out_f) if transpose else (out_f, in_f)
    layout = "(InnerProduct with transpose: in, out)" if transpose else "(InnerProduct: out, in)"
    w, b = _blobs(model, layer, stored, layout, out_f)
    return (np.ascontiguousarray(w.T) if transpose else w), b


def _convert_deconv(model: CaffeModel, layer: CaffeLayer, module: nn.ConvTranspose2d):
    """A Deconvolution layer -> our ConvTranspose2d: the same (in, out, kh, kw) layout, copied."""
    if layer.type != "Deconvolution":
        raise _fail(model, layer, f"expected a Deconvolution layer for our {module}")
    stored = tuple(module.weight.shape)  # (in, out, k, k): Caffe's Deconvolution layout too
    geometry = dict(kernel=module.kernel_size, stride=module.stride, pad=module.padding, group=1)
    _check_geometry(model, layer, **geometry, num_output=stored[1], target=f"our {module}")
    return _blobs(model, layer, stored, "(Deconvolution: in, out, kh, kw)", stored[1])


def _convert_conv(model: CaffeModel, layer: CaffeLayer, module: nn.Conv2d):
    """A Convolution layer (copied) or a stride-1 Deconvolution (transposed and flipped, see the module
    docstring) -> our Conv2d."""
    out_c, in_c, kh, kw = module.weight.shape
    if layer.type == "Convolution":
        geometry = dict(kernel=(kh, kw), stride=module.stride, pad=module.padding, group=module.groups)
        _check_geometry(model, layer, **geometry, num_output=out_c, target=f"our {module}")
        return _blobs(model, layer, (out_c, in_c, kh, kw), "(Convolution: out, in/group, kh, kw)", out_c)
    if layer.type == "Deconvolution" and module.stride == (1, 1) and module.groups == 1:
        ph, pw = module.padding
        geometry = dict(kernel=(kh, kw), stride=(1, 1), pad=(kh - 1 - ph, kw - 1 - pw), group=1)
        target = f"our {module} (as a stride-1 deconvolution)"
        _check_geometry(model, layer, **geometry, num_output=out_c, target=target)
        w, b = _blobs(model, layer, (in_c, out_c, kh, kw), "(Deconvolution: in, out, kh, kw)", out_c)
        return np.ascontiguousarray(w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]), b
    raise _fail(model, layer, f"a {layer.type} layer does not map to our {module}")


def _check_activation(model: CaffeModel, layer: CaffeLayer, alpha: float | None) -> None:
    """The ReLU after ``layer`` must have our slope ``alpha`` (None: our layer is linear, so no ReLU)."""
    if not any(other.type == "ReLU" for other in model.layers):
        return  # a weights-only file: nothing stated to check
    relus = [other for other in model.consumers(layer.tops[0]) if other.type == "ReLU"] if layer.tops else []
    if alpha is None:
        if relus:
            raise _fail(model, layer, f"followed by ReLU {relus[0].name!r}, but our last layer is linear")
        return
    if not relus:
        raise _fail(model, layer, f"not followed by a ReLU, but our layer applies LReLU({alpha})")
    slope = relus[0].relu_negative_slope
    if abs(slope - alpha) > 1e-6:
        raise _fail(
            model, layer, f"its ReLU {relus[0].name!r} has negative_slope {slope:g}, ours is {alpha:g}"
        )


def _set(module: nn.Module, weight: np.ndarray, bias: np.ndarray | None, what: str) -> None:
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(weight))
        if module.bias is not None:
            module.bias.copy_(torch.from_numpy(bias) if bias is not None else torch.zeros_like(module.bias))
        elif bias is not None and np.any(bias != 0):
            raise CaffeModelError(f"{what}: the file has a nonzero bias, but our layer has none")


def fold_output_convention(
    weight: np.ndarray, bias: np.ndarray | None, mean_bgr=CAFFE_MEAN_BGR
) -> tuple[np.ndarray, np.ndarray]:
    """deconv0's (weight (C, 3, k, k), bias (3,)) for BGR on Caffe's scale -> the same layer for RGB in [-1,
    1].

    Caffe pixel (BGR, 0..255 minus ``mean_bgr``) y -> ours x[c] = (y[2 - c] + mean_bgr[2 - c]) / 127.5 - 1.
    """
    mean = np.asarray(mean_bgr, np.float64)[::-1]  # RGB order
    bias = np.zeros(3) if bias is None else np.asarray(bias, np.float64)
    folded_w = np.asarray(weight, np.float64)[:, ::-1] / 127.5
    folded_b = (bias[::-1] + mean) / 127.5 - 1.0
    return np.ascontiguousarray(folded_w, np.float32), folded_b.astype(np.float32)


def _check_mean(mean_bgr) -> tuple[float, float, float]:
    values = tuple(float(v) for v in mean_bgr)
    if len(values) != 3 or not all(np.isfinite(values)):
        raise ValueError(f"mean_bgr {mean_bgr!r}: expected three finite numbers (B, G, R on 0..255)")
    return values


def generator_from_caffemodel(
    model: CaffeModel, layer: str, *, image_size: int = 227, mean_bgr=CAFFE_MEAN_BGR
) -> InversionGenerator:
    """Our :class:`InversionGenerator` with the weights of a parsed generator caffemodel (see
    :func:`load_generator`)."""
    if layer not in GENERATOR_LAYERS:
        raise ValueError(f"generator layer {layer!r}: expected one of {', '.join(GENERATOR_LAYERS)}")
    ours = GENERATOR_LAYERS[layer]
    mean_bgr = _check_mean(mean_bgr)
    if not 129 <= image_size <= 256:  # the Caffe stack always makes 256x256; we only crop it
        raise ValueError(f"image_size {image_size}: the authors' generators output 256x256, crop to 129..256")
    head_names = CONV5_HEAD if ours == "conv5" else FC_HEAD
    for name in head_names + UP_STACK:  # every layer first, so a missing one is named before any work
        model.layer(name)
    fc_width = 4096
    if ours != "conv5":  # the FC width is read from defc7 (the code's is 4096; tests use narrow ones)
        first = model.layer(FC_HEAD[0])
        if not first.blobs:
            raise _fail(model, first, "no weight blob")
        shape = first.blobs[0].shape_as(2)
        if shape is None:
            raise _fail(
                model, first, f"weight blob has {first.blobs[0].describe()}, expected a matrix (out, in)"
            )
        fc_width = shape[1] if first.inner_product and first.inner_product.transpose else shape[0]
    generator = InversionGenerator(ours, image_size=image_size, fc_width=fc_width)
    modules = [m for m in generator.head if isinstance(m, (nn.Linear, nn.Conv2d))] + list(
        generator.decoder.layers
    )
    names = head_names + UP_STACK
    if len(modules) != len(names):  # our layout changed: this table must follow it
        raise RuntimeError(
            f"InversionGenerator({ours}) has {len(modules)} weight layers, the Caffe layout {len(names)}"
        )
    for i, (name, module) in enumerate(zip(names, modules)):
        caffe_layer = model.layer(name)
        weight, bias = _convert(model, caffe_layer, module)
        last = i == len(names) - 1
        _check_activation(model, caffe_layer, None if last else module.alpha)
        if last:
            weight, bias = fold_output_convention(weight, bias, mean_bgr)
        _set(module, weight, bias, f"{model.path}: layer {name!r}")
    return generator.eval()


def caffenet_from_caffemodel(model: CaffeModel, *, up_to: str = "fc8") -> dict[str, torch.Tensor]:
    """Our CaffeNet comparator's state dict from a parsed BVLC CaffeNet (see :func:`load_caffenet`)."""
    if up_to not in CAFFENET_LAYERS:
        raise ValueError(f"up_to {up_to!r}: expected one of {', '.join(CAFFENET_LAYERS)}")
    state: dict[str, torch.Tensor] = {}
    for name in CAFFENET_LAYERS[: CAFFENET_LAYERS.index(up_to) + 1]:
        if not model.has_layer(name) and name.startswith("fc") and model.has_layer("conv5"):
            before = CAFFENET_LAYERS[CAFFENET_LAYERS.index(name) - 1]
            raise CaffeModelError(
                f"{model.path} has no layer {name!r} (the net ends before it); import up to {before} with "
                f"up_to={before!r} (CLI: --up-to {before}); conv5 is enough for the pool5 tap"
            )
        layer = model.layer(name)  # a missing one raises, listing the layers the file has
        shape = CAFFENET_WEIGHT_SHAPES[name]
        if name in _CAFFENET_CONV:
            if layer.type != "Convolution":
                raise _fail(model, layer, "expected a Convolution layer (BVLC CaffeNet)")
            k, s, p, g = _CAFFENET_CONV[name]
            geometry = dict(kernel=(k, k), stride=(s, s), pad=(p, p), group=g)
            target = "BVLC CaffeNet (our caffenet comparator)"
            _check_geometry(model, layer, **geometry, num_output=shape[0], target=target)
            weight, bias = _blobs(model, layer, shape, "(Convolution: out, in/group, kh, kw)", shape[0])
        else:
            if layer.type != "InnerProduct":
                raise _fail(model, layer, "expected an InnerProduct layer (BVLC CaffeNet)")
            param = layer.inner_product
            transpose = bool(param and param.transpose)
            weight, bias = _blobs(
                model, layer, shape[::-1] if transpose else shape, "(InnerProduct: out, in)", shape[0]
            )
            weight = np.ascontiguousarray(weight.T) if transpose else weight
        _check_activation(model, layer, None if name == "fc8" else 0.0)
        state[f"{name}.weight"] = torch.from_numpy(weight)  # _blobs made a writable float32 copy
        state[f"{name}.bias"] = torch.from_numpy(bias) if bias is not None else torch.zeros(shape[0])
    return state


def load_generator(
    path: str | Path, layer: str, *, image_size: int = 227, mean_bgr=CAFFE_MEAN_BGR
) -> InversionGenerator:
    """One of the authors' released inversion generators as our :class:`InversionGenerator`, in eval mode.

    Args:
        path: the generator .caffemodel (release_deepsim_v0: ``pool5|fc6|fc7/generator.caffemodel``).
        layer: the inverted CaffeNet layer: "pool5" (alias "conv5"), "fc6", "fc7" (or "fc8" for a generator
            of that layout taking 1000 inputs; none was released).
        image_size: our output side: 227 = the 256x256 Caffe output centre-cropped at offset 14 (as the
            code crops it), 256 = the whole Caffe output.
        mean_bgr: the per-channel mean (B, G, R on 0..255) the generator's output is relative to.

    Returns:
        the generator; ``generator(features)`` takes CaffeNet features as CaffeNet computes them on Caffe's
        input scale: fc6 / fc7 after their (in-place) ReLU, (B, 4096); pool5, (B, 256, 6, 6). Our
        ``caffenet`` comparator with the imported CaffeNet weights gives exactly these
        (``Comparator("caffenet:fc6", weights=...)``, or :class:`deepsim.applications.FeatureExtractor`).
        Output: (B, 3, image_size, image_size), RGB in [-1, 1] (the house convention; not clamped).
    """
    return generator_from_caffemodel(read_caffemodel(path), layer, image_size=image_size, mean_bgr=mean_bgr)


def load_caffenet(path: str | Path, *, up_to: str = "fc8") -> dict[str, torch.Tensor]:
    """BVLC's reference CaffeNet as the state dict of our ``caffenet`` comparator.

    Args:
        path: ``bvlc_reference_caffenet.caffemodel`` (V1 ``layers`` or V2 ``layer`` format).
        up_to: the last layer to import (conv1 .. ``up_to``); a comparator tapped at or below it loads the
            result (pool5 needs conv5, the fc6 tap fc6).

    Returns:
        {"conv1.weight", "conv1.bias", ..., "<up_to>.bias"}: float32 tensors in Caffe's blob layout (grouped
        convs (out, in/2, k, k), first-layer input channels in BGR order), the keys
        :class:`deepsim.Comparator` reads for ``caffenet`` (``deepsim import-caffe --layer caffenet`` writes
        them to a file that ``--comparator-weights`` / ``--invert-network-weights`` take).
    """
    return caffenet_from_caffemodel(read_caffemodel(path), up_to=up_to)
