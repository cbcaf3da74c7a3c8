"""Reliability: bit-exact resume, a checkpoint write killed mid-way, a NaN found without a per-step sync."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from deepsim.train.checkpoint import load_checkpoint, save_checkpoint
from deepsim.train.loop import NonFiniteLossError, train
from tests.training_runs import tiny_config

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _config(out, **changes):
    return tiny_config(out, **{"image_size": 32, "disc_padding": "padded", "checkpoint_every": 10, **changes})


def test_resume_is_bit_exact(tmp_path):
    """20 steps in one go == 10 steps, resume, 10 steps: every parameter, Adam moment and the pause state."""
    straight = train(_config(tmp_path / "straight", steps=20), progress=False)
    train(_config(tmp_path / "resumed", steps=10), progress=False)
    assert load_checkpoint(tmp_path / "resumed")["step"] == 10
    resumed = train(_config(tmp_path / "resumed", steps=20), resume=True, progress=False)
    a = load_checkpoint(straight.checkpoint)["trainer"]
    b = load_checkpoint(resumed.checkpoint)["trainer"]
    assert a.keys() == b.keys()
    for net in ("generator", "discriminator", "pause"):
        for name, tensor in a[net].items():
            assert torch.equal(tensor, b[net][name]), f"{net}.{name}"
    for opt in ("opt_g", "opt_d"):
        for index, state in a[opt]["state"].items():
            for key, tensor in state.items():
                assert torch.equal(tensor, b[opt]["state"][index][key]), f"{opt}[{index}].{key}"
    # the metrics of the steps after the resume are the same numbers too
    assert [r for r in straight.history if r["step"] > 10] == [
        {**r, "images_per_s": s["images_per_s"]}
        for r, s in zip(resumed.history, straight.history[-len(resumed.history) :])
    ]


_KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from deepsim.train.checkpoint import save_checkpoint

    path = sys.argv[1]
    save_checkpoint(path, {"step": 1, "config": {}, "weights": torch.zeros(10)})
    real_save = torch.save

    def save_then_die(obj, handle, *args, **kwargs):
        handle.write(b"PK" + b"x" * (1 << 20))  # a partial, unreadable file on disk...
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # ...and the process dies mid-write

    torch.save = save_then_die
    save_checkpoint(path, {"step": 2, "config": {}, "weights": torch.ones(1 << 22)})
    """
)


def test_process_killed_while_writing_leaves_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, str(path)], env=env, timeout=120, capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    stale = list(tmp_path.glob(".checkpoint.pt.*.tmp"))
    assert len(stale) == 1 and stale[0].stat().st_size > 1 << 20  # the killed writer's half-written file
    payload = load_checkpoint(path)
    assert payload["step"] == 1 and torch.equal(payload["weights"], torch.zeros(10))
    save_checkpoint(path, {"step": 3, "config": {}})  # the next save removes the leftover
    assert not list(tmp_path.glob(".checkpoint.pt.*.tmp")) and load_checkpoint(path)["step"] == 3


def test_nan_found_at_a_log_step_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    """NaN from step 11 on; metrics are read every 3 steps (one step late, no per-step sync): the error
    names step 12 and the term, training stops right after, and the step-10 checkpoint is untouched."""
    config = _config(tmp_path, steps=30, log_every=3, lr=2e-4)
    train(config.replace(steps=10), progress=False)
    checkpoint = tmp_path / "checkpoint.pt"
    before = checkpoint.read_bytes()

    import deepsim.losses as losses

    calls = []
    real_image_distance = losses.image_distance

    def poisoned(fake, real, kind="se"):
        calls.append(1)
        return real_image_distance(fake, real, kind) * float("nan")

    monkeypatch.setattr(losses, "image_distance", poisoned)
    with pytest.raises(
        NonFiniteLossError,
        match=r"step 12 \(.*Loss/G/img = nan.*last good checkpoint .*checkpoint\.pt is untouched",
    ):
        train(config, resume=True, progress=False)
    assert len(calls) == 3  # steps 11, 12, and 13 (queued before step 12's metrics were read); no more
    assert checkpoint.read_bytes() == before
    assert load_checkpoint(checkpoint)["step"] == 10


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_on_cuda_puts_the_optimizer_state_on_the_device(tmp_path, monkeypatch):
    """A run on the GPU, stopped at a checkpoint and resumed (the checkpoint is read with map_location="cpu"):
    every optimizer state tensor, the step counts included, is back on the GPU, and the run goes on with
    finite losses and learning rates."""
    from deepsim.kernels import use_backend

    import deepsim.train.loop as loop

    built = []
    real_build = loop.build_trainer
    monkeypatch.setattr(loop, "build_trainer", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    config = _config(tmp_path, steps=2, checkpoint_every=2, log_every=1, device="cuda", compile="off")
    with use_backend("reference"):  # the resume is under test here, not the kernels (no Triton compile)
        train(config, progress=False)
        result = train(config.replace(steps=4), resume=True, progress=False)
    trainer = built[-1]
    for optimizer in (trainer.opt_g, trainer.opt_d):
        for p, state in optimizer.state.items():
            assert {k: v.device for k, v in state.items()} == dict.fromkeys(state, p.device), list(state)
        assert optimizer.current_lr().device == p.device
    assert result.step == 4 and all(torch.isfinite(torch.tensor(v)) for v in result.history[-1].values())
