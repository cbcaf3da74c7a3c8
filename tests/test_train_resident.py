"""`deepsim train --loader resident` on the CPU: the quickstart preset trains, checkpoints the data cursor,
and the run resumes on the torch loader exactly there."""

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


@pytest.mark.slow
def test_a_generator_that_asks_for_4_channels_trains_on_padded_batches_like_on_rgb(tmp_path, monkeypatch):
    import deepsim.data
    from deepsim.config import get_preset
    from deepsim.networks import AutoencoderGenerator
    from deepsim.train.loop import train

    real_build_loader = deepsim.data.build_loader
    channels = []

    def build_loader(*args, **kwargs):
        stream = real_build_loader(*args, **kwargs)
        if kwargs.get("batch_size") == 4:  # the training stream (the sample grid's has 8)
            channels.append(next(real_build_loader(*args, **kwargs)).shape[1])
        return stream

    monkeypatch.setattr(deepsim.data, "build_loader", build_loader)
    config = get_preset("autoencoder-photos").replace(
        steps=2,
        batch_size=4,
        image_size=40,
        log_every=1,
        sample_every=1000,
        checkpoint_every=1000,
        device="cpu",
        comparator="alexnet-random:conv2",
        loader="resident",
    )
    rgb = train(config.replace(out=str(tmp_path / "rgb")), progress=False)
    monkeypatch.setattr(AutoencoderGenerator, "input_channels", 4)
    padded = train(config.replace(out=str(tmp_path / "padded")), progress=False)
    assert channels == [3, 4]
    for a, b in zip(rgb.history, padded.history):
        for key in ("Loss/G/feat", "Loss/G/img", "Loss/D/real", "Loss/D/fake"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
