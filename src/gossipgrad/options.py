"""The gossip engine's options, defined and validated in one place.

    options = GossipOptions(sync=True, wire_dtype=torch.bfloat16)  # ValueError on a bad value
    model = GossipDataParallel(module, options)     # or by keyword: (module, sync=True)

``GossipDataParallel`` and ``HierarchicalDataParallel`` take a ``GossipOptions``, ``wrap`` forwards
one, ``gossipgrad train`` maps its flags onto one (``TrainConfig.gossip_options``) and the virtual
cluster reads the same fields. A new engine option is a field here (with its check in
``_validate``), its test, and its row in the README.

Every choice set and default of the engine lives here too, spelt once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from typing import Any

import torch

from gossipgrad.schedule import SCHEDULES

MODES: tuple[str, ...] = ("params", "gradients")
ON_NONFINITE: tuple[str, ...] = ("raise", "skip")
# The payload dtypes on the wire, by the name the command line uses.
WIRE_DTYPES: dict[str, torch.dtype | None] = {
    "none": None,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.int8,  # blockwise quantized (gossipgrad._quantize): 3.9x fewer bytes
}
MAX_STREAMS = 16
MAX_STALENESS = 1024


class UnknownOptionError(TypeError, ValueError):
    """A keyword that is not an option: a ``TypeError`` as Python gives for any unknown keyword,
    and a ``ValueError`` like every other bad option."""


@dataclass(frozen=True)
class GossipOptions:
    """How the gossip engine exchanges and mixes (see the README's options table).

    Attributes:
        sync: wait for each exchange before computing, instead of overlapping it.
        mode: ``"params"`` (mix parameters with the partner) or ``"gradients"`` (average only
            the gradients; for comparison, replicas drift apart).
        schedule: partner schedule, one of ``gossipgrad.schedule.SCHEDULES``.
        seed: seeds the schedule's rotation; must be equal on every rank.
        bucket_cap_mb: largest flat buffer sent as one message, in MiB.
        timeout: how long to wait for a partner (or a collective) before raising ``PeerError``.
        on_nonfinite: ``"raise"`` a ``NonFiniteError`` on NaN/inf in local or received
            parameters, or ``"skip"`` mixing that bucket with a warning.
        wire_dtype: send floating-point payloads in this dtype (``torch.bfloat16`` or
            ``torch.float16``: half the bytes; ``torch.int8``: blockwise quantized, 3.9x fewer
            bytes); mixing still keeps the replicas' average exactly.
        streams: connections per partner to spread the buckets over (gloo: one TCP stream each;
            NCCL ignores it).
        gossip_every: exchange with a partner every ``K`` steps (local steps between; the
            exchange travels during the ``K`` steps); ``params`` mode.
        average_every: every ``H`` steps, replace every replica by the exact average (one
            all-reduce; Gossip-PGA); 0: never.
        tracking: gradient tracking (DIGing / NEXT): each rank also gossips ``y``, its estimate
            of the average gradient (``y <- W y + g_t - g_{t-1}``, so the mean of the ``y`` is
            the mean gradient), and its optimizer steps along ``y`` instead of its own
            gradient. For data that differs between ranks (label skew), and adaptive or
            orthogonalizing optimizers (AdamW, Muon). Twice the bytes per exchange.
        max_staleness: mix each exchange ``S`` steps later than it is due (SGP's overlap
            with a delay tau, bounded staleness): a rank runs up to ``S`` steps ahead of a slow
            partner and waits only for a message more than ``S`` steps overdue. Every message
            is still mixed exactly once (residual form), so the replicas' average is kept; the
            arithmetic does not depend on timing; the mixing weight shrinks with ``S`` so that
            delayed mixing still contracts (``gossipgrad.mixing.delayed_weight``). Costs
            ``S // gossip_every`` more pairs of model-sized buffers (allocated when wrapping);
            needs ``sync=False`` and ``params`` mode.
        outer_lr: learning rate of the outer step (DiLoCo, NoLoCo): at each exchange the change
            since the last one is a pseudo-gradient, and the replica moves from its slow
            weights by ``outer_lr`` times the Nesterov step on the pair-averaged pseudo-gradient.
            ``1.0`` with ``outer_momentum=0`` is plain gossip (no outer step, the default).
        outer_momentum: Nesterov momentum of the outer step, in ``[0, 1)``; DiLoCo uses 0.9
            with ``outer_lr=0.7``. Needs ``params`` mode, no tracking, no staleness, no PGA.
    """

    sync: bool = False
    mode: str = "params"
    schedule: str = "dissemination"
    seed: int = 0
    bucket_cap_mb: float = 25.0
    timeout: timedelta = timedelta(minutes=5)
    on_nonfinite: str = "raise"
    wire_dtype: torch.dtype | None = None
    streams: int = 1
    gossip_every: int = 1
    average_every: int = 0
    tracking: bool = False
    max_staleness: int = 0
    outer_lr: float = 1.0
    outer_momentum: float = 0.0

    @property
    def outer_step(self) -> bool:
        """Whether exchanges end with an outer step (any outer setting other than the default)."""
        return (self.outer_lr, self.outer_momentum) != (1.0, 0.0)

    def __post_init__(self) -> None:
        _validate(self)

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


def check_bucket_cap(bucket_cap_mb: object) -> None:
    """Raise ``ValueError`` unless ``bucket_cap_mb`` is a finite number > 0 (MiB)."""
    ok = isinstance(bucket_cap_mb, (int, float)) and not isinstance(bucket_cap_mb, bool)
    if not ok or not math.isfinite(bucket_cap_mb) or bucket_cap_mb <= 0:  # type: ignore[arg-type]
        raise ValueError(f"bucket_cap_mb must be a finite number > 0 (MiB), got {bucket_cap_mb!r}")


def check_timeout(timeout: object) -> None:
    """Raise ``ValueError`` unless ``timeout`` is a positive ``datetime.timedelta``."""
    if not isinstance(timeout, timedelta) or timeout.total_seconds() <= 0:
        raise ValueError(f"timeout must be a positive datetime.timedelta, got {timeout!r}")


def _validate(o: GossipOptions) -> None:
    for name in ("sync", "tracking"):
        if not isinstance(getattr(o, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(o, name)!r}")
    if o.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {o.mode!r}")
    if o.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {o.schedule!r}")
    if isinstance(o.seed, bool) or not isinstance(o.seed, int) or not 0 <= o.seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63 - 1], got {o.seed!r}")
    check_bucket_cap(o.bucket_cap_mb)
    check_timeout(o.timeout)
    if o.on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {o.on_nonfinite!r}")
    if not any(o.wire_dtype is d for d in WIRE_DTYPES.values()):
        raise ValueError(
            f"wire_dtype must be None, torch.bfloat16, torch.float16 or torch.int8, "
            f"got {o.wire_dtype!r}"
        )
    if o.wire_dtype is torch.int8 and o.mode != "params":
        raise ValueError("wire_dtype=torch.int8 needs mode='params' (gradients travel as floats)")
    if isinstance(o.streams, bool) or not isinstance(o.streams, int):
        raise ValueError(f"streams must be an integer in [1, {MAX_STREAMS}], got {o.streams!r}")
    if not 1 <= o.streams <= MAX_STREAMS:
        raise ValueError(f"streams must be an integer in [1, {MAX_STREAMS}], got {o.streams!r}")
    for name, low in (("gossip_every", 1), ("average_every", 0), ("max_staleness", 0)):
        value = getattr(o, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if o.tracking and o.mode != "params":
        raise ValueError("tracking=True needs mode='params' (it gossips parameters and trackers)")
    if o.gossip_every > 1 and o.mode != "params":
        raise ValueError(
            f"gossip_every={o.gossip_every} needs mode='params' (local steps between exchanges "
            "of gradients would drop those gradients); use gossip_every=1 with mode='gradients'"
        )
    if o.max_staleness >= MAX_STALENESS:
        raise ValueError(
            f"max_staleness must be below {MAX_STALENESS} steps (messages of exchanges in flight "
            f"are told apart by their step), got {o.max_staleness}"
        )
    if o.max_staleness and (o.sync or o.mode != "params"):
        raise ValueError(
            f"max_staleness={o.max_staleness} needs sync=False and mode='params' (sync waits for "
            "every message in its own step; gradients are averaged in their own step)"
        )
    for name, bounds, ok in (
        ("outer_lr", "in (0, 4]", lambda v: 0 < v <= 4),
        ("outer_momentum", "in [0, 1)", lambda v: 0 <= v < 1),
    ):
        value = getattr(o, name)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or not ok(value):
            raise ValueError(f"{name} must be a number {bounds}, got {value!r}")
    if o.outer_step and (o.mode != "params" or o.tracking or o.max_staleness or o.average_every):
        raise ValueError(
            f"an outer step (outer_lr={o.outer_lr}, outer_momentum={o.outer_momentum}) needs "
            "mode='params' and no tracking, max_staleness or average_every: leave outer_lr=1 "
            "and outer_momentum=0, or turn those off"
        )
