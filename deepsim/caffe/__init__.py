"""Run the authors' released Caffe models in PyTorch: a .caffemodel reader and converters, no Caffe needed.

    deepsim import-caffe bvlc_reference_caffenet.caffemodel --layer caffenet --out caffenet.pt
    deepsim import-caffe release_deepsim_v0/fc6/generator.caffemodel --layer fc6 --out fc6.pt \\
        --invert-network-weights caffenet.pt
    deepsim invert --checkpoint fc6.pt IMAGE... --out inv/

Python::

    from deepsim.caffe import load_generator, load_caffenet
    generator = load_generator("fc6/generator.caffemodel", "fc6")   # InversionGenerator, weights in place
    state = load_caffenet("bvlc_reference_caffenet.caffemodel")     # our caffenet comparator's state dict

The reader (:mod:`.protobuf`, :mod:`.caffemodel`) walks the protocol-buffer wire format itself (no Caffe, no
compiled caffe.proto, no protobuf package) and takes both layer formats (``layer``, V2, and ``layers``, V1
with its enum layer types) and both blob shape encodings (``shape { dim }`` and num/channels/height/width).

How the authors' generators map to ours, and where the two differ (:mod:`.convert` has the layer table):

* Same layers, same order: defc7, defc6, defc5 (FC 4096, LReLU 0.3; pool5: Rconv6, Rconv7, Rconv8, 3x3 512,
  the last unpadded), reshape to 256x4x4, deconv5 (4x4/s2 p1, 256), conv5_1 (3x3, 512), deconv4 (256),
  conv4_1 (256), deconv3 (128), conv3_1 (128), deconv2 (64), deconv1 (32), deconv0 (3, linear): 256x256.
* Caffe's "convN_1" are Deconvolution layers with stride 1; ours are convolutions. Same function: the
  kernel is transposed (in <-> out) and flipped in space on import.
* Output: Caffe's is BGR on Caffe's scale (0..255 minus the mean), 256x256; ours is RGB in [-1, 1] (the affine
  map and channel swap are folded into deconv0), centre-cropped to ``image_size`` (227 = the code's crop at
  offset 14; 256 = no crop).
* The up-conv biases are fixed (lr_mult 0) when the authors train; here they are ordinary parameters that
  take whatever bias blob the file holds (zeros when it holds none).
* Ours can take noise beside the features (``noise_dim``, pre-image sampling): imported generators take none.
* The mean: the generator's output is taken relative to a per-channel mean (default 104, 117, 123, the
  mean our caffenet comparator subtracts and synthesizing's CaffeNet classifier uses). Parts of the authors'
  code subtract the 256x256 mean image instead; a per-pixel mean cannot fold into a bias, so it is
  approximated by its channel means (``mean_bgr`` / ``--mean-bgr`` to change them).

Input the generators expect: CaffeNet's features on Caffe's input scale as CaffeNet computes them: fc6 and
fc7 after their in-place ReLU, pool5 (256x6x6). Our ``caffenet`` comparator with the imported weights gives
exactly these; ``deepsim invert`` on an imported checkpoint feeds them (Phi = caffenet, 227x227 input).
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
