"""deepsim.eval: the normalized error on constructed cases, the fold SVM, the STL-10 path, tables."""

import json
import math

import numpy as np
import pytest
import torch

from deepsim.config import TrainConfig
from deepsim.eval import (
    evaluate_checkpoint,
    evaluate_checkpoints,
    fold_svm_accuracy,
    markdown_table,
    reconstruction_error,
    stl10_svm_accuracy,
    write_table,
)
from deepsim.metrics import mean_pairwise_distance, normalized_error
from deepsim.networks import AutoencoderGenerator
from deepsim.train.checkpoint import save_checkpoint


def write_stl10(folder, train_images, train_labels, test_images, test_labels, folds):
    """The STL-10 binary format: per image 3 planes of 96x96 in column-major order; labels uint8 1..10."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, images, labels in (("train", train_images, train_labels), ("test", test_images, test_labels)):
        np.ascontiguousarray(images.transpose(0, 1, 3, 2)).astype(np.uint8).tofile(folder / f"{split}_X.bin")
        np.asarray(labels, dtype=np.uint8).tofile(folder / f"{split}_y.bin")
    (folder / "fold_indices.txt").write_text("\n".join(" ".join(map(str, f)) for f in folds) + "\n")
    return folder


def colour_class_images(labels, rng):
    """Class 1: red-dominant, class 2: blue-dominant, plus noise and an asymmetric pattern (N, 3, 96, 96)."""
    n = len(labels)
    images = rng.integers(0, 60, size=(n, 3, 96, 96)).astype(np.int32)
    for i, label in enumerate(labels):
        images[i, 0 if label == 1 else 2] += 160
    images[:, 1, :10, :] = 255  # a horizontal band: the Fortran-order write must keep it horizontal
    return np.clip(images, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def stl10_folder(tmp_path_factory):
    rng = np.random.default_rng(0)
    train_labels = np.array([1, 2] * 10)  # 20 images
    test_labels = np.array([1, 2] * 5)
    folds = [np.array([2 * i % 20, (2 * i + 1) % 20, (2 * i + 4) % 20, (2 * i + 5) % 20]) for i in range(10)]
    return write_stl10(
        tmp_path_factory.mktemp("stl10"),
        colour_class_images(train_labels, rng),
        train_labels,
        colour_class_images(test_labels, rng),
        test_labels,
        folds,
    )


# ------------------------------------------------------------------------------- normalized error
def test_identical_sets_give_zero():
    targets = torch.randn(6, 3, 8, 8)
    result = reconstruction_error(lambda x: x.clone(), [targets[:4], targets[4:]])
    assert result["images"] == 6 and result["normalized_error"] == 0.0 and result["mean_distance"] == 0.0
    assert result["reference_distance"] == pytest.approx(
        float(mean_pairwise_distance(targets.flatten(1))), rel=1e-5
    )


def test_known_pairs_give_their_known_value():
    # Targets 0 and c * 1 (D = 3*4*4 = 48 elements): N = c * sqrt(48). Each reconstruction is off by a vector
    # of norm d, so the error is d / (c sqrt(48)).
    c, d = 0.5, 0.3
    targets = torch.stack([torch.zeros(3, 4, 4), torch.full((3, 4, 4), c)])
    offset = torch.zeros(3, 4, 4)
    offset[0, 0, 0] = d
    result = reconstruction_error(lambda x: x + offset, [targets])
    assert result["reference_distance"] == pytest.approx(c * math.sqrt(48), rel=1e-6)
    assert result["mean_distance"] == pytest.approx(d, rel=1e-6)
    assert result["normalized_error"] == pytest.approx(d / (c * math.sqrt(48)), rel=1e-6)


def test_batching_does_not_change_the_error_and_max_images_truncates():
    torch.manual_seed(0)
    targets = torch.randn(7, 3, 5, 5)
    noisy = lambda x: x * 0.9 + 0.05  # noqa: E731
    whole = reconstruction_error(noisy, [targets])
    split = reconstruction_error(noisy, [targets[:3], targets[3:5], targets[5:]])
    assert split["normalized_error"] == pytest.approx(whole["normalized_error"], rel=1e-6)
    assert whole["normalized_error"] == pytest.approx(
        float(normalized_error(noisy(targets), targets, targets)), rel=1e-5
    )
    first4 = reconstruction_error(noisy, [targets[:3], targets[3:]], max_images=4)
    assert first4["images"] == 4
    assert first4["normalized_error"] == pytest.approx(
        float(normalized_error(noisy(targets[:4]), targets[:4], targets[:4])), rel=1e-5
    )
    with pytest.raises(ValueError, match="at least 2"):
        reconstruction_error(noisy, [targets[:1]])


# ------------------------------------------------------------------------------- SVM
def test_fold_svm_on_separable_codes_is_accurate():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 20)) * 6
    train_labels = np.repeat([1, 2, 3], 40)
    test_labels = np.repeat([1, 2, 3], 30)
    train = centres[train_labels - 1] + rng.normal(size=(120, 20))
    test = centres[test_labels - 1] + rng.normal(size=(90, 20))
    folds = [rng.permutation(120)[:30] for _ in range(10)]
    result = fold_svm_accuracy(train, train_labels, folds, test, test_labels)
    assert len(result.fold_accuracies) == 10 and result.train_per_fold == [30] * 10
    assert result.mean > 0.97 and result.std < 0.03 and result.feature_dim == 20


def test_fold_svm_on_random_labels_is_near_chance():
    rng = np.random.default_rng(2)
    train, test = rng.normal(size=(200, 30)), rng.normal(size=(400, 30))
    result = fold_svm_accuracy(
        train, rng.integers(1, 3, 200), [np.arange(200)], test, rng.integers(1, 3, 400)
    )
    assert 0.35 < result.mean < 0.65


def test_fold_svm_rejects_one_class_folds():
    codes = np.random.default_rng(3).normal(size=(10, 4))
    labels = np.array([1] * 5 + [2] * 5)
    with pytest.raises(ValueError, match="fold 0 has 1 class"):
        fold_svm_accuracy(codes, labels, [np.arange(5)], codes, labels)


def test_stl10_folder_svm(stl10_folder):
    def mean_colour(x):  # (B, 3, H, W) -> (B, 3): separates the two colour classes
        return x.mean(dim=(2, 3))

    result = stl10_svm_accuracy(mean_colour, stl10_folder, batch_size=8)
    assert len(result.fold_accuracies) == 10 and result.test_images == 10
    assert result.mean == 1.0 and result.std == 0.0

    def band_rows(x):  # the green band must be horizontal at the top (rows 0..9) after reading
        return x[:, 1].mean(dim=2)[:, :12]

    codes = band_rows(_first_batch(stl10_folder))
    assert torch.all(codes[:, :10] == 1.0) and torch.all(codes[:, 10:] < 0)


def _first_batch(folder):
    from deepsim.data import iterate_eval

    return next(iter(iterate_eval(folder, batch_size=4, crop_size=96, split="train")))


def test_evaluate_autoencoder_checkpoint_on_stl10(tmp_path, stl10_folder):
    torch.manual_seed(0)
    generator = AutoencoderGenerator()
    config = TrainConfig(task="autoencoder", loss="se")
    path = save_checkpoint(
        tmp_path / "checkpoint.pt",
        {"step": 5, "config": config.to_dict(), "trainer": {"generator": generator.state_dict()}},
    )
    result = evaluate_checkpoint(path, stl10_folder, batch_size=4)
    row = result["reconstruction"]
    assert row["task"] == "autoencoder" and row["images"] == 10 and row["step"] == 5  # the test split

    # the same number computed by hand from the same centre crops
    from deepsim.data import iterate_eval

    generator.eval()
    targets = torch.cat(list(iterate_eval(stl10_folder, batch_size=10, crop_size=64, split="test")))
    with torch.no_grad():
        expected = normalized_error(generator(targets), targets, targets)
    assert row["normalized_error"] == pytest.approx(float(expected), rel=1e-4)

    svm = result["svm"]
    assert svm["folds"] == 10 and svm["feature_dim"] == 8 * 12 * 12  # the code of the whole 96x96 image
    assert 0.0 <= svm["accuracy_mean"] <= 1.0 and len(svm["fold_accuracies"]) == 10

    tables = evaluate_checkpoints([path], stl10_folder, out=tmp_path / "tables", batch_size=4, svm=False)
    assert not tables["svm"] and (tmp_path / "tables" / "reconstruction.md").is_file()
    assert not (tmp_path / "tables" / "svm.md").exists()
    saved = json.loads((tmp_path / "tables" / "reconstruction.json").read_text())
    assert saved["rows"][0]["normalized_error"] == pytest.approx(row["normalized_error"])


# ------------------------------------------------------------------------------- tables
def test_markdown_and_json_tables(tmp_path):
    rows = [{"layer": "fc6", "err": 0.51234, "n": 3}, {"layer": "fc|8", "err": float("nan"), "n": None}]
    columns = [("layer", "layer", ""), ("err", "error", ".3f"), ("n", "images", "d")]
    text = markdown_table(rows, columns, "T")
    assert text.splitlines() == [
        "### T",
        "",
        "| layer | error | images |",
        "|---|---|---|",
        "| fc6 | 0.512 | 3 |",
        "| fc\\|8 | - | - |",
    ]
    md, js = write_table(rows, columns, tmp_path, "t", "T")
    assert md.read_text() == text
    assert json.loads(js.read_text())["rows"][0] == {"layer": "fc6", "err": 0.51234, "n": 3}


def test_reconstruction_error_reports_sharpness():
    from deepsim.eval.evaluate import reconstruction_error

    targets = [torch.rand(4, 3, 16, 16) * 2 - 1 for _ in range(2)]
    same = reconstruction_error(lambda x: x, targets)
    assert same["normalized_error"] == 0 and same["sharpness"] == pytest.approx(1.0)
    blur = reconstruction_error(lambda x: torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1), targets)
    assert blur["sharpness"] < 0.5 and blur["normalized_error"] > 0


# ------------------------------------------------------------------------------- LPIPS column
def _autoencoder_checkpoint(tmp_path):
    torch.manual_seed(0)
    generator = AutoencoderGenerator()
    config = TrainConfig(task="autoencoder", loss="se")
    payload = {"step": 5, "config": config.to_dict(), "trainer": {"generator": generator.state_dict()}}
    return save_checkpoint(tmp_path / "checkpoint.pt", payload), generator


def test_eval_reports_lpips_beside_the_normalized_error(tmp_path, stl10_folder):
    pytest.importorskip("lpips", reason="LPIPS' lin weights come with the lpips package")
    from deepsim.data import iterate_eval
    from deepsim.metrics import LPIPS

    path, generator = _autoencoder_checkpoint(tmp_path)
    tables = evaluate_checkpoints(
        [path], stl10_folder, batch_size=4, svm=False, lpips_backbone_weights="random"
    )
    row = tables["reconstruction"][0]
    generator.eval()
    targets = torch.cat(list(iterate_eval(stl10_folder, batch_size=10, crop_size=64, split="test")))
    with torch.no_grad():
        expected = LPIPS("alex", backbone_weights="random")(generator(targets), targets).mean()
    assert row["lpips"] == pytest.approx(float(expected), rel=1e-4) and row["lpips"] > 0
    assert "LPIPS (alex)" in tables["markdown"] and "not reported" not in tables["markdown"]


def test_eval_says_why_lpips_is_missing(tmp_path, stl10_folder, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))  # no torchvision AlexNet file
    path, _ = _autoencoder_checkpoint(tmp_path)
    tables = evaluate_checkpoints([path], stl10_folder, batch_size=4, svm=False)
    row = tables["reconstruction"][0]
    assert "lpips" not in row and "alexnet-owt-7be5be79.pth" in row["lpips_note"]
    assert "LPIPS (alex) not reported: " in tables["markdown"] and "LPIPS (alex) |" not in tables["markdown"]
