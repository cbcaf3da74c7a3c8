"""torch.compile traces every op (as a torch.library custom op) with no graph break."""

import pytest
import torch
import torch._dynamo

from ._common import INTERPRET, K

pytestmark = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs Triton runnable")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _conv(x, w, b):
    return K.conv_lrelu(x, w, b, 2, 1).square().sum()


def _upconv(x, w, b):
    return K.conv_transpose_lrelu(x, w, b, 2, 1).square().sum()


def _feat(a, b):
    return K.feature_distance([a, a * 2], [b, b], [1.0, 0.5], "mean")


def _pairwise(a, b):
    return K.mean_pairwise_distance(a.flatten(1)) + b.sum()


CASES = {
    "conv_lrelu": (_conv, lambda: (torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.randn(4))),
    "conv_transpose_lrelu": (
        _upconv,
        lambda: (torch.randn(2, 4, 3, 3), torch.randn(4, 3, 4, 4), torch.randn(3)),
    ),
    "feature_distance": (_feat, lambda: (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4))),
    "mean_pairwise_distance": (_pairwise, lambda: (torch.randn(5, 3, 2, 2), torch.randn(3))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_no_graph_break(name):
    fn, make = CASES[name]
    args = [t.to(DEVICE) for t in make()]
    if name != "mean_pairwise_distance":
        args = [t.requires_grad_() for t in args]
    torch._dynamo.reset()
    with K.use_backend("triton"):
        explanation = torch._dynamo.explain(fn)(*args)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
        # and the compiled function (forward + backward through the custom ops) matches eager
        out = torch.compile(fn, backend="aot_eager", fullgraph=True)(*args)
        expected = fn(*args)
    torch.testing.assert_close(out, expected)
    if out.requires_grad:
        out.backward()
