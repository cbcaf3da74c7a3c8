"""Run the authors' released Caffe models in PyTorch: a .caffemodel reader and converters, no Caffe needed.

    deepsim import-caffe bvlc_reference_caffenet.caffemodel --layer caffenet --out caffenet.pt
    deepsim import-caffe release_deepsim_v0/fc6/generator.caffemodel --layer fc6 --out fc6.pt \
        --invert-network-weights caffenet.pt
    deepsim invert --checkpoint fc6.pt IMAGE... --out inv/

Design notes: docs/caffe.md.
"""

from .caffemodel import CaffeBlob, CaffeLayer, CaffeModel, CaffeModelError, read_caffemodel
from .convert import (
    CAFFENET_LAYERS,
    GENERATOR_LAYERS,
    caffenet_from_caffemodel,
    fold_output_convention,
    generator_from_caffemodel,
    load_caffenet,
    load_generator,
)
from .importer import IMPORT_LAYERS, ImportResult, import_caffemodel

__all__ = [
    "load_generator",
    "load_caffenet",
    "import_caffemodel",
    "ImportResult",
    "read_caffemodel",
    "CaffeModel",
    "CaffeLayer",
    "CaffeBlob",
    "CaffeModelError",
    "generator_from_caffemodel",
    "caffenet_from_caffemodel",
    "fold_output_convention",
    "GENERATOR_LAYERS",
    "CAFFENET_LAYERS",
    "IMPORT_LAYERS",
]
