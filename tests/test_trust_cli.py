"""Hostile and careless input through the CLI: each bad input is one line on stderr, exit status 2, and no
file written or changed; a checkpoint whose pickle runs code is never executed by a command that opens it."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from deepsim.cli import main
from deepsim.train.checkpoint import load_checkpoint, save_checkpoint
from tests import caffe_writer as cw
from tests.training_runs import TINY_RUN_FLAGS, TINY_RUNTIME_FLAGS

RUN = [*TINY_RUN_FLAGS, "--log-every", "1"]
RUNTIME = TINY_RUNTIME_FLAGS


def snapshot(*folders):
    """{path: (size, mtime_ns)} of every file under the folders (a folder that does not exist: absent)."""
    files = {}
    for folder in folders:
        if folder.exists():
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    stat = path.stat()
                    files[str(path)] = (stat.st_size, stat.st_mtime_ns)
        files[f"{folder} exists"] = folder.exists()
    return files


def run_cli(argv, capsys):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err.splitlines(), captured.out


class Evil:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 2-step run, and bad files derived from it."""
    root = tmp_path_factory.mktemp("trust")
    run = root / "run"
    assert main(["train", *RUN, *RUNTIME, "--steps", "2", "--checkpoint-every", "1", "--out", str(run)]) == 0
    payload = load_checkpoint(run)
    bad = root / "bad"
    bad.mkdir()
    shape = {**payload, "config": {**payload["config"], "code_channels": 4}}  # tensors are for 8 channels
    save_checkpoint(bad / "shape.pt", shape)
    save_checkpoint(bad / "no_trainer.pt", {k: v for k, v in payload.items() if k != "trainer"})
    (bad / "random.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    weights = {f"features.{i}.{k}": torch.zeros(2) for i in (0, 3) for k in ("weight", "bias")}
    torch.save(weights, bad / "weights.pt")
    data = (bad / "weights.pt").read_bytes()
    (bad / "truncated_weights.pt").write_bytes(data[: len(data) // 2])
    (bad / "exists.safetensors").write_bytes(b"an earlier export")
    (bad / "exists.pt").write_bytes(b"an earlier import")
    weights = cw.random_generator_weights("fc", np.random.default_rng(0), fc_width=16)
    (bad / "fc6.caffemodel").write_bytes(cw.generator_caffemodel("fc", weights))
    other = root / "other"
    other.mkdir()
    shutil.copy(run / "checkpoint.pt", other / "checkpoint.pt")
    image = root / "image.png"
    Image.fromarray((np.random.default_rng(1).random((48, 48, 3)) * 255).astype(np.uint8)).save(image)
    return {"run": run, "bad": bad, "other": other, "image": image, "root": root}


# (case, argv given the files, the text the one error line must hold)
CASES = [
    (
        "reconstruct: a checkpoint of another config",
        lambda f: [
            "reconstruct",
            "--checkpoint",
            f["bad"] / "shape.pt",
            f["image"],
            "--out",
            f["root"] / "o1",
        ],
        "does not fit",
    ),
    (
        "reconstruct: an image over --max-image-pixels",
        lambda f: (
            ["reconstruct", "--checkpoint", f["run"], f["image"], "--out", f["root"] / "o7"]
            + ["--max-image-pixels", "100"]
        ),
        "image.png: image is 48x48 = 2304 pixels, over the limit of 100 (max_image_pixels, "
        "--max-image-pixels); not decoded",
    ),
    (
        "reconstruct: a bad --max-image-pixels",
        lambda f: (
            ["reconstruct", "--checkpoint", f["run"], f["image"], "--out", f["root"] / "o7"]
            + ["--max-image-pixels", "0"]
        ),
        "--max-image-pixels 0: expected a positive number of pixels",
    ),
    (
        "train --resume: a checkpoint of another config",
        lambda f: [
            "train",
            "--resume",
            f["bad"] / "shape.pt",
            "--out",
            f["root"] / "o2",
            "--steps",
            "3",
            *RUNTIME,
        ],
        "tensor",
    ),
    (
        "train: random bytes as --comparator-weights",
        lambda f: [
            "train",
            *RUN,
            "--comparator",
            "alexnet:conv2",
            "--comparator-weights",
            f["bad"] / "random.bin",
            "--out",
            f["root"] / "o3",
            "--steps",
            "1",
            *RUNTIME,
        ],
        "random.bin",
    ),
    (
        "train: a truncated --comparator-weights",
        lambda f: [
            "train",
            *RUN,
            "--comparator",
            "alexnet:conv2",
            "--comparator-weights",
            f["bad"] / "truncated_weights.pt",
            "--out",
            f["root"] / "o4",
            "--steps",
            "1",
            *RUNTIME,
        ],
        "truncated_weights.pt",
    ),
    (
        "reconstruct: a checkpoint with no trainer key",
        lambda f: [
            "reconstruct",
            "--checkpoint",
            f["bad"] / "no_trainer.pt",
            f["image"],
            "--out",
            f["root"] / "o5",
        ],
        "no trained generator",
    ),
    (
        "train --resume: a checkpoint with no trainer key",
        lambda f: [
            "train",
            "--resume",
            f["bad"] / "no_trainer.pt",
            "--out",
            f["root"] / "o6",
            "--steps",
            "3",
            *RUNTIME,
        ],
        "'trainer'",
    ),
    (
        "train invert --resume <autoencoder> --loss se",
        lambda f: [
            "train",
            "invert",
            "--resume",
            f["run"],
            "--out",
            f["run"],
            "--loss",
            "se",
            "--steps",
            "3",
            *RUNTIME,
        ],
        "--loss se (the checkpoint's: deepsim)",
    ),
    (
        "train without --resume into a folder holding a run",
        lambda f: ["train", *RUN, *RUNTIME, "--steps", "4", "--out", f["run"]],
        "--resume auto",
    ),
    (
        "train --resume another run's checkpoint into a folder holding a run",
        lambda f: [
            "train",
            "--resume",
            f["other"] / "checkpoint.pt",
            "--out",
            f["run"],
            "--steps",
            "4",
            *RUNTIME,
        ],
        "holds another run",
    ),
    (
        "train --resume an older checkpoint into its own folder",
        lambda f: [
            "train",
            "--resume",
            f["run"] / "checkpoint.step0000001.pt",
            "--out",
            f["run"],
            "--steps",
            "4",
            *RUNTIME,
        ],
        "newer checkpoint, checkpoint.pt",
    ),
    (
        "export over an existing file",
        lambda f: ["export", "--checkpoint", f["run"], "--out", f["bad"] / "exists.safetensors"],
        "--force",
    ),
    (
        "import-caffe over an existing file",
        lambda f: [
            "import-caffe",
            f["bad"] / "fc6.caffemodel",
            "--layer",
            "fc6",
            "--out",
            f["bad"] / "exists.pt",
        ],
        "--force",
    ),
]


@pytest.mark.parametrize("case, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_status_2_and_changes_nothing(files, capsys, case, argv, expected):
    argv = argv(files)
    watched = [files["run"], files["bad"], files["other"]] + [files["root"] / f"o{i}" for i in range(1, 8)]
    before = snapshot(*watched)
    code, err, _ = run_cli(argv, capsys)
    assert code == 2, (case, err)
    assert len(err) == 1, (case, err)
    assert ": error: " in err[0] and expected in err[0], (case, err)
    assert snapshot(*watched) == before, case


def test_reconstruct_takes_the_limit_of_max_image_pixels(files, capsys, tmp_path):
    argv = ["reconstruct", "--checkpoint", files["run"], files["image"], "--out", tmp_path / "o"]
    code, err, out = run_cli([*argv, "--max-image-pixels", str(48 * 48)], capsys)  # at the limit: read
    assert code == 0 and not err and "squared error per pixel" in out
    assert (tmp_path / "o" / "image_reconstruction.png").is_file()


def _evil_files(run, root, marker):
    """The same code-running pickle as a plain torch.save file, as a checksummed checkpoint (a valid SHA-256
    proves the file is intact, not that it is harmless) and as a state dict in upconvGAN's layout."""
    config = load_checkpoint(run)["config"]
    payload = {"config": config, "step": 1, "trainer": {"generator": Evil(marker)}, "rng": {}}
    plain, summed = root / "evil" / "plain.pt", root / "evil" / "summed" / "checkpoint.pt"
    plain.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, plain)
    save_checkpoint(summed, payload)
    their_layout = root / "evil" / "upconvGAN_fc6.pt"
    torch.save({"defc7.weight": Evil(marker), "deconv0.weight": torch.zeros(1)}, their_layout)
    return plain, summed, their_layout


OPENERS = {
    "reconstruct": lambda f, c, o: ["reconstruct", "--checkpoint", c, f["image"], "--out", o],
    "invert": lambda f, c, o: ["invert", "--checkpoint", c, f["image"], "--out", o, "--device", "cpu"],
    "sample-preimages": lambda f, c, o: ["sample-preimages", "--checkpoint", c, f["image"], "--out", o],
    "sample-vae": lambda f, c, o: ["sample-vae", "--checkpoint", c, "--out", o / "x.png"],
    "eval": lambda f, c, o: ["eval", "--checkpoint", c, "--data", "photos", "--out", o],
    "export": lambda f, c, o: ["export", "--checkpoint", c, "--out", o / "G.safetensors"],
    "train --resume FILE": lambda f, c, o: ["train", "--resume", c, "--out", o, "--steps", "3", *RUNTIME],
    "train --comparator-weights": lambda f, c, o: [
        "train",
        *RUN,
        "--comparator",
        "alexnet:conv2",
        "--comparator-weights",
        c,
        "--out",
        o,
        "--steps",
        "1",
        *RUNTIME,
    ],
}


@pytest.mark.parametrize("which", ["plain", "summed", "their_layout"])
@pytest.mark.parametrize("command", sorted(OPENERS))
def test_a_pickle_that_runs_code_is_not_run_by_any_command(files, capsys, tmp_path, command, which):
    marker = tmp_path / "ran"
    plain, summed, their_layout = _evil_files(files["run"], tmp_path, marker)
    checkpoint = {"plain": plain, "summed": summed, "their_layout": their_layout}[which]
    out = tmp_path / "out"
    code, err, _ = run_cli(OPENERS[command](files, checkpoint, out), capsys)
    assert not marker.exists(), f"{command} ran the pickle's code"
    assert code == 2 and len(err) == 1, err
    assert "could run code" in err[0] and checkpoint.name in err[0], err
    if command != "train --comparator-weights":  # a weights file is never fully unpickled
        assert "--trust-checkpoint" in err[0], err
    assert not out.exists()


def test_train_resume_auto_does_not_run_a_pickle_in_the_folder(files, capsys, tmp_path):
    marker = tmp_path / "ran"
    _, summed, _ = _evil_files(files["run"], tmp_path, marker)
    before = snapshot(summed.parent)
    code, err, _ = run_cli(
        ["train", "--resume", "auto", "--out", summed.parent, "--steps", "3", *RUNTIME], capsys
    )
    assert not marker.exists() and code == 2 and len(err) == 1 and "--trust-checkpoint" in err[0], err
    assert snapshot(summed.parent) == before


def test_trust_checkpoint_opens_it_and_its_code_runs(files, capsys, tmp_path):
    """The control for the tests above: the marker is how a run of the pickle's code shows."""
    marker = tmp_path / "ran"
    plain, _, _ = _evil_files(files["run"], tmp_path, marker)
    code, err, _ = run_cli(
        ["reconstruct", "--checkpoint", plain, files["image"], "--out", tmp_path / "o", "--trust-checkpoint"],
        capsys,
    )
    assert marker.exists()
    assert code == 2 and len([line for line in err if "error" in line]) == 1  # not a generator: refused after


def test_resume_auto_reads_an_older_checkpoint_once_safely_and_continues(
    files, capsys, tmp_path, monkeypatch
):
    """A checkpoint as older code wrote it (plain torch.save, no checksum, NumPy's RNG state as an array) is
    read with weights_only, once (not again to learn its step when it is rotated), and the run continues."""
    run = tmp_path / "run"
    shutil.copytree(files["run"], run)
    for extra in run.glob("checkpoint.step*.pt"):
        extra.unlink()
    payload = load_checkpoint(run)
    payload["rng"] = {**payload["rng"], "numpy": np.random.get_state()}  # the older layout: an ndarray
    (run / "checkpoint.pt").unlink()
    torch.save(payload, run / "checkpoint.pt")
    calls = []
    real_load = torch.load

    def counting_load(f, *args, **kwargs):
        calls.append((str(f), kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    code, err, _ = run_cli(
        ["train", "--resume", "auto", "--out", run, "--steps", "3", "--keep-checkpoints", "2", *RUNTIME],
        capsys,
    )
    assert code == 0, err
    opened = [c for c in calls if c[0] == str(run / "checkpoint.pt")]
    assert opened == [(str(run / "checkpoint.pt"), True)], calls
    assert any("has no checksum" in line for line in err)
    assert sorted(p.name for p in run.glob("checkpoint*.pt")) == [
        "checkpoint.pt",
        "checkpoint.step0000002.pt",
    ]
    assert load_checkpoint(run)["step"] == 3


def test_a_preset_given_on_resume_is_a_warning_and_the_checkpoint_wins(files, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(files["run"], run)
    code, err, _ = run_cli(
        [
            "train",
            "--preset",
            "autoencoder-stl10-se",
            "--resume",
            "auto",
            "--out",
            run,
            "--steps",
            "3",
            *RUNTIME,
        ],
        capsys,
    )
    assert code == 0, err
    warning = [line for line in err if "warning: --preset autoencoder-stl10-se" in line]
    assert len(warning) == 1 and "preset autoencoder-photos" in warning[0], err
    assert load_checkpoint(run)["config"]["data"] == "photos"  # the checkpoint's, not the preset's


def test_force_replaces_the_file_that_import_caffe_and_export_refuse(files, capsys, tmp_path):
    target = tmp_path / "fc6.pt"
    target.write_bytes(b"an earlier import")
    code, err, _ = run_cli(
        ["import-caffe", files["bad"] / "fc6.caffemodel", "--layer", "fc6", "--out", target, "--force"],
        capsys,
    )
    assert code == 0 and load_checkpoint(target)["config"]["invert_layer"] == "fc6", err
    export = tmp_path / "G.safetensors"
    export.write_bytes(b"an earlier export")
    code, err, _ = run_cli(["export", "--checkpoint", target, "--out", export, "--force"], capsys)
    assert code == 0 and load_checkpoint(export)["config"]["invert_layer"] == "fc6", err


@pytest.mark.parametrize("which", ["plain", "summed", "their_layout"])
def test_load_generator_does_not_run_a_pickle(files, tmp_path, which):
    import deepsim
    from deepsim.train.checkpoint import UnsafeCheckpointError

    marker = tmp_path / "ran"
    plain, summed, their_layout = _evil_files(files["run"], tmp_path, marker)
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system"):
        deepsim.load_generator({"plain": plain, "summed": summed, "their_layout": their_layout}[which])
    assert not marker.exists()
