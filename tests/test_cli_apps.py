"""End to end through deepsim.cli.main: train vae / invert for 2 steps on a tiny JPEG folder, then the
invert, sample-preimages, sample-vae and eval commands on their checkpoints (CPU, random-weight AlexNets,
small images and narrow FC layers)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from deepsim.cli import main

SMALL = (
    "--no-progress --device cpu --batch-size 2 --fc-width 64 --sample-every 100 --log-every 1 "
    "--checkpoint-every 100"
).split()
INVERT = SMALL + "--invert-network alexnet-random --comparator alexnet-random:pool5 --image-size 64".split()


def make_photos(folder, n=8, size=256):
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:size, 0:size]
    for i in range(n):
        pixels = np.stack([(x * (i + 1)) % 256, (y * 2 + 30 * i) % 256, ((x + y) * (i + 2) // 3) % 256], -1)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"photo{i}.jpg", quality=90)
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photos(tmp_path_factory.mktemp("photos"))


def _trained(out, photos, *flags: str):
    """``out`` after ``deepsim train FLAGS`` for 2 steps on ``photos``."""
    assert main(["train", *flags, "--steps", "2", "--data", str(photos), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, photos):
    vae = ["--image-size", "32", "--disc-padding", "padded", "--latent-dim", "16", "--lambda-kl", "0.5"]
    return _trained(tmp_path_factory.mktemp("vae"), photos, "vae", *vae, *SMALL)


@pytest.fixture(scope="module")
def fc8_run(tmp_path_factory, photos):
    out = tmp_path_factory.mktemp("invert-fc8")
    return _trained(out, photos, "invert", "--layer", "fc8", "--noise-dim", "4", *INVERT)


@pytest.fixture(scope="module")
def conv5_no_adv_run(tmp_path_factory, photos):
    out = tmp_path_factory.mktemp("invert-conv5")
    return _trained(out, photos, "invert", "--layer", "conv5", "--lambda-adv", "0", *INVERT)


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def png_size(path):
    with Image.open(path) as image:
        return image.size


def test_train_vae_writes_checkpoint_metrics_and_prior_samples(vae_run):
    payload = torch.load(vae_run / "checkpoint.pt", weights_only=False)
    assert (
        payload["step"] == 2 and payload["config"]["task"] == "vae" and payload["config"]["latent_dim"] == 16
    )
    assert {"generator", "discriminator"} <= set(payload["trainer"])
    rows = read_rows(vae_run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(r["Loss/G/kl"] >= 0 for r in rows)
    assert png_size(vae_run / "prior_samples.png") == (
        8 * 34 + 2,
        8 * 34 + 2,
    )  # 64 samples of 32x32, padding 2


def test_sample_vae_command(vae_run, tmp_path, capsys):
    out = tmp_path / "prior.png"
    assert (
        main(
            [
                "sample-vae",
                "--checkpoint",
                str(vae_run / "checkpoint.pt"),
                "--out",
                str(out),
                "--samples",
                "6",
                "--nrow",
                "3",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert png_size(out) == (3 * 34 + 2, 2 * 34 + 2)
    assert "6 samples from the prior" in capsys.readouterr().out
    again = tmp_path / "again.png"
    main(["sample-vae", "--checkpoint", str(vae_run), "--out", str(again), "--samples", "6", "--nrow", "3"])
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))  # seeded


def test_train_invert_fc8_with_noise(fc8_run):
    payload = torch.load(fc8_run / "checkpoint.pt", weights_only=False)
    config = payload["config"]
    assert (config["task"], config["invert_layer"], config["noise_dim"], config["disc_first_stride"]) == (
        "invert",
        "fc8",
        4,
        4,
    )
    assert payload["trainer"]["generator"]["head.0.weight"].shape == (64, 1000 + 4)
    assert payload["trainer"]["discriminator"]["feature_branch.0.weight"].shape == (1024, 1000)
    assert png_size(fc8_run / "samples" / "step_0000002.png") == (8 * 66 + 2, 2 * 66 + 2)


def test_zero_adversarial_weight_trains_without_discriminator(conv5_no_adv_run):
    payload = torch.load(conv5_no_adv_run / "checkpoint.pt", weights_only=False)
    assert "discriminator" not in payload["trainer"] and "opt_d" not in payload["trainer"]
    rows = read_rows(conv5_no_adv_run / "metrics.jsonl")
    assert all("Loss/D/real" not in r and r["Loss/G/adv"] == 0 for r in rows)


def test_invert_command(fc8_run, photos, tmp_path, capsys):
    images = sorted(photos.glob("*.jpg"))[:2]
    out = tmp_path / "inv"
    assert (
        main(
            [
                "invert",
                "--checkpoint",
                str(fc8_run / "checkpoint.pt"),
                *map(str, images),
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    written = sorted(out.glob("*_inversion.png"))
    assert [p.name for p in written] == ["photo0_inversion.png", "photo1_inversion.png"]
    assert png_size(written[0]) == (128, 64)  # input | reconstruction, 64x64 each
    assert capsys.readouterr().out.count("squared error per pixel") == 2


def test_sample_preimages_command(fc8_run, photos, tmp_path, capsys):
    images = sorted(photos.glob("*.jpg"))[:2]
    out = tmp_path / "pre"
    assert (
        main(
            [
                "sample-preimages",
                "--checkpoint",
                str(fc8_run / "checkpoint.pt"),
                *map(str, images),
                "--samples",
                "3",
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    report = json.loads((out / "diversity.json").read_text())
    assert (
        report["samples"] == 3
        and report["noise_dim"] == 4
        and set(report["images"]) == {"photo0.jpg", "photo1.jpg"}
    )
    assert all(v > 0 for v in report["images"].values())  # different noise -> different samples
    assert report["mean_diversity"] == pytest.approx(np.mean(list(report["images"].values())))
    assert png_size(out / "photo0_preimages.png") == (4 * 66 + 2, 66 + 2)  # input + 3 samples
    assert "mean diversity" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["invert", "sample-preimages"])
def test_max_image_pixels_is_the_limit_of_invert_and_sample_preimages(
    command, fc8_run, photos, tmp_path, capsys
):
    image = sorted(photos.glob("*.jpg"))[0]  # 256 x 256 = 65536 pixels
    samples = ["--samples", "2"] if command == "sample-preimages" else []
    argv = [command, "--checkpoint", str(fc8_run), str(image), "--device", "cpu", *samples]
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "over"), "--max-image-pixels", "65535"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"deepsim {command}: error: {image}: image is 256x256"), err
    assert "over the limit of 65535 (max_image_pixels, --max-image-pixels)" in err[0]
    assert not (tmp_path / "over").exists()
    assert main([*argv, "--out", str(tmp_path / "at"), "--max-image-pixels", "65536"]) == 0
    assert len(list((tmp_path / "at").glob("photo0_*.png"))) == 1


def test_sample_preimages_without_noise_gives_zero_diversity(conv5_no_adv_run, photos, tmp_path):
    out = tmp_path / "pre0"
    image = str(sorted(photos.glob("*.jpg"))[0])
    assert (
        main(
            [
                "sample-preimages",
                "--checkpoint",
                str(conv5_no_adv_run),
                image,
                "--samples",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads((out / "diversity.json").read_text())["mean_diversity"] == 0.0


def test_eval_per_layer_table(fc8_run, conv5_no_adv_run, photos, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(
        [
            "eval",
            "--checkpoint",
            str(fc8_run / "checkpoint.pt"),
            str(conv5_no_adv_run / "checkpoint.pt"),
            "--data",
            str(photos),
            "--out",
            str(out),
            "--batch-size",
            "4",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    rows = json.loads((out / "reconstruction.json").read_text())["rows"]
    assert [r["layer"] for r in rows] == ["conv5", "fc8"]  # sorted by layer
    assert all(r["images"] == 8 and 0 < r["normalized_error"] < np.inf for r in rows)
    assert rows[0]["reference_distance"] == pytest.approx(rows[1]["reference_distance"])  # the same targets
    md = (out / "reconstruction.md").read_text()
    assert "per layer" in md and md.index("| conv5 |") < md.index("| fc8 |")
    assert "normalized error" in capsys.readouterr().out


def test_eval_vae_default_out_folder(vae_run, photos):
    assert (
        main(
            ["eval", "--checkpoint", str(vae_run / "checkpoint.pt"), "--data", str(photos), "--device", "cpu"]
        )
        == 0
    )
    rows = json.loads((vae_run / "eval" / "reconstruction.json").read_text())["rows"]
    assert rows[0]["task"] == "vae" and rows[0]["images"] == 8


def test_commands_reject_the_wrong_kind_of_checkpoint(vae_run, photos, tmp_path, capsys):
    image = str(sorted(photos.glob("*.jpg"))[0])
    assert main(["invert", "--checkpoint", str(vae_run), image, "--out", str(tmp_path)]) == 2
    assert "'vae' run" in capsys.readouterr().err
    assert (
        main(["sample-vae", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x.png")])
        == 2
    )
    assert "no checkpoint" in capsys.readouterr().err


def test_train_autoencoder_then_eval_with_svm_on_stl10(tmp_path, capsys):
    rng = np.random.default_rng(0)
    folder = tmp_path / "stl10"
    folder.mkdir()
    labels = {"train": np.array([1, 2] * 10), "test": np.array([1, 2] * 4)}
    for split, y in labels.items():
        images = rng.integers(0, 80, size=(len(y), 3, 96, 96)).astype(np.int32)
        images[np.arange(len(y)), np.where(y == 1, 0, 2)] += 170  # red vs blue classes
        np.ascontiguousarray(np.clip(images, 0, 255).astype(np.uint8).transpose(0, 1, 3, 2)).tofile(
            folder / f"{split}_X.bin"
        )
        y.astype(np.uint8).tofile(folder / f"{split}_y.bin")
    folds = [f"{2 * i} {2 * i + 1} {(2 * i + 2) % 20} {(2 * i + 3) % 20}" for i in range(10)]
    (folder / "fold_indices.txt").write_text("\n".join(folds) + "\n")
    run = tmp_path / "ae"
    assert (
        main(
            [
                "train",
                "autoencoder",
                "--loss",
                "se",
                "--steps",
                "1",
                "--data",
                str(folder),
                "--out",
                str(run),
                "--no-progress",
                "--device",
                "cpu",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    out = tmp_path / "eval"
    assert (
        main(["eval", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(folder), "--out", str(out)])
        == 0
    )
    error = json.loads((out / "reconstruction.json").read_text())["rows"][0]
    assert error["task"] == "autoencoder" and error["images"] == 8  # the test split
    svm = json.loads((out / "svm.json").read_text())["rows"][0]
    assert svm["folds"] == 10 and svm["feature_dim"] == 8 * 12 * 12
    assert svm["accuracy_mean"] >= 0.75  # two colour classes: even a barely trained code separates them
    assert "Linear SVM" in (out / "svm.md").read_text() and "SVM accuracy" in capsys.readouterr().out
