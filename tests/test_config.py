"""The config: the derived code's dynamics as defaults, every preset value's provenance, configs saved before
the new fields existed, and their CLI flags."""

import dataclasses
import json

import pytest
import torch

from deepsim.cli import build_parser, main
from deepsim.config import (
    DEFAULT_SOURCES,
    LEGACY_VALUES,
    PRESET_SOURCES,
    PRESETS,
    SOURCES,
    TrainConfig,
    get_preset,
    value_sources,
)
from tests.training_runs import tiny_config

PAPER_PRESETS = [n for n in PRESETS if "photos" not in n]


def test_paper_presets_train_as_the_derived_code():
    for name in PAPER_PRESETS:
        p = PRESETS[name]
        assert (
            p.update_order,
            p.disc_padding,
            p.disc_init,
            p.upconv_bias,
            p.gen_init,
            p.weight_decay_scope,
        ) == ("code", "code", "code", "zero", "code", "code"), name
        assert p.weight_decay == 4e-4 and p.lr_gamma == 0.5, name
        assert p.lr_milestones == (300_000, 500_000, 700_000, 900_000, 1_100_000), name
        assert p.mirror is False and p.disc_activation == "lrelu", name
    assert PRESETS["autoencoder-photos"].mirror and PRESETS["vae-photos"].mirror  # the quickstarts (ours)


def test_every_preset_value_names_its_source():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(DEFAULT_SOURCES) <= fields  # no stale name
    default = TrainConfig()
    for name in PRESETS:
        assert set(PRESET_SOURCES.get(name, {})) <= fields, name
        rows = value_sources(name)
        assert set(rows) == fields
        for field, (value, source) in rows.items():
            assert source.split(":")[0] in SOURCES, (name, field, source)
            if field in DEFAULT_SOURCES and value != getattr(default, field):
                assert field in PRESET_SOURCES[name], f"{name}.{field} changes the default without a source"
    assert (
        value_sources("invert-fc6")["lambda_feat"][1].startswith("code")
        and "NOT calibrated" in (value_sources("invert-fc6")["lambda_feat"][1])
    )
    assert value_sources("autoencoder-photos")["lr"][1].startswith("ours")
    assert value_sources("invert-fc6")["weight_decay"] == (4e-4, DEFAULT_SOURCES["weight_decay"])


def test_configs_saved_before_the_new_fields_load_as_they_were_trained():
    old = get_preset("autoencoder-photos").to_dict()
    for name in LEGACY_VALUES:
        old.pop(name)
    config = TrainConfig.from_dict(old)
    for name, value in LEGACY_VALUES.items():
        assert getattr(config, name) == value
    new = TrainConfig.from_dict(json.loads(json.dumps(get_preset("invert-fc6").to_dict())))  # via config.json
    assert new == get_preset("invert-fc6") and isinstance(new.lr_milestones, tuple)


@pytest.mark.usefixtures("one_intra_op_thread")
def test_old_checkpoint_resumes_with_its_own_dynamics(tmp_path):
    """A checkpoint of the earlier code (config without the new fields, pause state d_paused, optimizer groups
    without weight decay or milestones) resumes: padded LReLU D, simultaneous order, no decay, D paused."""
    from deepsim.train.checkpoint import load_checkpoint, save_checkpoint
    from deepsim.train.loop import train

    config = tiny_config(
        tmp_path,
        batch_size=2,
        image_size=32,
        steps=2,
        log_every=1,
        checkpoint_every=1000,
        disc_padding="padded",
        disc_init="torch",
        update_order="simultaneous",
        weight_decay=0.0,
        lr_milestones=(),
        upconv_bias="learned",
        gen_init="torch",
        mirror=True,
    )
    train(config, progress=False)
    payload = load_checkpoint(tmp_path)
    for name in LEGACY_VALUES:  # what the earlier code wrote
        payload["config"].pop(name)
    payload["trainer"]["pause"] = {"d_paused": torch.tensor(True)}
    for opt in ("opt_g", "opt_d"):
        for group in payload["trainer"][opt]["param_groups"]:
            for key in ("weight_decay", "lr_milestones", "lr_gamma"):
                group.pop(key)
    save_checkpoint(tmp_path / "checkpoint.pt", payload)
    result = train(config.replace(steps=3), resume=True, progress=False)
    assert result.step == 3
    assert result.history[-1]["Pause/train_d"] == 0.0  # the saved "D paused" gated the resumed step
    saved = load_checkpoint(tmp_path)
    assert saved["config"]["update_order"] == "simultaneous" and saved["config"]["disc_padding"] == "padded"
    assert set(saved["trainer"]["pause"]) == {"train_d", "train_g"}


def test_cli_flags_reach_the_config():
    args = build_parser().parse_args(
        [
            "train",
            "--update-order",
            "simultaneous",
            "--disc-padding",
            "padded",
            "--disc-activation",
            "relu",
            "--disc-init",
            "torch",
            "--upconv-bias",
            "learned",
            "--gen-init",
            "torch",
            "--weight-decay",
            "0",
            "--weight-decay-scope",
            "all",
            "--lr-milestones",
            "1000,2000",
            "--lr-gamma",
            "0.1",
            "--mirror",
        ]
    )
    assert (args.update_order, args.disc_padding, args.disc_activation, args.disc_init, args.upconv_bias) == (
        "simultaneous",
        "padded",
        "relu",
        "torch",
        "learned",
    )
    assert args.gen_init == "torch"
    assert (args.weight_decay, args.weight_decay_scope, args.lr_milestones, args.lr_gamma, args.mirror) == (
        0.0,
        "all",
        (1000, 2000),
        0.1,
        True,
    )
    assert build_parser().parse_args(["train", "--lr-milestones", "none", "--no-mirror"]).lr_milestones == ()
    assert build_parser().parse_args(["train", "--no-mirror"]).mirror is False
    assert build_parser().parse_args(["train"]).mirror is None  # the preset decides
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--lr-milestones", "soon"])


def test_presets_command_prints_values_and_sources(capsys):
    assert main(["presets", "invert-fc6"]) == 0
    out = capsys.readouterr().out
    assert "update_order" in out and "code: D first" in out and "NOT calibrated" in out
    assert main(["presets", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert set(table) == set(PRESETS) and table["vae-imagenet"]["image_size"][0] == 227
    assert main(["presets"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("defaults") and all(f"{name}:" in text for name in PRESETS)
    assert main(["presets", "nope"]) == 2
