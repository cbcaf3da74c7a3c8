"""deepsim.metrics.LPIPS against the lpips package, NaN safety, and the shared input checks."""

import warnings

import pytest
import torch
from deepsim.kernels import lpips_distance, reference_lpips_distance, use_backend

from deepsim.metrics import LPIPS, lpips
from deepsim.perceptual import PerceptualLoss

lpips_pkg = pytest.importorskip(
    "lpips", reason="the exactness tests need the lpips package (pip install lpips)"
)
torchvision = pytest.importorskip("torchvision")

BACKENDS = ["reference", "triton"]  # triton: the interpreter on CPU (tests/conftest.py)


def _backbone_file(tmp_path, net):
    """A random backbone in torchvision's format (features.* keys), seeded."""
    torch.manual_seed(7)
    model = torchvision.models.alexnet() if net == "alex" else torchvision.models.vgg16()
    state = {k: v for k, v in model.state_dict().items() if k.startswith("features.")}
    path = tmp_path / f"{net}-random.pth"
    torch.save(state, path)
    return path, state


def _their_lpips(net, state):
    """lpips.LPIPS with its shipped lin weights and our backbone (pnet_rand: no torchvision download)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = lpips_pkg.LPIPS(net=net, pnet_rand=True, verbose=False)
    slices = [theirs.net.slice1, theirs.net.slice2, theirs.net.slice3, theirs.net.slice4, theirs.net.slice5]
    for key, value in state.items():
        _, index, kind = key.split(".")
        owner = next(s for s in slices if index in s._modules)
        getattr(owner._modules[index], kind).data.copy_(value)
    return theirs.eval()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("net, side", [("alex", 40), pytest.param("vgg", 32, marks=pytest.mark.slow)])
def test_equals_lpips_package_value_and_input_gradient(tmp_path, net, side, backend):
    path, state = _backbone_file(tmp_path, net)
    ours = LPIPS(net, backbone_weights=path)
    theirs = _their_lpips(net, state)
    torch.manual_seed(0)
    x = (torch.rand(2, 3, side, side + 3) * 2 - 1).requires_grad_()  # odd width
    y = torch.rand(2, 3, side, side + 3) * 2 - 1
    expected = theirs(x, y).view(-1)
    (g_expected,) = torch.autograd.grad(expected, x, torch.tensor([1.0, -0.5]))
    with use_backend(backend):
        got = ours(x, y)
    (g_got,) = torch.autograd.grad(got, x, torch.tensor([1.0, -0.5]))
    assert got.shape == (2,)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(g_got, g_expected, rtol=1e-5, atol=1e-5 * g_expected.abs().max().item())


def test_normalize_flag_matches_lpips_normalize(tmp_path):
    path, state = _backbone_file(tmp_path, "alex")
    ours, theirs = LPIPS("alex", backbone_weights=path, normalize=True), _their_lpips("alex", state)
    x, y = torch.rand(2, 3, 48, 48), torch.rand(2, 3, 48, 48)
    torch.testing.assert_close(ours(x, y), theirs(x, y, normalize=True).view(-1), rtol=1e-5, atol=0)
    torch.testing.assert_close(
        lpips(x, y, normalize=True, backbone_weights=path), ours(x, y), rtol=1e-6, atol=0
    )


def _lpips_formula(f0s, f1s, weights):
    """lpips' own normalisation, f / (sqrt(sum f^2) + eps): NaN gradients at zero features."""
    total = 0
    for a, b, w in zip(f0s, f1s, weights):
        n0, n1 = lpips_pkg.normalize_tensor(a), lpips_pkg.normalize_tensor(b)
        total = total + ((n0 - n1).pow(2) * w.view(1, -1, 1, 1)).sum(1).mean((1, 2))
    return total


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_features_give_finite_gradients_where_lpips_gives_nan(backend):
    shapes = [(2, 4, 3, 3), (2, 6, 2, 5)]
    weights = [torch.rand(s[1]) for s in shapes]
    f0s = [torch.zeros(s, requires_grad=True) for s in shapes]
    f1s = [torch.zeros(s) for s in shapes]
    f1s[1][:, :, 0, 0] = 1.0  # one side non-zero somewhere
    grads_theirs = torch.autograd.grad(_lpips_formula(f0s, f1s, weights).sum(), f0s)
    assert any(torch.isnan(g).any() for g in grads_theirs), "lpips' formula should give NaN here"
    with use_backend(backend):
        d = lpips_distance(f0s, f1s, weights)
    grads = torch.autograd.grad(d.sum(), f0s)
    assert all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(d, _lpips_formula(f0s, f1s, weights).detach(), rtol=1e-6, atol=0)


def test_real_side_taps_have_no_graph():
    metric = LPIPS("alex", backbone_weights="random")
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    y = torch.rand(2, 3, 64, 64)
    seen = []
    hook = metric.comparator.layers[0].register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    metric(x, y).sum().backward()
    hook.remove()
    assert seen == [True, False]  # x's taps carry a graph, y's do not
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_missing_lin_weights_file_is_one_line_error(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"lin_weights file .*nope\.pth does not exist.*pip install lpips"
    ) as e:
        LPIPS("alex", backbone_weights="random", lin_weights=tmp_path / "nope.pth")
    assert "\n" not in str(e.value)


def test_missing_backbone_file_is_one_line_error(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"backbone_weights file .*gone\.pth does not exist.*alexnet-owt"
    ) as e:
        LPIPS("alex", backbone_weights=tmp_path / "gone.pth")
    assert "\n" not in str(e.value)


def test_lin_weights_load_weights_only(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"lin0.model.1.weight": torch.ones(1, 64, 1, 1), "x": object()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        LPIPS("alex", backbone_weights="random", lin_weights=path)


@pytest.mark.parametrize("make", ["lpips", "perceptual"])
def test_shared_input_validation(make):
    metric = (
        LPIPS("alex", backbone_weights="random")
        if make == "lpips"
        else PerceptualLoss("alexnet-random:conv3", reduction="none")
    )
    x = torch.rand(2, 3, 64, 64)
    cases = [
        (torch.rand(3, 64, 64), r"x: expected a 4-D batch .*unsqueeze\(0\)"),
        (torch.rand(2, 1, 64, 64), r"x: expected 3 \(RGB\) channels"),
        (torch.rand(2, 3, 16, 16), r"x: images of 16x16 are smaller than this comparator's minimum side"),
        ((torch.rand(2, 3, 64, 64) * 255).to(torch.uint8), r"x: expected a floating dtype, got torch.uint8"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            metric(bad, x if bad.shape == x.shape else bad)
        assert "\n" not in str(e.value)
    with pytest.raises(
        ValueError, match=r"x \(2, 3, 64, 64\) and y \(2, 3, 64, 72\) must have the same shape"
    ):
        metric(x, torch.rand(2, 3, 64, 72))
    out64 = metric(x.double(), x.double() * 0.5)  # float64 is cast to the comparator's dtype
    assert out64.dtype == torch.float32 and out64.shape == (2,)


@pytest.mark.parametrize("normalize, bad", [(False, 255.0), (True, -1.0)])
def test_out_of_range_warns_once_naming_range_and_flag(normalize, bad):
    metric = LPIPS("alex", backbone_weights="random", normalize=normalize)
    x = torch.rand(1, 3, 64, 64) * bad
    with pytest.warns(UserWarning, match=r"spans \[.*\], far outside the declared .*normalize=") as record:
        metric(x, x)
        metric(x, x)
    assert len([w for w in record if "far outside" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LPIPS("alex", backbone_weights="random", normalize=normalize)(
            torch.rand(1, 3, 64, 64) * (1 if normalize else 2) - (0 if normalize else 1),
            torch.zeros(1, 3, 64, 64),
        )


def test_reference_gradcheck_float64():
    torch.manual_seed(1)
    f0 = [
        torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True),
        torch.randn(2, 5, dtype=torch.float64, requires_grad=True),
    ]
    f1 = [torch.randn_like(t, requires_grad=True) for t in f0]
    w = [torch.rand(3, dtype=torch.float64), torch.rand(5, dtype=torch.float64)]
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: reference_lpips_distance([a, b], [c, d], w), (*f0, *f1)
    )
