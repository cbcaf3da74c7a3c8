"""Stop signals: a real process killed with SIGTERM resumes to the same parameters bit for bit, a second
signal exits at once with the previous checkpoint intact, and the loop stops where the signal said."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time

import pytest

from deepsim.train.checkpoint import load_checkpoint
from deepsim.train.preemption import PREEMPTED_EXIT_CODE, REPEAT_WINDOW_S, StopSignals, parse_signals
from tests.training_runs import (
    TINY_TRAIN_FLAGS,
    assert_same_training_state,
    deepsim_cli,
    metrics_steps,
    run,
    subprocess_env,
    tiny_config,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def test_parse_signals_names_numbers_and_errors():
    assert parse_signals("SIGTERM, int,USR1") == [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1]
    assert parse_signals("") == [] and parse_signals("15") == [signal.SIGTERM]
    with pytest.raises(ValueError, match="--stop-signals.*'SIGFOO' is not a signal name"):
        parse_signals("SIGTERM,SIGFOO")
    with pytest.raises(ValueError, match="SIGKILL cannot be caught"):
        parse_signals("KILL")


def test_first_signal_is_a_request_a_repeat_within_the_window_is_the_same_request():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals("SIGUSR1,SIGUSR2") as stopper:
        assert stopper.requested is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stopper.requested == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGUSR2)  # within REPEAT_WINDOW_S: no exit (we are still here)
        assert stopper.requested == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before  # restored


def _tiny(out, **changes):
    return tiny_config(out, **{"checkpoint_every": 1000, **changes})


def test_signal_at_step_7_stops_after_step_7_with_a_checkpoint_there(tmp_path, monkeypatch):
    """In process: SIGUSR1 raised while step 7's batch is drawn -> the loop finishes step 7, checkpoints it
    (not a multiple of checkpoint_every or log_every) and returns stopped_by="SIGUSR1"."""
    import deepsim.data

    real_build = deepsim.data.build_loader

    def build(*args, **kwargs):
        stream = real_build(*args, **kwargs)
        if kwargs.get("batch_size") == 8:  # the sample-grid stream
            return stream
        real_next = type(stream).__next__

        class Signalling(type(stream)):
            def __next__(self):
                if self.cursor == 6 * self.batch_size:  # drawing step 7's batch
                    os.kill(os.getpid(), signal.SIGUSR1)
                return real_next(self)

        stream.__class__ = Signalling
        return stream

    monkeypatch.setattr(deepsim.data, "build_loader", build)
    result = __import__("deepsim.train.loop", fromlist=["train"]).train(
        _tiny(tmp_path, steps=20), progress=False
    )
    assert result.stopped_by == "SIGUSR1" and result.step == 7
    payload = load_checkpoint(tmp_path)
    assert payload["step"] == 7 and payload["data"]["cursor"] == 7 * 4
    assert [row["step"] for row in result.history] == [5, 7]


@pytest.mark.slow
def test_sigterm_mid_run_then_resume_equals_uninterrupted_run_bit_for_bit(tmp_path):
    """A real `deepsim train` process gets SIGTERM after step >= 6 of 60: it exits with status 75 and a
    checkpoint at the step it was in; the same command line (--resume auto) finishes the run; its final
    parameters, Adam moments, pause state, data cursor and RNG equal those of an uninterrupted 60-step run,
    bit for bit."""
    steps = "60"
    flags = [
        *TINY_TRAIN_FLAGS,
        "--steps",
        steps,
        "--log-every",
        "3",
        "--checkpoint-every",
        "1000",
        "--resume",
        "auto",
    ]
    env = subprocess_env()
    straight = subprocess.Popen(
        deepsim_cli("train", *flags, "--out", str(tmp_path / "straight")),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    interrupted_cmd = deepsim_cli("train", *flags, "--out", str(tmp_path / "run"))
    first = subprocess.Popen(
        interrupted_cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(
            lambda: max(metrics_steps(tmp_path / "run"), default=0) >= 6,
            300,
            "step 6 in metrics.jsonl",
            [first],
        )
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=300)
        assert first.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
        stopped_at = load_checkpoint(tmp_path / "run")["step"]
        assert 6 <= stopped_at < 60, stopped_at
        assert f"stopped by SIGTERM at step {stopped_at}" in out and "SIGTERM received" in err
        second = run(interrupted_cmd, 300, env=env)
        assert second.returncode == 0, second.stderr[-3000:]
        assert f"resuming from {tmp_path / 'run' / 'checkpoint.pt'} (step {stopped_at}" in second.stderr
        straight_out, straight_err = straight.communicate(timeout=300)
        assert straight.returncode == 0, straight_err[-3000:]
    finally:
        for process in (straight, first):
            if process.poll() is None:
                process.kill()
    assert_same_training_state(load_checkpoint(tmp_path / "run"), load_checkpoint(tmp_path / "straight"))
    assert load_checkpoint(tmp_path / "run")["step"] == 60


_SLOW_STOP_WRITE = textwrap.dedent(
    """
    import sys, time
    import torch
    import deepsim.train.checkpoint as checkpoint
    from deepsim.cli import main

    real_save = torch.save

    def save(obj, handle, *args, **kwargs):
        if obj.get("step", 0) % 4:  # the stop checkpoint (periodic ones are every 4 steps): write slowly
            handle.write(b"x" * 4096)
            handle.flush()
            time.sleep(600)
        return real_save(obj, handle, *args, **kwargs)

    checkpoint.torch.save = save
    sys.exit(main(sys.argv[1:]))
    """
)


def test_second_sigterm_exits_at_once_with_143_and_the_step_4k_checkpoint_intact(tmp_path):
    """The first SIGTERM starts the stop checkpoint (made slow here); a second one 2 s later exits at once
    with status 128 + 15, leaving the half-written temporary file aside and the last periodic checkpoint
    loadable."""
    import sys

    out = tmp_path / "run"
    args = [
        "train",
        *TINY_TRAIN_FLAGS,
        "--steps",
        "200",
        "--log-every",
        "1",
        "--checkpoint-every",
        "4",
        "--out",
        str(out),
    ]
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_STOP_WRITE, *args],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: max(metrics_steps(out), default=0) >= 5, 300, "step 5 in metrics.jsonl", [process])
        process.send_signal(signal.SIGTERM)
        first_at = time.monotonic()
        wait_for(
            lambda: any(p.stat().st_size >= 4096 for p in out.glob(".checkpoint.pt.*.tmp")),
            120,
            "the stop checkpoint's temporary file",
            [process],
        )
        time.sleep(max(0.0, REPEAT_WINDOW_S + 0.3 - (time.monotonic() - first_at)))
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "second signal (SIGTERM): exiting now without a new checkpoint; the checkpoint" in err
    payload = load_checkpoint(out)
    assert payload["step"] % 4 == 0 and payload["step"] >= 4
    assert list(out.glob(".checkpoint.pt.*.tmp"))  # the interrupted write never replaced checkpoint.pt
