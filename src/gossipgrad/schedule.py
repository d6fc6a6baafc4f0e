"""Partner schedules: who sends to whom at each step.

Every function here is pure: the result depends only on (rank, step, world_size, seed, schedule),
so every rank computes the same global pattern with no communication, and the schedule can be
tested and simulated without torch.distributed.

At step ``t`` a rank sends its snapshot to ``send_to`` and receives one from ``recv_from``, then
mixes ``x <- (1 - w) * x + w * x_received`` with ``w = weight``. ``None`` means "no message this
step" (world size 1, or a rank that rests in a step of the exact schedule).

Schedules (``SCHEDULES``):

- ``dissemination`` (default): rounds of ``L = ceil(log2 p)`` steps; in round ``r`` all ranks draw
  the same permutation ``pi_r`` (seeded by ``(seed, r)``), and with ``v = pi_r^-1(rank)`` a rank
  sends to ``pi_r((v + 2^k) % p)`` and receives from ``pi_r((v - 2^k) % p)`` at ``k = t % L``.
  An update reaches every rank within one round (feature 2); the permutation rotates partners
  from round to round (feature 3).
- ``dissemination-fixed``: the same without rotation (``pi_r`` is the identity).
- ``hypercube``: ``p`` a power of two; partners ``v XOR 2^k`` exchange with each other, rotated
  like ``dissemination``. After the ``log2 p`` steps of a round the replicas hold the exact average.
- ``ring``: send to ``rank + 1``, receive from ``rank - 1``, forever (a slow-diffusion baseline).
- ``exact``: exact average after every period for *any* ``p`` (see ``gossipgrad._exact``).
"""

from __future__ import annotations

import math

from gossipgrad._exact import exact_exchange, exact_period
from gossipgrad._plan import Exchange, permutation

__all__ = ["SCHEDULES", "Exchange", "partners", "plan", "rounds_length"]

SCHEDULES: tuple[str, ...] = ("dissemination", "dissemination-fixed", "hypercube", "ring", "exact")


def rounds_length(world_size: int, schedule: str = "dissemination") -> int:
    """Steps per round: the period after which the schedule's diffusion (or exactness) holds."""
    _check(0, 0, world_size, schedule)
    if schedule == "ring":
        return max(1, world_size - 1)
    if schedule == "exact":
        return exact_period(world_size)
    return max(1, math.ceil(math.log2(world_size))) if world_size > 1 else 1


def plan(
    rank: int, step: int, world_size: int, seed: int = 0, schedule: str = "dissemination"
) -> Exchange:
    """The exchange that ``rank`` performs at ``step`` (see the module docstring)."""
    _check(rank, step, world_size, schedule)
    if world_size == 1:
        return Exchange(None, None, 0.0)
    if schedule == "ring":
        return Exchange((rank + 1) % world_size, (rank - 1) % world_size)
    if schedule == "exact":
        return exact_exchange(rank, step, world_size, seed)

    length = rounds_length(world_size, schedule)
    rnd, k = divmod(step, length)
    perm = permutation(world_size, seed, rnd) if schedule != "dissemination-fixed" else None
    v = perm.index(rank) if perm is not None else rank
    if schedule == "hypercube":
        to = frm = v ^ (1 << k)
    else:
        to, frm = (v + (1 << k)) % world_size, (v - (1 << k)) % world_size
    if perm is not None:
        to, frm = perm[to], perm[frm]
    return Exchange(to, frm)


def partners(
    rank: int, step: int, world_size: int, seed: int = 0, schedule: str = "dissemination"
) -> tuple[int | None, int | None]:
    """``(send_to, recv_from)`` for ``rank`` at ``step``; ``None`` where no message goes."""
    ex = plan(rank, step, world_size, seed, schedule)
    return ex.send_to, ex.recv_from


def _check(rank: int, step: int, world_size: int, schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if not _is_int(world_size) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if not _is_int(rank) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, {world_size - 1}], got {rank!r}")
    if not _is_int(step) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if schedule == "hypercube" and world_size & (world_size - 1):
        raise ValueError(
            f"schedule 'hypercube' needs a power-of-two world size, got {world_size}; "
            "use 'dissemination' (any size) or 'exact' (exact average for any size)"
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
