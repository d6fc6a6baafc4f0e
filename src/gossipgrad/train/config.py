"""The options of ``gossipgrad train``, validated in one place.

    cfg = load_config(["--lr", "0.1"])             # defaults < --config FILE.toml < command line
    cfg = TrainConfig(lr=0.1).validate()           # in code: ConfigError on a bad value

Every option is a field of ``TrainConfig`` with its help text; the command-line parser and the
TOML reader are generated from the fields, so ``--help`` lists every option with its default, and
a TOML file takes the same names (``batch_size`` or ``batch-size``). ``validate`` checks each
value and raises ``ConfigError`` with one line naming the option and the allowed range.

Nothing here imports torch (``gossipgrad.train.choices`` holds the choice sets), so a bad option
is answered at once. ``gossip_options`` builds the engine's ``GossipOptions`` (importing torch),
whose own checks cover what depends on several engine options at once (``--wire-dtype int8``
needs ``--mode params``): ``gossipgrad train`` calls it before any worker starts.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gossipgrad.train.choices import (
    ALGOS,
    AMP,
    DATASETS,
    DEVICES,
    ENGINE_DEFAULTS,
    LR_SCHEDULES,
    MAX_NPROC,
    MAX_STALENESS,
    MAX_STREAMS,
    MODELS,
    MODES,
    ON_NONFINITE,
    OPTIMIZERS,
    SCHEDULES,
    WIRE,
)
from gossipgrad.train.files import DamagedFile, parse_text
from gossipgrad.train.plugins import import_callable

if TYPE_CHECKING:
    from gossipgrad.options import GossipOptions

__all__ = [
    "ALGOS",
    "DEVICES",
    "MODES",
    "ON_NONFINITE",
    "OPTIMIZERS",
    "WIRE",
    "ConfigError",
    "TrainConfig",
    "build_parser",
    "check_launch",
    "PRESETS",
    "flag",
    "load_config",
    "read_toml",
]
_ENGINE: dict[str, Any] = ENGINE_DEFAULTS  # the engine's defaults, which the flags below take
# Engine options whose flag has another name (field ``bucket_cap_mb``: ``--bucket-mb``), so that
# an error of ``GossipOptions`` names the flag.
_FLAG_OF = {"bucket_cap_mb": "bucket_mb", "timeout": "timeout_s"}


# Named sets of flag values (``--preset NAME``), applied below the command line and --config.
PRESETS: dict[str, dict[str, Any]] = {
    # links that are the bottleneck: exchange 8x less often, at half the bytes
    "slow-network": {"gossip_every": 8, "wire_dtype": "bfloat16"},
}
PRESET_NAMES: tuple[str, ...] = ("none", *PRESETS)


def preset_text(name: str) -> str:
    """``slow-network`` -> ``--gossip-every 8 --wire-dtype bfloat16``."""
    pairs = PRESETS.get(name, {}).items()
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in pairs) or "nothing"


_MAX_SEED = 2**63 - 1  # the shuffle's agreement check holds seeds in an int64
_MAX_TIMEOUT_S = 7 * 24 * 3600.0  # a week; a datetime.timedelta overflows far beyond


class ConfigError(ValueError):
    """A bad option value; the message is one line naming the option and what is allowed."""


def _opt(
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    shown: str | None = None,
    bare: str | None = None,
) -> dict[str, Any]:
    """Field metadata: help text, allowed values, the default as ``--help`` shows it, and the
    value of the flag given without a value (``--resume`` alone means ``--resume auto``)."""
    return {"help": help, "choices": choices, "shown": shown, "bare": bare}


@dataclass(frozen=True)
class TrainConfig:
    """Every option of ``gossipgrad train`` (and ``python -m gossipgrad.train`` under torchrun)."""

    # --- what to run
    algo: str = field(
        default="both",
        metadata=_opt("both: one run of each, then a comparison table", choices=ALGOS),
    )
    nproc: int = field(
        default=4,
        metadata=_opt(f"local worker processes, 1 to {MAX_NPROC} (ignored under torchrun)"),
    )
    max_restarts: int = field(
        default=0, metadata=_opt("times the launcher restarts failed workers (torch elastic)")
    )
    dataset: str = field(
        default="digits",
        metadata=_opt(f"{', '.join(DATASETS)}, or your own as module:function"),
    )
    model: str = field(
        default="auto",
        metadata=_opt(
            f"auto (the dataset's default), {', '.join(MODELS)}, or your own as module:function"
        ),
    )
    device: str = field(
        default="auto",
        metadata=_opt("cpu (gloo), cuda (NCCL, one GPU per rank), or auto", choices=DEVICES),
    )
    preset: str = field(
        default="none",
        metadata=_opt(
            "a named set of flag values, below --config and the command line: "
            + "; ".join(f"{name} = {preset_text(name)}" for name in PRESETS),
            choices=PRESET_NAMES,
        ),
    )
    # --- optimisation
    epochs: int = field(default=15, metadata=_opt("passes over the training set"))
    batch_size: int = field(default=32, metadata=_opt("samples per step on each rank"))
    lr: float = field(default=0.05, metadata=_opt("learning rate"))
    momentum: float = field(default=0.9, metadata=_opt("SGD momentum (adam: beta1)"))
    weight_decay: float = field(default=0.0, metadata=_opt("weight decay"))
    optimizer: str = field(
        default="sgd", metadata=_opt("each rank's own optimizer", choices=OPTIMIZERS)
    )
    seed: int = field(default=0, metadata=_opt("seeds the model, data split, sampler, schedule"))
    lr_schedule: str = field(
        default="constant",
        metadata=_opt(
            "learning rate after the warmup: constant, cosine (to 0 at the end of --epochs), or "
            "step (x0.1 at 1/2 and 3/4 of --epochs)",
            choices=LR_SCHEDULES,
        ),
    )
    warmup_epochs: float = field(
        default=0.0,
        metadata=_opt("epochs of linear warmup to --lr, step by step (0: none)"),
    )
    amp: str = field(
        default="none",
        metadata=_opt(
            "mixed precision (autocast): bf16, or fp16 (CUDA only, with a GradScaler)",
            choices=AMP,
        ),
    )
    grad_clip: float = field(
        default=0.0, metadata=_opt("clip each rank's gradient to this norm (0: off)")
    )
    label_smoothing: float = field(
        default=0.0, metadata=_opt("label smoothing of the cross-entropy (0 to 1)")
    )
    # --- gossip
    schedule: str = field(
        default=_ENGINE["schedule"], metadata=_opt("gossip partner schedule", choices=SCHEDULES)
    )
    sync: bool = field(
        default=_ENGINE["sync"], metadata=_opt("wait for each exchange instead of overlapping it")
    )
    mode: str = field(
        default=_ENGINE["mode"], metadata=_opt("what gossip mixes with the partner", choices=MODES)
    )
    shuffle_fraction: float = field(
        default=0.25,
        metadata=_opt("share of its samples a rank passes to its partner each epoch (0 to 1)"),
    )
    bucket_mb: float = field(
        default=_ENGINE["bucket_cap_mb"], metadata=_opt("largest message, in MiB")
    )
    wire_dtype: str = field(
        default=_ENGINE["wire_dtype"],
        metadata=_opt(
            "send parameters as bfloat16 or float16 (half the bytes), int8 (blockwise "
            "quantized, 3.9x fewer bytes; --mode params), or none",
            choices=WIRE,
        ),
    )
    gossip_every: int = field(
        default=_ENGINE["gossip_every"],
        metadata=_opt("exchange with a partner every K steps, local steps between (--mode params)"),
    )
    average_every: int = field(
        default=_ENGINE["average_every"],
        metadata=_opt(
            "every H steps, set every replica to the exact average (one all-reduce; "
            "Gossip-PGA); 0: never"
        ),
    )
    tracking: bool = field(
        default=_ENGINE["tracking"],
        metadata=_opt(
            "gradient tracking: also gossip an estimate of the average gradient and step along "
            "it (for data that differs between ranks; twice the bytes; --mode params)"
        ),
    )
    max_staleness: int = field(
        default=_ENGINE["max_staleness"],
        metadata=_opt(
            "bounded staleness: mix each exchange S steps late, so a rank runs up to S steps "
            "ahead of a slow partner before it waits (S more model copies in memory)"
        ),
    )
    balance: bool = field(
        default=False,
        metadata=_opt(
            "balance work between ranks of different speeds: the gossip shuffle moves samples "
            "to faster ranks, which take bigger batches (same steps on every rank; losses "
            "weighted by batch size; gossip only, --batch-size >= 8)"
        ),
    )
    streams: int = field(
        default=_ENGINE["streams"],
        metadata=_opt("connections per partner to spread messages over (1 to 16)"),
    )
    on_nonfinite: str = field(
        default=_ENGINE["on_nonfinite"],
        metadata=_opt("on NaN/inf parameters: raise, or skip that exchange", choices=ON_NONFINITE),
    )
    timeout_s: float = field(
        default=_ENGINE["timeout_s"],
        metadata=_opt("seconds to wait for a peer before failing"),
    )
    ranks_per_node: int = field(
        default=0,
        metadata=_opt(
            "--algo hierarchical: ranks per node (consecutive ranks share one; to emulate nodes "
            "on one machine); 0: torchrun's layout, or one node under gossipgrad train"
        ),
    )
    # --- length, logging, checkpoints
    max_steps: int = field(default=0, metadata=_opt("stop after this many steps (0: no cap)"))
    log_every: int = field(default=10, metadata=_opt("steps between metric records"))
    consensus_every: int = field(
        default=10, metadata=_opt("steps between consensus-distance measurements (0: never)")
    )
    consensus_warn: float = field(
        default=0.5,
        metadata=_opt("warn when the consensus distance goes above this (0: never)"),
    )
    eval_every: int = field(
        default=0,
        metadata=_opt(
            "epochs between held-out evaluations of the replicas' exact average, recorded in "
            "metrics.jsonl with the training time (0: only at the end)"
        ),
    )
    checkpoint_every: int = field(default=0, metadata=_opt("steps between checkpoints (0: none)"))
    keep_checkpoints: int = field(default=3, metadata=_opt("checkpoints kept (the latest ones)"))
    resume: str = field(
        default="",
        metadata=_opt(
            "continue from a checkpoint: auto (the latest in --out, or in the newest run in "
            "runs/ without --out; also --resume alone) or PATH",
            shown="no resume",
            bare="auto",
        ),
    )
    out: str = field(default="", metadata=_opt("run folder", shown="runs/<date-time>"))
    quiet: bool = field(default=False, metadata=_opt("no progress bar"))
    tensorboard: bool = field(
        default=False, metadata=_opt("also log to TensorBoard (needs the tensorboard package)")
    )

    def validate(self) -> TrainConfig:
        """Return ``self`` if every value is allowed, else raise ``ConfigError``."""
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise ConfigError(
                    f"{flag(f.name)} must be one of {', '.join(choices)}, "
                    f"got {getattr(self, f.name)!r}"
                )
        _at_least(self, "nproc", 1)
        _at_least(self, "max_restarts", 0)
        _at_least(self, "epochs", 1)
        _at_least(self, "batch_size", 1)
        _positive(self, "lr")
        _in_range(self, "momentum", 0.0, 1.0, upper_open=True)
        _at_least(self, "weight_decay", 0.0)
        _in_range(self, "shuffle_fraction", 0.0, 1.0)
        _at_least(self, "warmup_epochs", 0.0)
        _at_least(self, "grad_clip", 0.0)
        _in_range(self, "label_smoothing", 0.0, 1.0, upper_open=True)
        if not 0 <= self.seed <= _MAX_SEED:
            raise ConfigError(f"--seed must be in [0, 2**63 - 1], got {self.seed}")
        _positive(self, "timeout_s")
        _in_range(self, "timeout_s", 0.0, _MAX_TIMEOUT_S)
        _at_least(self, "max_steps", 0)
        _at_least(self, "log_every", 1)
        _at_least(self, "consensus_every", 0)
        _at_least(self, "consensus_warn", 0.0)
        _at_least(self, "eval_every", 0)
        _at_least(self, "checkpoint_every", 0)
        _at_least(self, "keep_checkpoints", 1)
        if not self.dataset:
            raise ConfigError(f"--dataset must be one of {', '.join(DATASETS)} or module:function")
        if ":" not in self.dataset and self.dataset not in DATASETS:
            raise ConfigError(
                f"--dataset must be one of {', '.join(DATASETS)} or module:function, "
                f"got {self.dataset!r}"
            )
        if ":" not in self.model and self.model not in ("auto", *MODELS):
            raise ConfigError(
                f"--model must be auto, one of {', '.join(MODELS)}, or module:function, "
                f"got {self.model!r}"
            )
        for option in ("dataset", "model"):
            spec = getattr(self, option)
            if ":" in spec:
                try:
                    import_callable(spec, option)
                except ValueError as error:
                    raise ConfigError(f"{flag(option)}: {error}") from None
        _positive(self, "bucket_mb")
        _in_range(self, "streams", 1, MAX_STREAMS)
        _at_least(self, "gossip_every", 1)
        _at_least(self, "ranks_per_node", 0)
        _at_least(self, "average_every", 0)
        _in_range(self, "max_staleness", 0, MAX_STALENESS, upper_open=True)
        if self.algo == "hierarchical" and (self.mode != "params" or self.tracking):
            got = "--tracking" if self.mode == "params" else f"--mode {self.mode}"
            raise ConfigError(
                f"--algo hierarchical supports --mode params without --tracking only, got {got}: "
                "use --algo gossip for it"
            )
        if self.balance and self.algo == "allreduce":
            raise ConfigError(
                "--balance moves samples in the gossip shuffle, which all-reduce does not use "
                "(it keeps DistributedSampler's equal shards): use --algo gossip or both"
            )
        if self.balance and self.batch_size < 8:
            raise ConfigError(
                f"--balance needs --batch-size >= 8 (a slow rank's shard may shrink to 1/8 of an "
                f"even share), got {self.batch_size}"
            )
        if self.tensorboard and not _has_tensorboard():
            raise ConfigError(
                "--tensorboard needs the tensorboard package: pip install 'gossipgrad[tensorboard]'"
            )
        return self

    def gossip_options(self) -> GossipOptions:
        """The engine's options these flags set: the one place where flags map onto them.
        Raises ``ConfigError`` naming the flag when the engine refuses a combination."""
        from gossipgrad.options import WIRE_DTYPES, GossipOptions

        try:
            return GossipOptions(
                sync=self.sync,
                mode=self.mode,
                schedule=self.schedule,
                seed=self.seed,
                bucket_cap_mb=self.bucket_mb,
                timeout=timedelta(seconds=self.timeout_s),
                on_nonfinite=self.on_nonfinite,
                wire_dtype=WIRE_DTYPES[self.wire_dtype],
                streams=self.streams,
                gossip_every=self.gossip_every,
                average_every=self.average_every,
                tracking=self.tracking,
                max_staleness=self.max_staleness,
            )
        except ValueError as error:
            name = re.match(r"\w*", str(error)).group()  # type: ignore[union-attr]
            raise ConfigError(f"{flag(_FLAG_OF.get(name, name))}: {error}") from None

    def algos(self) -> tuple[str, ...]:
        """The algorithms to run, in order."""
        return ("gossip", "allreduce") if self.algo == "both" else (self.algo,)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def flag(name: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def load_config(argv: list[str], prog: str = "gossipgrad train") -> TrainConfig:
    """Parse ``argv`` (with ``--config FILE.toml``) into a validated ``TrainConfig``. A bad value
    prints one line ``gossipgrad: error: ...`` and exits with status 2."""
    parser = build_parser(prog)
    args = vars(parser.parse_args(argv))
    try:
        values = read_toml(args.pop("config")) if "config" in args else {}
        values.update(args)
        cfg = replace(TrainConfig(), **with_preset(values))
        return cfg.validate()
    except ConfigError as error:
        parser.error(str(error))
        raise  # unreachable: parser.error exits


def check_launch(cfg: TrainConfig) -> None:
    """What ``gossipgrad train`` needs besides ``validate`` (torchrun ignores ``--nproc``): at
    most ``MAX_NPROC`` local workers, and a gossip schedule that fits ``--nproc`` (checked here,
    before torch is imported, so the answer is immediate). Raises ``ConfigError``."""
    if cfg.nproc > MAX_NPROC:
        raise ConfigError(
            f"--nproc must be in [1, {MAX_NPROC}] (worker processes on this machine), got "
            f"{cfg.nproc}: for more ranks, start workers on several machines with torchrun"
        )
    if {"gossip", "hierarchical"} & set(cfg.algos()):
        from gossipgrad.schedule import partners  # pure: no torch

        try:
            partners(0, 0, cfg.nproc, cfg.seed, cfg.schedule)
        except ValueError as error:
            raise ConfigError(
                f"--schedule {cfg.schedule} with --nproc {cfg.nproc}: {error}"
            ) from None


def with_preset(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (the file's and the command line's) over the values of the preset they name."""
    name = values.get("preset", "none")
    if not isinstance(name, str):
        return values  # validate() names the wrong type
    if name not in PRESET_NAMES:
        raise ConfigError(f"--preset must be one of {', '.join(PRESET_NAMES)}, got {name!r}")
    return {**PRESETS.get(name, {}), **values}


def read_toml(path: str | Path) -> dict[str, Any]:
    """The options in a TOML file, as ``TrainConfig`` field names (``-`` read as ``_``).
    ``ConfigError`` naming the file if it cannot be read, is not UTF-8 or not valid TOML."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        raw = parse_text(path, tomllib.loads, "TOML")
    except OSError as error:
        reason = error.strerror or str(error)
        raise ConfigError(f"--config: cannot read {str(path)!r}: {reason}") from None
    except DamagedFile as error:
        raise ConfigError(f"--config: {error}") from None
    names = {f.name for f in fields(TrainConfig)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in names:
            allowed = ", ".join(sorted(names))
            raise ConfigError(f"--config: unknown key {key!r} in {str(path)!r}; allowed: {allowed}")
        kind = next(str(f.type) for f in fields(TrainConfig) if f.name == name)
        is_int = isinstance(value, int) and not isinstance(value, bool)
        values[name] = float(value) if kind == "float" and is_int else value
    return values


class _Parser(argparse.ArgumentParser):
    """argparse, with errors on one line: ``gossipgrad: error: ...`` and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"gossipgrad: error: {message}\n")
        sys.exit(2)


def build_parser(prog: str = "gossipgrad train") -> argparse.ArgumentParser:
    """The command-line parser generated from ``TrainConfig``'s fields. Options not given on the
    command line are absent from the result, so a TOML file can set them."""
    parser = _Parser(
        prog=prog,
        description="Train a model data-parallel with gossip (GossipGraD) and/or all-reduce.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--config", metavar="FILE.toml", help="read options from a TOML file (command line wins)"
    )
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else None
        shown = f.metadata.get("shown") or default
        text = f"{f.metadata['help']} (default: {shown})"
        choices = f.metadata.get("choices")
        metavar = "{" + ",".join(choices) + "}" if choices else f.name.upper()
        if f.type == "bool":
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, help=text)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            bare = f.metadata.get("bare")
            extra: dict[str, Any] = {"nargs": "?", "const": bare} if bare else {}
            parser.add_argument(flag(f.name), type=kind, metavar=metavar, help=text, **extra)
    return parser


# --- checks -------------------------------------------------------------------------------------


def _check_type(name: str, value: Any, kind: Any) -> None:
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }[str(kind)]
    if not ok:
        raise ConfigError(f"{flag(name)} must be {kind}, got {value!r}")
    if str(kind) == "float" and not math.isfinite(value):
        raise ConfigError(f"{flag(name)} must be a finite number, got {value!r}")


def _at_least(cfg: TrainConfig, name: str, low: float) -> None:
    value = getattr(cfg, name)
    if value < low:
        raise ConfigError(f"{flag(name)} must be >= {low:g}, got {value:g}")


def _positive(cfg: TrainConfig, name: str) -> None:
    value = getattr(cfg, name)
    if not value > 0:
        raise ConfigError(f"{flag(name)} must be > 0, got {value:g}")


def _in_range(
    cfg: TrainConfig, name: str, low: float, high: float, upper_open: bool = False
) -> None:
    value = getattr(cfg, name)
    if not (low <= value < high if upper_open else low <= value <= high):
        closing = ")" if upper_open else "]"
        raise ConfigError(f"{flag(name)} must be in [{low:g}, {high:g}{closing}, got {value:g}")


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None
