"""The options of ``gossipgrad train``, each defined once.

    cfg = load_config(["--lr", "0.1"])             # defaults < --config FILE.toml < command line
    cfg = TrainConfig(lr=0.1).validate()           # in code: ConfigError on a bad value

``TrainConfig`` holds the job's own options (``JobOptions``: one field each, with its help text
and allowed values) and the gossip engine's (``EngineFlags``, generated from the fields of
``gossipgrad.options.GossipOptions``: a new engine option needs nothing here). The command-line
parser, the TOML reader (the same names: ``batch_size`` or ``batch-size``), ``validate``'s
one-line messages naming the flag, and ``job_options_markdown`` are all generated from the
fields. ``gossip_options`` builds the engine's ``GossipOptions``, whose rules about several
options at once (``--wire-dtype int8`` needs ``--mode params``) name a flag too:
``gossipgrad train`` calls it before any worker starts.

Nothing here imports torch, so ``--help`` and a bad option are answered at once.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, make_dataclass, replace
from pathlib import Path
from typing import Any

from gossipgrad._spec import Allowed, Option, of_kind, option_of, table
from gossipgrad.options import (
    MAX_SEED,
    MODES,
    ON_NONFINITE,
    WIRE,
    ConfigError,
    Flag,
    GossipOptions,
    command_line,
)
from gossipgrad.train.choices import (
    ALGOS,
    AMP,
    DATASETS,
    DEVICES,
    LR_SCHEDULES,
    MAX_NPROC,
    MODELS,
    OPTIMIZERS,
)
from gossipgrad.train.files import DamagedFile, parse_text
from gossipgrad.train.plugins import import_callable

__all__ = [
    "ALGOS",
    "DEVICES",
    "MODES",
    "ON_NONFINITE",
    "OPTIMIZERS",
    "PRESETS",
    "WIRE",
    "ConfigError",
    "EngineFlags",
    "JobOptions",
    "TrainConfig",
    "build_parser",
    "check_launch",
    "flag",
    "job_options_markdown",
    "load_config",
    "read_toml",
]

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


def _is_dataset(spec: str) -> bool:
    return spec in DATASETS or ":" in spec


def _is_model(spec: str) -> bool:
    return spec in ("auto", *MODELS) or ":" in spec


def _opt(
    default: Any, help: str, *, shown: str | None = None, bare: str | None = None, **allowed: Any
) -> Any:
    """A field of ``JobOptions``: its default, help text and allowed values (the keywords of
    ``gossipgrad._spec.Allowed``), the default as ``--help`` shows it, and the value of the flag
    given without a value (``--resume`` alone means ``--resume auto``)."""
    option = Option(help, Allowed(**allowed))
    return field(default=default, metadata={"option": option, "shown": shown, "bare": bare})


@dataclass(frozen=True)
class JobOptions:
    """The options of ``gossipgrad train`` besides the engine's; ``--seed`` sets the engine's
    ``seed`` too."""

    # --- what to run
    algo: str = _opt("both", "both: one run of each, then a comparison table", choices=ALGOS)
    nproc: int = _opt(
        4, f"local worker processes, 1 to {MAX_NPROC} (ignored under torchrun)", low=1
    )
    max_restarts: int = _opt(0, "times the launcher restarts failed workers (torch elastic)", low=0)
    elastic: bool = _opt(
        False,
        "each rank on its own: survivors go on when a worker dies, and restarted workers "
        "(--max-restarts) join from a live peer (gossip on the CPU; see gossipgrad.elastic)",
    )
    dataset: str = _opt(
        "digits",
        f"{', '.join(DATASETS)}, or your own as module:function",
        check=_is_dataset,
        text=f"one of {', '.join(DATASETS)} or module:function",
    )
    model: str = _opt(
        "auto",
        f"auto (the dataset's default), {', '.join(MODELS)}, or your own as module:function",
        check=_is_model,
        text=f"auto, one of {', '.join(MODELS)}, or module:function",
    )
    device: str = _opt(
        "auto", "cpu (gloo), cuda (NCCL, one GPU per rank), or auto", choices=DEVICES
    )
    preset: str = _opt(
        "none",
        "a named set of flag values, below --config and the command line: "
        + "; ".join(f"{name} = {preset_text(name)}" for name in PRESETS),
        choices=PRESET_NAMES,
    )
    # --- optimisation
    epochs: int = _opt(15, "passes over the training set", low=1)
    batch_size: int = _opt(32, "samples per step on each rank", low=1)
    lr: float = _opt(0.05, "learning rate", above=0)
    momentum: float = _opt(0.9, "SGD momentum (adam: beta1)", low=0, below=1)
    weight_decay: float = _opt(0.0, "weight decay", low=0)
    optimizer: str = _opt("sgd", "each rank's own optimizer", choices=OPTIMIZERS)
    seed: int = _opt(0, "seeds the model, data split, sampler, schedule", low=0, high=MAX_SEED)
    lr_schedule: str = _opt(
        "constant",
        "learning rate after the warmup: constant, cosine (to 0 at the end of --epochs), or "
        "step (x0.1 at 1/2 and 3/4 of --epochs)",
        choices=LR_SCHEDULES,
    )
    warmup_epochs: float = _opt(
        0.0, "epochs of linear warmup to --lr, step by step (0: none)", low=0
    )
    amp: str = _opt(
        "none",
        "mixed precision (autocast): bf16, or fp16 (CUDA only, with a GradScaler)",
        choices=AMP,
    )
    grad_clip: float = _opt(0.0, "clip each rank's gradient to this norm (0: off)", low=0)
    label_smoothing: float = _opt(
        0.0, "label smoothing of the cross-entropy (0 to 1)", low=0, below=1
    )
    # --- the gossip job
    shuffle_fraction: float = _opt(
        0.25,
        "share of its samples a rank passes to its partner each epoch (0 to 1)",
        low=0,
        high=1,
    )
    balance: bool = _opt(
        False,
        "balance work between ranks of different speeds: the gossip shuffle moves samples to "
        "faster ranks, which take bigger batches (same steps on every rank; losses weighted by "
        "batch size; gossip only, --batch-size >= 8)",
    )
    ranks_per_node: int = _opt(
        0,
        "--algo hierarchical: ranks per node (consecutive ranks share one; to emulate nodes on "
        "one machine); 0: torchrun's layout, or one node under gossipgrad train",
        low=0,
    )
    # --- length, logging, checkpoints
    max_steps: int = _opt(0, "stop after this many steps (0: no cap)", low=0)
    log_every: int = _opt(10, "steps between metric records", low=1)
    consensus_every: int = _opt(
        10, "steps between consensus-distance measurements (0: never)", low=0
    )
    consensus_warn: float = _opt(
        0.5, "warn when the consensus distance goes above this (0: never)", low=0
    )
    eval_every: int = _opt(
        0,
        "epochs between held-out evaluations of the replicas' exact average, recorded in "
        "metrics.jsonl with the training time (0: only at the end)",
        low=0,
    )
    checkpoint_every: int = _opt(0, "steps between checkpoints (0: none)", low=0)
    keep_checkpoints: int = _opt(3, "checkpoints kept (the latest ones)", low=1)
    resume: str = _opt(
        "",
        "continue from a checkpoint: auto (the latest in --out, or in the newest run in runs/ "
        "without --out; also --resume alone) or PATH",
        shown="no resume",
        bare="auto",
    )
    out: str = _opt("", "run folder", shown="runs/<date-time>")
    quiet: bool = _opt(False, "no progress bar")
    tensorboard: bool = _opt(False, "also log to TensorBoard (needs the tensorboard package)")


def _engine_flags() -> Any:
    """A dataclass of the engine's options as ``gossipgrad train`` takes them
    (``gossipgrad.options.command_line``: fields named as the flags), less those that the job
    defines itself (``seed``)."""
    own = {f.name for f in fields(JobOptions)}
    flags = [
        (c.name, c.kind, field(default=c.default, metadata=_engine_metadata(c)))
        for c in command_line()
        if c.name not in own
    ]
    return make_dataclass("EngineFlags", flags, frozen=True, namespace={"__module__": __name__})


def _engine_metadata(c: Flag) -> dict[str, Any]:
    return {"option": Option(c.help, c.allowed), "engine": c.option}


EngineFlags: Any = _engine_flags()  # generated: type checkers see its fields as Any


@dataclass(frozen=True)
class TrainConfig(EngineFlags, JobOptions):
    """Every option of ``gossipgrad train`` (and ``python -m gossipgrad.train`` under torchrun):
    the job's own (``JobOptions``) and the engine's (``EngineFlags``)."""

    def validate(self) -> TrainConfig:
        """Return ``self`` if every value is allowed, else raise ``ConfigError``."""
        for f in fields(self):
            _check(f, getattr(self, f.name))
        for option in ("dataset", "model"):
            spec = getattr(self, option)
            if ":" in spec:
                try:
                    import_callable(spec, option)
                except ValueError as error:
                    raise ConfigError(f"{flag(option)}: {error}", option) from None
        if self.algo == "hierarchical" and (self.mode != "params" or self.tracking):
            got = "--tracking" if self.mode == "params" else f"--mode {self.mode}"
            raise ConfigError(
                f"--algo hierarchical supports --mode params without --tracking only, got {got}: "
                "use --algo gossip for it",
                "algo",
            )
        if self.balance and self.algo == "allreduce":
            raise ConfigError(
                "--balance moves samples in the gossip shuffle, which all-reduce does not use "
                "(it keeps DistributedSampler's equal shards): use --algo gossip or both",
                "balance",
            )
        if self.balance and self.batch_size < 8:
            raise ConfigError(
                f"--balance needs --batch-size >= 8 (a slow rank's shard may shrink to 1/8 of an "
                f"even share), got {self.batch_size}",
                "balance",
            )
        if self.tensorboard and not _has_tensorboard():
            raise ConfigError(
                "--tensorboard needs the tensorboard package: "
                "pip install 'gossipgrad[tensorboard]'",
                "tensorboard",
            )
        return self

    def gossip_options(self) -> GossipOptions:
        """The engine's options these flags set. Raises ``ConfigError`` naming the flag when the
        engine refuses a combination."""
        flags = command_line()
        values = {c.option: c.to_engine(getattr(self, c.name)) for c in flags}
        try:
            return GossipOptions(**values)
        except ConfigError as error:
            named = next((c.flag for c in flags if c.option == error.option), "--config")
            raise ConfigError(f"{named}: {error}", error.option) from None

    def algos(self) -> tuple[str, ...]:
        """The algorithms to run, in order."""
        return ("gossip", "allreduce") if self.algo == "both" else (self.algo,)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def flag(name: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def job_options_markdown() -> str:
    """The job's own options as a markdown table: option, flag, allowed values, default, meaning
    (the engine's: ``gossipgrad.options.options_markdown``)."""
    rows = [
        (
            f"`{f.name}`",
            f"`{flag(f.name)}`",
            option_of(f).allowed.requirement(str(f.type)),
            f"`{f.metadata['shown'] or repr(f.default)}`",
            option_of(f).help,
        )
        for f in fields(JobOptions)
    ]
    return table(("option", "flag", "allowed", "default", "meaning"), rows)


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
            f"{cfg.nproc}: for more ranks, start workers on several machines with torchrun",
            "nproc",
        )
    if {"gossip", "hierarchical"} & set(cfg.algos()):
        from gossipgrad.schedule import partners  # pure: no torch

        try:
            partners(0, 0, cfg.nproc, cfg.seed, cfg.schedule)
        except ValueError as error:
            raise ConfigError(
                f"--schedule {cfg.schedule} with --nproc {cfg.nproc}: {error}", "schedule"
            ) from None


def with_preset(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (the file's and the command line's) over the values of the preset they name."""
    name = values.get("preset", "none")
    if not isinstance(name, str):
        return values  # validate() names the wrong type
    if name not in PRESET_NAMES:
        raise ConfigError(
            f"--preset must be one of {', '.join(PRESET_NAMES)}, got {name!r}", "preset"
        )
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
    kinds = {f.name: str(f.type) for f in fields(TrainConfig)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in kinds:
            allowed = ", ".join(sorted(kinds))
            raise ConfigError(f"--config: unknown key {key!r} in {str(path)!r}; allowed: {allowed}")
        is_int = isinstance(value, int) and not isinstance(value, bool)
        values[name] = float(value) if kinds[name] == "float" and is_int else value
    return values


class _Parser(argparse.ArgumentParser):
    """argparse, with errors on one line: ``gossipgrad: error: ...`` and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"gossipgrad: error: {message}\n")
        sys.exit(2)


def build_parser(prog: str = "gossipgrad train") -> argparse.ArgumentParser:
    """The command-line parser generated from ``TrainConfig``'s fields: the job's options, then
    the engine's. Options not given on the command line are absent from the result, so a TOML
    file can set them."""
    parser = _Parser(
        prog=prog,
        description="Train a model data-parallel with gossip (GossipGraD) and/or all-reduce.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--config", metavar="FILE.toml", help="read options from a TOML file (command line wins)"
    )
    engine = parser.add_argument_group("gossip engine options (gossipgrad.GossipOptions)")
    for f in fields(TrainConfig):
        _add_flag(engine if "engine" in f.metadata else parser, f)
    return parser


def _add_flag(parser: argparse._ActionsContainer, f: Field) -> None:
    default = f.default if f.default is not MISSING else None
    text = f"{option_of(f).help} (default: {f.metadata.get('shown') or default})"
    choices = option_of(f).allowed.choices
    metavar = "{" + ",".join(choices) + "}" if choices else f.name.upper()
    if f.type == "bool":
        parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, help=text)
        return
    kind = {"int": int, "float": float}.get(str(f.type), str)
    bare = f.metadata.get("bare")
    extra: dict[str, Any] = {"nargs": "?", "const": bare} if bare else {}
    parser.add_argument(flag(f.name), type=kind, metavar=metavar, help=text, **extra)


# --- checks -------------------------------------------------------------------------------------


def _check(f: Field, value: Any) -> None:
    """``ConfigError`` naming the flag unless ``value`` is of the field's type and allowed."""
    kind, allowed = str(f.type), option_of(f).allowed
    if not of_kind(kind, value):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        wanted = "a finite number" if kind == "float" and number else kind
        raise ConfigError(f"{flag(f.name)} must be {wanted}, got {value!r}", f.name)
    if not allowed.allows(kind, value):
        shown = f"{value:g}" if isinstance(value, float) else repr(value)
        raise ConfigError(
            f"{flag(f.name)} must be {allowed.requirement(kind, typed=True)}, got {shown}", f.name
        )


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None
