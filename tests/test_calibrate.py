"""deepsim calibrate: the mechanics of the lambda_feat calibration, with random weights on the bundled photos
(trained weights are not available here, so no calibrated number is asserted or quoted)."""

import json

import pytest
import torch

from deepsim.calibrate import PERTURBATIONS, calibrate_lambda_feat, feature_distances
from deepsim.cli import main
from deepsim.comparators import Comparator
from deepsim.data import iterate_eval

IMAGES, SIZE = 4, 128  # 128: the mechanics at a third of the cost of 227 (pool5 is still defined)


@pytest.fixture(scope="module")
def caffenet_file(tmp_path_factory):
    """A CaffeNet weights file in the comparators' key layout (random weights, Caffe blob shapes)."""
    net = Comparator("caffenet-random:fc8")
    state = {}
    for key, index in net._param_names.items():
        state[f"{key}.weight"] = net.layers[index].weight.detach().clone()
        state[f"{key}.bias"] = net.layers[index].bias.detach().clone()
    path = tmp_path_factory.mktemp("weights") / "caffenet.pt"
    torch.save(state, path)
    return path


def test_a_comparator_against_itself_gives_the_reference_lambda():
    report = calibrate_lambda_feat(
        "alexnet-random:pool5", "alexnet-random:pool5", data="photos", images=IMAGES, size=SIZE
    )
    assert report.images == IMAGES and set(report.ratios) == set(PERTURBATIONS)
    assert all(r == pytest.approx(1.0, rel=1e-6) for r in report.ratios.values())
    assert report.lambda_feat == pytest.approx(report.reference_lambda_feat, rel=1e-6) == pytest.approx(0.005)


def test_ratio_is_the_ratio_of_mean_feature_distances(caffenet_file):
    """By hand on the same crops: R(blur) = sum D_ref / sum D_cmp; a tap weight of 2 on the comparator halves
    R (the calibrated lambda_feat compensates exactly for a uniform scale of the comparator's term)."""
    cmp, ref = Comparator("alexnet-random:pool5"), Comparator("caffenet:pool5", weights=str(caffenet_file))
    report = calibrate_lambda_feat(
        cmp, ref, data="photos", images=IMAGES, size=SIZE, perturbations=["blur", "shift"]
    )
    batch = next(iter(iterate_eval("photos", batch_size=IMAGES, crop_size=SIZE, mode="resize-center")))
    gen = torch.Generator().manual_seed(0)
    blurred = PERTURBATIONS["blur"](batch, gen)
    expected = feature_distances(ref, batch, blurred).sum() / feature_distances(cmp, batch, blurred).sum()
    assert report.ratios["blur"] == pytest.approx(expected.item(), rel=1e-5)
    assert report.distances["blur"]["reference"] == pytest.approx(
        feature_distances(ref, batch, blurred).mean().item(), rel=1e-5
    )
    assert report.ratio == pytest.approx((report.ratios["blur"] * report.ratios["shift"]) ** 0.5, rel=1e-9)
    assert report.lambda_feat == pytest.approx(0.005 * report.ratio, rel=1e-9)
    doubled = calibrate_lambda_feat(
        "alexnet-random:pool5=2",
        ref,
        data="photos",
        images=IMAGES,
        size=SIZE,
        perturbations=["blur", "shift"],
    )
    assert doubled.ratio == pytest.approx(report.ratio / 2, rel=1e-5)


def test_perturbations_keep_the_shape_and_change_the_image():
    batch = torch.rand(2, 3, 40, 40) * 2 - 1
    for name, perturb in PERTURBATIONS.items():
        out = perturb(batch, torch.Generator().manual_seed(0))
        assert out.shape == batch.shape and (out - batch).abs().mean() > 1e-3, name


def test_calibrate_command(caffenet_file, capsys):
    argv = [
        "calibrate",
        "--comparator",
        "alexnet-random:pool5",
        "--reference",
        "caffenet:pool5",
        "--reference-weights",
        str(caffenet_file),
        "--data",
        "photos",
        "--images",
        "2",
        "--size",
        "128",
        "--device",
        "cpu",
        "--perturbations",
        "noise,downsample",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "lambda_feat for alexnet-random:pool5 = 0.005 x" in out and "downsample" in out
    assert main(argv + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 2 and set(report["ratios"]) == {"noise", "downsample"}
    assert report["lambda_feat"] == pytest.approx(0.005 * report["ratio"])


def test_calibrate_errors_name_the_fault(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert (
        main(
            [
                "calibrate",
                "--reference-weights",
                str(missing),
                "--comparator",
                "alexnet-random:pool5",
                "--data",
                "photos",
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert str(missing) in capsys.readouterr().err
    with pytest.raises(ValueError, match="perturbations \\['rotate'\\]"):
        calibrate_lambda_feat(
            "alexnet-random:pool5", "alexnet-random:pool5", data="photos", perturbations=["rotate"]
        )
