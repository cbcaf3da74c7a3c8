"""Activation bytes kept for backward by the fused conv block vs eager conv2d + bias + leaky_relu.

Definition (documented in bench/kernels.py too): run a chain of L identical conv blocks whose output
feeds a consumer that saves it (as the next layer of a network does), collect every tensor autograd saves
(torch.autograd.graph.saved_tensors_hooks), and count the bytes of unique storages, leaving out the
parameters and the chain's input (both alive whatever the block saves). That is the activation memory
the blocks themselves allocate and keep alive until backward. Eager keeps the pre-activation (saved by
leaky_relu) and the output (saved by the next conv) per block; the fused block keeps only the output.
Counted per single block including its input, both sides save x + one (N, C_out, OH, OW) tensor (ratio 1).
"""

import pytest
import torch

from bench.kernels import saved_bytes

from ._common import INTERPRET, K

pytestmark = pytest.mark.skipif(not INTERPRET, reason="CPU Triton needs TRITON_INTERPRET=1")


def _chain(block, x, params):
    y = x
    for w, b in params:
        y = block(y, w, b, 1, 1, 0.3)
    return (y * y).sum()  # the consumer saves the last block's output, as a next layer would


def test_fused_block_saves_at_most_055x_of_eager():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    params = [
        (torch.randn(8, 8, 3, 3, requires_grad=True), torch.randn(8, requires_grad=True)) for _ in range(4)
    ]
    exclude = [x] + [t for p in params for t in p]
    eager = saved_bytes(lambda: _chain(K.reference_conv_lrelu, x, params), exclude)
    with K.use_backend("triton"):
        fused = saved_bytes(lambda: _chain(K.conv_lrelu, x, params), exclude)
    act = 2 * 8 * 8 * 8 * 4  # one block output, fp32
    assert eager == 2 * 4 * act, "eager: pre-activation + output per block"
    assert fused == 4 * act, "fused: output only"
    assert fused / eager <= 0.55


def test_single_block_saves_only_input_weight_output():
    x = torch.randn(1, 3, 5, 5, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with K.use_backend("triton"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = K.conv_lrelu(x, w, b, 1, 1)
    ptrs = {t.untyped_storage().data_ptr() for t in saved}
    assert ptrs == {
        x.untyped_storage().data_ptr(),
        w.untyped_storage().data_ptr(),
        y.untyped_storage().data_ptr(),
    }
