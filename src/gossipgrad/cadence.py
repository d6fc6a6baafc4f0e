"""When a gossip step exchanges, mixes and averages: pure functions of the step, shared by the
engines and the virtual cluster.

With ``gossip_every = K``, the replica is sent when the first step of every run of ``K`` steps
begins (at the end of the step before it, inside its optimizer step) and the partner's is mixed
in at the end of the last one (residual form, so the ``K - 1`` local steps taken meanwhile are
kept, and the exchange has ``K`` steps to travel). With ``average_every = H > 0``, every replica
becomes the exact average at the end of every ``H``-th step (Gossip-PGA). A step ends inside
the optimizer's step (``gossipgrad._clock``). Partners follow the schedule by exchange, not by
step. With ``max_staleness = S``, each exchange is mixed ``S`` steps after that (bounded
staleness), so up to ``buffers_in_flight`` exchanges travel at once.

Exchange 0 (posted at step 0) is never sent: at step 0 every replica is the same (broadcast when
wrapping, or DDP's ``init_sync=False`` contract), so its mix ``x + w (r - s)`` would add exactly
zero and cost one model's traffic. The first exchange sent is exchange 1; partners still follow
the schedule by exchange index. Replicas that differ at step 0 (a contract broken) skip one mix,
which keeps their mean.
"""

from __future__ import annotations


def exchange_starts(step: int, gossip_every: int) -> bool:
    """Whether step ``step`` (0-based) sends the replica (not step 0: see the module
    docstring)."""
    return step > 0 and step % gossip_every == 0


def exchange_ends(step: int, gossip_every: int) -> bool:
    """Whether the end of step ``step`` mixes the partner's replica in."""
    return (step + 1) % gossip_every == 0


def exchange_index(step: int, gossip_every: int) -> int:
    """Which exchange of the schedule step ``step`` belongs to (``schedule.plan``'s step)."""
    return step // gossip_every


def average_due(step: int, average_every: int) -> bool:
    """Whether the end of step ``step`` averages every replica exactly."""
    return average_every > 0 and (step + 1) % average_every == 0


def mixed_exchange(step: int, gossip_every: int, max_staleness: int = 0) -> int | None:
    """Which exchange the end of step ``step`` mixes in, if any: the one due
    ``max_staleness`` steps earlier."""
    due = step - max_staleness
    if due < 0 or not exchange_ends(due, gossip_every):
        return None
    index = exchange_index(due, gossip_every)
    return index if index > 0 else None  # exchange 0 is not sent


def buffers_in_flight(gossip_every: int, max_staleness: int = 0) -> int:
    """How many exchanges can be in flight at once (each holds its own send and receive
    buffers): exchange ``j`` is posted at step ``jK`` and mixed at the end of step
    ``jK + K - 1 + S``."""
    return (gossip_every - 1 + max_staleness) // gossip_every + 1
