"""`deepsim train` shaped by task: flags derived from the config fields' metadata, per-task help, foreign
flags refused, the offline switch, the first line's checkpoint size, `data check --task`, missing files."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from deepsim.cli import TRAIN_FIELDS, build_parser, main
from deepsim.config import (
    DEFAULT_SOURCES,
    FIELD_INFO,
    GROUPS,
    PRESET_SOURCES,
    TASK_NAMES,
    TrainConfig,
    field_choices,
    get_preset,
    source_kind,
)
from deepsim.tasks import TASK_TABLE, TASKS, checkpoint_bytes, crop_size, data_mode

INTERNAL = {
    "task",
    "code_channels",
    "image_distance",
    "feature_metric",
    "pause_d_below",
    "pause_d_resume_above",
    "pause_g_above",
    "disc_first_stride",
    "beta1",
    "beta2",
}
TINY = [
    "--no-progress",
    "--device",
    "cpu",
    "--batch-size",
    "2",
    "--sample-every",
    "100",
    "--log-every",
    "1",
    "--checkpoint-every",
    "100",
    "--no-tensorboard",
    "--compile",
    "off",
    "--precision",
    "fp32",
]


def _train_flags() -> dict:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {s: a for a in sub.choices["train"]._actions for s in a.option_strings}


# ------------------------------------------------------------------------------- one source of truth
def test_every_field_has_a_flag_or_is_marked_internal():
    flags = _train_flags()
    for f in dataclasses.fields(TrainConfig):
        info = FIELD_INFO[f.name]
        if f.name in INTERNAL:
            assert info.flag is None, f.name
            continue
        assert info.flag, f"{f.name}: no flag and not marked internal"
        flag = "--" + info.flag.replace("_", "-")
        assert flag in flags and flags[flag].dest == f.name, flag
        assert info.help and flags[flag].help == info.help, flag
        assert info.group in GROUPS and set(info.tasks) <= set(TASK_NAMES) and info.tasks, flag
    assert {f.name for f in dataclasses.fields(TrainConfig) if FIELD_INFO[f.name].flag is None} == INTERNAL


def test_choices_are_the_consuming_code_s_own():
    from deepsim.applications.generators import GENERATOR_INITS, UPCONV_BIASES
    from deepsim.applications.inversion import INVERTIBLE_NETWORKS, LAYER_TAPS
    from deepsim.data.sampling import LOADERS, ON_BAD
    from deepsim.losses import DeePSiMLoss
    from deepsim.networks import DISC_ACTIVATIONS, DISC_INITS, DISC_PADDINGS
    from deepsim.train.auto import RUNTIME_CHOICES
    from deepsim.train.compiled import COMPILE_MODES
    from deepsim.train.optim import WEIGHT_DECAY_SCOPES
    from deepsim.train.step import UPDATE_ORDERS

    consumers = {
        "update_order": UPDATE_ORDERS,
        "disc_padding": DISC_PADDINGS,
        "disc_activation": tuple(DISC_ACTIVATIONS),
        "disc_init": DISC_INITS,
        "upconv_bias": UPCONV_BIASES,
        "gen_init": GENERATOR_INITS,
        "weight_decay_scope": WEIGHT_DECAY_SCOPES,
        "invert_network": INVERTIBLE_NETWORKS,
        "invert_layer": tuple(LAYER_TAPS),
        "on_bad": ON_BAD,
        "loader": ("auto",) + LOADERS,
        "compile": ("auto", "off") + COMPILE_MODES,
        "precision": ("auto",) + RUNTIME_CHOICES["precision"],
    }
    flags = _train_flags()
    with_choices = {name for name, info in FIELD_INFO.items() if field_choices(info)}
    assert with_choices == set(consumers) | {"loss"}
    for name, valid in consumers.items():
        assert field_choices(FIELD_INFO[name]) == tuple(valid), name
        assert tuple(flags["--" + FIELD_INFO[name].flag.replace("_", "-")].choices) == tuple(valid), name
    for loss in field_choices(FIELD_INFO["loss"]):  # the loss checks its kinds inline
        DeePSiMLoss(None, loss=loss, lambda_feat=0.0, lambda_adv=0.0)
    with pytest.raises(ValueError):
        DeePSiMLoss(None, loss="hinge", lambda_feat=0.0, lambda_adv=0.0)


def test_sources_say_paper_and_come_from_the_fields():
    assert DEFAULT_SOURCES["batch_size"] == FIELD_INFO["batch_size"].source == "paper: 64"
    every = list(DEFAULT_SOURCES.values()) + [s for rows in PRESET_SOURCES.values() for s in rows.values()]
    assert every and not [s for s in every if s.startswith("seed")]
    assert source_kind("seed: 64") == "paper" and source_kind("code: 100") == "code"  # old strings still read
    assert not [i.name for i in TRAIN_FIELDS if "seed:" in i.help]


def test_presets_and_preset_help_say_paper(capsys):
    assert main(["presets"]) == 0
    text = capsys.readouterr().out
    assert "paper: 64" in text and "seed:" not in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "None per task" not in text and "seed:" not in text and "(paper: 2e-4)" in text


# ------------------------------------------------------------------------------- the task table
def test_task_table_holds_the_task_knowledge():
    assert set(TASK_TABLE) == set(TASKS) == set(TASK_NAMES)
    assert (
        data_mode(get_preset("invert-fc6")) == "resize-crop"
        and data_mode(get_preset("vae-imagenet")) == "resize-crop"
    )
    assert (
        data_mode(get_preset("autoencoder-photos")) == "crop"
        and data_mode(get_preset("vae-photos")) == "crop"
    )
    assert crop_size("invert") == 227 and crop_size("autoencoder") == 64
    assert TASK_TABLE["vae"].after is not None and TASK_TABLE["autoencoder"].after is None


# ------------------------------------------------------------------------------- per-task help
def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as stop:
        main(["train", *argv, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def test_each_task_shows_its_own_flags_grouped(capsys):
    invert, vae, autoencoder = _help(capsys, "invert"), _help(capsys, "vae"), _help(capsys, "autoencoder")
    everything = _help(capsys)
    for text in (invert, vae, autoencoder, everything):
        for group in GROUPS:
            assert f"\n{group}:\n" in text, group
    assert (
        invert.startswith("usage: deepsim train invert") and "--layer" in invert and "--noise-dim" in invert
    )
    assert "--latent-dim" not in invert and "--lambda-kl" not in invert
    assert "{invert-conv5,invert-fc6,invert-fc7,invert-fc8}" in invert and "vae-photos" not in invert
    assert "--latent-dim" in vae and "--fc-width" in vae and "--layer" not in vae and "--noise-dim" not in vae
    for flag in ("--layer", "--fc-width", "--latent-dim", "--noise-dim", "--upconv-bias"):
        assert flag not in autoencoder, flag
        assert flag in everything, flag
    assert "--steps" in autoencoder and "--random-weights" in autoencoder
    assert _help(capsys, "--preset", "invert-conv5").startswith(
        "usage: deepsim train invert"
    )  # the preset's task
    assert _help(capsys, "--steps", "3", "vae").startswith("usage: deepsim train vae")


def test_a_flag_of_another_task_is_an_error_naming_it(capsys):
    assert main(["train", "--layer", "fc6", "--data", "imgs"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "--layer" in err[0] and "deepsim train invert" in err[0] and "autoencoder" in err[0]
    )
    assert main(["train", "vae", "--noise-dim", "4"]) == 2
    assert "deepsim train invert" in capsys.readouterr().err
    assert main(["train", "autoencoder", "--latent-dim", "4"]) == 2
    assert "deepsim train vae" in capsys.readouterr().err


def test_missing_weights_name_every_flag_at_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    assert main(["train", "invert", "--data", "photos", "--out", str(tmp_path / "r"), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for flag in (
        "--comparator-weights",
        "--invert-network-weights",
        "--download-weights",
        "--random-weights",
    ):
        assert flag in err[0], flag
    assert (
        main(["train", "invert", "--resume", "auto", "--out", str(tmp_path / "r"), *TINY]) == 2
    )  # a first start
    assert "--invert-network-weights" in capsys.readouterr().err


# ------------------------------------------------------------------------------- an offline run
def _photos(folder, n=4, size=72):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def test_random_weights_run_offline_and_the_first_line_says_so_with_the_checkpoint_size(
    tmp_path, monkeypatch, capsys
):
    from deepsim.cli import _size
    from deepsim.train.checkpoint import load_checkpoint

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))  # no trained weights anywhere
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    out = tmp_path / "run"
    argv = [
        "train",
        "invert",
        "--layer",
        "fc8",
        "--random-weights",
        "--steps",
        "2",
        "--fc-width",
        "64",
        "--image-size",
        "64",
        "--data",
        str(_photos(tmp_path / "imgs")),
        "--out",
        str(out),
        *TINY,
    ]
    assert main(argv) == 0
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("deepsim train invert: ")
    assert (
        "random weights (--random-weights): comparator alexnet-random:pool5, inverted network alexnet-random"
        in first
    )
    config = TrainConfig.from_dict(load_checkpoint(out)["config"])
    estimate, written = checkpoint_bytes(config), (out / "checkpoint.pt").stat().st_size
    assert abs(estimate - written) <= 0.1 * written, (estimate, written)
    assert (
        f"checkpoint about {_size(estimate)}, {_size(2 * estimate)} on disk with --keep-checkpoints 2"
        in first
    )
    # a missing image says so, not "corrupt"
    assert (
        main(["invert", "--checkpoint", str(out), str(tmp_path / "gone.png"), "--out", str(tmp_path / "o")])
        == 2
    )
    err = capsys.readouterr().err
    assert "gone.png: no such file" in err and "corrupt" not in err


def test_the_paper_fc6_estimate_is_the_size_seen():
    assert 700e6 < checkpoint_bytes(get_preset("invert-fc6")) < 790e6  # 744 MB written after 2 steps


def test_the_autoencoder_estimate_matches_a_written_checkpoint(tmp_path, capsys):
    from deepsim.train.checkpoint import load_checkpoint

    out = tmp_path / "ae"
    argv = [
        "train",
        "--steps",
        "1",
        "--image-size",
        "40",
        "--data",
        str(_photos(tmp_path / "imgs")),
        "--out",
        str(out),
        *TINY,
    ]
    assert main(argv) == 0
    assert (
        "deepsim train autoencoder: " in capsys.readouterr().err.splitlines()[0]
    )  # no task: the autoencoder
    saved = load_checkpoint(out)
    assert saved["provenance"]["preset"] == "autoencoder-photos"
    estimate, written = (
        checkpoint_bytes(TrainConfig.from_dict(saved["config"])),
        (out / "checkpoint.pt").stat().st_size,
    )
    assert abs(estimate - written) <= 0.1 * written, (estimate, written)


# ------------------------------------------------------------------------------- data check
def test_data_check_uses_the_task_s_crop(tmp_path, capsys):
    folder = _photos(tmp_path / "imgs", n=2, size=100)
    Image.fromarray(np.zeros((240, 260, 3), np.uint8)).save(folder / "big.png")
    assert main(["data", "check", str(folder)]) == 0
    assert "3 usable for training (min size 64)" in capsys.readouterr().out
    # the inversion crops 227 after resizing the shorter side to 256: a
    # 100x100 image is resized up, not refused
    assert main(["data", "check", str(folder), "--task", "invert"]) == 0
    text = capsys.readouterr().out
    assert "3 usable for training (min size 227, shorter side resized to 256 first)" in text
    assert "upscaled: 2 file(s) smaller than 227x227, resized up to 256" in text and "too_small" not in text
    assert main(["data", "check", str(folder), "--min-size", "227"]) == 1  # cropped as they are: too small
    text = capsys.readouterr().out
    assert "1 usable for training (min size 227)" in text and "too_small: 2" in text
    assert main(["data", "check", str(folder), "--task", "autoencoder", "--min-size", "250"]) == 1
    assert "min size 250" in capsys.readouterr().out


def test_the_resize_side_is_the_loader_s():
    import inspect

    from deepsim.data import build_loader
    from deepsim.tasks import RESIZE_SIDE, resize_side

    assert inspect.signature(build_loader).parameters["resize_size"].default == RESIZE_SIDE
    assert resize_side("invert") == RESIZE_SIDE and resize_side("autoencoder") is None


def test_a_missing_image_says_no_such_file(tmp_path):
    from deepsim.data.images import ImageReadError, read_image

    with pytest.raises(ImageReadError, match=r"gone\.png: no such file$") as error:
        read_image(tmp_path / "gone.png")
    assert "corrupt" not in str(error.value)
