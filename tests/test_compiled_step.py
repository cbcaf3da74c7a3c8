"""The compiled training step: one graph with no break in both update orders, the same parameters as the eager
step, GatedAdam (weight decay, multistep LR without recompiling), bf16 autocast and channels_last on CPU."""

import copy

import pytest
import torch
import torch._dynamo
import torch._inductor.config as inductor_config

from deepsim.config import get_preset
from deepsim.train.compiled import CompiledStep, count_graph_breaks
from deepsim.train.factory import build_trainer
from deepsim.train.optim import GatedAdam

SIZE, BATCH, STEPS, LR = 40, 2, 3, 1e-4  # 40: the smallest multiple of 8 the code's unpadded D takes (35)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _trainer(**changes):
    config = get_preset("autoencoder-photos").replace(
        comparator="alexnet-random:conv2", batch_size=BATCH, image_size=SIZE, device="cpu", lr=LR, **changes
    )
    torch.manual_seed(0)
    return build_trainer(config, torch.device("cpu"))


def _batches(n=STEPS, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(BATCH, 3, SIZE, SIZE, generator=gen) * 2 - 1 for _ in range(n)]


def test_gated_adam_matches_torch_adam_and_a_closed_gate_changes_nothing():
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    gated, adam = GatedAdam(ours, lr=1e-2), torch.optim.Adam(theirs, lr=1e-2)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        gated.step(torch.tensor(True))
        adam.step()
        before = [p.detach().clone() for p in ours] + [s[k].clone() for s in gated.state.values() for k in s]
        gated.step(torch.tensor(False))  # paused: parameters, moments and step counts stay bit-identical
        after = [p.detach() for p in ours] + [s[k] for s in gated.state.values() for k in s]
        assert all(torch.equal(a, b) for a, b in zip(before, after))
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)  # same formula, different rounding order
    assert gated.state[ours[0]]["step"].item() == 5


@pytest.mark.parametrize("order", ["code", "simultaneous"])
def test_compiled_step_is_one_graph_without_break(order):
    graphs, breaks, reasons = count_graph_breaks(_trainer(update_order=order), _batches(1)[0])
    assert breaks == 0, reasons
    assert graphs == 1


@pytest.fixture
def eager_rng_in_inductor():
    # The config module's own patch(): monkeypatch.setattr on it can delete the option on undo when the
    # module's __getattr__ hides it at set time, which breaks every later compile in the session.
    with inductor_config.patch(fallback_random=True):
        yield


# Tolerances. "aot_eager" runs the traced graph (Dynamo + AOTAutograd: forward, both backward passes, pause
# rule and Adam in one graph) with eager kernels: bit-identical to the eager step. "inductor" fuses and
# reorders floating-point reductions, so gradients differ at ~1e-7 relative where they are large; G's encoder
# gradients come back through the decoder, C and D and are tiny (near Adam's eps), so their relative error is
# larger, and Adam (update ~ g / (sqrt(v) + eps)) passes it on to the update or flips its sign. Measured with
# lr 1e-4, 3 steps, 1 thread: max |diff| 7e-5 (encoder only), 98.5 % of elements within 1e-6, mean |diff| =
# 0.03 % of the mean parameter movement. Bounds: every element within lr * steps (a wrong update on a real
# gradient reaches ~2 lr per step), >= 95 % of all elements within 1e-6, and the mean difference below 1 % of
# the mean movement over the steps (which rules out a systematically wrong update or a skipped one).
# Dropout: inductor's own RNG would draw other masks, so fallback_random makes it call the eager RNG ops in
# program order (without it, compiled and eager runs differ by design).
# Both orders through Dynamo + AOTAutograd (aot_eager: the traced graph, bit-identical to eager); inductor's
# numerics in the default order only (a cold inductor compile of this graph costs minutes on a loaded 2-core
# machine, and the two orders differ in graph order, not in the kernels inductor generates).
@pytest.mark.parametrize(
    "backend,order", [("aot_eager", "code"), ("aot_eager", "simultaneous"), ("inductor", "code")]
)
def test_compiled_step_matches_eager(backend, order, eager_rng_in_inductor):
    eager = _trainer(update_order=order)
    compiled = copy.deepcopy(eager)
    initial = [p.detach().clone() for p in eager.parameters()]
    batches = _batches()
    torch._dynamo.reset()
    step = CompiledStep(compiled, "default", backend=backend)
    torch.manual_seed(1)
    eager_metrics = [eager.step(b) for b in batches]
    torch.manual_seed(1)
    compiled_metrics = [step(b) for b in batches]

    for m_e, m_c in zip(eager_metrics, compiled_metrics):
        assert m_e.keys() == m_c.keys()
        for name in m_e:
            torch.testing.assert_close(m_c[name], m_e[name], rtol=1e-4, atol=1e-6, msg=name)
    total, close, moved, diff_sum, moved_sum = 0, 0, 0.0, 0.0, 0.0
    for (name, p_e), p_c, p_0 in zip(eager.named_parameters(), compiled.parameters(), initial):
        diff = (p_e - p_c).abs()
        if backend == "aot_eager":
            assert torch.equal(p_e, p_c), name
        else:
            assert diff.max() <= LR * STEPS, (name, diff.max().item())
        total += diff.numel()
        close += (diff <= 1e-6).sum().item()
        moved = max(moved, (p_e - p_0).abs().max().item())
        diff_sum, moved_sum = diff_sum + diff.sum().item(), moved_sum + (p_e - p_0).abs().sum().item()
    assert close >= 0.95 * total, close / total
    assert diff_sum <= 0.01 * moved_sum, diff_sum / moved_sum
    assert moved > 0.5 * LR * STEPS  # the steps did update the parameters
    # D's Adam moments, each tensor against its own scale. Inductor reorders the sums of D's backward (a bias
    # or weight gradient is a sum over batch x H x W terms of both signs), and the first layers' gradients
    # come last in the chain and cancel most: an element near 0 can be off by more than its own size, so a
    # bound per element (the earlier atol 1e-6) measures luck. Measured (lr 1e-4, 3 steps, 1 thread), max
    # |diff| / max |moment| of a tensor: 1.5e-6 on torch 2.14.1; on torch 2.11.0 3.8e-3 for exp_avg (D's
    # second conv bias: 2.2e-6 against 5.9e-4, which failed atol 1e-6) and 3.0e-3 for exp_avg_sq. Bound: 2 %
    # of the tensor's largest moment, 5x the worst measured; a wrong or
    # skipped update moves a moment by its whole size.
    for s_e, s_c in zip(eager.opt_d.state.values(), compiled.opt_d.state.values()):
        for key in ("exp_avg", "exp_avg_sq"):
            scale = s_e[key].abs().max().item()
            torch.testing.assert_close(s_c[key], s_e[key], atol=0.02 * scale, rtol=1e-3)
        assert torch.equal(s_c["step"], s_e["step"])
    assert torch.equal(eager.pause.train_d, compiled.pause.train_d)
    assert torch.equal(eager.pause.train_g, compiled.pause.train_g)


@pytest.mark.parametrize("order", ["code", "simultaneous"])
def test_compiled_step_follows_the_pause_rule(order):
    """r below the threshold after iteration 1 stops D for iteration 2 (not for iteration 1): decided on the
    device, inside the one graph."""
    trainer = _trainer(update_order=order)
    trainer.pause.d_below = trainer.pause.d_resume_above = 1e6  # r is always below: D stops after iteration 1
    step = CompiledStep(trainer, "eager")
    torch._dynamo.reset()
    metrics = torch.compile(step.iteration, backend="aot_eager", fullgraph=True)
    first, second = _batches(2)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        out = metrics(first)
        assert out["Pause/train_d"].item() == 1.0 and out["Pause/train_g"].item() == 1.0  # the initial flags
        assert not trainer.pause.train_d.item() and trainer.pause.train_g.item()  # set for iteration 2
        d_before = [p.detach().clone() for p in trainer.discriminator.parameters()]
        g_before = [p.detach().clone() for p in trainer.generator.parameters()]
        out = metrics(second)
    assert out["Pause/train_d"].item() == 0.0 and out["Pause/train_g"].item() == 1.0
    assert all(torch.equal(a, b) for a, b in zip(d_before, trainer.discriminator.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(g_before, trainer.generator.parameters()))
    assert all(s["step"].item() == 1 for s in trainer.opt_d.state.values())
    assert all(s["step"].item() == 2 for s in trainer.opt_g.state.values())


def test_bf16_autocast_runs_on_cpu():
    trainer = _trainer(precision="bf16")
    seen = {}
    hook = trainer.generator.register_forward_hook(lambda m, i, o: seen.update(dtype=o.dtype))  # returns None
    before = [p.detach().clone() for p in trainer.generator.parameters()]
    metrics = trainer.step(_batches(1)[0])
    hook.remove()
    assert seen["dtype"] == torch.bfloat16  # the forward ran under autocast
    assert all(torch.isfinite(v) for v in metrics.values())
    assert all(p.dtype == torch.float32 for p in trainer.parameters())  # fp32 master weights
    assert not all(torch.equal(a, b) for a, b in zip(before, trainer.generator.parameters()))


def test_channels_last_gives_the_same_step():
    plain = _trainer()
    nhwc = copy.deepcopy(plain).to_channels_last()
    conv_weight = nhwc.generator.encoder[0].weight
    assert conv_weight.is_contiguous(memory_format=torch.channels_last) and not conv_weight.is_contiguous()
    batch = _batches(1)[0]
    torch.manual_seed(1)
    plain.step(batch)
    torch.manual_seed(1)
    nhwc.step(batch.contiguous(memory_format=torch.channels_last))
    for p, q in zip(plain.parameters(), nhwc.parameters()):
        torch.testing.assert_close(
            q, p, atol=2e-5, rtol=1e-4
        )  # same math; convolution kernels sum in another order


def test_conv_paths_are_decided_before_the_first_compiled_call(monkeypatch, tmp_path):
    """The kernel dispatcher times every conv block once, eagerly, before the step is traced or captured
    (driven on CPU tensors with a fake timer here; on CPU it is otherwise a no-op)."""
    from deepsim.kernels import dispatch

    timed = []

    def fake_timer(step):  # records the path, does not run it; cuDNN + the epilogue "wins"
        timed.append(step.path)
        return {"triton": 2.0, "cudnn": 1.0}[step.path]

    monkeypatch.setattr(dispatch, "DISPATCH_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(dispatch, "_timer", fake_timer)
    monkeypatch.setattr(dispatch, "_backward_timer", lambda step: {"triton": 2.0, "cudnn": 1.0}[step.path])

    def no_check(op, x, weight, bias, stride, padding, alpha, run, dtype):  # the first-call check runs every
        with torch.no_grad():  # Triton candidate (minutes in the interpreter): tested in test_dispatch.py
            want = run("cudnn", x, weight, bias, stride, padding, alpha)
        if getattr(run, "backward_op", None) is None:
            return {}, None
        return {}, (torch.randn_like(want), want, x.detach(), weight.detach(), stride, padding, alpha)

    monkeypatch.setattr(dispatch, "_check_candidates", no_check)
    monkeypatch.setenv(dispatch.CACHE_ENV, str(tmp_path / "dispatch.json"))
    monkeypatch.delenv("DEEPSIM_KERNELS", raising=False)
    dispatch.reset()
    step, seen = CompiledStep(_trainer(), "eager"), []
    step._fn = lambda batch: seen.append(len(timed))  # the (traced) iteration itself is not the point here
    batches = _batches(2)
    try:
        step(batches[0])
        step(batches[1])
        rows = dispatch.decisions()
    finally:
        dispatch.reset()
    ops = [r["op"] for r in rows]
    assert ops.count("conv_transpose_lrelu") == 2 and ops.count("conv_lrelu") >= 8, ops  # G's and D's blocks
    assert seen == [len(timed), len(timed)] == [2 * len(rows)] * 2, "all timed before the first call, once"
    assert {r["choice"] for r in rows} == {"cudnn"}


def test_lr_milestone_does_not_recompile():
    """The multistep LR is computed from the device step counts inside the graph: crossing a milestone
    halves the learning rate with the same compiled graph (a recompile is an error here)."""
    trainer = _trainer(lr_milestones=(2,), lr_gamma=0.5)
    reference = copy.deepcopy(trainer)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    step = CompiledStep(trainer, "default", backend="aot_eager")
    batches = _batches(4)
    with torch._dynamo.config.patch(error_on_recompile=True):
        lrs = [step(b)["Opt/lr_g"].item() for b in batches]
    assert lrs == pytest.approx([LR, LR / 2, LR / 2, LR / 2])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch.manual_seed(0)  # the eager step crosses the milestone the same way (dropout aside: compare lrs)
    assert [reference.step(b)["Opt/lr_d"].item() for b in batches] == pytest.approx(lrs)


@pytest.mark.parametrize("order", ["code", "simultaneous"])
def test_update_order_decides_which_d_gives_the_adversarial_term(order):
    """ "code": L_adv (logged, and entering r) is D's verdict on the fakes AFTER D's update of this iteration;
    "simultaneous": before it. Checked against D evaluated by hand (dropout off) on the fakes G produced."""
    trainer = _trainer(update_order=order)
    trainer.discriminator.drop1.p = trainer.discriminator.drop2.p = 0.0
    d_before = copy.deepcopy(trainer.discriminator)
    fakes = []
    hook = trainer.generator.register_forward_hook(lambda m, i, o: fakes.append(o.detach()))
    metrics = trainer.step(_batches(1)[0])
    hook.remove()
    assert not all(
        torch.equal(a, b) for a, b in zip(d_before.parameters(), trainer.discriminator.parameters())
    )
    from deepsim.losses import adversarial_loss

    with torch.no_grad():
        after = adversarial_loss(trainer.discriminator(fakes[0]))
        before = adversarial_loss(d_before(fakes[0]))
    expected, other = (after, before) if order == "code" else (before, after)
    torch.testing.assert_close(metrics["Loss/G/adv"], expected, rtol=1e-5, atol=1e-7)
    assert (metrics["Loss/G/adv"] - other).abs() > 1e-6
    ratio = (metrics["Loss/D/real"] + metrics["Loss/D/fake"]) / expected
    torch.testing.assert_close(metrics["Pause/r"], ratio, rtol=1e-5, atol=1e-7)
