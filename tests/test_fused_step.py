"""The training step on the fused Triton kernels matches the same step on the PyTorch references.

CUDA (marked ``cuda``; bench/gpu.sh runs it): two training steps of the autoencoder (batch 8, 64x64) and
of the fc6 inversion (batch 4, 227x227), each from the same initial weights, batches and RNG seed, once
with ``use_backend("reference")`` (cuDNN / cuBLAS) and once with ``use_backend("triton")`` (every
conv+LReLU, up-conv+LReLU and feature distance of G, D and the loss on the Triton kernels). fp32 with TF32
off on both sides, so both multiply in IEEE fp32 and only the order of the sums differs.

Tolerances, and why:

* step 1 metrics (every loss term, the pause rule's r): the same weights on both sides, so only the
  forward's summation order differs (~1e-7 relative per op): ``rtol 1e-4, atol 1e-5``.
* step 2 metrics: after one Adam update, which is ~lr * sign(g) per element, so it is the same on both
  sides except where a gradient is within rounding of 0: ``rtol 1e-3, atol 1e-4``.
* parameters after both steps: every element within ``2 * lr * steps`` (Adam moves an element by about lr
  per step; a gradient of opposite sign on the two sides costs 2 lr per step, a wrong kernel far more over
  a whole tensor); at least 95 % of all elements within 1e-6; and the summed |difference| at most 1 % of
  the summed movement over the steps (rules out a systematically wrong or skipped update).

The fused run is checkpointed and resumed once after its first step (on CUDA: the optimizer state loaded
from a CPU-mapped checkpoint must land on the device).

CPU: the comparison itself is checked on the reference step (a whole step in the Triton interpreter takes
tens of seconds): it passes for two identical runs and fails for a planted error of 1e-3 in one
convolution's output, and for a skipped optimizer step.
"""

from __future__ import annotations

import copy

import pytest
import torch
from deepsim.kernels import use_backend

from deepsim.config import get_preset
from deepsim.tasks import TASKS
from deepsim.train.checkpoint import load_checkpoint, save_checkpoint
from deepsim.train.factory import build_trainer

STEPS = 2
STEP1_TOL = dict(rtol=1e-4, atol=1e-5)
LATER_TOL = dict(rtol=1e-3, atol=1e-4)
CLOSE_ELEMENT = 1e-6  # a parameter element "agrees" within this
CLOSE_FRACTION = 0.95  # ... and at least this fraction of all elements must
MEAN_DIFF_OF_MOVEMENT = 0.01  # summed |difference| / summed |movement|


def autoencoder_config(device: str, batch: int = 8, size: int = 64):
    return get_preset("autoencoder-photos").replace(
        batch_size=batch, image_size=size, device=device, precision="fp32"
    )


def invert_fc6_config(device: str, batch: int = 4, size: int = 227, fc_width: int = 4096):
    return get_preset("invert-fc6").replace(
        invert_network="alexnet-random",
        comparator="alexnet-random:pool5",
        batch_size=batch,
        image_size=size,
        fc_width=fc_width,
        device=device,
        precision="fp32",
    )


def make_batches(config, device, n: int = STEPS, seed: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (config.batch_size, 3, config.image_size, config.image_size)
    return [(torch.rand(shape, generator=gen) * 2 - 1).to(device) for _ in range(n)]


def resume_once(trainer, folder) -> None:
    """Checkpoint ``trainer`` and load it back as a resumed run does (``map_location="cpu"``); every optimizer
    state tensor must then be on its parameter's device (a CPU step count would mix devices in the update)."""
    path = save_checkpoint(
        folder / "checkpoint.pt", {"step": 1, "config": {}, "trainer": trainer.training_state()}
    )
    trainer.load_training_state(load_checkpoint(path)["trainer"])
    for optimizer in (trainer.opt_g, trainer.opt_d):
        for p, state in optimizer.state.items():
            for key, value in state.items():
                assert value.device == p.device, (
                    f"optimizer state {key!r} on {value.device}, its parameter on {p.device}"
                )


def run_steps(trainer, batches, kernels: str, seed: int = 1, resume_dir=None) -> list[dict[str, float]]:
    """``len(batches)`` steps of ``trainer`` on backend ``kernels``; the metrics of each step, as floats.
    With ``resume_dir``: checkpointed and resumed once, after the first step (:func:`resume_once`)."""
    torch.manual_seed(seed)  # D's dropout masks (and G's noise): the same draws on both sides
    metrics = []
    with use_backend(kernels):
        for t, batch in enumerate(batches):
            if t == 1 and resume_dir is not None:
                resume_once(trainer, resume_dir)
            metrics.append({k: float(v) for k, v in trainer.step(batch).items()})
    return metrics


def assert_steps_match(initial, reference, fused, ref_metrics, fused_metrics, lr: float) -> None:
    """The module docstring's tolerances; an AssertionError names the step and metric, or the parameter."""
    for step, (m_r, m_f) in enumerate(zip(ref_metrics, fused_metrics), start=1):
        assert m_r.keys() == m_f.keys()
        tol = STEP1_TOL if step == 1 else LATER_TOL
        for name in m_r:
            torch.testing.assert_close(
                torch.tensor(m_f[name]),
                torch.tensor(m_r[name]),
                **tol,
                msg=lambda m, name=name, step=step: f"step {step} {name}: {m}",
            )
    total, close, diff_sum, moved_sum = 0, 0, 0.0, 0.0
    for (name, p_r), p_f, p_0 in zip(reference.named_parameters(), fused.parameters(), initial):
        diff = (p_r.detach() - p_f.detach()).abs().double()
        assert diff.max() <= 2 * lr * STEPS, (name, diff.max().item())
        total += diff.numel()
        close += (diff <= CLOSE_ELEMENT).sum().item()
        diff_sum += diff.sum().item()
        moved_sum += (p_r.detach() - p_0).abs().double().sum().item()
    assert close >= CLOSE_FRACTION * total, f"{close / total:.4f} of the parameters within {CLOSE_ELEMENT}"
    assert moved_sum > 0, "the steps did not update the parameters"
    assert diff_sum <= MEAN_DIFF_OF_MOVEMENT * moved_sum, (
        f"|difference| = {diff_sum / moved_sum:.4f} of |movement|"
    )


def compare_backends(config, device, kernels: str = "triton", tamper=None, resume_dir=None) -> None:
    """Two steps on the references and two on ``kernels`` from one initial trainer; asserts they match.

    ``tamper(trainer)`` (CPU tests) plants an error in the second run's trainer before its steps.
    ``resume_dir``: the fused run is checkpointed and resumed after its first step (:func:`resume_once`).
    """
    torch.manual_seed(0)
    initial_trainer = build_trainer(config, torch.device(device), TASKS)  # the fc6 inversion too
    batches = make_batches(config, device)
    reference, fused = copy.deepcopy(initial_trainer), copy.deepcopy(initial_trainer)
    initial = [p.detach().clone() for p in initial_trainer.parameters()]
    if tamper is not None:
        tamper(fused)
    ref_metrics = run_steps(reference, batches, "reference")
    fused_metrics = run_steps(fused, batches, kernels, resume_dir=resume_dir)
    assert_steps_match(initial, reference, fused, ref_metrics, fused_metrics, config.lr)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "make_config", [autoencoder_config, invert_fc6_config], ids=["autoencoder", "invert-fc6"]
)
def test_fused_step_matches_reference_on_cuda(make_config, ieee_fp32, tmp_path):
    """... with the fused run resumed once from a checkpoint after its first step."""
    compare_backends(make_config("cuda"), "cuda", resume_dir=tmp_path)


# ---- CPU: the comparison itself, on the reference step ---------------------------------------------------
@pytest.fixture
def small_autoencoder(one_intra_op_thread):
    # 40 px: the smallest multiple of 8 that the derived code's unpadded D takes (35)
    return autoencoder_config("cpu", batch=2, size=40).replace(comparator="alexnet-random:conv2")


def test_comparison_accepts_identical_runs(small_autoencoder, tmp_path):
    compare_backends(small_autoencoder, "cpu", kernels="reference", resume_dir=tmp_path)  # resumed: the same


def test_comparison_runs_the_fc6_inversion_on_cpu(one_intra_op_thread):
    """The fc6 workload of the CUDA test builds and steps through the same comparison (small, on the CPU)."""
    compare_backends(invert_fc6_config("cpu", batch=2, size=64, fc_width=64), "cpu", kernels="reference")


def _scale_first_conv(trainer, factor=1 + 1e-3):
    """A kernel error of 1e-3 relative in the generator's first convolution's output."""
    trainer.generator.encoder[0].register_forward_hook(lambda module, args, out: out * factor)


def _skip_second_g_update(trainer):
    step, calls = trainer.opt_g.step, []

    def skipping(*args, **kwargs):
        calls.append(1)
        if len(calls) != 2:
            return step(*args, **kwargs)

    trainer.opt_g.step = skipping


@pytest.mark.parametrize(
    "tamper", [_scale_first_conv, _skip_second_g_update], ids=["conv-off-by-1e-3", "skipped-step"]
)
def test_comparison_catches_a_planted_error(small_autoencoder, tamper):
    with pytest.raises(AssertionError):
        compare_backends(small_autoencoder, "cpu", kernels="reference", tamper=tamper)
