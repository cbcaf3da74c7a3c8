"""Write an imported Caffe model as a file the rest of deepsim loads (``deepsim import-caffe``).

* A generator (``--layer pool5|fc6|fc7|fc8``) becomes an "invert" checkpoint, the same payload a
  ``deepsim train invert`` run writes for its generator: ``config`` (the ``invert-<layer>`` preset with
  Phi = CaffeNet, 227 px, the file's FC width, no noise), ``step`` 0 and ``trainer["generator"]``. So
  ``deepsim invert`` / ``deepsim sample-preimages`` / ``deepsim eval`` and
  :func:`deepsim.applications.load_model` take it as it is. Phi is our ``caffenet`` comparator tapped at
  the inverted layer (pool5, or fc6/fc7/fc8 after ReLU, as CaffeNet computes them in place), whose weights
  file (``invert_network_weights``) is the imported CaffeNet below; without it the checkpoint still holds
  the generator, and ``deepsim invert`` says that Phi's weights are missing.
* CaffeNet (``--layer caffenet``) becomes a weights file with ``state_dict`` = our comparator's keys
  (conv1.weight ... fc8.bias), which ``--comparator caffenet:<tap> --comparator-weights FILE`` and
  ``--invert-network caffenet --invert-network-weights FILE`` read.

Both carry ``caffe_import`` = {source file, layer, format, mean_bgr (generators), up_to (CaffeNet)} and are
written by :func:`deepsim.train.checkpoint.save_checkpoint` (atomic: an existing file is never left broken).
Not written: optimizer or discriminator state, so an imported generator cannot be ``--resume``\\ d.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from deepsim.applications.inversion import FeatureExtractor
from deepsim.comparators import CAFFE_MEAN_BGR
from deepsim.config import get_preset
from deepsim.train.checkpoint import save_checkpoint

from .caffemodel import read_caffemodel
from .convert import GENERATOR_LAYERS, caffenet_from_caffemodel, generator_from_caffemodel

__all__ = ["IMPORT_LAYERS", "ImportResult", "import_caffemodel", "imported_generator_payload"]

IMPORT_LAYERS = (*GENERATOR_LAYERS, "caffenet")
PHI_IMAGE_SIZE = 227  # CaffeNet's input; the generators' 256x256 output is centre-cropped to it (code)


@dataclass(frozen=True)
class ImportResult:
    """What :func:`import_caffemodel` wrote: the file, what it holds, and the caffemodel's format."""

    out: Path
    layer: str
    format: str  # "V1" (``layers``) or "V2" (``layer``)
    layers: int  # layers in the caffemodel
    fc_width: int | None  # generators with an FC head: width of defc7/defc6
    invert_network_weights: str | None  # generators: Phi's weights file recorded in the config


def import_caffemodel(
    caffemodel: str | Path,
    layer: str,
    out: str | Path,
    *,
    invert_network_weights: str | Path | None = None,
    mean_bgr=CAFFE_MEAN_BGR,
    up_to: str = "fc8",
    force: bool = False,
) -> ImportResult:
    """Read ``caffemodel`` and write it to ``out`` in deepsim's format (see the module docstring).

    Args:
        caffemodel: a generator .caffemodel (``layer`` pool5|conv5|fc6|fc7|fc8) or BVLC's CaffeNet
            (``layer`` "caffenet").
        layer: which of the two it is and, for a generator, the CaffeNet layer it inverts.
        out: the file to write (its folder is created).
        invert_network_weights: generators: the imported CaffeNet file (``layer="caffenet"``) that
            ``deepsim invert`` uses as Phi; checked here (it must load into the caffenet comparator at the
            inverted tap). Stored as an absolute path.
        mean_bgr: generators: the per-channel mean the Caffe output is relative to (B, G, R on 0..255).
        up_to: CaffeNet: the last layer imported (conv5 is enough for pool5 taps).
        force: replace ``out`` if it exists (otherwise FileExistsError, before anything is read).
    """
    if layer not in IMPORT_LAYERS:
        raise ValueError(f"--layer {layer!r}: expected one of {', '.join(IMPORT_LAYERS)}")
    if Path(out).exists() and not force:
        raise FileExistsError(f"--out {out} exists; pass --force to replace it (library: force=True)")
    model = read_caffemodel(caffemodel)
    meta = {
        "source": str(Path(caffemodel).resolve()),
        "layer": layer,
        "format": model.format,
        "net": model.name,
    }
    if layer == "caffenet":
        state = caffenet_from_caffemodel(model, up_to=up_to)
        meta["up_to"] = up_to
        path = save_checkpoint(out, {"state_dict": state, "step": 0, "caffe_import": meta})
        return ImportResult(path, layer, model.format, len(model.layers), None, None)

    inverted = GENERATOR_LAYERS[layer]
    generator = generator_from_caffemodel(model, layer, image_size=PHI_IMAGE_SIZE, mean_bgr=mean_bgr)
    phi_weights = None
    if invert_network_weights is not None:
        phi_weights = str(Path(invert_network_weights).resolve())
        FeatureExtractor("caffenet", inverted, phi_weights)  # fails now, naming the file, if Phi cannot load
    meta["mean_bgr"] = [float(v) for v in mean_bgr]
    payload = imported_generator_payload(
        generator, phi_weights=phi_weights, out_folder=Path(out).parent, meta=meta
    )
    fc_width = generator.head[0].out_features if inverted != "conv5" else None
    path = save_checkpoint(out, payload)
    return ImportResult(path, layer, model.format, len(model.layers), fc_width, phi_weights)


def imported_generator_payload(generator, *, phi_weights: str | None, out_folder, meta: dict) -> dict:
    """The "invert" checkpoint payload of an imported generator of the authors (Phi = CaffeNet, 227 px)."""
    inverted = generator.layer
    fc_width = generator.head[0].out_features if inverted != "conv5" else None
    config = get_preset(f"invert-{inverted}").replace(
        invert_network="caffenet",
        invert_network_weights=phi_weights,
        comparator="caffenet:pool5",  # the code's comparator, should the generator be trained further
        comparator_weights=phi_weights,
        image_size=generator.image_size,
        fc_width=fc_width or 4096,
        noise_dim=0,
        out=str(out_folder),
    )
    return {
        "config": config.to_dict(),
        "step": 0,
        "trainer": {"generator": generator.state_dict()},
        "caffe_import": meta,
    }
