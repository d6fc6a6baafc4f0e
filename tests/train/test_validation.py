"""Bad input, property-based: every bad option value gives one clear error naming the option, on
every surface (command line, TOML file, Python API), and every good value is accepted.

The allowed ranges below are this test's own statement of the contract; a new numeric or choice
option of ``TrainConfig`` must be added here (``test_every_option_is_covered``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from gossipgrad import ALGOS as WRAP_ALGOS
from gossipgrad import (
    SCHEDULES,
    GossipDataParallel,
    GossipShuffleSampler,
    partners,
    wrap,
)
from gossipgrad.train import cli
from gossipgrad.train.config import (
    ALGOS,
    DEVICES,
    MODES,
    ON_NONFINITE,
    OPTIMIZERS,
    PRESET_NAMES,
    WIRE,
    TrainConfig,
    flag,
)
from gossipgrad.train.data import DATASETS
from gossipgrad.train.models import MODELS

_FAST = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure here is never a fluke
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# --- the contract -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Range:
    """Allowed numbers: ``low`` <= value <= ``high`` (strict where ``*_open``), finite."""

    kind: type
    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def allows(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def edges(self) -> list[Any]:
        """The boundaries and their neighbours, where mistakes live."""
        if self.kind is int:
            ends = [int(self.low)] + ([int(self.high)] if math.isfinite(self.high) else [])
            return [e + d for e in ends for d in (-1, 0, 1)]
        ends = [self.low] + ([self.high] if math.isfinite(self.high) else [])
        near = [math.nextafter(e, d) for e in ends for d in (-math.inf, math.inf)]
        return [*ends, *near, -0.0, math.nan, math.inf, -math.inf]


_NUMBERS = {
    "nproc": _Range(int, 1),
    "max_restarts": _Range(int, 0),
    "epochs": _Range(int, 1),
    "batch_size": _Range(int, 1),
    "seed": _Range(int, 0, 2**63 - 1),
    "streams": _Range(int, 1, 16),
    "gossip_every": _Range(int, 1),
    "ranks_per_node": _Range(int, 0),
    "average_every": _Range(int, 0),
    "max_staleness": _Range(int, 0, 1023),
    "max_steps": _Range(int, 0),
    "log_every": _Range(int, 1),
    "consensus_every": _Range(int, 0),
    "eval_every": _Range(int, 0),
    "checkpoint_every": _Range(int, 0),
    "keep_checkpoints": _Range(int, 1),
    "lr": _Range(float, 0.0, low_open=True),
    "momentum": _Range(float, 0.0, 1.0, high_open=True),
    "weight_decay": _Range(float, 0.0),
    "warmup_epochs": _Range(float, 0.0),
    "grad_clip": _Range(float, 0.0),
    "label_smoothing": _Range(float, 0.0, 1.0, high_open=True),
    "shuffle_fraction": _Range(float, 0.0, 1.0),
    "bucket_mb": _Range(float, 0.0, low_open=True),
    "timeout_s": _Range(float, 0.0, 7 * 24 * 3600, low_open=True),
    "consensus_warn": _Range(float, 0.0),
    "outer_lr": _Range(float, 0.0, 4.0, low_open=True),
    "outer_momentum": _Range(float, 0.0, 1.0, high_open=True),
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "algo": ALGOS,
    "device": DEVICES,
    "optimizer": OPTIMIZERS,
    "schedule": SCHEDULES,
    "mode": MODES,
    "wire_dtype": WIRE,
    "on_nonfinite": ON_NONFINITE,
    "dataset": DATASETS,  # or module:function (tested in test_config.py)
    "model": ("auto", *MODELS),
    "preset": PRESET_NAMES,
    "lr_schedule": ("constant", "cosine", "step"),
    "amp": ("none", "bf16", "fp16"),
}
_BOOLS = ("sync", "tracking", "balance", "quiet", "tensorboard", "elastic")
_FREE = ("resume", "out")  # any text


def test_every_option_is_covered() -> None:
    covered = set(_NUMBERS) | set(_CHOICES) | set(_BOOLS) | set(_FREE)
    assert covered == {f.name for f in fields(TrainConfig)}


def _number(rng: _Range) -> st.SearchStrategy[Any]:
    wild = st.integers(-(2**70), 2**70) if rng.kind is int else st.floats()
    return st.one_of(st.sampled_from(rng.edges()), wild)


def _good_number(name: str) -> st.SearchStrategy[Any]:
    rng = _NUMBERS[name]
    return _number(rng).filter(rng.allows)


def _bad_number(name: str) -> st.SearchStrategy[Any]:
    rng = _NUMBERS[name]
    return _number(rng).filter(lambda v: not rng.allows(v))


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


def _bad_choice(name: str) -> st.SearchStrategy[str]:
    # No ":" (module:function specs import code; their errors are tested in test_config.py).
    return _TEXT.filter(lambda t: t not in _CHOICES[name] and ":" not in t)


_PER_OPTION = settings(_FAST, max_examples=12)  # times each option: ~300 examples in all
_CHECKED = sorted(_NUMBERS) + sorted(_CHOICES)


def _bad(name: str) -> st.SearchStrategy[Any]:
    return _bad_number(name) if name in _NUMBERS else _bad_choice(name)


_GOOD_OPTION = st.one_of(
    st.sampled_from(sorted(_NUMBERS)).flatmap(lambda n: st.tuples(st.just(n), _good_number(n))),
    st.sampled_from(sorted(_CHOICES)).flatmap(
        lambda n: st.tuples(st.just(n), st.sampled_from(_CHOICES[n]))
    ),
    st.tuples(st.sampled_from(("sync", "tracking", "balance", "quiet")), st.booleans()),
    st.tuples(st.sampled_from(_FREE), _TEXT),
)


# --- command line and TOML ----------------------------------------------------------------------


@pytest.fixture
def no_launch(monkeypatch) -> list[TrainConfig]:
    """``gossipgrad train`` up to the launch: the config it would train with is kept instead."""
    launched: list[TrainConfig] = []
    monkeypatch.setattr(cli, "run", lambda cfg: launched.append(cfg) or 0)  # checks: elsewhere
    return launched


def _run_cli(argv: list[str]) -> int:
    """``cli.main``'s exit status, whether returned or raised by argparse's ``SystemExit``."""
    try:
        return cli.main(["train", *argv])
    except SystemExit as exit:
        return int(exit.code or 0)


def _cli_text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _assert_one_line_error(err: str, name: str) -> None:
    assert err.startswith("gossipgrad: error: "), err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert flag(name) in err, f"the error does not name {flag(name)}: {err!r}"


@pytest.mark.parametrize("name", _CHECKED)
def test_command_line_rejects_bad_values_in_one_line(no_launch, capsys, name) -> None:
    @_PER_OPTION
    @given(_bad(name))
    def check(value: Any) -> None:
        assert _run_cli([f"{flag(name)}={_cli_text(value)}"]) == 2
        _assert_one_line_error(capsys.readouterr().err, name)
        assert not no_launch

    check()


@_FAST
@given(st.sampled_from(sorted(_NUMBERS)), _TEXT)
def test_command_line_rejects_what_is_not_a_number(no_launch, capsys, name, text) -> None:
    rng = _NUMBERS[name]
    try:
        parsed: Any = rng.kind(text)
    except ValueError:
        parsed = None
    if parsed is not None and rng.allows(parsed):
        return  # " 5", "5_0", "٥": Python reads these as numbers, and so does argparse
    assert _run_cli([f"{flag(name)}={text}"]) == 2
    _assert_one_line_error(capsys.readouterr().err, name)


@_FAST
@given(_GOOD_OPTION)
def test_command_line_accepts_good_values(no_launch, capsys, option) -> None:
    name, value = option
    argv = [flag(name) if value else "--no-" + flag(name)[2:]] if isinstance(value, bool) else []
    argv = argv or [f"{flag(name)}={_cli_text(value)}"]
    assert _run_cli(argv) == 0, capsys.readouterr().err
    assert getattr(no_launch[-1], name) == value


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # nan, inf, -inf, 1e-05: all valid TOML floats
    if isinstance(value, str):
        escaped = "".join(
            c if c.isprintable() and c not in '"\\' else f"\\U{ord(c):08X}" for c in value
        )
        return f'"{escaped}"'
    return str(value)


@pytest.fixture
def toml_file(tmp_path) -> Callable[[str], list[str]]:
    """Writes a TOML file and returns the ``--config`` arguments naming it."""

    def write(text: str) -> list[str]:
        path = tmp_path / "run.toml"
        path.write_text(text, encoding="utf-8")
        return ["--config", str(path)]

    return write


@pytest.mark.parametrize("name", _CHECKED)
def test_config_file_rejects_bad_values(no_launch, capsys, toml_file, name) -> None:
    @_PER_OPTION
    @given(_bad(name), st.booleans())
    def check(value: Any, dashes: bool) -> None:
        key = name.replace("_", "-") if dashes else name
        assert _run_cli(toml_file(f"{key} = {_toml_value(value)}\n")) == 2
        _assert_one_line_error(capsys.readouterr().err, name)
        assert not no_launch

    check()


_WRONG_TYPE = st.one_of(
    st.booleans(), st.integers(), st.floats(allow_nan=False), _TEXT, st.just([1, 2])
)


@_FAST
@given(st.sampled_from([f.name for f in fields(TrainConfig)]), _WRONG_TYPE)
def test_config_file_rejects_values_of_the_wrong_type(
    no_launch, capsys, toml_file, name, value
) -> None:
    kind = next(str(f.type) for f in fields(TrainConfig) if f.name == name)
    fits = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
    }[kind]
    if fits:
        return
    text = "[1, 2]" if isinstance(value, list) else _toml_value(value)
    assert _run_cli(toml_file(f"{name} = {text}\n")) == 2
    err = capsys.readouterr().err
    _assert_one_line_error(err, name)
    assert f"{flag(name)} must be {kind}, got " in err


@_FAST
@given(st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,15}", fullmatch=True))
def test_config_file_rejects_unknown_keys(no_launch, capsys, toml_file, key) -> None:
    if key.replace("-", "_") in {f.name for f in fields(TrainConfig)}:
        return
    assert _run_cli(toml_file(f"{key} = 1\n")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gossipgrad: error: --config: unknown key {key!r} in ")
    assert err.count("\n") == 1 and "allowed: " in err


@_FAST
@given(st.lists(_GOOD_OPTION, max_size=4, unique_by=lambda o: o[0]), st.booleans())
def test_config_file_accepts_good_values(no_launch, capsys, toml_file, options, dashes) -> None:
    lines = [
        f"{name.replace('_', '-') if dashes else name} = {_toml_value(value)}"
        for name, value in options
    ]
    assert _run_cli(toml_file("\n".join(lines) + "\n")) == 0, capsys.readouterr().err
    for name, value in options:
        assert getattr(no_launch[-1], name) == value


def test_command_line_wins_over_the_file_and_bad_flags_name_the_option(
    no_launch, capsys, toml_file
) -> None:
    assert _run_cli([*toml_file("lr = 0.5\nepochs = 3\n"), "--lr=0.25"]) == 0
    assert (no_launch[-1].lr, no_launch[-1].epochs) == (0.25, 3)
    for argv, name in [
        (["--sync=yes"], "sync"),
        (["--epochs"], "epochs"),
        (["--lr", "-1e-3"], "lr"),
    ]:
        assert _run_cli(argv) == 2
        _assert_one_line_error(capsys.readouterr().err, name)


# --- Python API ---------------------------------------------------------------------------------


@pytest.fixture
def world_of_one(tmp_path) -> Iterator[None]:
    """An in-process gloo group of one rank, destroyed after the test (forked tests need none)."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


_ENGINE_GOOD = {
    "mode": st.sampled_from(MODES),
    "schedule": st.sampled_from(SCHEDULES),
    "bucket_cap_mb": st.floats(min_value=1e-6, max_value=1e6),
    "timeout": st.floats(min_value=1e-3, max_value=1e6).map(lambda s: timedelta(seconds=s)),
    "on_nonfinite": st.sampled_from(ON_NONFINITE),
    "wire_dtype": st.sampled_from([None, torch.bfloat16, torch.float16]),
    "streams": st.integers(1, 16),
    "seed": st.integers(0, 2**63 - 1),
    "sync": st.booleans(),
}
_DTYPES = [torch.float32, torch.float64, torch.uint8, torch.complex64]  # int8: a wire dtype
_ENGINE_BAD = {
    "mode": _TEXT.filter(lambda t: t not in MODES),
    "schedule": _TEXT.filter(lambda t: t not in SCHEDULES),
    "bucket_cap_mb": st.one_of(st.floats(max_value=0.0), st.just(math.nan)),
    "timeout": st.one_of(
        st.floats(min_value=-1e9, max_value=0).map(lambda s: timedelta(seconds=s)),
        st.integers(),
        st.floats(),
        _TEXT,
        st.none(),
    ),
    "on_nonfinite": _TEXT.filter(lambda t: t not in ON_NONFINITE),
    "wire_dtype": st.one_of(st.sampled_from(_DTYPES), st.sampled_from(["bfloat16", "half", 16])),
    "streams": st.one_of(
        st.integers(max_value=0), st.integers(min_value=17), st.floats(), _TEXT, st.none()
    ),
}
_ENGINE_OPTION = st.sampled_from(sorted(_ENGINE_BAD)).flatmap(
    lambda n: st.tuples(st.just(n), _ENGINE_BAD[n])
)


@_FAST
@given(_ENGINE_OPTION, st.booleans())
def test_engine_rejects_bad_options_by_name(option, through_wrap) -> None:
    name, value = option
    build = wrap if through_wrap else GossipDataParallel
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        build(nn.Linear(3, 2), **{name: value})  # checked before any process group is needed


@_FAST
@given(st.fixed_dictionaries({}, optional=_ENGINE_GOOD))
def test_engine_accepts_good_options(world_of_one, options) -> None:
    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model = GossipDataParallel(module, **options)
    model(torch.randn(5, 3)).sum().backward()
    assert model.module is module
    if options.get("wire_dtype") is None:  # see test_one_replica_is_at_consensus_on_any_wire
        assert model.consensus_distance() == 0.0
    for name, value in options.items():
        assert getattr(model.options, name) == value


@_FAST
@given(_TEXT.filter(lambda t: t not in WRAP_ALGOS))
def test_wrap_rejects_unknown_algorithms(algo) -> None:
    with pytest.raises(ValueError, match=rf"^algo must be one of {re.escape(str(WRAP_ALGOS))}"):
        wrap(nn.Linear(3, 2), algo)


def test_wrap_builds_either_algorithm(world_of_one) -> None:
    for algo in ("gossip", "allreduce"):
        model = wrap(nn.Linear(3, 2), algo)
        model(torch.randn(4, 3)).sum().backward()
        assert model.step == (1 if algo == "allreduce" else 0)  # gossip rests at world size 1


_FRACTION = st.one_of(st.sampled_from([0.0, 1.0, math.nextafter(1.0, 2.0), -0.0]), st.floats())


@_FAST
@given(
    st.one_of(
        _FRACTION.filter(lambda f: not 0.0 <= f <= 1.0),
        st.sampled_from([True, False, None, "0.5", [0.5]]),
    )
)
def test_sampler_rejects_bad_shuffle_fractions(fraction) -> None:
    with pytest.raises(ValueError, match=r"^shuffle_fraction must be"):
        GossipShuffleSampler(range(10), shuffle_fraction=fraction)


@_FAST
@given(
    st.one_of(_FRACTION.filter(lambda f: 0.0 <= f <= 1.0), st.sampled_from([0, 1])),
    st.integers(1, 50),
)
def test_sampler_accepts_good_shuffle_fractions(fraction, n) -> None:
    sampler = GossipShuffleSampler(range(n), shuffle_fraction=fraction)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        assert sorted(sampler) == list(range(n))  # a world of one keeps every sample


_WORLDS = st.integers(1, 64)


@_FAST
@given(
    _WORLDS.flatmap(lambda p: st.tuples(st.integers(0, p - 1), st.just(p))),
    st.integers(0, 10**6),
    st.integers(0, 2**32),
    st.sampled_from(SCHEDULES),
)
def test_partners_accepts_every_valid_input(rank_world, step, seed, schedule) -> None:
    rank, world = rank_world
    if schedule == "hypercube" and world & (world - 1):
        with pytest.raises(ValueError, match=r"^schedule 'hypercube' needs a power-of-two"):
            partners(rank, step, world, seed, schedule)
        return
    send_to, recv_from = partners(rank, step, world, seed, schedule)
    for peer in (send_to, recv_from):
        assert peer is None or (0 <= peer < world and peer != rank)
    if world == 1:
        assert (send_to, recv_from) == (None, None)


_BAD_PARTNERS = st.one_of(
    st.tuples(st.just("world_size"), st.integers(max_value=0), st.just(0)),
    _WORLDS.flatmap(
        lambda p: st.tuples(
            st.just("rank"), st.just(p), st.one_of(st.integers(max_value=-1), st.integers(p))
        )
    ),
    st.tuples(st.just("step"), st.integers(max_value=-1), st.just(0)),
    st.tuples(st.just("schedule"), _TEXT.filter(lambda t: t not in SCHEDULES), st.just(0)),
)


@_FAST
@given(_BAD_PARTNERS)
def test_partners_rejects_bad_input_by_name(case) -> None:
    name, value, rank = case
    args: dict[str, Any] = {"rank": 0, "step": 0, "world_size": 4, "schedule": "dissemination"}
    if name == "rank":
        args.update(world_size=value, rank=rank)
    else:
        args[name] = value
    with pytest.raises(ValueError, match=rf"\b{name}\b") as info:
        partners(args["rank"], args["step"], args["world_size"], 0, args["schedule"])
    assert "\n" not in str(info.value)


# --- bad values that once slipped through (fixed in the modules; kept as regressions) ------------


def test_engine_rejects_an_infinite_bucket_cap(world_of_one) -> None:
    with pytest.raises(ValueError, match="^bucket_cap_mb must be"):
        GossipDataParallel(nn.Linear(3, 2), bucket_cap_mb=math.inf)


def test_one_replica_is_at_consensus_on_any_wire(world_of_one) -> None:
    model = GossipDataParallel(nn.Linear(30, 20), wire_dtype=torch.bfloat16)
    assert model.consensus_distance() == 0.0


def test_engine_rejects_a_text_bucket_cap() -> None:
    with pytest.raises(ValueError, match="^bucket_cap_mb must be"):
        GossipDataParallel(nn.Linear(3, 2), bucket_cap_mb="25")


def test_allreduce_rejects_a_negative_bucket_cap(world_of_one) -> None:
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        wrap(nn.Linear(3, 2), "allreduce", bucket_cap_mb=-1.0)


def test_sampler_rejects_a_seed_beyond_int64() -> None:
    with pytest.raises(ValueError, match="^seed must be"):
        GossipShuffleSampler(range(10), seed=2**63)


@pytest.mark.parametrize(("name", "args"), [("rank", (1.5, 0, 4)), ("step", (0, 2.5, 4))])
def test_partners_rejects_fractional_rank_and_step(name: str, args: tuple) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        partners(*args)
