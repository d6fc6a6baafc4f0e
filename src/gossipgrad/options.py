"""The gossip engine's options: each one defined once, as a field of ``GossipOptions``.

    options = GossipOptions(sync=True, wire_dtype=torch.bfloat16)  # ConfigError on a bad value
    model = GossipDataParallel(module, options)     # or by keyword: (module, sync=True)

``GossipDataParallel`` and ``HierarchicalDataParallel`` take a ``GossipOptions``, ``wrap``
forwards one, and the virtual cluster reads the same fields. A field's definition (``_option``)
holds its default, its help text, the values it allows (a range, choices or a check) and, where
they differ, its command-line name and form (``--bucket-mb``; ``--timeout-s`` in seconds;
``--wire-dtype`` by name). ``gossipgrad train``'s flags, TOML keys and messages
(``command_line``) and the options table (``options_markdown``) are generated from these
definitions, so a new engine option is one field here and its test. Rules about several options
at once are plain code in ``_check_together``.

Nothing here imports torch (``gossipgrad train --help`` stays instant): a wire dtype is checked
by its name.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from gossipgrad._spec import Allowed, Cli, Option, option_of, table
from gossipgrad.schedule import SCHEDULES

if TYPE_CHECKING:
    import torch

ALGOS: tuple[str, ...] = ("gossip", "allreduce", "hierarchical")  # what gossipgrad.wrap builds
MODES: tuple[str, ...] = ("params", "gradients")
ON_NONFINITE: tuple[str, ...] = ("raise", "skip")
# The payload dtypes on the wire by name (int8: blockwise quantized, gossipgrad._quantize);
# WIRE_DTYPES maps them to torch dtypes.
WIRE: tuple[str, ...] = ("none", "bfloat16", "float16", "int8")
MAX_STREAMS = 16
MAX_STALENESS = 1024  # messages of exchanges in flight are told apart by their step
MAX_SEED = 2**63 - 1  # the shuffle's agreement check holds seeds in an int64
_MAX_TIMEOUT_S = 7 * 24 * 3600.0  # a week; a datetime.timedelta overflows far beyond


class ConfigError(ValueError):
    """A bad option value, or options that do not go together, in one line naming the option.
    ``option`` is the field it is about, so a caller that names options otherwise (a
    command-line flag) can say so without reading the message."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class UnknownOptionError(TypeError, ValueError):
    """A keyword that is not an option: a ``TypeError`` as Python gives for any unknown keyword,
    and a ``ValueError`` like every other bad option."""


def _option(
    default: Any, help: str, *, flag: str = "", cli: Cli | None = None, **allowed: Any
) -> Any:
    """A field of ``GossipOptions``: its default, help text and allowed values (``Allowed``'s
    keywords), and its command-line ``flag`` and form (``cli``) where they differ."""
    return field(default=default, metadata={"option": Option(help, Allowed(**allowed), flag, cli)})


# --- the options --------------------------------------------------------------------------------


def wire_name(dtype: object) -> str | None:
    """A wire dtype's name (``torch.bfloat16``: ``"bfloat16"``; ``None``: ``"none"``), or None
    for any other value. Never imports torch: a dtype given means torch is imported already."""
    if dtype is None:
        return "none"
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(dtype, torch.dtype):
        return None
    name = str(dtype).removeprefix("torch.")
    return name if name in WIRE else None


def _wire_dtype(name: str) -> torch.dtype | None:
    """``"bfloat16"``: ``torch.bfloat16`` (imports torch); ``"none"``: None."""
    if name == "none":
        return None
    import torch

    return getattr(torch, name)


def _is_wire_dtype(value: object) -> bool:
    return wire_name(value) is not None


def _is_positive_timedelta(value: object) -> bool:
    return isinstance(value, timedelta) and value.total_seconds() > 0


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)


@dataclass(frozen=True)
class GossipOptions:
    """How the gossip engine exchanges and mixes. Every field is checked when the options are
    made (``ConfigError``, a ``ValueError``); ``options_markdown()`` tables them."""

    sync: bool = _option(
        False, "wait for each exchange before computing, instead of overlapping it"
    )
    mode: str = _option(
        "params",
        "what gossip mixes with the partner: params, or gradients (only the gradients are "
        "averaged; for comparison, the replicas drift apart)",
        choices=MODES,
    )
    schedule: str = _option(
        "dissemination", "partner schedule (gossipgrad.schedule)", choices=SCHEDULES
    )
    seed: int = _option(
        0, "seeds the schedule's rotation; must be equal on every rank", low=0, high=MAX_SEED
    )
    bucket_cap_mb: float = _option(
        25.0, "largest flat buffer sent as one message, in MiB", above=0, flag="--bucket-mb"
    )
    timeout: timedelta = _option(
        timedelta(minutes=5),
        "how long to wait for a partner (or a collective) before raising PeerError; in seconds "
        "on the command line",
        check=_is_positive_timedelta,
        text="a positive datetime.timedelta",
        flag="--timeout-s",
        cli=Cli("float", Allowed(above=0, high=_MAX_TIMEOUT_S), _seconds, timedelta.total_seconds),
    )
    on_nonfinite: str = _option(
        "raise",
        "on NaN/inf in local or received parameters: raise a NonFiniteError, or skip mixing "
        "that bucket (with a warning)",
        choices=ON_NONFINITE,
    )
    wire_dtype: torch.dtype | None = _option(
        None,
        "send floating-point payloads as bfloat16 or float16 (half the bytes), or int8 "
        "(blockwise quantized, 3.9x fewer bytes; params mode); mixing still keeps the replicas' "
        "average exactly",
        check=_is_wire_dtype,
        text="None, torch.bfloat16, torch.float16 or torch.int8",
        cli=Cli("str", Allowed(choices=WIRE), _wire_dtype, wire_name),
    )
    streams: int = _option(
        1,
        "connections per partner to spread the buckets over (gloo: one TCP stream each; NCCL "
        "ignores it)",
        low=1,
        high=MAX_STREAMS,
    )
    gossip_every: int = _option(
        1,
        "exchange with a partner every K steps, local steps between (the exchange travels "
        "during the K steps); params mode",
        low=1,
    )
    average_every: int = _option(
        0,
        "every H steps, replace every replica by the exact average (one all-reduce; "
        "Gossip-PGA); 0: never",
        low=0,
    )
    tracking: bool = _option(
        False,
        "gradient tracking (DIGing/NEXT): also gossip an estimate of the average gradient and "
        "step along it, for data that differs between ranks and for adaptive or orthogonalizing "
        "optimizers (AdamW, Muon); twice the bytes per exchange; params mode",
    )
    max_staleness: int = _option(
        0,
        "bounded staleness (SGP's delayed mixing): mix each exchange S steps after it is due, "
        "so a rank runs up to S steps ahead of a slow partner before it waits; every message is "
        "still mixed once (the average is kept) with a weight that shrinks with S; costs "
        "S // gossip_every more pairs of model-sized buffers; needs sync off and params mode",
        low=0,
        below=MAX_STALENESS,
        text=f"an integer >= 0 and below {MAX_STALENESS} (messages of exchanges in flight are "
        "told apart by their step)",
    )
    outer_lr: float = _option(
        1.0,
        "learning rate of the outer step (DiLoCo, NoLoCo): at each exchange the change since "
        "the last one is a pseudo-gradient, and the replica moves from its slow weights by "
        "outer_lr times the Nesterov step on its pseudo-gradient, and toward its partner; 1 with "
        "outer_momentum 0 is plain gossip (no outer step)",
        above=0,
        high=4,
    )
    outer_momentum: float = _option(
        0.0,
        "Nesterov momentum of the outer step (DiLoCo: 0.9 with outer_lr 0.7); an outer step "
        "needs params mode and no tracking, max_staleness or average_every",
        low=0,
        below=1,
    )

    @property
    def outer_step(self) -> bool:
        """Whether exchanges end with an outer step (any outer setting other than the default)."""
        return (self.outer_lr, self.outer_momentum) != (1.0, 0.0)

    def __post_init__(self) -> None:
        for f in fields(self):
            check_option(f.name, getattr(self, f.name))
        _check_together(self)

    @property
    def bucket_cap_bytes(self) -> int:
        return int(self.bucket_cap_mb * 2**20)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def build(cls, options: GossipOptions | None = None, **overrides: Any) -> GossipOptions:
        """``options`` (default: the defaults) with ``overrides`` applied; a keyword that is not
        an option raises ``UnknownOptionError`` naming the options there are."""
        unknown = sorted(set(overrides) - set(cls.names()))
        if unknown:
            raise UnknownOptionError(
                f"unknown options {unknown}: the gossip options are {list(cls.names())}"
            )
        if options is not None and not isinstance(options, GossipOptions):
            raise TypeError(f"options must be a GossipOptions, got {type(options).__name__}")
        return replace(options or cls(), **overrides)


# --- checks -------------------------------------------------------------------------------------


def check_option(name: str, value: Any) -> None:
    """Raise ``ConfigError`` unless ``value`` is allowed for the option ``name`` on its own."""
    f = next(f for f in fields(GossipOptions) if f.name == name)
    allowed = option_of(f).allowed
    if not allowed.allows(str(f.type), value):
        raise ConfigError(f"{name} must be {allowed.requirement(str(f.type))}, got {value!r}", name)


def check_bucket_cap(bucket_cap_mb: object) -> None:
    """Raise ``ConfigError`` unless ``bucket_cap_mb`` is a finite number > 0 (MiB)."""
    check_option("bucket_cap_mb", bucket_cap_mb)


def _check_together(o: GossipOptions) -> None:
    """The rules about several options at once; each error names the option to change."""
    if wire_name(o.wire_dtype) == "int8" and o.mode != "params":
        raise ConfigError(
            "wire_dtype=torch.int8 needs mode='params' (gradients travel as floats)", "wire_dtype"
        )
    if o.tracking and o.mode != "params":
        raise ConfigError(
            "tracking=True needs mode='params' (it gossips parameters and trackers)", "tracking"
        )
    if o.gossip_every > 1 and o.mode != "params":
        raise ConfigError(
            f"gossip_every={o.gossip_every} needs mode='params' (local steps between exchanges "
            "of gradients would drop those gradients); use gossip_every=1 with mode='gradients'",
            "gossip_every",
        )
    if o.max_staleness and (o.sync or o.mode != "params"):
        raise ConfigError(
            f"max_staleness={o.max_staleness} needs sync=False and mode='params' (sync waits for "
            "every message in its own step; gradients are averaged in their own step)",
            "max_staleness",
        )
    if o.outer_step and (o.mode != "params" or o.tracking or o.max_staleness or o.average_every):
        raise ConfigError(
            f"an outer step (outer_lr={o.outer_lr}, outer_momentum={o.outer_momentum}) needs "
            "mode='params' and no tracking, max_staleness or average_every: leave outer_lr=1 "
            "and outer_momentum=0, or turn those off",
            "outer_lr" if o.outer_lr != 1.0 else "outer_momentum",
        )


# --- generated: the command line's flags, the table, the docstring ------------------------------


@dataclass(frozen=True)
class Flag:
    """An engine option as ``gossipgrad train`` takes it: the flag ``--{name}`` (``-`` for
    ``_``) and TOML key ``name``, a value of ``kind`` among ``allowed``, which ``to_engine``
    turns into the ``option``'s value."""

    option: str
    name: str
    kind: str
    default: Any
    help: str
    allowed: Allowed
    to_engine: Callable[[Any], Any]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def command_line() -> tuple[Flag, ...]:
    """Every engine option as a command-line flag, in field order."""
    flags = []
    for f in fields(GossipOptions):
        o = option_of(f)
        name = (o.flag or f.name).removeprefix("--").replace("-", "_")
        if o.cli is None:
            flags.append(Flag(f.name, name, str(f.type), f.default, o.help, o.allowed, _same))
        else:
            default = o.cli.from_engine(f.default)
            flags.append(
                Flag(f.name, name, o.cli.kind, default, o.help, o.cli.allowed, o.cli.to_engine)
            )
    return tuple(flags)


def _same(value: Any) -> Any:
    return value


def options_markdown() -> str:
    """The engine's options as a markdown table: option, flag, allowed values, default, meaning."""
    rows = []
    for f, flag in zip(fields(GossipOptions), command_line(), strict=True):
        o = option_of(f)
        allowed, default = o.allowed.requirement(str(f.type)), f"`{f.default!r}`"
        if o.cli is not None:
            allowed += f" (the flag: {o.cli.allowed.requirement(o.cli.kind)})"
            default += f" (`{flag.default!r}`)"
        rows.append((f"`{f.name}`", f"`{flag.flag}`", allowed, default, o.help))
    return table(("option", "flag", "allowed", "default", "meaning"), rows)


def __getattr__(name: str) -> Any:
    """``WIRE_DTYPES``, the wire dtypes by name, imports torch when first used (PEP 562)."""
    if name == "WIRE_DTYPES":
        return {wire: _wire_dtype(wire) for wire in WIRE}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


GossipOptions.__doc__ = f"{GossipOptions.__doc__}\n\n    Attributes:\n" + "".join(
    textwrap.fill(
        f"{f.name}: {option_of(f).help}.", 96, initial_indent=" " * 8, subsequent_indent=" " * 12
    )
    + "\n"
    for f in fields(GossipOptions)
)
