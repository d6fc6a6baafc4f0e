"""Each option is defined once: ``GossipOptions``' fields (the engine's) and ``JobOptions``'
(``gossipgrad train``'s own). These tests check that what is generated from the definitions
covers every field: the command-line flags, the TOML keys, the mapping onto ``GossipOptions``,
the messages naming the flag, and the markdown tables."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import pytest
import torch

from gossipgrad.options import (
    WIRE,
    ConfigError,
    Flag,
    GossipOptions,
    command_line,
    options_markdown,
    wire_name,
)
from gossipgrad.train.config import (
    JobOptions,
    TrainConfig,
    build_parser,
    job_options_markdown,
    load_config,
)

FLAGS = command_line()


def _other_value(c: Flag) -> Any:
    """An allowed value of the flag other than its default, whatever the option."""
    if c.kind == "bool":
        return not c.default
    if c.allowed.choices:
        return next(v for v in c.allowed.choices if v != c.default)
    numbers = [c.default + 1, c.default * 2, c.default + 0.5, c.default / 2]
    return next(v for v in numbers if v != c.default and c.allowed.allows(c.kind, v))


def _argv(c: Flag, value: Any) -> list[str]:
    if c.kind == "bool":
        return [c.flag if value else "--no-" + c.flag[2:]]
    return [c.flag, str(value)]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else repr(value)


def test_every_engine_option_has_a_flag_a_toml_key_and_a_row() -> None:
    assert [c.option for c in FLAGS] == list(GossipOptions.names())
    config = {f.name for f in fields(TrainConfig)}
    text = " ".join(build_parser().format_help().split())
    table = options_markdown()
    for c in FLAGS:
        assert c.name in config, c  # a TrainConfig field, so a TOML key
        assert f"{c.flag} " in text or f"{c.flag}, " in text, c.flag
        assert f"| `{c.option}` | `{c.flag}` |" in table, c.option
    assert table.count("\n") == len(FLAGS) + 2  # header, rule, a row each


def test_every_job_option_has_a_flag_and_a_row() -> None:
    text = " ".join(build_parser().format_help().split())
    table = job_options_markdown()
    for f in fields(JobOptions):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text and f"| `{f.name}` | `{flag}` |" in table, f.name
    assert table.count("\n") == len(fields(JobOptions)) + 2


def test_the_job_shares_only_the_seed_with_the_engine() -> None:
    job = {f.name for f in fields(JobOptions)}
    assert job & {c.name for c in FLAGS} == {"seed"}  # --seed seeds the data, model and schedule
    assert len(fields(TrainConfig)) == len(job) + len(FLAGS) - 1


@pytest.mark.parametrize("c", FLAGS, ids=[c.option for c in FLAGS])
def test_each_flag_and_toml_key_sets_its_engine_option(c: Flag, tmp_path: Path) -> None:
    value = _other_value(c)
    engine = c.to_engine(value)
    assert engine != getattr(GossipOptions(), c.option)
    from_flag = load_config(_argv(c, value)).gossip_options()
    toml = tmp_path / "run.toml"
    toml.write_text(f"{c.name.replace('_', '-')} = {_toml(value)}\n")
    from_file = load_config(["--config", str(toml)]).gossip_options()
    assert getattr(from_flag, c.option) == engine == getattr(from_file, c.option)
    assert TrainConfig().gossip_options() == GossipOptions()  # the flags' defaults: the engine's


@pytest.mark.parametrize("c", FLAGS, ids=[c.option for c in FLAGS])
def test_a_bad_flag_value_is_named_in_one_line(c: Flag, capsys) -> None:
    if c.kind == "bool":
        return  # argparse takes only --flag / --no-flag
    bad = "not-a-choice" if c.allowed.choices else "-1"  # every number here is >= 0
    with pytest.raises(SystemExit) as exit:
        load_config([f"{c.flag}={bad}"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"gossipgrad: error: {c.flag} must be "), err


def test_the_outer_step_flags() -> None:
    options = load_config(["--outer-lr", "0.7", "--outer-momentum", "0.9"]).gossip_options()
    assert (options.outer_lr, options.outer_momentum, options.outer_step) == (0.7, 0.9, True)
    with pytest.raises(ConfigError, match=r"^--outer-momentum: an outer step .* needs mode"):
        TrainConfig(mode="gradients", outer_momentum=0.5).validate().gossip_options()
    with pytest.raises(ConfigError, match=r"^--outer-lr must be in \(0, 4\], got 5$"):
        TrainConfig(outer_lr=5.0).validate()


def test_engine_errors_carry_the_option() -> None:
    with pytest.raises(ValueError, match=r"^streams must be an integer in \[1, 16\], got 0$") as e:
        GossipOptions(streams=0)
    assert isinstance(e.value, ConfigError) and e.value.option == "streams"
    with pytest.raises(ConfigError) as e:
        GossipOptions(mode="gradients", gossip_every=2)
    assert e.value.option == "gossip_every"
    with pytest.raises(ConfigError, match=r"^--timeout-s must be in \(0, 604800\]"):
        TrainConfig(timeout_s=1e9).validate()


def test_every_field_has_a_definition() -> None:
    for f in [*fields(GossipOptions), *fields(JobOptions)]:
        assert f.metadata["option"].help and f.default is not MISSING, f.name
        assert f.metadata["option"].allowed.allows(str(f.type), f.default), f.name
    for c in FLAGS:
        assert c.allowed.allows(c.kind, c.default), c.name


def test_wire_dtypes_are_checked_by_name() -> None:
    from gossipgrad.options import WIRE_DTYPES

    assert tuple(WIRE_DTYPES) == WIRE
    for name, dtype in WIRE_DTYPES.items():
        assert wire_name(dtype) == name
    assert wire_name(torch.float32) is None and wire_name("bfloat16") is None


_NO_TORCH = """
import sys
from gossipgrad.train import cli
try:
    cli.main(["train", "--help"])
except SystemExit:
    pass
assert "torch" not in sys.modules, "--help imported torch"
"""


def test_help_imports_no_torch() -> None:
    done = subprocess.run([sys.executable, "-c", _NO_TORCH], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--outer-lr OUTER_LR" in done.stdout and "--timeout-s TIMEOUT_S" in done.stdout
