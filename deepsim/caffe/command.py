"""``deepsim import-caffe MODEL.caffemodel --layer pool5|fc6|fc7|fc8|caffenet --out FILE.pt`` (registered by
deepsim.cli); the work is :func:`deepsim.caffe.import_caffemodel`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deepsim.applications.commands import picked
from deepsim.comparators import CAFFE_MEAN_BGR

from .convert import CAFFENET_LAYERS
from .importer import IMPORT_LAYERS, import_caffemodel

__all__ = ["add_subcommand", "run_import_caffe"]


def _mean(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: expected three numbers B,G,R, e.g. 104,117,123")
    return values


def add_subcommand(sub) -> None:
    """Add ``import-caffe`` to the ``deepsim`` argument parser's subparsers."""

    p = sub.add_parser(
        "import-caffe",
        help="convert the authors' released Caffe models (generators, CaffeNet) into deepsim files",
        description="Read a binary .caffemodel (no Caffe needed) and write a deepsim file: a generator of "
        "release_deepsim_v0 (--layer pool5|fc6|fc7) becomes an 'invert' checkpoint for deepsim invert / "
        "sample-preimages / eval; BVLC's CaffeNet (--layer caffenet) becomes a weights file for "
        "--comparator caffenet:TAP --comparator-weights FILE and --invert-network-weights FILE.",
    )
    p.add_argument("caffemodel", type=Path, metavar="MODEL.caffemodel")
    p.add_argument(
        "--layer",
        required=True,
        choices=IMPORT_LAYERS,
        help="the inverted CaffeNet layer of a generator (conv5 = pool5), or 'caffenet' for BVLC's CaffeNet",
    )
    p.add_argument("--out", required=True, type=Path, help="the file to write (e.g. fc6.pt)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--invert-network-weights",
        type=Path,
        default=None,
        metavar="CAFFENET.pt",
        help="generators: the imported CaffeNet (import-caffe --layer caffenet) that deepsim invert feeds "
        "the generator from (Phi)",
    )
    p.add_argument(
        "--mean-bgr",
        type=_mean,
        default=CAFFE_MEAN_BGR,
        metavar="B,G,R",
        help="generators: the per-channel mean the Caffe output is relative to (default: %(default)s)",
    )
    p.add_argument(
        "--up-to",
        default="fc8",
        choices=CAFFENET_LAYERS,
        help="caffenet: import conv1 up to this layer (conv5 suffices for pool5 taps; default: %(default)s)",
    )


def run_import_caffe(args) -> int:
    options = picked(args, "invert_network_weights", "mean_bgr", "up_to", "force")
    result = import_caffemodel(args.caffemodel, args.layer, args.out, **options)
    what = f"CaffeNet conv1..{args.up_to}" if result.layer == "caffenet" else f"the {result.layer} generator"
    width = f", FC width {result.fc_width}" if result.fc_width else ""
    print(
        f"{args.caffemodel} ({result.format} format, {result.layers} layers): {what}{width} -> {result.out}"
    )
    if result.layer == "caffenet":
        print(
            f"use: --comparator caffenet:pool5 --comparator-weights {result.out}, or "
            f"--invert-network caffenet --invert-network-weights {result.out}"
        )
    elif result.invert_network_weights:
        print(f"use: deepsim invert --checkpoint {result.out} IMAGE... --out DIR")
    else:
        print(
            f"note: no --invert-network-weights: {result.out} holds the generator, but deepsim invert needs "
            "Phi's weights too (import bvlc_reference_caffenet.caffemodel with --layer caffenet and pass it)",
            file=sys.stderr,
        )
    return 0
