"""TrainConfig: validation messages, TOML + command-line precedence, generated --help."""

from __future__ import annotations

import sys
from dataclasses import fields, replace

import pytest

from gossipgrad.train.config import ConfigError, TrainConfig, build_parser, flag, load_config


def test_defaults_are_valid() -> None:
    cfg = TrainConfig().validate()
    assert cfg.algos() == ("gossip", "allreduce")
    assert replace(cfg, algo="gossip").algos() == ("gossip",)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lr": -1.0}, "--lr must be > 0, got -1"),
        ({"lr": float("nan")}, "--lr must be a finite number"),
        ({"nproc": 0}, "--nproc must be >= 1, got 0"),
        ({"batch_size": 0}, "--batch-size must be >= 1, got 0"),
        ({"momentum": 1.0}, "--momentum must be in [0, 1), got 1"),
        ({"shuffle_fraction": 1.5}, "--shuffle-fraction must be in [0, 1], got 1.5"),
        (
            {"algo": "ring"},
            "--algo must be one of gossip, allreduce, hierarchical, both, got 'ring'",
        ),
        ({"optimizer": "lbfgs"}, "--optimizer must be one of sgd, adam, adamw"),
        ({"schedule": "star"}, "--schedule must be one of dissemination"),
        ({"dataset": "mnist"}, "--dataset must be one of digits, pytext, synthetic-imagenet"),
        ({"model": "vgg"}, "--model must be auto, one of mlp"),
        ({"model": "no_such_module_xyz:f"}, "--model: model spec 'no_such_module_xyz:f'"),
        ({"epochs": 2.5}, "--epochs must be int, got 2.5"),
        ({"quiet": "yes"}, "--quiet must be bool"),
        ({"keep_checkpoints": 0}, "--keep-checkpoints must be >= 1, got 0"),
        ({"eval_every": -1}, "--eval-every must be >= 0, got -1"),
        ({"eval_every": 1.5}, "--eval-every must be int, got 1.5"),
        (
            {"algo": "hierarchical", "mode": "gradients"},
            "--algo hierarchical supports --mode params without --tracking only, got --mode "
            "gradients: use --algo gossip",
        ),
        (
            {"algo": "hierarchical", "tracking": True},
            "--algo hierarchical supports --mode params without --tracking only, got --tracking: "
            "use --algo gossip",
        ),
    ],
)
def test_bad_values_name_the_option(change: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        replace(TrainConfig(), **change).validate()
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_toml_then_command_line(tmp_path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('lr = 1\nbatch-size = 8\nalgo = "gossip"\nsync = true\n')
    cfg = load_config(["--config", str(toml), "--batch-size", "16", "--no-sync"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)  # TOML int read as float
    assert cfg.batch_size == 16  # the command line wins
    assert cfg.algo == "gossip" and cfg.sync is False
    assert cfg.epochs == TrainConfig().epochs


@pytest.mark.parametrize(
    ("argv", "toml", "message"),
    [
        (["--lr", "-1"], None, "gossipgrad: error: --lr must be > 0, got -1\n"),
        (["--lr", "abc"], None, "gossipgrad: error: argument --lr: invalid float value: 'abc'\n"),
        (["--bogus"], None, "gossipgrad: error: unrecognized arguments: --bogus\n"),
        ([], "colour = 3\n", "gossipgrad: error: --config: unknown key 'colour'"),
        ([], 'lr = "fast"\n', "gossipgrad: error: --lr must be float, got 'fast'\n"),
        ([], "lr = [\n", "gossipgrad: error: --config: "),
    ],
)
def test_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, toml, message) -> None:
    if toml is not None:
        path = tmp_path / "bad.toml"
        path.write_text(toml)
        argv = ["--config", str(path), *argv]
    with pytest.raises(SystemExit) as info:
        load_config(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message)
    assert err.count("\n") == 1


def test_resume_alone_means_auto() -> None:
    assert load_config(["--resume"]).resume == "auto"
    assert load_config(["--resume", "runs/x"]).resume == "runs/x"
    assert load_config([]).resume == ""


def test_tensorboard_without_the_package(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"--tensorboard needs .* pip install"):
        TrainConfig(tensorboard=True).validate()


def test_missing_config_file(capsys) -> None:
    with pytest.raises(SystemExit):
        load_config(["--config", "/no/such/file.toml"])
    assert "cannot read '/no/such/file.toml'" in capsys.readouterr().err


def test_help_lists_every_option_with_its_default() -> None:
    text = " ".join(build_parser().format_help().split())  # undo argparse's line wrapping
    for f in fields(TrainConfig):
        assert flag(f.name) in text
    assert text.count("(default: ") == len(fields(TrainConfig))
    assert "--lr LR learning rate (default: 0.05)" in text
    assert "--sync, --no-sync" in text
    assert "--config FILE.toml" in text


def test_eval_every_from_the_command_line() -> None:
    assert load_config([]).eval_every == 0  # only at the end
    assert load_config(["--eval-every", "2"]).eval_every == 2
    with pytest.raises(SystemExit):
        load_config(["--eval-every", "-1"])


def test_a_valid_config_makes_valid_engine_options() -> None:
    cfg = TrainConfig(
        bucket_mb=1e-6, streams=16, timeout_s=7 * 24 * 3600.0, wire_dtype="float16"
    ).validate()
    options = cfg.gossip_options()
    assert (options.streams, options.bucket_cap_mb) == (16, 1e-6)
    for bad in ({"streams": 17}, {"streams": 0}, {"bucket_mb": 0.0}):
        with pytest.raises(ConfigError, match=flag(next(iter(bad)))):
            replace(TrainConfig(), **bad).validate()


def test_a_preset_sits_below_the_file_and_the_command_line(tmp_path) -> None:
    from gossipgrad.train.config import PRESETS

    cfg = load_config(["--preset", "slow-network"])
    assert {k: getattr(cfg, k) for k in PRESETS["slow-network"]} == PRESETS["slow-network"]
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "slow-network"\nwire_dtype = "int8"\n')
    cfg = load_config(["--config", str(toml), "--gossip-every", "2"])
    assert (cfg.preset, cfg.wire_dtype, cfg.gossip_every) == ("slow-network", "int8", 2)
    assert load_config([]).gossip_every == 1  # no preset: the engine's defaults
    with pytest.raises(SystemExit):
        load_config(["--preset", "fast"])


def test_help_lists_the_presets_and_their_values(capsys) -> None:
    with pytest.raises(SystemExit):
        load_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "slow-network = --gossip-every 8 --wire- dtype bfloat16" in text or (
        "slow-network = --gossip-every 8 --wire-dtype bfloat16" in text
    )


def test_new_engine_options_map_and_name_their_flag() -> None:
    options = TrainConfig(gossip_every=4, average_every=10, tracking=True).gossip_options()
    assert (options.gossip_every, options.average_every, options.tracking) == (4, 10, True)
    assert TrainConfig(max_staleness=3).gossip_options().max_staleness == 3
    for bad, name in (
        ({"sync": True, "max_staleness": 2}, "--max-staleness"),
        ({"mode": "gradients", "gossip_every": 2}, "--gossip-every"),
        ({"mode": "gradients", "tracking": True}, "--tracking"),
        ({"mode": "gradients", "wire_dtype": "int8"}, "--wire-dtype"),
    ):
        with pytest.raises(ConfigError, match=f"^{name}: "):
            TrainConfig(**bad).validate().gossip_options()
