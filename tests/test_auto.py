"""The `auto` runtime choices (deepsim.train.auto) for a faked CUDA device and for the CPU, without a GPU."""

import numpy as np
import pytest
import torch

from deepsim.config import PRESETS, TrainConfig, get_preset
from deepsim.train.auto import AUTO, RUNTIME_CHOICES, data_kind, describe_runtime, resolve_runtime

H100 = dict(cuda_capability=(9, 0), tensorboard_installed=True)


def test_cpu_takes_the_simple_path():
    config, reasons = resolve_runtime(TrainConfig(), torch.device("cpu"), tensorboard_installed=False)
    assert (config.compile, config.precision, config.channels_last, config.loader) == (
        "off",
        "fp32",
        False,
        "torch",
    )
    assert config.tensorboard is False
    assert len(reasons) == 5 and all("(auto: " in r for r in reasons)
    assert describe_runtime(config, "cpu", reasons).startswith("simple path on cpu: compile=off (auto: ")


@pytest.mark.parametrize(
    "kind, dali, loader",
    [
        ("folder", True, "dali"),
        ("folder", False, "nvjpeg"),
        ("stl10", True, "dali"),  # too big for the device's free memory (faked below)
        ("stl10", False, "torch"),  # raw pixels: nothing to decode
        ("photos", True, "torch"),  # decoded once into memory
        ("photos", False, "torch"),
    ],
)
def test_faked_cuda_device_takes_the_fast_path(kind, dali, loader):
    config, reasons = resolve_runtime(
        TrainConfig(data="/data/x"), torch.device("cuda", 0), dali_available=dali, kind=kind,
        resident_fits=False, **H100,
    )  # fmt: skip
    assert config.compile == "reduce-overhead" and config.precision == "bf16" and config.channels_last is True
    assert config.loader == loader and config.tensorboard is True
    line = describe_runtime(config, torch.device("cuda", 0), reasons)
    assert line.startswith("fast path on cuda:0: compile=reduce-overhead (auto: CUDA device, sm_90")
    assert f"loader={loader} (auto: " in line
    assert ("DALI is installed" in line) == (loader == "dali")


@pytest.mark.parametrize("kind, fits, loader", [
    ("stl10", True, "resident"), ("photos", True, "resident"), ("folder", True, "dali"), ("stl10", False, "dali"),
])  # fmt: skip
def test_auto_keeps_stl10_and_the_photos_on_the_gpu_when_they_fit(kind, fits, loader):
    config, reasons = resolve_runtime(
        TrainConfig(), "cuda", dali_available=True, kind=kind, resident_fits=fits, **H100
    )
    assert config.loader == loader
    assert ("loader=resident (auto: the decoded data set fits on the GPU" in " ".join(reasons)) == (loader == "resident")


def test_older_gpus_get_what_their_tensor_cores_do():
    turing, _ = resolve_runtime(
        TrainConfig(), "cuda", dali_available=False, kind="folder", cuda_capability=(7, 5)
    )
    assert (turing.precision, turing.channels_last, turing.compile) == ("fp32", True, "reduce-overhead")
    pascal, reasons = resolve_runtime(
        TrainConfig(), "cuda", dali_available=False, kind="folder", cuda_capability=(6, 1)
    )
    assert (pascal.precision, pascal.channels_last) == ("fp32", False)
    assert "precision=fp32 (auto: CUDA device, sm_61: no bf16)" in reasons


def test_explicit_values_win_over_auto_on_cuda():
    explicit = TrainConfig(
        compile="off", precision="tf32", loader="torch", channels_last=False, tensorboard=False
    )
    config, reasons = resolve_runtime(explicit, "cuda", dali_available=True, kind="folder", **H100)
    assert config == explicit
    assert reasons == [f"{name} (set)" for name in
                       ("compile=off", "precision=tf32", "channels_last=off", "loader=torch", "tensorboard=off")]  # fmt: skip
    assert describe_runtime(config, "cuda", reasons).startswith("custom path on cuda")


def test_dali_is_only_imported_when_it_decides_something(monkeypatch):
    import deepsim.train.auto as auto

    calls = []
    monkeypatch.setattr(auto, "_dali_available", lambda: calls.append(1) or False)
    resolve_runtime(TrainConfig(), "cpu")
    resolve_runtime(TrainConfig(loader="torch"), "cuda", kind="folder", **H100)
    assert calls == []
    config, _ = resolve_runtime(TrainConfig(), "cuda", kind="folder", **H100)
    assert calls == [1] and config.loader == "nvjpeg"


def test_presets_leave_runtime_fields_auto_and_an_explicit_preset_value_wins():
    for name, preset in PRESETS.items():
        assert all(getattr(preset, field) == AUTO for field in RUNTIME_CHOICES), name
    pinned = get_preset("autoencoder-photos").replace(precision="fp32")  # what a preset with a value does
    config, _ = resolve_runtime(pinned, "cuda", dali_available=False, kind="photos", **H100)
    assert config.precision == "fp32" and config.compile == "reduce-overhead"


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match=r"compile='fast': expected one of auto, off, default"):
        resolve_runtime(TrainConfig(compile="fast"), "cpu")
    with pytest.raises(ValueError, match=r"--tensorboard: the tensorboard package is not installed"):
        resolve_runtime(TrainConfig(tensorboard=True), "cpu", tensorboard_installed=False)
    off, _ = resolve_runtime(TrainConfig(tensorboard=False), "cpu", tensorboard_installed=False)
    assert off.tensorboard is False


def test_data_kind_looks_at_the_path(tmp_path):
    assert data_kind("photos") == "photos"
    assert data_kind(tmp_path) == "folder"
    (tmp_path / "train_X.bin").write_bytes(np.zeros(3 * 96 * 96, np.uint8).tobytes())
    assert data_kind(tmp_path) == "stl10"
    assert data_kind(tmp_path / "missing") == "folder"  # the loader names a missing folder later


@pytest.mark.parametrize(
    "flags, expected",
    [
        ([], dict(compile="auto", precision="auto", loader="auto", channels_last="auto", tensorboard="auto")),
        (["--channels-last", "--no-tensorboard"], dict(channels_last=True, tensorboard=False)),
        (["--channels-last", "off", "--tensorboard", "--compile", "off", "--precision", "bf16", "--loader", "nvjpeg"],
         dict(channels_last=False, tensorboard=True, compile="off", precision="bf16", loader="nvjpeg")),
        (["--preset", "autoencoder-stl10-se", "--channels-last", "auto"], dict(channels_last="auto", loss="se")),
    ],
)  # fmt: skip
def test_cli_flags_reach_the_config_and_auto_is_the_default(monkeypatch, tmp_path, flags, expected):
    import deepsim.train.loop as loop
    from deepsim.cli import main

    seen = {}

    def fake_train(config, **kwargs):
        seen["config"] = config
        return loop.TrainResult(step=0, out=tmp_path, checkpoint=None)

    monkeypatch.setattr(loop, "train", fake_train)
    assert main(["train", "--out", str(tmp_path)] + flags) == 0
    for name, value in expected.items():
        assert getattr(seen["config"], name) == value, name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_default_run_on_cuda_takes_the_fast_path(tmp_path):
    """On a GPU: a default-config run resolves to the compiled step under CUDA graphs, bf16, channels_last
    (the bundled photos go resident on the GPU), trains 3 steps with finite losses and records the choice."""
    import json

    from deepsim.train.loop import train

    config = get_preset("autoencoder-photos").replace(
        steps=3,
        batch_size=8,
        log_every=1,
        sample_every=100,
        checkpoint_every=100,
        device="cuda",
        out=str(tmp_path),
    )
    lines = []
    result = train(config, progress=False, announce=lambda cfg, line: lines.append(line))
    assert lines[0].startswith("fast path on cuda"), lines
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["compile"], saved["channels_last"], saved["loader"]) == ("reduce-overhead", True, "resident")
    assert saved["precision"] == ("bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp32")
    assert result.step == 3 and all(np.isfinite(v) for v in result.history[-1].values())
