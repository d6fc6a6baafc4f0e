"""The step engine: what a gossip step does to one replica, written once for every wrapper.

``GossipDataParallel``, ``HierarchicalDataParallel`` (on each node's leader) and the virtual
cluster (``gossipgrad.sim.virtual``, one engine per replica) all drive a ``StepEngine``; none of
them re-derives the cadence. The engine owns the exchange cadence (``gossipgrad.cadence``), the
flat buffers, the exchanges in flight, mixing, gradient tracking and bounded staleness. It never
decides *when* a step ends: its owner calls it at the step's end, which for the wrappers is the
end of ``optimizer.step()`` (``gossipgrad._clock``), so parameters change only inside the
optimizer's step, as in a single-process loop and under DDP.

At the end of step ``t`` (``finish_step``, then the owner's exact average if ``average_due``,
then ``begin_next_step``):

1. gradient tracking, if on: ``y <- g_used`` (the tracked gradient the optimizer just used) and
   ``g_last <- g_used - (y - g_last)`` (the raw gradient);
2. the exchanges due at ``t`` are waited for and mixed in residual form ``x <- x + w (r - s)``
   (``gossipgrad.mixing``): ``s`` is the snapshot this rank sent, ``r`` the partner's, and the
   optimizer's step taken since the snapshot is kept;
3. step ``t + 1`` begins: if it sends (``cadence.exchange_starts``), the replica (the optimizer's
   result, mixed) is packed and put on the wire, to travel while step ``t + 1`` computes.

A step that ends without an optimizer step (``skip_step``: a ``GradScaler`` that found inf on
this rank only) keeps the schedule, as its partners expect: it begins the next step's exchange
but mixes nothing (its parameters must not change outside the optimizer); what was due is mixed
at the next ``finish_step``. Every exchange is mixed exactly once, so the replicas' mean is kept.

**Outer step** (``options.outer_step``: ``outer_lr`` and ``outer_momentum`` other than 1 and 0;
DiLoCo's outer optimizer, on the pair's mean instead of an all-reduce). The engine keeps slow
weights ``phi`` (the replica when wrapped, or when the layout changed) and a momentum buffer
``u``; the snapshot ``s`` is sent as above (same bytes, same overlap), and where a mix is due,
``gossipgrad.mixing.outer_step_`` takes one Nesterov step of ``phi`` on this replica's
pseudo-gradient ``phi - s``, pulls it toward the pair's mean by ``w (r - s)`` (outside the
momentum, as NoLoCo does) and moves the replica by ``phi' - s``, which keeps the local steps
taken since ``s``. Summed over ranks the pulls cancel, so the mean of the ``phi`` follows
DiLoCo's outer step on the mean exactly. Overlapped, the step uses
the snapshot sent ``gossip_every`` steps earlier (the outer step lands one exchange late);
``sync=True`` mixes each exchange as soon as it is received, at the step end that sent it, so
that the outer step follows the ``gossip_every`` local steps at once, as in DiLoCo. A rank
without a partner in an exchange steps with ``m = s``; a single rank has no exchange and no
outer step. Memory: ``phi`` and ``u`` are two more copies of the mixed tensors (float32 for
narrower ones); with a compressed wire, each exchange in flight also keeps its unrounded
snapshot (one more copy, instead of a shared scratch the size of one bucket); each mix
allocates two bucket-sized temporaries.

Messages go through a ``gossipgrad._transport.Transport``: ``GroupTransport``
(torch.distributed point-to-point, gloo or NCCL) or the virtual cluster's in-memory one.
"""

from __future__ import annotations

import time
import warnings
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gossipgrad import cadence
from gossipgrad._transport import Transport, Wire
from gossipgrad.errors import NonFiniteError
from gossipgrad.mixing import (
    Bucket,
    delayed_weight,
    difference,
    encode_,
    is_finite,
    make_buckets,
    mix_,
    mix_residual_,
    outer_step_,
    pack_,
    sent_values,
    views,
)
from gossipgrad.options import GossipOptions
from gossipgrad.schedule import Exchange, plan

Layout = tuple[tuple[tuple[int, ...], torch.dtype, torch.device], ...]


@dataclass
class _Pending:
    """An exchange in flight: its index in the schedule, one wire per bucket, its plan, the
    buffers it uses and the layout they were packed from."""

    index: int
    wires: list[Wire]
    ex: Exchange
    buckets: list[Bucket]
    layout: Layout
    differences: list[torch.Tensor] | None = None  # resumed: ``s - r`` per bucket, received
    snapshots: list[torch.Tensor] | None = None  # resumed with an outer step: ``s`` per bucket


class StepEngine:
    """One replica's side of gossip (see the module docstring).

    Args:
        tensors: returns what the replica mixes, read afresh at each use (parameters and float
            buffers, less constants), so that tensors created, replaced or resized after
            wrapping are followed.
        options: the engine's options.
        rank, world_size: this replica's rank in the gossip group, and the group's size.
        transport: how messages travel.
        tracked: the parameters gradient tracking follows (``options.tracking``).
        touch: fill the buffers when they are made (one page fault per page now, not in a step).
    """

    def __init__(
        self,
        tensors: Callable[[], list[torch.Tensor]],
        options: GossipOptions,
        rank: int,
        world_size: int,
        transport: Transport,
        *,
        tracked: Sequence[torch.Tensor] = (),
        touch: bool = True,
    ) -> None:
        self.options = o = options
        self.rank, self.world_size = rank, world_size
        self.transport = transport
        self.step = 0  # steps ended so far: the step now computing
        self.bytes_sent_last_step = 0
        self.wait_time_s = 0.0  # seconds spent blocked on partners' messages, in total
        self._tensors = tensors
        self._touch = touch and world_size > 1
        self._pending: deque[_Pending] = deque()
        self._due = -1  # the newest exchange whose mix is due (mixed at the next finish_step)
        self._grad_exchanges = 0  # gradients mode: exchanges made
        # gradient tracking: per tracked parameter, its tracker y and its last raw gradient
        tracking = o.tracking and world_size > 1 and o.mode == "params"
        self._tracked = list(tracked) if tracking else []
        self._trackers = [torch.zeros_like(p) for p in self._tracked]
        self._last_grads = [torch.zeros_like(p) for p in self._tracked]
        self._offset: dict[int, int] = {}  # id(param) -> its index, offset added this step
        self._index = {id(p): i for i, p in enumerate(self._tracked)}
        self._layout: Layout = ()
        self._free: list[list[Bucket]] = []
        self._delta: list[torch.Tensor] | None = None  # mixed at a skipped step, added later
        # the outer step: slow weights and Nesterov buffer, per mixed tensor
        self._outer = o.outer_step and o.mode == "params" and world_size > 1
        self._slow: list[torch.Tensor] = []
        self._momentum: list[torch.Tensor] = []
        self._rebuild(self.mixed_tensors())

    # --- what is mixed -----------------------------------------------------------------------

    def mixed_tensors(self) -> list[torch.Tensor]:
        """The replica's tensors (gradients mode: the parameters whose gradients are averaged)
        and, with tracking, the trackers."""
        return self._tensors() + self._trackers

    def _rebuild(self, tensors: list[torch.Tensor]) -> None:
        """Buffers for ``tensors``: every pair the exchanges in flight can need at once
        (``cadence.buffers_in_flight``), made now; with an outer step, the slow weights start
        from ``tensors`` (every rank rebuilds at the same step)."""
        o = self.options
        self._layout = _layout_of(tensors)
        slots = cadence.buffers_in_flight(o.gossip_every, o.max_staleness)
        wire = o.wire_dtype if o.mode == "params" else None
        cap, keep = o.bucket_cap_bytes, self._outer
        self._free = [
            make_buckets(tensors, cap, wire, zeroed=self._touch, keep_snapshot=keep)
            for _ in range(slots)
        ]
        self._salt = zlib.crc32(repr(self._layout).encode()) % 128
        if self._outer:
            self.reset_outer()

    @torch.no_grad()
    def reset_outer(self) -> None:
        """Slow weights = the replica as it stands, momentum = 0 (when wrapping, when the
        layout changes, and after a ``load_state_dict``; ``load_state`` then restores saved
        ones). No effect without an outer step."""
        if not self._outer:
            return
        tensors = self.mixed_tensors()
        self._slow = [t.detach().to(_outer_dtype(t.dtype), copy=True) for t in tensors]
        self._momentum = [torch.zeros_like(p) for p in self._slow]

    @property
    def buckets(self) -> list[Bucket]:
        """One set of buffers (their sizes are every exchange's)."""
        return self._free[0] if self._free else self._pending[0].buckets

    # --- a step's end ------------------------------------------------------------------------

    def finish_step(self) -> None:
        """The end of step ``step``, inside the optimizer's step: track, then mix what is due
        (after what a skipped step left)."""
        o = self.options
        if o.mode == "gradients":
            return
        self._apply_delta()
        self._track()
        due = cadence.mixed_exchange(self.step, o.gossip_every, o.max_staleness)
        if due is not None:
            self._due = max(self._due, due)
        while self._pending and self._pending[0].index <= self._due:
            self._mix(self._pending.popleft())

    def average_due(self) -> bool:
        """Whether the step ending now is followed by the exact average (Gossip-PGA)."""
        return self.options.mode == "params" and cadence.average_due(
            self.step, self.options.average_every
        )

    def begin_next_step(self, *, skipped: bool = False) -> None:
        """Step ``step + 1`` begins: start its exchange if it sends one (with an outer step and
        ``sync``, mix it at once: into the delta if step ``step`` was ``skipped``)."""
        self.step += 1
        self.bytes_sent_last_step = 0
        self._offset.clear()
        o = self.options
        sends = o.mode == "params" and self.world_size > 1
        if sends and cadence.exchange_starts(self.step, o.gossip_every):
            self._start(cadence.exchange_index(self.step, o.gossip_every))
            if self._outer and o.sync:
                self._mix(self._pending.pop(), into_delta=skipped)

    def skip_step(self) -> None:
        """Step ``step`` ended without an optimizer step (its gradients were discarded): keep
        the schedule without changing the replica. What was due is mixed into a delta that the
        next ``finish_step`` adds, and the next exchange sends the replica plus that delta, as
        if it had been mixed (so no exchange is mixed late, which would not contract)."""
        o = self.options
        due = cadence.mixed_exchange(self.step, o.gossip_every, o.max_staleness)
        if due is not None:
            self._due = max(self._due, due)
        while self._pending and self._pending[0].index <= self._due:
            self._mix(self._pending.popleft(), into_delta=True)
        self.begin_next_step(skipped=True)

    def flush(self) -> None:
        """Wait for every exchange in flight and mix it in now."""
        self._apply_delta()
        while self._pending:
            self._mix(self._pending.popleft())

    @torch.no_grad()
    def _apply_delta(self) -> None:
        delta, self._delta = self._delta, None
        if delta is not None and _layout_of(delta) == self._layout:
            torch._foreach_add_(self.mixed_tensors(), delta)

    def _with_delta(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """What the replica will be once the delta of a skipped step is added."""
        if self._delta is None:
            return tensors
        return [t + d for t, d in zip(tensors, self._delta, strict=True)]

    def close(self) -> None:
        """Complete every exchange in flight and free the buffers and trackers."""
        self.flush()
        self._free, self._layout = [], ()
        self._tracked, self._trackers, self._last_grads = [], [], []
        self._index, self._offset = {}, {}

    # --- params mode: exchanges ----------------------------------------------------------------

    def start_exchange(self, index: int) -> None:
        """Start exchange ``index`` now, whatever the cadence (the virtual cluster's
        ``gossip()``, which mixes it at once with ``flush``)."""
        self._start(index)

    def _start(self, index: int) -> None:
        tensors = self.mixed_tensors()
        if _layout_of(tensors) != self._layout:
            self._relayout(tensors)
        buckets = self._free.pop() if self._free else self._new_buckets(tensors)
        ex = self.plan(index)
        where = f"exchange {index} (step {self.step})"
        wires = []
        snapshot = self._with_delta(tensors)
        for i, b in enumerate(buckets):  # bucket 0 is on the wire while 1 is packed
            encode_(b, [snapshot[j] for j in b.indices])
            wires.append(self.transport.start([b.send], [b.recv], ex, index, where, i, self._salt))
        if ex.send_to is not None:
            self.bytes_sent_last_step = sum(b.nbytes for b in buckets)
        self._pending.append(_Pending(index, wires, ex, buckets, self._layout))
        if self.options.sync:
            for wire in wires:
                self._wait(wire)

    def _new_buckets(self, tensors: list[torch.Tensor]) -> list[Bucket]:
        """More buffers than cadence plans for: a skipped step left an exchange unmixed."""
        o = self.options
        return make_buckets(tensors, o.bucket_cap_bytes, o.wire_dtype, keep_snapshot=self._outer)

    def _relayout(self, tensors: list[torch.Tensor]) -> None:
        """The replica's tensors changed (a buffer created, replaced by another shape, or
        resized after wrapping): the exchanges in flight were packed from the old shapes and
        cannot be mixed, so they complete unmixed (every rank makes the same change at the same
        step, so every pair skips its mix and the mean is kept) and new buffers are made (and
        the outer step restarts from the replica, on every rank at this step)."""
        while self._pending:
            pending = self._pending.popleft()
            for wire in pending.wires:
                self._wait(wire)
        self._rebuild(tensors)

    def _mix(self, pending: _Pending, *, into_delta: bool = False) -> None:
        """Wait for ``pending`` and mix it into the replica (``into_delta``: into the delta
        that the next step end adds, when the replica must not change now)."""
        ex = pending.ex
        tensors = self.mixed_tensors()
        same = _layout_of(tensors) == pending.layout
        if pending.differences is not None:
            self._mix_resumed(pending, self._delta if into_delta else tensors)
            return
        if into_delta and same:
            if self._delta is None:
                self._delta = [torch.zeros_like(t) for t in tensors]
            tensors = self._delta
        weight = delayed_weight(ex.weight, self.options.max_staleness)
        for b, wire in zip(pending.buckets, pending.wires, strict=True):
            self._wait(wire)
            if not same or (ex.recv_from is None and not self._outer):
                continue
            own = [tensors[i] for i in b.indices]
            if self._outer:
                self._outer_step(b, own, pending)
                continue
            if not mix_residual_(own, b.send, b.recv, weight, require_finite=True, scratch=b.stage):
                what = "local" if is_finite(b.recv) else "received"  # which one is not finite
                self._nonfinite(what, ex.recv_from, pending.index)
        if same:  # else the buffers go: the next exchange makes new ones (``_relayout``)
            self._free.append(pending.buckets)

    def _outer_step(self, b: Bucket, own: list[torch.Tensor], pending: _Pending) -> None:
        """Bucket ``b`` of exchange ``pending``, received: its outer step into ``own``."""
        ex = pending.ex
        diff = None
        if ex.recv_from is not None:
            diff = difference(b.send, b.recv, own[0].dtype, sum(b.numels))
            if not is_finite(diff):
                what = "local" if is_finite(b.recv) else "received"
                self._nonfinite(what, ex.recv_from, pending.index)
                return
        self._outer_step_bucket(b, own, sent_values(b), diff, ex.weight)

    def _outer_step_bucket(
        self,
        b: Bucket,
        own: list[torch.Tensor],
        snapshot: torch.Tensor,
        diff: torch.Tensor | None,
        weight: float,
    ) -> None:
        o = self.options
        slow = [self._slow[i] for i in b.indices]
        momentum = [self._momentum[i] for i in b.indices]
        outer_step_(own, slow, momentum, snapshot, diff, weight, o.outer_lr, o.outer_momentum)

    @torch.no_grad()
    def _mix_resumed(self, pending: _Pending, tensors: list[torch.Tensor] | None) -> None:
        """Mix an exchange resumed from a checkpoint (its differences were saved per bucket of
        the same layout)."""
        outer = self._outer and pending.snapshots is not None
        if not outer and (pending.ex.recv_from is None or not pending.differences):
            return
        if tensors is None:  # into a delta that does not exist yet
            self._delta = tensors = [torch.zeros_like(t) for t in self.mixed_tensors()]
        weight = delayed_weight(pending.ex.weight, self.options.max_staleness)
        differences: list[torch.Tensor | None] = [None] * len(self.buckets)
        if pending.differences:
            differences = list(pending.differences)
        for k, (b, diff) in enumerate(zip(self.buckets, differences, strict=True)):
            own = [tensors[i] for i in b.indices]
            if diff is not None and not is_finite(diff):
                self._nonfinite("received", pending.ex.recv_from, pending.index)
                continue
            if outer and pending.snapshots is not None:
                diff = None if diff is None else diff.to(own[0].dtype)
                snapshot = pending.snapshots[k].to(own[0].dtype)
                self._outer_step_bucket(b, own, snapshot, diff, weight)
            elif diff is not None:
                torch._foreach_add_(own, views(diff.to(own[0].dtype), own), alpha=-weight)

    def _wait(self, wire: Wire) -> None:
        began = time.perf_counter()
        try:
            wire.wait(self.options.timeout, self.rank)
        finally:
            self.wait_time_s += time.perf_counter() - began

    def plan(self, index: int) -> Exchange:
        o = self.options
        return plan(self.rank, index, self.world_size, o.seed, o.schedule)

    # --- gradient tracking --------------------------------------------------------------------

    @torch.no_grad()
    def offset_gradient(self, param: torch.Tensor) -> None:
        """Called when ``param``'s gradient has accumulated (a backward hook): the first time in
        a step, add ``y - g_last``, so that the optimizer steps along the tracked direction
        ``y + g - g_last`` (gradient accumulation is additive, so the offset may be added at any
        backward of the step). A parameter without a gradient this step gets none."""
        i = self._index.get(id(param))
        if i is None or id(param) in self._offset or param.grad is None:
            return
        self._offset[id(param)] = i
        param.grad.add_(self._trackers[i]).sub_(self._last_grads[i])

    @torch.no_grad()
    def _track(self) -> None:
        """``y <- g_used`` and ``g_last <- g_used - (y - g_last)`` for the parameters whose
        gradient was offset this step (the others keep their tracker)."""
        for pid, i in self._offset.items():
            p = self._tracked[i]
            if p.grad is None or id(p) != pid:
                continue
            y, last = self._trackers[i], self._last_grads[i]
            last.sub_(y).add_(p.grad)  # g_last <- g_used - y + g_last
            y.copy_(p.grad)

    # --- gradients mode -----------------------------------------------------------------------

    def start_gradients(self, *, zeros: bool = False) -> tuple[Exchange, list[Wire]]:
        """Gradients mode, at the end of a backward: send this rank's gradients (``zeros``: a
        rank that has joined) and receive its partner's."""
        tensors = self.mixed_tensors()
        if _layout_of(tensors) != self._layout:
            self._rebuild(tensors)
        index = self._grad_exchanges
        self._grad_exchanges += 1
        ex = self.plan(index)
        where = f"gradient exchange {index} (step {self.step})"
        wires = []
        for i, b in enumerate(self.buckets):
            pack_(b.send, [_grad(tensors[j], zeros) for j in b.indices])
            wires.append(self.transport.start([b.send], [b.recv], ex, index, where, i, self._salt))
        self.bytes_sent_last_step = sum(b.nbytes for b in self.buckets) if ex.send_to else 0
        return ex, wires

    @torch.no_grad()
    def finish_gradients(
        self, started: tuple[Exchange, list[Wire]], *, zeros: bool = False
    ) -> None:
        """Average this rank's gradients with the partner's: ``g <- (1 - w) g + w g_r``."""
        ex, wires = started
        for wire in wires:
            self._wait(wire)
        if ex.recv_from is None or zeros:
            return
        tensors = self.mixed_tensors()
        for t in tensors:
            if t.grad is None and t.requires_grad:
                t.grad = torch.zeros_like(t)
        for b in self.buckets:
            if not is_finite(b.recv):
                self._nonfinite("received", ex.recv_from, self._grad_exchanges - 1)
                continue
            offset = 0
            for i in b.indices:  # a parameter without a gradient (frozen) takes none
                n, grad = tensors[i].numel(), tensors[i].grad
                if grad is not None:
                    mix_([grad], b.recv[offset : offset + n], ex.weight)
                offset += n

    # --- state ----------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What a checkpoint needs to resume exactly: the step and what the schedule depends on,
        the gradient exchanges made (gradients mode: they pick the partners), and with tracking
        the trackers and last gradients; the exchanges in flight, waited for but not mixed
        (their differences ``s - r``, and with an outer step their snapshots ``s``), the delta
        of a skipped step, and the outer step's slow weights and momentum, so that a checkpoint
        changes nothing in the run it is taken from."""
        out = schedule_state(self.step, self.options)
        out["world_size"] = self.world_size
        out["due"] = self._due
        out["in_flight"] = [self._saved(pending) for pending in self._pending]
        if self._delta is not None:
            out["delta"] = [t.detach().cpu().clone() for t in self._delta]
        if self.options.mode == "gradients":
            out["grad_exchanges"] = self._grad_exchanges
        if self._trackers:
            out["trackers"] = [t.detach().cpu().clone() for t in self._trackers]
            out["last_grads"] = [t.detach().cpu().clone() for t in self._last_grads]
        if self._outer:
            out["slow_weights"] = [t.detach().cpu().clone() for t in self._slow]
            out["outer_momentum"] = [t.detach().cpu().clone() for t in self._momentum]
        return out

    @torch.no_grad()
    def load_state(self, state: dict[str, Any]) -> None:
        """Resume from ``state()``. Trackers saved without tracking on now are dropped; tracking
        turned on at a resume starts from zero trackers, as a fresh run does. Likewise the
        outer step: turned on at a resume, it starts from the replica as loaded."""
        self.step = load_schedule_state(state, self.options)
        self._grad_exchanges = int(state.get("grad_exchanges", self.step))
        if self._outer and "slow_weights" not in state:
            self.reset_outer()
        for name, mine in (
            ("trackers", self._trackers),
            ("last_grads", self._last_grads),
            ("slow_weights", self._slow),
            ("outer_momentum", self._momentum),
        ):
            saved = state.get(name)
            if saved is None or not mine:
                continue
            _check_trackers(saved, mine, name)
            moved = [t.to(device=m.device, dtype=m.dtype) for t, m in zip(saved, mine, strict=True)]
            torch._foreach_copy_(mine, moved)
        self._resume_in_flight(state)

    def _saved(self, pending: _Pending) -> dict[str, Any]:
        """Exchange ``pending``, waited for: its plan and, per bucket, ``s - r`` in the
        replica's dtype (what its mix adds, times ``-w``)."""
        for wire in pending.wires:
            self._wait(wire)
        ex, tensors = pending.ex, self.mixed_tensors()
        differences = pending.differences or []
        if pending.differences is None and ex.recv_from is not None:
            differences = [
                difference(b.send, b.recv, tensors[b.indices[0]].dtype, sum(b.numels)).cpu()
                for b in pending.buckets
            ]
        saved = {
            "index": pending.index,
            "send_to": -1 if ex.send_to is None else ex.send_to,
            "recv_from": -1 if ex.recv_from is None else ex.recv_from,
            "weight": ex.weight,
            "differences": differences,
        }
        if self._outer:
            snapshots = pending.snapshots
            if snapshots is None:
                snapshots = [sent_values(b).detach().cpu().clone() for b in pending.buckets]
            saved["snapshots"] = snapshots
        return saved

    def _resume_in_flight(self, state: dict[str, Any]) -> None:
        """The exchanges in flight and the delta of a saved state, on the same ranks; resumed on
        another number of ranks they are dropped (their mixes sum to zero over the ranks, so the
        mean they would have kept is kept)."""
        self._pending.clear()
        self._delta = None
        if int(state.get("world_size", self.world_size)) != self.world_size:
            return
        self._due = int(state.get("due", self._due))
        device = self._layout[0][2] if self._layout else torch.device("cpu")
        for saved in state.get("in_flight", []):
            ex = Exchange(
                None if saved["send_to"] < 0 else int(saved["send_to"]),
                None if saved["recv_from"] < 0 else int(saved["recv_from"]),
                float(saved["weight"]),
            )
            differences = [d.to(device) for d in saved["differences"]]
            snapshots = saved.get("snapshots") if self._outer else None
            if snapshots is not None:
                snapshots = [s.to(device) for s in snapshots]
            self._pending.append(
                _Pending(int(saved["index"]), [], ex, [], self._layout, differences, snapshots)
            )
        if state.get("delta") is not None:
            here = self.mixed_tensors()
            self._delta = [d.to(t.device) for d, t in zip(state["delta"], here, strict=True)]

    # --- errors ----------------------------------------------------------------------------------

    def _nonfinite(self, what: str, source: int | None, index: int) -> None:
        """Raise ``NonFiniteError``, or warn (``on_nonfinite="skip"``: the caller skips)."""
        where = (
            "its own parameters" if what == "local" else f"parameters received from rank {source}"
        )
        message = (
            f"rank {self.rank} found NaN or inf in {where} at exchange {index} (step "
            f"{self.step}): training has diverged (lower the learning rate, add gradient "
            "clipping, or check the data)"
        )
        if self.options.wire_dtype is torch.float16:
            message += (
                "; or a finite value beyond float16's range (65504) was sent as inf: "
                "wire_dtype=torch.bfloat16 (--wire-dtype bfloat16) keeps float32's range"
            )
        if self.options.on_nonfinite == "raise":
            raise NonFiniteError(
                message + "; on_nonfinite='skip' would skip such exchanges",
                source=None if what == "local" else source,
                step=index,
            )
        warnings.warn(message + "; skipping this exchange", RuntimeWarning, stacklevel=4)

    # --- membership ------------------------------------------------------------------------------

    def change_membership(
        self,
        transport: Transport,
        rank: int,
        world_size: int,
        *,
        step: int | None = None,
        tracked: Sequence[torch.Tensor] = (),
    ) -> None:
        """Gossip among another set of ranks from now on (``gossipgrad.elastic``): this replica
        is ``rank`` of ``world_size`` and its messages go through ``transport``.

        The exchanges in flight are dropped unmixed, without waiting (a partner may be gone).
        Each exchange's mixes sum to zero over the ranks that took part, so dropping one on
        every rank keeps the replicas' mean; the mixes already made with a rank that left are
        not undone, so the survivors' mean differs from their mean before those exchanges by
        about the consensus distance (the departed replica's share of them). What a skipped
        step left to add is dropped too. The schedule is re-planned for ``world_size``
        (``gossipgrad.schedule`` plans any size); buffers, gradient trackers (``tracked``: the
        parameters to follow, as when wrapping) and the outer step's slow weights start afresh,
        as when wrapping, on every rank alike. The step counter is kept, or set to ``step``;
        the totals (``wait_time_s``) are kept."""
        kept = (self.step if step is None else step, self.wait_time_s)
        self._pending.clear()  # the works (and the group they hold) go with them
        StepEngine.__init__(
            self, self._tensors, self.options, rank, world_size, transport, tracked=tracked
        )
        self.step, self.wait_time_s = kept


def schedule_state(step: int, options: GossipOptions) -> dict[str, Any]:
    """The step and what the schedule depends on, for a checkpoint."""
    return {"step": step, "schedule": options.schedule, "seed": options.seed}


def load_schedule_state(state: dict[str, Any], options: GossipOptions) -> int:
    """The step to resume at, after checking that ``state`` follows the same schedule."""
    for key in ("schedule", "seed"):
        mine = getattr(options, key)
        if state.get(key, mine) != mine:
            raise ValueError(
                f"checkpoint was made with {key}={state[key]!r} but this run uses "
                f"{key}={mine!r}: resume with the same {key}"
            )
    return int(state["step"])


def _check_trackers(
    saved: Sequence[torch.Tensor], mine: Sequence[torch.Tensor], name: str = "trackers"
) -> None:
    """Refuse saved trackers (or outer-step state) that are not one per tensor, of its shape."""
    pairs = zip(saved, mine, strict=False)
    differ = next((i for i, (s, m) in enumerate(pairs) if s.shape != m.shape), None)
    if len(saved) == len(mine) and differ is None:
        return
    where = ""
    if differ is not None:
        shapes = tuple(saved[differ].shape), tuple(mine[differ].shape)
        where = f" (#{differ}: {shapes[0]} saved, {shapes[1]} here)"
    what, of = "gradient trackers", "tracked parameters"
    if name not in ("trackers", "last_grads"):
        what, of = f"outer-step {name.replace('_', ' ')}", "mixed tensors"
    raise ValueError(
        f"checkpoint holds {what} for {len(saved)} tensors that do not fit this "
        f"model's {len(mine)} {of}{where}: resume the same model"
    )


def _outer_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where the outer step runs: the tensor's dtype, float32 at least."""
    return torch.promote_types(dtype, torch.float32)


def _layout_of(tensors: Sequence[torch.Tensor]) -> Layout:
    return tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)


def _grad(p: torch.Tensor, zeros: bool) -> torch.Tensor:
    if zeros or p.grad is None:
        return torch.zeros_like(p)
    return p.grad
