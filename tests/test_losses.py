"""DeePSiM loss terms against hand computations, the baselines, and the pause rule's transitions."""

import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

from deepsim import Comparator, DeePSiMLoss, PauseRule
from deepsim.config import CAFFE_TO_DEEPSIM
from deepsim.losses import image_distance


def test_image_terms_by_hand():
    fake = torch.tensor([[[[1.0, 2.0]]], [[[0.0, -1.0]]]])  # (2, 1, 1, 2)
    real = torch.zeros_like(fake)
    assert image_distance(fake, real, "se").item() == pytest.approx((1 + 4 + 0 + 1) / 2)
    assert image_distance(fake, real, "l1").item() == pytest.approx((1 + 2 + 0 + 1) / 2)


def test_feature_term_by_hand():
    c = Comparator("alexnet-random:conv2=1,conv3=0.5")
    loss = DeePSiMLoss(c, lambda_adv=0, lambda_img=0, lambda_feat=1)
    fake, real = torch.rand(3, 3, 64, 64) * 2 - 1, torch.rand(3, 3, 64, 64) * 2 - 1
    f2, f3 = c(fake)
    r2, r3 = c(real)
    expected = ((f2 - r2).pow(2).sum() + 0.5 * (f3 - r3).pow(2).sum()) / 3
    out = loss(fake, real)
    torch.testing.assert_close(out.feat, expected, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(out.total, expected, rtol=1e-5, atol=1e-3)


def test_adversarial_and_total_by_hand():
    c = Comparator("alexnet-random:conv3")
    loss = DeePSiMLoss(c, lambda_feat=0.2, lambda_adv=3.0, lambda_img=0.1)
    fake, real = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    logits = torch.tensor([[0.3, -0.2], [1.0, 2.0]])
    out = loss(fake, real, logits)
    p_real = torch.softmax(logits, 1)[:, 1]
    assert out.adv.item() == pytest.approx(-torch.log(p_real).mean().item(), rel=1e-6)
    expected = 0.2 * out.feat + 3.0 * out.adv + 0.1 * out.img
    torch.testing.assert_close(out.total, expected)


def test_discriminator_loss_by_hand():
    real_logits = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    fake_logits = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    out = DeePSiMLoss.discriminator_loss(real_logits, fake_logits)
    p = lambda l, k: torch.softmax(l, 1)[:, k]  # noqa: E731
    assert out.real.item() == pytest.approx(-torch.log(p(real_logits, 1)).mean().item(), rel=1e-6)
    assert out.fake.item() == pytest.approx(-torch.log(p(fake_logits, 0)).mean().item(), rel=1e-6)
    assert out.total.item() == pytest.approx(out.real.item() + out.fake.item(), rel=1e-6)


def test_baselines_ignore_comparator_and_d():
    fake, real = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    se = DeePSiMLoss(None, loss="se")(fake, real)
    l1 = DeePSiMLoss(None, loss="l1")(fake, real)
    assert se.total.item() == pytest.approx(F.mse_loss(fake, real, reduction="sum").item() / 2, rel=1e-5)
    assert l1.total.item() == pytest.approx(F.l1_loss(fake, real, reduction="sum").item() / 2, rel=1e-5)
    assert not DeePSiMLoss(None, loss="se").uses_discriminator


def test_caffe_scale_convention():
    # Caffe EuclideanLoss on 0..255 pixels = sum / (2B); ours on [-1, 1] = sum / B.
    fake, real = torch.rand(4, 3, 8, 8) * 2 - 1, torch.rand(4, 3, 8, 8) * 2 - 1
    caffe = ((fake - real) * 127.5).pow(2).sum() / (2 * 4)
    ours = image_distance(fake, real)
    assert (2e-6 * caffe).item() == pytest.approx((2e-6 * CAFFE_TO_DEEPSIM["img"] * ours).item(), rel=1e-5)


def test_invalid_loss_names():
    with pytest.raises(ValueError, match="'deepsim', 'se' or 'l1'"):
        DeePSiMLoss(None, loss="mse")
    with pytest.raises(ValueError, match="needs a comparator"):
        DeePSiMLoss(None)


def _step(rule, r):
    # r = (real + fake) / adv with adv = 1
    return rule(torch.tensor(r / 2), torch.tensor(r / 2), torch.tensor(1.0))


def _train_py_rule(ratio, train_discr, train_gen):
    """model_training/train.py's switch, transcribed line by line (plain Python, the oracle)."""
    if ratio < 1e-1 and train_discr:
        train_discr = False
        train_gen = True
    if ratio > 5e-1 and not train_discr:
        train_discr = True
        train_gen = True
    if ratio > 1e1 and train_gen:
        train_gen = False
        train_discr = True
    return train_discr, train_gen


def test_pause_rule_replays_the_derived_code_state_machine():
    """A long random r sequence (log-uniform over 1e-3..1e3, so every threshold is crossed both ways many
    times, plus exact threshold values): every state of the device rule equals the transcription's."""
    gen = torch.Generator().manual_seed(0)
    ratios = torch.pow(10.0, torch.rand(5000, generator=gen) * 6 - 3).tolist()
    ratios[::97] = [0.1, 0.5, 10.0] * (len(ratios[::97]) // 3) + [0.1] * (len(ratios[::97]) % 3)
    rule = PauseRule()
    train_d, train_g = True, True
    visited = set()
    for t, r in enumerate(ratios):
        gates = rule.gates()  # what gates iteration t: the state after iteration t - 1
        assert (gates[0].item(), gates[1].item()) == (train_d, train_g), t
        new_d, new_g, ratio = rule(torch.tensor(r), torch.tensor(0.0), torch.tensor(1.0))
        train_d, train_g = _train_py_rule(ratio.item(), train_d, train_g)
        assert (new_d.item(), new_g.item()) == (train_d, train_g), (t, r)
        assert (rule.train_d.item(), rule.train_g.item()) == (train_d, train_g)
        visited.add((train_d, train_g))
    assert visited == {(True, True), (False, True), (True, False)}  # (False, False) is unreachable


def test_pause_rule_transitions():
    rule = PauseRule()
    assert [t.item() for t in rule.gates()] == [True, True]  # both train at the start
    train_d, train_g, r = _step(rule, 1.0)
    assert train_d.item() and train_g.item() and r.item() == pytest.approx(1.0)
    train_d, train_g, _ = _step(rule, 0.05)  # r < 0.1 stops D (from the next iteration on), G trains
    assert not train_d.item() and train_g.item()
    assert [t.item() for t in rule.gates()] == [False, True]
    train_d, _, _ = _step(rule, 0.3)  # between 0.1 and 0.5: stays stopped (hysteresis)
    assert not train_d.item()
    train_d, _, _ = _step(rule, 0.6)  # r > 0.5 resumes D
    assert train_d.item()
    train_d, train_g, _ = _step(rule, 11.0)  # r > 10 stops G, D trains
    assert train_d.item() and not train_g.item()
    _, train_g, _ = _step(rule, 9.0)  # G stays stopped below 10 ...
    assert not train_g.item()
    _, train_g, _ = _step(rule, 0.5)
    assert not train_g.item()
    train_d, train_g, _ = _step(rule, 0.05)  # ... until r < 0.1, which also stops D
    assert not train_d.item() and train_g.item()
    train_d, train_g, _ = _step(rule, float("nan"))  # a non-finite r changes nothing
    assert not train_d.item() and train_g.item()


def test_pause_rule_is_device_tensors_and_state_is_saved():
    rule = PauseRule()
    train_d, train_g, r = _step(rule, 0.01)
    assert all(isinstance(t, torch.Tensor) and t.dim() == 0 for t in (train_d, train_g, r))
    _step(rule, 20.0)  # D resumes (r > 0.5) and G stops (r > 10)
    state = rule.state_dict()
    assert (state["train_d"].item(), state["train_g"].item()) == (True, False)
    fresh = PauseRule()
    fresh.load_state_dict(state)
    assert [t.item() for t in fresh.gates()] == [True, False]
    assert not _step(fresh, 0.3)[1].item()  # G stays stopped: the state came back
    assert math.isfinite(_step(PauseRule(), 1.0)[2].item())


@pytest.mark.parametrize("d_paused", [True, False])
def test_pause_rule_loads_the_earlier_one_flag_state(d_paused):
    """Checkpoints of the earlier rule hold only d_paused: D's flag is its negation, G trains (the earlier
    rule kept no G state and resumed G whenever r <= 10)."""
    rule = PauseRule()
    rule.load_state_dict({"d_paused": torch.tensor(d_paused)})
    assert [t.item() for t in rule.gates()] == [not d_paused, True]
    with pytest.raises(RuntimeError, match="train_g"):  # anything else is still checked
        PauseRule().load_state_dict({"train_d": torch.tensor(True)})


def test_deepsim_loss_validates_its_inputs_with_one_line_errors():
    """The stumbles of a first use: wrong channel count, an unbatched image, a side under the comparator's
    minimum, an integer batch, two shapes: each a ValueError naming the tensor; float64 is cast."""
    loss = DeePSiMLoss(Comparator("alexnet-random:conv3"), lambda_adv=0)
    good = torch.rand(2, 3, 64, 64) * 2 - 1
    cases = {
        "3 (RGB) channels": (torch.rand(2, 1, 64, 64), torch.rand(2, 1, 64, 64)),
        "unsqueeze(0)": (good[0], good[0]),
        "minimum side 31": (torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)),
        "floating dtype": ((good * 127).to(torch.uint8), (good * 127).to(torch.uint8)),
        "same shape": (good, good[:1]),
    }
    for expected, (fake, real) in cases.items():
        with pytest.raises(ValueError, match=re.escape(expected)) as caught:
            loss(fake, real)
        assert "\n" not in str(caught.value)
    assert loss(good.double(), good.double()).total.dtype == torch.float32


def test_deepsim_loss_warns_once_on_a_range_far_outside_minus_one_one():
    loss = DeePSiMLoss(Comparator("alexnet-random:conv3"), lambda_adv=0)
    pixels = torch.rand(2, 3, 64, 64) * 255
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        loss(pixels, pixels)
        loss(pixels, pixels)  # checked on the first call only: no host sync per step
    messages = [str(w.message) for w in seen if "far outside" in str(w.message)]
    assert len(messages) == 1 and "real spans" in messages[0] and "x / 127.5 - 1" in messages[0]
