"""End-to-end training on the bundled photos: the loss goes down, checkpoints round-trip, bad input fails
clearly."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from deepsim.cli import main
from deepsim.config import get_preset
from deepsim.train.checkpoint import CheckpointWriteError, load_checkpoint, save_checkpoint
from deepsim.train.loop import NonFiniteLossError, train

TINY = dict(batch_size=4, log_every=5, sample_every=1000, checkpoint_every=1000, device="cpu")


def test_short_se_run_loss_goes_down(tmp_path):
    config = get_preset("autoencoder-photos").replace(loss="se", steps=60, lr=1e-3, out=str(tmp_path), **TINY)
    result = train(config, progress=False)
    losses = [row["Loss/G/img"] for row in result.history]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:2]), losses
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 60 and "images_per_s" in rows[-1]
    assert (tmp_path / "samples" / "step_0000000.png").is_file() and (
        tmp_path / "samples" / "step_0000060.png"
    ).is_file()


def test_deepsim_run_writes_every_term_and_checkpoint(tmp_path):
    config = get_preset("autoencoder-photos").replace(
        steps=6, out=str(tmp_path), comparator="alexnet-random:conv2", **TINY
    )
    result = train(config, progress=False)
    row = result.history[-1]
    for key in (
        "Loss/G/feat",
        "Loss/G/adv",
        "Loss/G/img",
        "Loss/D/real",
        "Loss/D/fake",
        "Pause/r",
        "Pause/train_d",
    ):
        assert key in row and np.isfinite(row[key])
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    assert payload["step"] == 6
    assert {"generator", "discriminator", "opt_g", "opt_d", "pause"} <= set(payload["trainer"])
    assert payload["config"]["comparator"] == "alexnet-random:conv2"
    assert {"python", "numpy", "torch"} <= set(payload["rng"])


def test_checkpoint_round_trip_restores_training_state(tmp_path):
    config = get_preset("autoencoder-photos").replace(
        steps=4, out=str(tmp_path), comparator="alexnet-random:conv2", **TINY
    )
    train(config, progress=False)
    from deepsim.train.factory import build_trainer

    payload = load_checkpoint(tmp_path)
    trainer = build_trainer(config, torch.device("cpu"))
    trainer.load_training_state(payload["trainer"])
    for name, tensor in trainer.generator.state_dict().items():
        assert torch.equal(tensor, payload["trainer"]["generator"][name])
    for a, b in zip(trainer.opt_d.state.values(), payload["trainer"]["opt_d"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and a["step"].item() == b["step"].item() == 4 - 0
    # resume continues from step 4 to 6
    result = train(config.replace(steps=6), resume=True, progress=False)
    assert result.step == 6 and load_checkpoint(tmp_path)["step"] == 6


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    config = get_preset("autoencoder-photos").replace(
        loss="se", steps=10, out=str(tmp_path), **{**TINY, "checkpoint_every": 5, "log_every": 5}
    )
    train(config.replace(steps=5), progress=False)
    before = (tmp_path / "checkpoint.pt").read_bytes()

    from deepsim.train import step as step_module

    original = step_module.DeePSiMTrainer.prepare

    def poisoned(self, batch):
        g_input, target, cond = original(self, batch)
        return g_input * float("nan"), target, cond

    monkeypatch.setattr(step_module.DeePSiMTrainer, "prepare", poisoned)
    with pytest.raises(
        NonFiniteLossError, match=r"step 10 .*Loss/G/img = nan.*last good checkpoint .*checkpoint.pt"
    ):
        train(config, resume=True, progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert load_checkpoint(tmp_path)["step"] == 5


def test_atomic_save_keeps_old_checkpoint_when_write_fails(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "checkpoint.pt", {"step": 1, "config": {}})

    def broken_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(
        CheckpointWriteError,
        match=r"disk full; the previous checkpoint .*checkpoint\.pt \(step 1\) is intact",
    ):
        save_checkpoint(path, {"step": 2, "config": {}})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert list(tmp_path.iterdir()) == [path]


# ------------------------------------------------------------------------------------- bad input via the CLI
def _cli(capsys, *args):
    code = main(["train", "--steps", "2", "--batch-size", "2", "--no-progress", "--device", "cpu", *args])
    return code, capsys.readouterr().err


def test_cli_wrong_tap_name(tmp_path, capsys):
    code, err = _cli(capsys, "--comparator", "alexnet-random:conv7", "--out", str(tmp_path))
    assert code == 2 and "no tap 'conv7'" in err and "valid taps: conv1" in err


def test_cli_missing_weights_file(tmp_path, capsys):
    code, err = _cli(
        capsys,
        "--comparator",
        "caffenet:conv3",
        "--comparator-weights",
        str(tmp_path / "nope.pt"),
        "--out",
        str(tmp_path),
    )
    assert code == 2 and "nope.pt does not exist" in err


def test_cli_empty_data_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = _cli(capsys, "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "run"))
    assert code == 2 and "empty" in err


def test_cli_image_smaller_than_crop(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(folder / "fine.png")
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(folder / "tiny.png")
    code, err = _cli(capsys, "--data", str(folder), "--out", str(tmp_path / "run"))
    assert code == 2 and "tiny.png" in err


def test_cli_reconstruct(tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--no-progress",
                "--loss",
                "se",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(image)
    assert (
        main(
            ["reconstruct", "--checkpoint", str(tmp_path / "run"), str(image), "--out", str(tmp_path / "rec")]
        )
        == 0
    )
    out = Image.open(tmp_path / "rec" / "photo_reconstruction.png")
    assert out.size == (2 * 88, 64)
    assert "squared error per pixel" in capsys.readouterr().out


def test_cli_missing_checkpoint(tmp_path, capsys):
    assert (
        main(
            [
                "reconstruct",
                "--checkpoint",
                str(tmp_path / "none.pt"),
                str(tmp_path / "x.png"),
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "no checkpoint at" in capsys.readouterr().err


def test_cli_help_lists_flags(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--preset",
        "--steps",
        "--batch-size",
        "--loss",
        "--comparator",
        "--data",
        "--out",
        "--device",
        "--resume",
    ):
        assert flag in text


def test_cli_on_bad_skip_trains_past_bad_files(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(folder / f"ok_{i}.png")
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(folder / "tiny.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg" * 20)
    code, err = _cli(
        capsys,
        "--data",
        str(folder),
        "--out",
        str(tmp_path / "run"),
        "--on-bad",
        "skip",
        "--loss",
        "se",
        "--log-every",
        "1",
    )
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["Data/skipped"] == 2


def test_tf32_precision_goes_through_the_current_api_even_after_it_was_used():
    """precision "tf32" turns TF32 on for fp32 matmuls and convs through torch.backends.*.fp32_precision where
    torch has it (setting the legacy allow_tf32 flags after the new API was used raises on recent torch), and
    the fused conv kernels read the same setting (deepsim.kernels.fp32_uses_tf32)."""
    import torch
    from deepsim.kernels import fp32_uses_tf32

    from deepsim.train.auto import allow_tf32

    conv = getattr(torch.backends.cudnn, "conv", None)
    if not hasattr(conv, "fp32_precision"):
        pytest.skip("this torch has only the legacy allow_tf32 flags")
    matmul = torch.backends.cuda.matmul
    saved = (matmul.fp32_precision, conv.fp32_precision)
    try:
        matmul.fp32_precision, conv.fp32_precision = "ieee", "ieee"  # the new API in use, TF32 off
        assert not fp32_uses_tf32()
        allow_tf32()
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        assert fp32_uses_tf32()
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved
