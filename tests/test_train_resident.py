"""`deepsim train --loader resident` on the CPU: the quickstart preset trains, checkpoints the data cursor, and
the run resumes on the torch loader exactly there."""

import pytest

from deepsim.cli import main
from deepsim.train.checkpoint import load_checkpoint
from tests.training_runs import TINY_TRAIN_FLAGS


@pytest.mark.slow
def test_quickstart_trains_with_the_resident_loader_and_resumes_on_the_torch_loader(tmp_path, capsys):
    out = str(tmp_path / "run")
    flags = TINY_TRAIN_FLAGS + ["--out", out, "--log-every", "1", "--checkpoint-every", "1000"]
    assert main(["train", "--loader", "resident", "--steps", "3"] + flags) == 0
    said = capsys.readouterr()
    assert "loader=resident (set)" in said.out + said.err
    payload = load_checkpoint(out)
    assert payload["step"] == 3 and payload["data"]["cursor"] == 3 * 4
    assert main(["train", "--loader", "torch", "--steps", "5", "--resume", "auto"] + flags) == 0
    payload = load_checkpoint(out)
    assert payload["step"] == 5 and payload["data"]["cursor"] == 5 * 4
