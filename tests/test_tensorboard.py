"""TensorBoard event files of a run (read back with TensorBoard's EventAccumulator), --no-tensorboard, the
progress bar's images/s and ETA, and the run's first line naming the runtime path."""

import io
import json

import pytest

from deepsim.cli import main
from deepsim.config import get_preset
from deepsim.train.loop import train
from deepsim.train.progress import TrainingProgress

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
TINY = dict(
    batch_size=4, image_size=32, disc_padding="padded", comparator="alexnet-random:conv2", device="cpu"
)


def _events(folder):
    return sorted(folder.glob("events.out.tfevents.*"))


def test_run_writes_scalars_images_and_hparams(tmp_path):
    pytest.importorskip("tensorboard")  # in the test extras; CI has it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = get_preset("autoencoder-photos").replace(
        steps=4,
        log_every=2,
        sample_every=2,
        checkpoint_every=100,
        out=str(tmp_path),
        tensorboard=True,
        **TINY,
    )
    announced = []
    train(config, progress=False, announce=lambda cfg, line: announced.append((cfg, line)))
    assert announced[0][0].tensorboard is True and announced[0][1].startswith("simple path on cpu: ")

    assert len(_events(tmp_path)) == 1
    board = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    board.Reload()
    tags = board.Tags()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for key in (
        "Loss/G/total",
        "Loss/G/feat",
        "Loss/G/adv",
        "Loss/G/img",
        "Loss/D/real",
        "Loss/D/fake",
        "Pause/r",
        "Pause/train_d",
        "Pause/train_g",
        "Data/skipped",
    ):
        events = board.Scalars(key)
        assert [e.step for e in events] == [r["step"] for r in rows] == [2, 4]
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6), key
    assert [e.value for e in board.Scalars("Speed/images_per_s")] == pytest.approx(
        [r["images_per_s"] for r in rows]
    )
    assert [e.value for e in board.Scalars("LR/G")] == pytest.approx([config.lr] * 2)
    assert [e.value for e in board.Scalars("LR/D")] == pytest.approx([config.lr] * 2)
    images = board.Images("samples")
    assert [e.step for e in images] == [0, 2, 4] and images[0].width > 32 and images[0].height > 32
    assert "config/text_summary" in tags["tensors"]  # add_text is stored as a tensor summary
    hparams = board.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)
    assert (
        b"comparator" in hparams["_hparams_/session_start_info"]
        and b"alexnet-random:conv2" in hparams["_hparams_/session_start_info"]
    )


def test_no_tensorboard_writes_no_events_and_the_bar_shows_images_per_s_and_eta(tmp_path, capsys):
    code = main(
        [
            "train",
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--image-size",
            "32",
            "--disc-padding",
            "padded",
            "--comparator",
            "alexnet-random:conv2",
            "--device",
            "cpu",
            "--log-every",
            "1",
            "--sample-every",
            "100",
            "--out",
            str(tmp_path),
            "--no-tensorboard",
            "--channels-last",
            "off",
            "--compile",
            "auto",
        ]
    )
    assert code == 0
    assert _events(tmp_path) == [] and (tmp_path / "metrics.jsonl").is_file()
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert first.startswith("deepsim train autoencoder: simple path on cpu: compile=off (auto: ")
    assert "channels_last=off (set)" in first and "tensorboard=off (set)" in first
    assert "3/3 steps" in err and " img/s, ETA " in err
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["compile"], saved["channels_last"], saved["tensorboard"]) == ("off", False, False)


def test_progress_bar_images_per_s_and_eta_from_the_step_rate(monkeypatch):
    import tqdm.std

    now = [100.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])
    out = io.StringIO()
    bar = TrainingProgress(
        100, 20, images_per_step=64, file=out, mininterval=0, smoothing=0, dynamic_ncols=False
    )
    assert "? img/s, ETA ?" in str(bar)
    for _ in range(10):  # 10 steps in 4 s: 2.5 steps/s = 160 images/s; 70 steps left = 28 s
        now[0] += 0.4
        bar.update(1)
    text = str(bar)
    assert "30/100 steps [00:04, 160 img/s, ETA 00:28]" in text, text
    bar.close()


def test_resumed_writer_hides_what_the_interrupted_run_wrote_past_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from deepsim.config import TrainConfig
    from deepsim.train.tensorboard import TensorBoardWriter

    first = TensorBoardWriter(tmp_path, TrainConfig())
    for step in (1, 2, 3, 4):  # checkpoint at 2, then killed after logging 3 and 4
        first.log_metrics({"step": step, "Loss/G/img": float(step)})
    first.close()
    # (event file names carry the second and a per-process counter, so the resumed file sorts after)
    resumed = TensorBoardWriter(tmp_path, TrainConfig(), start_step=2)
    resumed.log_metrics({"step": 3, "Loss/G/img": 30.0}, {"LR/G": 1e-3})
    resumed.close()
    board = EventAccumulator(str(tmp_path))
    board.Reload()
    assert [(e.step, e.value) for e in board.Scalars("Loss/G/img")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert [e.value for e in board.Scalars("LR/G")] == pytest.approx([1e-3])
