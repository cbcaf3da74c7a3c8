"""deepsim export (safetensors with config and provenance), deepsim.load_generator, every --checkpoint command
on an exported file, and the upconvGAN state-dict mapping against a reference built in their layout."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import deepsim
from deepsim.caffe.upconvgan import generator_from_upconvgan, upconvgan_reference_output
from deepsim.cli import main
from deepsim.config import TrainConfig
from deepsim.train.checkpoint import CorruptCheckpointError, load_checkpoint
from deepsim.train.tensorfile import read_metadata, read_safetensors, write_safetensors
from tests.training_runs import TINY_TRAIN_FLAGS

RUN = [*TINY_TRAIN_FLAGS, "--log-every", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    assert main(["train", *RUN, "--steps", "2", "--out", str(out)]) == 0
    return out


def test_export_writes_the_generator_with_config_and_provenance(run, tmp_path, capsys):
    out = tmp_path / "G.safetensors"
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    meta = read_metadata(out)
    provenance = json.loads(meta["deepsim.provenance"])
    assert provenance["preset"] == "autoencoder-photos" and provenance["step"] == 2
    assert provenance["task"] == "autoencoder" and "commit" in provenance
    from_json = TrainConfig.from_dict(json.loads(meta["deepsim.config"]))
    assert from_json == TrainConfig.from_dict(load_checkpoint(run)["config"])
    from safetensors.torch import load_file

    saved = load_checkpoint(run)["trainer"]["generator"]
    plain = load_file(out)  # a plain safetensors file: any reader sees the tensors by name
    assert sorted(plain) == sorted(f"trainer.generator.{name}" for name in saved)
    payload = read_safetensors(out)
    assert set(payload["trainer"]) == {"generator"}
    for name, tensor in saved.items():
        torch.testing.assert_close(payload["trainer"]["generator"][name], tensor, rtol=0, atol=0)

    generator = deepsim.load_generator(out)
    assert not generator.training
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    from deepsim.reconstruct import load_generator as load_from_checkpoint

    reference, _ = load_from_checkpoint(run)
    torch.testing.assert_close(generator(x), reference(x), rtol=0, atol=0)

    with_d = tmp_path / "GD.safetensors"
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(run / "checkpoint.pt"),
                "--out",
                str(with_d),
                "--with-discriminator",
            ]
        )
        == 0
    )
    assert set(read_safetensors(with_d)["trainer"]) == {"generator", "discriminator"}


def test_every_checkpoint_command_takes_an_export(run, tmp_path, capsys):
    out = tmp_path / "G.safetensors"
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    image = tmp_path / "image.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(image)
    assert (
        main(
            [
                "reconstruct",
                "--checkpoint",
                str(out),
                str(image),
                "--out",
                str(tmp_path / "rec"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert (tmp_path / "rec" / "image_reconstruction.png").is_file()
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(out),
                "--data",
                "photos",
                "--max-images",
                "4",
                "--no-svm",
                "--out",
                str(tmp_path / "eval"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    capsys.readouterr()
    # a generator-only export cannot be resumed, and says so in one line
    assert (
        main(["train", "--resume", str(out), "--out", str(tmp_path / "r"), "--steps", "3", "--device", "cpu"])
        == 2
    )
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "--training-state" in err[0]


def test_training_state_export_resumes_like_the_checkpoint(run, tmp_path):
    full = tmp_path / "full.safetensors"
    assert main(["export", "--checkpoint", str(run), "--out", str(full), "--training-state"]) == 0
    a, b = tmp_path / "a", tmp_path / "b"
    for source, out in ((run / "checkpoint.pt", a), (full, b)):
        assert (
            main(
                [
                    "train",
                    "--resume",
                    str(source),
                    "--out",
                    str(out),
                    "--steps",
                    "3",
                    "--device",
                    "cpu",
                    "--no-progress",
                ]
            )
            == 0
        )
    ta, tb = load_checkpoint(a)["trainer"], load_checkpoint(b)["trainer"]
    for name in ta["generator"]:
        torch.testing.assert_close(ta["generator"][name], tb["generator"][name], rtol=0, atol=0)


def test_a_damaged_export_is_named(run, tmp_path):
    out = tmp_path / "G.safetensors"
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    data = bytearray(out.read_bytes())
    data[-10] ^= 0xFF  # a tensor byte
    out.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        load_checkpoint(out)


def test_write_safetensors_never_replaces_a_file_without_force(tmp_path):
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="--force"):
        write_safetensors(out, {"config": {}, "step": 0})
    assert out.read_bytes() == b"mine"
    write_safetensors(out, {"config": {}, "step": 0, "t": (1, {2: torch.ones(2)})}, force=True)
    assert read_safetensors(out)["t"][1][2].tolist() == [1.0, 1.0]


# ------------------------------------------------------------------------------------ upconvGAN layout


class _View(nn.Module):
    def forward(self, x):
        return x.view(-1, 256, 4, 4)


def their_generator(layer: str, fc_width: int) -> nn.Sequential:
    """The layer layout of upconvGAN's ``G`` (named children, LReLU 0.3), written for this test."""
    layers: list[tuple[str, nn.Module]] = []

    def add(name, module, relu=True):
        layers.append((name, module))
        if relu:
            layers.append((f"relu_{name}", nn.LeakyReLU(0.3)))

    if layer == "pool5":
        add("Rconv6", nn.Conv2d(256, 512, 3, padding=1))
        add("Rconv7", nn.Conv2d(512, 512, 3, padding=1))
        add("Rconv8", nn.Conv2d(512, 512, 3))
        channels = 512
    else:
        add("defc7", nn.Linear(1000 if layer == "fc8" else 4096, fc_width))
        add("defc6", nn.Linear(fc_width, fc_width))
        add("defc5", nn.Linear(fc_width, 4096))
        layers.append(("reshape", _View()))
        channels = 256
    for name, out, k in (
        ("deconv5", 256, 4),
        ("conv5_1", 512, 3),
        ("deconv4", 256, 4),
        ("conv4_1", 256, 3),
        ("deconv3", 128, 4),
        ("conv3_1", 128, 3),
        ("deconv2", 64, 4),
        ("deconv1", 32, 4),
        ("deconv0", 3, 4),
    ):
        add(
            name,
            nn.ConvTranspose2d(channels, out, k, stride=2 if k == 4 else 1, padding=1),
            relu=name != "deconv0",
        )
        channels = out
    model = nn.Sequential(OrderedDict(layers))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                fan_in = (
                    module.weight[0].numel()
                    if not isinstance(module, nn.ConvTranspose2d)
                    else (module.weight.shape[0] * module.weight[0, 0].numel() // module.stride[0] ** 2)
                )
                module.weight.normal_(0, (2.0 / fan_in) ** 0.5)
                module.bias.normal_(0, 0.1)
        model.deconv0.weight.mul_(20)  # their output spans tens of Caffe units
    return model.eval()


@pytest.mark.parametrize("layer, prefix", [("fc6", ""), ("fc8", "G."), ("pool5", "")])
def test_upconvgan_state_dict_maps_onto_our_generator(layer, prefix):
    torch.manual_seed(0)
    theirs = their_generator(layer, fc_width=32)
    state = {prefix + k: v for k, v in theirs.state_dict().items()}
    ours = generator_from_upconvgan(state)  # the layer is read from the keys (fc6 and fc7 look the same)
    assert ours.layer == {"pool5": "conv5"}.get(layer, layer)
    shape = (2, 256, 6, 6) if layer == "pool5" else (2, 1000 if layer == "fc8" else 4096)
    features = torch.randn(shape).abs()
    if layer == "pool5":
        features = features * 0.1
    with torch.no_grad():
        expected = upconvgan_reference_output(theirs(features))  # BGR - mean -> RGB in [-1, 1]
        got = ours(features)
    assert got.shape == (2, 3, 256, 256) and expected.abs().mean() > 0.05
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_upconvgan_file_through_load_generator_and_export(tmp_path, capsys):
    torch.manual_seed(1)
    theirs = their_generator("fc6", fc_width=16)
    path = tmp_path / "upconvGAN_fc7.pt"
    torch.save(theirs.state_dict(), path)
    generator = deepsim.load_generator(path, layer="fc7")
    assert generator.layer == "fc7" and generator.image_size == 256
    out = tmp_path / "fc7.safetensors"
    assert main(["export", "--checkpoint", str(path), "--layer", "fc7", "--out", str(out)]) == 0
    payload = load_checkpoint(out)
    assert payload["config"]["invert_layer"] == "fc7" and payload["config"]["fc_width"] == 16
    features = torch.randn(1, 4096).abs()
    with torch.no_grad():
        full = generator(features)
        cropped = deepsim.load_generator(out)(features)  # 227: the code's centre crop of the 256 output
    torch.testing.assert_close(cropped, full[..., 14:241, 14:241], atol=1e-5, rtol=1e-5)


def test_upconvgan_errors_name_the_tensor():
    state = their_generator("fc6", fc_width=8).state_dict()
    state["conv4_1.weight"] = torch.zeros(3, 3, 3, 3)
    with pytest.raises(ValueError, match=r"conv4_1\.weight.*shape \(3, 3, 3, 3\)"):
        generator_from_upconvgan(state)
    state = their_generator("fc6", fc_width=8).state_dict()
    state["deconv2.bias"] = torch.full((64,), float("nan"))
    with pytest.raises(ValueError, match=r"deconv2\.bias.*non-finite"):
        generator_from_upconvgan(state)
    state = their_generator("fc6", fc_width=8).state_dict()
    state["defc4.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected tensors defc4.weight"):
        generator_from_upconvgan(state)
