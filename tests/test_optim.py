"""GatedAdam's solver of the derived code: coupled weight decay, the multistep LR policy on the device, the
weight-decay groups of each network, and optimizer states saved before these existed."""

import pytest
import torch

from deepsim.applications.generators import InversionGenerator, VariationalAutoencoder
from deepsim.networks import AutoencoderGenerator, Discriminator
from deepsim.train.optim import GatedAdam, decay_param_groups, multistep_factor


def _pair(seed=0):
    torch.manual_seed(seed)
    ours = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    return ours, [torch.nn.Parameter(p.detach().clone()) for p in ours]


def test_weight_decay_is_coupled_l2_like_caffe():
    """grad += wd * p before the moments: torch.optim.Adam(weight_decay=...), not AdamW."""
    ours, theirs = _pair()
    adamw = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    gated = GatedAdam(ours, lr=1e-2, weight_decay=0.1)
    adam = torch.optim.Adam(theirs, lr=1e-2, weight_decay=0.1)
    decoupled = torch.optim.AdamW(adamw, lr=1e-2, weight_decay=0.1)
    for _ in range(6):
        grads = [torch.randn_like(p) for p in ours]
        for params, opt in ((ours, gated), (theirs, adam), (adamw, decoupled)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for p, q, w in zip(ours, theirs, adamw):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
        assert (p - w).abs().max() > 1e-4  # the decoupled variant is measurably different


def test_multistep_lr_counts_the_networks_own_steps():
    """lr = base * gamma^k, k = milestones reached by the optimizer's step count; paused steps do not count
    (each Caffe solver of the derived code counts only its own iterations)."""
    ours, theirs = _pair(1)
    gated = GatedAdam(ours, lr=1e-2, lr_milestones=(2, 4), lr_gamma=0.5)
    adam = torch.optim.Adam(theirs, lr=1e-2)
    enabled = [
        True,
        False,
        True,
        True,
        False,
        True,
        True,
    ]  # 5 real steps: lrs 1, 0.5, 0.5, 0.25, 0.25 (x1e-2)
    done = 0
    lrs = []
    for on in enabled:
        grads = [torch.randn_like(p) for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        gated.step(torch.tensor(on))
        if on:
            done += 1
            adam.param_groups[0]["lr"] = 1e-2 * 0.5 ** sum(done >= m for m in (2, 4))
            adam.step()
            lrs.append(gated.current_lr().item())
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert lrs == pytest.approx([1e-2, 5e-3, 5e-3, 2.5e-3, 2.5e-3])
    assert gated.current_lr().device == ours[0].device and gated.current_lr().dim() == 0


def test_multistep_factor_on_device_tensors():
    steps = torch.tensor([0.0, 299_999.0, 300_000.0, 1_099_999.0, 1_100_000.0, 2e6])
    code = (300_000, 500_000, 700_000, 900_000, 1_100_000)
    expected = torch.tensor([1, 1, 0.5, 0.5**4, 0.5**5, 0.5**5])
    torch.testing.assert_close(multistep_factor(steps, code, 0.5), expected)
    torch.testing.assert_close(multistep_factor(steps, (), 0.5), torch.ones(6))


def test_invalid_solver_settings_are_named():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="lr_milestones"):
        GatedAdam(p, lr_milestones=(5, 3))
    with pytest.raises(ValueError, match="weight_decay"):
        GatedAdam(p, weight_decay=-1.0)
    with pytest.raises(ValueError, match="scope 'some'"):
        decay_param_groups(torch.nn.Linear(2, 2), 1e-4, "some")


def _ids(params):
    return {id(p) for p in params}


def test_decay_groups_follow_the_prototxts_decay_mult():
    d = Discriminator(first_stride=4, feature_dim=16)
    groups = decay_param_groups(d, 4e-4, "code")
    assert len(groups) == 1 and groups[0]["weight_decay"] == 4e-4  # every D parameter: decay_mult 1
    assert _ids(groups[0]["params"]) == _ids(d.parameters())

    conv5 = InversionGenerator("conv5", image_size=32, upconv_bias="zero")
    decayed, plain = decay_param_groups(conv5, 4e-4, "code")
    heads = [m.weight for m in conv5.head if isinstance(m, torch.nn.Conv2d)]
    assert _ids(decayed["params"]) == _ids(heads) and len(heads) == 3  # Rconv6..8 weights
    assert plain["weight_decay"] == 0.0
    frozen = [p for p in conv5.parameters() if not p.requires_grad]
    assert frozen and not _ids(frozen) & _ids(
        decayed["params"] + plain["params"]
    )  # fixed biases: not optimised

    for generator in (
        InversionGenerator("fc6", image_size=32, fc_width=8),
        VariationalAutoencoder(32, 8, 8),
        AutoencoderGenerator(),
    ):
        (only,) = decay_param_groups(generator, 4e-4, "code")
        assert only["weight_decay"] == 0.0  # decay_mult 0 on every parameter of the authors' generators
    (none,) = decay_param_groups(conv5, 0.0, "code")  # no decay: one group in parameter order (old states)
    assert [id(p) for p in none["params"]] == [id(p) for p in conv5.parameters() if p.requires_grad]
    (every,) = decay_param_groups(conv5, 4e-4, "all")
    assert every["weight_decay"] == 4e-4 and _ids(every["params"]) == _ids(
        p for p in conv5.parameters() if p.requires_grad
    )


def test_optimizer_state_saved_before_the_solver_options_loads():
    p = [torch.nn.Parameter(torch.ones(3))]
    old = GatedAdam(p, lr=1e-3)
    state = old.state_dict()
    for group in state["param_groups"]:  # what a checkpoint of the earlier GatedAdam holds
        for key in ("weight_decay", "lr_milestones", "lr_gamma"):
            group.pop(key)
    new = GatedAdam(p, lr=1e-3, weight_decay=4e-4, lr_milestones=(10,), lr_gamma=0.5)
    new.load_state_dict(state)
    group = new.param_groups[0]
    assert (group["weight_decay"], group["lr_milestones"], group["lr_gamma"]) == (0.0, (), 1.0)  # as trained
    p[0].grad = torch.ones(3)
    new.step()  # runs


def test_loaded_state_goes_to_each_parameters_device():
    """A checkpoint read with map_location="cpu" into an optimizer on another device (meta here, standing in
    for CUDA): the step counts follow the parameters too, not only the moments (torch leaves ``step`` on
    the CPU unless the group is capturable or fused)."""
    cpu_params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    saved = GatedAdam(cpu_params, lr=1e-3)
    for p in cpu_params:
        p.grad = torch.ones_like(p)
    saved.step()
    meta_params = [torch.nn.Parameter(torch.empty_like(p, device="meta")) for p in cpu_params]
    loaded = GatedAdam(meta_params, lr=1e-3)
    loaded.load_state_dict(saved.state_dict())
    for p in meta_params:
        state = loaded.state[p]
        assert {key: value.device.type for key, value in state.items()} == dict.fromkeys(state, "meta")
    assert loaded.current_lr().device.type == "meta"
