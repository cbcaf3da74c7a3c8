"""The `auto` runtime choices (deepsim.train.auto) for a faked CUDA device and for the CPU, without a GPU."""

import numpy as np
import pytest
import torch

from deepsim.config import PRESETS, TrainConfig, get_preset
from deepsim.train.auto import (
    AUTO,
    RUNTIME_CHOICES,
    data_kind,
    describe_runtime,
    loader_trial,
    resolve_runtime,
    try_runtime,
)

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
        TrainConfig(data="/data/x"),
        torch.device("cuda", 0),
        dali_available=dali,
        kind=kind,
        resident_fits=False,
        **H100,
    )
    assert config.compile == "reduce-overhead" and config.precision == "bf16" and config.channels_last is True
    assert config.loader == loader and config.tensorboard is True
    line = describe_runtime(config, torch.device("cuda", 0), reasons)
    assert line.startswith("fast path on cuda:0: compile=reduce-overhead (auto: CUDA device, sm_90")
    assert f"loader={loader} (auto: " in line
    assert ("DALI is installed" in line) == (loader == "dali")


@pytest.mark.parametrize(
    "kind, fits, loader",
    [
        ("stl10", True, "resident"),
        ("photos", True, "resident"),
        ("folder", True, "dali"),
        ("stl10", False, "dali"),
    ],
)
def test_auto_keeps_stl10_and_the_photos_on_the_gpu_when_they_fit(kind, fits, loader):
    config, reasons = resolve_runtime(
        TrainConfig(), "cuda", dali_available=True, kind=kind, resident_fits=fits, **H100
    )
    assert config.loader == loader
    assert ("loader=resident (auto: the decoded data set fits on the GPU" in " ".join(reasons)) == (
        loader == "resident"
    )


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
    assert reasons == [
        f"{name} (set)"
        for name in ("compile=off", "precision=tf32", "channels_last=off", "loader=torch", "tensorboard=off")
    ]
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
        (
            [
                "--channels-last",
                "off",
                "--tensorboard",
                "--compile",
                "off",
                "--precision",
                "bf16",
                "--loader",
                "nvjpeg",
            ],
            dict(channels_last=False, tensorboard=True, compile="off", precision="bf16", loader="nvjpeg"),
        ),
        (
            ["--preset", "autoencoder-stl10-se", "--channels-last", "auto"],
            dict(channels_last="auto", loss="se"),
        ),
    ],
)
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
    assert (saved["compile"], saved["channels_last"], saved["loader"]) == (
        "reduce-overhead",
        True,
        "resident",
    )
    assert saved["precision"] == ("bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp32")
    assert result.step == 3 and all(np.isfinite(v) for v in result.history[-1].values())


def test_several_ranks_on_cuda_default_to_the_compiled_step_without_cuda_graphs():
    one, _ = resolve_runtime(TrainConfig(), "cuda", kind="photos", **H100)
    two, reasons = resolve_runtime(TrainConfig(), "cuda", kind="photos", world=2, **H100)
    assert (one.compile, two.compile) == ("reduce-overhead", "default")
    assert "2 ranks: the compiled step without CUDA graphs" in reasons[0]
    pinned, _ = resolve_runtime(
        TrainConfig(compile="reduce-overhead"), "cuda", kind="photos", world=2, **H100
    )
    assert pinned.compile == "reduce-overhead"  # an explicit value is kept


def _failing_trial(*broken):
    tried = []

    def trial(loader, device):
        tried.append(loader)
        if loader in broken:
            raise RuntimeError(f"{loader}: pipe.build() failed: CUDA driver version is insufficient\ndetails")

    return trial, tried


@pytest.mark.parametrize(
    "kind, broken, expected, tried",
    [
        ("folder", (), "dali", ["dali"]),
        ("folder", ("dali",), "nvjpeg", ["dali", "nvjpeg"]),
        ("folder", ("dali", "nvjpeg"), "torch", ["dali", "nvjpeg"]),
        ("stl10", ("dali",), "torch", ["dali"]),  # nvjpeg decodes image files only
    ],
)
def test_an_auto_loader_is_tried_on_one_batch_and_falls_back_with_a_reason(kind, broken, expected, tried):
    chosen, reasons = resolve_runtime(
        TrainConfig(data="/data/x"), "cuda", dali_available=True, kind=kind, **H100
    )
    trial, calls = _failing_trial(*broken)
    config, reasons = try_runtime(chosen, "cuda", reasons, {"loader"}, trial=trial, kind=kind)
    assert config.loader == expected and calls == tried
    line = next(r for r in reasons if r.startswith("loader="))
    assert "\n" not in line
    if broken:
        assert line.startswith(
            f"loader={expected} (auto: dali failed a one-batch trial (RuntimeError: dali: pipe"
        )
        assert line.endswith(f": the {expected} loader instead)")


def test_an_explicit_loader_is_not_tried():
    chosen, reasons = resolve_runtime(TrainConfig(loader="dali"), "cuda", kind="folder", **H100)
    trial, calls = _failing_trial("dali")
    assert try_runtime(chosen, "cuda", reasons, set(), trial=trial)[0].loader == "dali" and calls == []


@pytest.mark.parametrize("loader", ["torch", "nvjpeg", "dali"])
def test_the_loader_trial_delivers_one_batch_on_the_cpu(loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    loader_trial(loader, torch.device("cpu"))  # raises on failure


def test_the_loader_trial_raises_what_fails(monkeypatch):
    import deepsim.data.dali as dali

    def broken_build(self):
        raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version")

    pytest.importorskip("nvidia.dali")
    from nvidia.dali import Pipeline

    monkeypatch.setattr(Pipeline, "build", broken_build)
    with pytest.raises(RuntimeError, match="driver version is insufficient"):
        loader_trial("dali", torch.device("cpu"))
    assert dali.dali_available()  # the import alone says nothing


def _tiny_run(tmp_path, **kw):
    return get_preset("autoencoder-photos").replace(
        comparator="alexnet-random:conv2",
        batch_size=2,
        image_size=32,
        disc_padding="padded",
        steps=2,
        log_every=1,
        sample_every=1000,
        checkpoint_every=1000,
        device="cpu",
        out=str(tmp_path),
        tensorboard=False,
        **kw,
    )


def _broken_compile(monkeypatch):
    from deepsim.train import compiled

    def compile_step(trainer, mode):
        def step(batch):
            raise RuntimeError("InductorError: no working C compiler found\n(more lines)")

        return step

    monkeypatch.setattr(compiled, "compile_step", compile_step)


def test_a_run_falls_back_from_an_auto_loader_and_an_auto_compile_that_fail(
    monkeypatch, tmp_path, capsys, one_intra_op_thread
):
    """The loop wiring: resolve_runtime is made to choose DALI and the compiled step (as on a GPU), the DALI
    trial fails and the compiled step's first call raises; the run trains eagerly on the torch loader and
    says both in one line each."""
    import deepsim.train.auto as auto
    import deepsim.train.loop as loop

    real_resolve = loop.resolve_runtime

    def gpu_like(config, device, **kw):
        config, reasons = real_resolve(config, device, **kw)
        reasons = [
            r.replace("loader=torch", "loader=dali").replace("compile=off", "compile=default")
            for r in reasons
        ]
        return config.replace(loader="dali", compile="default"), reasons

    monkeypatch.setattr(loop, "resolve_runtime", gpu_like)
    monkeypatch.setattr(
        auto, "loader_trial", lambda loader, device: (_ for _ in ()).throw(RuntimeError("no DALI"))
    )
    _broken_compile(monkeypatch)
    lines = []
    result = loop.train(_tiny_run(tmp_path), progress=False, announce=lambda cfg, line: lines.append(line))
    assert result.step == 2 and all(np.isfinite(v) for v in result.history[-1].values())
    assert "loader=torch (auto: dali failed a one-batch trial (RuntimeError: no DALI)" in lines[0]
    assert "nvjpeg" not in lines[0]  # the bundled photos are not an image folder: no nvjpeg trial
    err = capsys.readouterr().err
    assert (
        "compile=default (auto) failed on the first step (RuntimeError: InductorError: no working C compiler"
        in err
    )
    assert "the eager step (compile=off) instead" in err


def test_an_explicit_compile_that_fails_is_an_error(monkeypatch, tmp_path, one_intra_op_thread):
    import deepsim.train.loop as loop

    _broken_compile(monkeypatch)
    with pytest.raises(RuntimeError, match="no working C compiler"):
        loop.train(_tiny_run(tmp_path, compile="default"), progress=False)
