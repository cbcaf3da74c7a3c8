"""Checkpoint integrity: checksums, the last K kept, a corrupt newest one falls back to the previous one (and
says so), a full disk leaves the previous checkpoint intact and stops with an error that says so."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from deepsim.cli import main
from deepsim.train.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    CorruptCheckpointError,
    find_checkpoints,
    load_checkpoint,
    read_footer,
    save_checkpoint,
)
from deepsim.train.loop import train
from tests.training_runs import TINY_TRAIN_FLAGS, subprocess_env, tiny_config

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _payload(step, n=1000):
    return {"step": step, "config": {}, "weights": torch.full((n,), float(step))}


def _corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) * 2 // 3]))
    else:  # flipped bytes in the middle of the payload
        for i in range(len(data) // 2, len(data) // 2 + 8):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))


def test_keep_3_of_5_saves_newest_first_with_checksums(tmp_path):
    path = tmp_path / "checkpoint.pt"
    for step in (10, 20, 30, 40, 50):
        save_checkpoint(path, _payload(step), keep=3)
    assert [p.name for p in find_checkpoints(tmp_path)] == [
        "checkpoint.pt",
        "checkpoint.step0000040.pt",
        "checkpoint.step0000030.pt",
    ]
    footer = read_footer(path)
    assert footer.step == 50 and footer.checked_bytes == path.stat().st_size - 58 and len(footer.sha256) == 64
    assert (
        torch.load(path, weights_only=False)["step"] == 50
    )  # still a plain torch.save file for everyone else
    assert load_checkpoint(tmp_path)["step"] == 50
    assert load_checkpoint(tmp_path / "checkpoint.step0000030.pt")["step"] == 30
    save_checkpoint(path, _payload(60))  # keep=None: replace only, older files untouched
    assert len(find_checkpoints(tmp_path)) == 3 and load_checkpoint(path)["step"] == 60


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_corrupt_newest_of_2_falls_back_to_the_previous_and_names_both(tmp_path, how):
    path = tmp_path / "checkpoint.pt"
    for step in (5, 10):
        save_checkpoint(path, _payload(step), keep=2)
    _corrupt(path, how)
    reason = "truncated or not a checkpoint" if how == "truncated" else "checksum mismatch"
    with pytest.raises(CorruptCheckpointError, match=f"checkpoint {path} is corrupt: .*{reason}"):
        load_checkpoint(path)  # a file asked for by name: no fallback
    with pytest.warns(CheckpointWarning) as caught:
        payload = load_checkpoint(tmp_path)
    assert payload["step"] == 5 and torch.equal(payload["weights"], torch.full((1000,), 5.0))
    message = str(caught[0].message)
    assert f"checkpoint {path} is corrupt ({reason}" in message
    assert f"using the previous one, {tmp_path / 'checkpoint.step0000005.pt'} (step 5)" in message


def test_every_checkpoint_corrupt_is_an_error_naming_them(tmp_path):
    path = tmp_path / "checkpoint.pt"
    for step in (5, 10):
        save_checkpoint(path, _payload(step), keep=2)
    _corrupt(path, "flipped")
    _corrupt(tmp_path / "checkpoint.step0000005.pt", "truncated")
    with pytest.raises(
        CorruptCheckpointError,
        match=r"every checkpoint in it is damaged: checkpoint\.pt: .*checkpoint\.step0000005\.pt",
    ):
        load_checkpoint(tmp_path)


def test_checkpoint_without_checksum_loads_with_a_warning(tmp_path):
    torch.save({"step": 3, "config": {}}, tmp_path / "checkpoint.pt")  # as written before checksums
    with pytest.warns(CheckpointWarning, match="has no checksum"):
        assert load_checkpoint(tmp_path)["step"] == 3


def _tiny(out, **changes):
    return tiny_config(out, **{"checkpoint_every": 5, **changes})


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_run_resumes_from_step_5_when_the_step_10_checkpoint_is_corrupt_and_says_so(tmp_path, capsys, how):
    train(_tiny(tmp_path, steps=10), progress=False)
    assert [p.name for p in find_checkpoints(tmp_path)] == ["checkpoint.pt", "checkpoint.step0000005.pt"]
    _corrupt(tmp_path / "checkpoint.pt", how)
    capsys.readouterr()
    result = train(_tiny(tmp_path, steps=12), resume="auto", progress=False)
    err = capsys.readouterr().err
    assert f"warning: checkpoint {tmp_path / 'checkpoint.pt'} is corrupt (" in err
    assert f"using the previous one, {tmp_path / 'checkpoint.step0000005.pt'} (step 5), instead" in err
    assert "renamed the corrupt checkpoint.pt to checkpoint.pt.corrupt" in err
    assert f"resuming from {tmp_path / 'checkpoint.step0000005.pt'} (step 5, data cursor 20" in err
    assert [row["step"] for row in result.history] == [10, 12]  # steps 6..12 trained again, from step 5
    assert load_checkpoint(tmp_path)["step"] == 12 and (tmp_path / "checkpoint.pt.corrupt").is_file()


def test_resume_auto_starts_fresh_in_an_empty_folder_and_plain_resume_says_use_auto(tmp_path, capsys):
    with pytest.raises(CheckpointError, match=r"--resume: no checkpoint in .*; use --resume auto"):
        train(_tiny(tmp_path / "a", steps=2), resume=True, progress=False)
    result = train(_tiny(tmp_path / "b", steps=2), resume="auto", progress=False)
    assert result.step == 2 and "starting fresh (--resume auto)" in capsys.readouterr().err


_FILE_SIZE_LIMIT = textwrap.dedent(
    """
    import resource, signal, sys
    import torch
    from deepsim.train.checkpoint import CheckpointWriteError, save_checkpoint

    path = sys.argv[1]
    save_checkpoint(path, {"step": 1, "config": {}, "weights": torch.zeros(1000)}, keep=2)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, write() fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        save_checkpoint(path, {"step": 2, "config": {}, "weights": torch.ones(1 << 20)}, keep=2)
    except CheckpointWriteError as error:
        print(error)
        sys.exit(3)
    """
)


def test_file_size_limit_of_64_kib_during_a_write_leaves_the_previous_checkpoint_intact(tmp_path):
    """The kernel refuses the write past 64 KiB (RLIMIT_FSIZE, like a full disk): CheckpointWriteError says
    the previous checkpoint is intact, and it is, byte for byte; no temporary file is left."""
    path = tmp_path / "checkpoint.pt"
    proc = subprocess.run(
        [sys.executable, "-c", _FILE_SIZE_LIMIT, str(path)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert (
        f"could not write checkpoint {path}: File too large (EFBIG); the previous checkpoint {path} (step 1) "
        "is intact" in proc.stdout
    )
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_full_disk_at_the_step_10_checkpoint_stops_the_run_with_exit_2_and_step_5_intact(
    tmp_path, capsys, monkeypatch
):
    """ENOSPC in the middle of the second checkpoint write: `deepsim train` prints one line that names the
    file and says the step-5 checkpoint is intact, exits with status 2, and that checkpoint loads."""
    import deepsim.train.checkpoint as checkpoint

    real_write = checkpoint._HashingWriter.write

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            self.handle.flush()

    def write(self, data):
        if self.size > 10_000 and checkpoint_count() == 1:  # partway through the second checkpoint: disk full
            self.handle = FullDisk(self.handle)
        return real_write(self, data)

    def checkpoint_count():
        return len(find_checkpoints(tmp_path))

    monkeypatch.setattr(checkpoint._HashingWriter, "write", write)
    code = main(
        [
            "train",
            *TINY_TRAIN_FLAGS,
            "--steps",
            "12",
            "--checkpoint-every",
            "5",
            "--log-every",
            "5",
            "--out",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert (
        f"deepsim train: error: could not write checkpoint {tmp_path / 'checkpoint.pt'}: No space left on "
        "device "
        f"(ENOSPC); the previous checkpoint {tmp_path / 'checkpoint.pt'} (step 5) is intact. Free some space"
    ) in err
    monkeypatch.undo()
    assert load_checkpoint(tmp_path)["step"] == 5
    assert not list(tmp_path.glob(".checkpoint.pt.*.tmp"))
