"""``GossipDataParallel``: data parallelism where each rank talks to one partner per step.

Used exactly like ``DistributedDataParallel``::

    model = GossipDataParallel(module)          # parameters broadcast from rank 0
    for x, y in loader:
        loss = loss_fn(model(x), y)
        loss.backward()                          # the received replica is mixed in here
        optimizer.step(); optimizer.zero_grad()
    model.average_replicas()                     # one all-reduce: every rank holds the mean

**One gossip step is one backward outside** ``no_sync()`` (like one all-reduce in DDP), whose
forward ran in training mode with gradients enabled. In the default ``params`` mode:

1. the first such forward snapshots the parameters (the result of the last optimizer step) into
   flat buffers and starts sending them to ``send_to`` while receiving ``recv_from``'s snapshot
   (``gossipgrad.schedule``); it changes nothing, so any number of forwards may follow. Step 0
   sends nothing: every replica is the same then, so its mix would add exactly zero
   (``gossipgrad.cadence``);
2. the exchange travels while forward and backward compute (gloo's own threads move the bytes);
3. at the end of backward (an autograd callback, where DDP finishes its all-reduce) the engine
   waits for it and mixes in residual form ``x <- x + w (r - s)`` (``gossipgrad.mixing``), which
   also keeps what the forward changed meanwhile (BatchNorm statistics); the optimizer step then
   applies the gradient computed at ``s``: ``x' = W x - lr g(x)``, staleness 0.

``max_staleness=S`` mixes each exchange ``S`` steps later (the end of the backward of step
``t + S``), so a rank waits for a slow partner only when its message is more than ``S`` steps
overdue; up to ``S + 1`` exchanges are in flight, each in buffers of its own. The weight shrinks
with ``S`` so that delayed mixing still contracts (``mixing.delayed_weight``).

``sync=True`` waits for the exchange in the forward instead of overlapping it (same arithmetic).
``mode="gradients"`` (for comparison only: replicas drift apart) averages the gradients with the
partner's at the end of backward instead, ``g <- (1 - w) g + w g_r``.

Parameters change only at the end of a backward and in the optimizer, as with DDP: several
forwards before one backward, autocast regions spanning forwards, and ``load_state_dict`` between
steps are all safe (a load first completes an exchange in flight). Uneven inputs: run the loop
inside ``with model.join():`` (torch's ``Join``), and a rank out of data keeps answering its
partners until every rank is done.

Per step a rank sends one message stream to one rank and receives one from one rank (several
buckets, same partner), with no collective. Tensors: floating-point (and complex, as their real
view) parameters and buffers are mixed; integer ones stay local; float buffers that are non-finite
when wrapping (a causal mask of ``-inf``) are constants, left out of mixing and averaging. All
tensors are broadcast from rank 0 when wrapping. In ``gradients`` mode buffers stay local until
``average_replicas``.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.join import Join, Joinable, JoinHook

from gossipgrad import _p2p, _setup, cadence
from gossipgrad.collectives import average_, broadcast_, consensus_distance
from gossipgrad.errors import NonFiniteError, PeerError
from gossipgrad.mixing import (
    Bucket,
    constant_buffers,
    delayed_weight,
    encode_,
    grads_of,
    is_finite,
    make_buckets,
    mix_,
    mix_residual_,
    pack_,
    replica_tensors,
    track_,
    tracked_parameters,
)
from gossipgrad.options import GossipOptions
from gossipgrad.schedule import Exchange, plan


class GossipDataParallel(nn.Module, Joinable):
    """Wrap ``module`` for GossipGraD data-parallel training (see the module docstring).

    Args:
        module: the model, on the device its rank trains on (CUDA for NCCL, CPU for gloo).
        options: the engine's options (``gossipgrad.options.GossipOptions``); default: the
            defaults. Keywords (``sync=True``, ...) override single options.
        process_group: the group to gossip in (default: the world). With ``streams > 1`` the
            extra groups come from ``torch.distributed.new_group``, which every rank of the world
            must call: with a group smaller than the world, the ranks outside it must call
            ``new_group(ranks)`` ``streams - 1`` times too.
        **keywords: ``GossipOptions`` fields, and DDP's constructor keywords, so that a DDP
            script switches by changing the class name: ``broadcast_buffers=False`` keeps float
            buffers local while training (not mixed; ``average_replicas`` still averages
            them), ``init_sync=False`` skips the broadcast from rank 0,
            ``device_ids``/``output_device`` must name the module's device, and the others
            (``find_unused_parameters``, ``static_graph``, ...) have no effect.
    """

    def __init__(
        self,
        module: nn.Module,
        options: GossipOptions | None = None,
        *,
        process_group: dist.ProcessGroup | None = None,
        **keywords: Any,
    ) -> None:
        super().__init__()
        Joinable.__init__(self)
        ddp = {k: keywords.pop(k) for k in list(keywords) if k in _setup.DDP_KEYWORDS}
        self.options = o = GossipOptions.build(options, **keywords)
        _setup.check_initialised("GossipDataParallel")
        ddp = _setup.ddp_keywords(module, ddp)
        self.module = module
        self.group = process_group if process_group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.step = 0
        self.bytes_sent_last_step = 0
        self.wait_time_s = 0.0  # seconds spent blocked on partners' messages, in total
        self._gossip_enabled = True
        # the exchanges in flight, oldest first (more than one with max_staleness)
        self._pending: deque[_Pending] = deque()
        self._open = False  # a step began (training forward) and its backward has not ended
        self._callback_queued = False  # the end-of-backward callback of this backward

        _setup.check_device(module, self.group)
        _setup.check_same_model(module, self.group, o.timeout)
        self._constants = constant_buffers(module)
        # gradient tracking: the tracked parameters, their trackers y and last gradients
        self._tracked = tracked_parameters(module)
        tracking = o.tracking and self.world_size > 1
        self._trackers = [torch.zeros_like(p) for p in self._tracked] if tracking else []
        self._last_grads = [torch.zeros_like(p) for p in self._trackers]
        # broadcast_buffers=False: buffers are not mixed while training (they stay local, as
        # DDP's do) but still averaged at the end, so that one model is exported
        keep_local = ddp.get("broadcast_buffers", True) is False
        self._unmixed = frozenset(n for n, _ in module.named_buffers()) if keep_local else None
        cap = o.bucket_cap_bytes
        if ddp.get("init_sync", True):
            everything = [_real(t) for t in list(module.parameters()) + list(module.buffers())]
            broadcast_(everything, make_buckets(everything, cap), self.group, o.timeout)
        # Every buffer pair the exchanges will use (exchange j uses slot j % buffers_in_flight),
        # allocated and touched now: a first touch costs a page fault per page (very slow in some
        # VMs), which would otherwise land in the steps of the first exchanges. A world of one
        # never exchanges, so its buffers stay untouched.
        slots = cadence.buffers_in_flight(o.gossip_every, o.max_staleness)
        tensors, touch = self._mixed_tensors(), self.world_size > 1
        self._pool = [make_buckets(tensors, cap, o.wire_dtype, zeroed=touch) for _ in range(slots)]
        self._buckets: list[Bucket] = self._pool[0]
        self._streams = _setup.extra_groups(self.group, o.streams)
        # float32-or-wider scratch for the collectives (the gossip buffers may be compressed)
        self._avg_buckets = make_buckets(self._replicas(), cap, at_least=torch.float32)
        if self.world_size > 1:
            for p in module.parameters():
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(_setup.WeakHook(self._on_grad_ready))
        module.register_load_state_dict_pre_hook(_setup.WeakHook(self._before_load))

    # --- the training step -------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._should_gossip() and not self.step_open:
            Join.notify_join_context(self)
            self.gossip_step()
        return self.module(*args, **kwargs)

    @property
    def step_open(self) -> bool:
        """Whether a gossip step has begun (a training forward) and its backward not ended."""
        return self._open

    def gossip_step(self) -> None:
        """Begin a step, as its first training forward does before computing: in ``params``
        mode, start the exchange if the step is due to send (``gossipgrad.cadence``); the end of
        the step's backward (``end_step``) completes it. For wrappers that compose the engine
        with other parallelism (``gossipgrad.hierarchical``); a plain loop never calls it."""
        o = self.options
        self._open = True
        self.bytes_sent_last_step = 0
        if o.mode == "params" and cadence.exchange_starts(self.step, o.gossip_every):
            self._start_params()
        self.step += 1

    def end_step(self, *, joined: bool = False) -> None:
        """End the open step, as the end of its backward does: mix the partner's replica in
        (or average gradients with it) when due, then the exact average when due. ``joined``: a
        rank that ran out of data, shadowing the step (``Join``)."""
        if not self._open:
            return
        self._open = False
        o, t = self.options, self.step - 1
        if o.mode == "gradients":
            self._exchange_grads(t, zeros=joined)
        elif (due := cadence.mixed_exchange(t, o.gossip_every, o.max_staleness)) is not None:
            self._mix_through(due)
        if self._trackers and not joined:
            track_(grads_of(self._tracked), self._trackers, self._last_grads)
        if cadence.average_due(t, o.average_every):
            self.average_replicas()

    def _should_gossip(self) -> bool:
        return (
            self.world_size > 1
            and self._gossip_enabled
            and self.module.training
            and torch.is_grad_enabled()
        )

    def _start_params(self) -> None:
        tensors = self._mixed_tensors()
        o = self.options
        index = cadence.exchange_index(self.step, o.gossip_every)
        ex = self._plan(index)
        buckets = self._buffers_for(index)
        inflights = []
        for i, b in enumerate(buckets):  # bucket 0 is on the wire while 1 is packed
            encode_(b, [tensors[j] for j in b.indices])
            inflights.append(self._start([b], ex, index, i))
        self.bytes_sent_last_step = self._payload_bytes(ex)
        self._pending.append(_Pending(index, inflights, ex, buckets))
        if o.sync:
            for inflight in inflights:
                self._wait(inflight)

    def _buffers_for(self, index: int) -> list[Bucket]:
        """Exchange ``index``'s buffers: its slot in the pool, which the exchange that used it
        before has left (``cadence.buffers_in_flight``)."""
        o = self.options
        buckets = self._pool[cadence.buffer_slot(index, o.gossip_every, o.max_staleness)]
        if any(p.buckets is buckets for p in self._pending):
            raise RuntimeError(
                f"rank {self.rank}: gossip exchange {index} found its buffers still in use; "
                "call flush() after changing the step counter by hand"
            )
        return buckets

    def _start(
        self, buckets: list[Bucket], ex: Exchange, exchange: int, first: int = 0
    ) -> _p2p.InFlight:
        return _p2p.start(
            [b.send for b in buckets],
            [b.recv for b in buckets],
            ex.send_to,
            ex.recv_from,
            exchange,
            self.group,
            streams=self._streams,
            index=first,
        )

    def _payload_bytes(self, ex: Exchange) -> int:
        return sum(b.nbytes for b in self._buckets) if ex.send_to is not None else 0

    def _on_grad_ready(self, _param: torch.Tensor) -> None:
        if self._open and not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        self.end_step()

    def flush(self) -> None:
        """Complete the exchange in flight, if any, and mix it in now rather than at the end of
        the next backward. Call it between steps (not between a forward and its backward).

        Buckets are mixed as they arrive, while later ones are still on the wire, in residual
        form ``x <- x + w (r - s)``: when nothing moved since the snapshot, ``x == s`` and it
        equals ``(1 - w) x + w r``; with a compressed wire dtype it still keeps the average."""
        self._mix_through(None)

    def _mix_through(self, index: int | None) -> None:
        """Wait for and mix the exchanges in flight up to exchange ``index`` (all: ``None``),
        oldest first."""
        while self._pending and (index is None or self._pending[0].index <= index):
            self._mix(self._pending.popleft())

    def _mix(self, pending: _Pending) -> None:
        ex = pending.ex
        weight = delayed_weight(ex.weight, self.options.max_staleness)
        tensors = self._mixed_tensors()
        for b, inflight in zip(pending.buckets, pending.inflights, strict=True):
            self._wait(inflight)
            if ex.recv_from is None:
                continue
            own = [tensors[i] for i in b.indices]
            mixed = mix_residual_(own, b.send, b.recv, weight, require_finite=True, scratch=b.stage)
            if not mixed:
                # s - r is not finite: the received buffer, or else this rank's own snapshot
                what = "local" if is_finite(b.recv) else "received"
                self._nonfinite(what, ex.recv_from, inflight.step)

    def _wait(self, inflight: _p2p.InFlight) -> None:
        began = time.perf_counter()
        try:
            inflight.wait(self.options.timeout, self.rank)
        except PeerError as exc:
            raise PeerError(_first_loss(exc, self.rank, inflight.step), exc.peer) from exc
        finally:
            self.wait_time_s += time.perf_counter() - began

    def _before_load(self, *_args: Any) -> None:
        """A ``load_state_dict`` completes the exchange in flight first, so that what it loads
        is not shifted afterwards by a residual of the replicas from before the load."""
        self.flush()

    # --- gradients mode ----------------------------------------------------------------------

    def _exchange_grads(self, step: int, zeros: bool = False) -> None:
        """Average gradients with the partner of step ``step``; ``zeros``: a rank that has
        joined sends zeros and keeps nothing (``Join``)."""
        params = self._mixed_tensors()
        grads = [_grad(p, zeros) for p in params]
        ex = self._plan(step)
        for b in self._buckets:
            pack_(b.send, [grads[i] for i in b.indices])
        self._wait(self._start(self._buckets, ex, step))
        self.bytes_sent_last_step = self._payload_bytes(ex)
        if ex.recv_from is None or zeros:
            return
        for b in self._buckets:
            if self._check_finite(b.recv, ex.recv_from, step):
                mix_([grads[i] for i in b.indices], b.recv, ex.weight)
        for p, g in zip(params, grads, strict=True):
            if p.grad is None and p.requires_grad:
                p.grad = g

    # --- replicas ------------------------------------------------------------------------------

    def consensus_distance(self) -> float:
        """``RMS_i ||x_i - mean|| / ||mean||`` over parameters and float buffers (collective:
        every rank must call it at the same point); ``nan`` if a replica is not finite."""
        self.flush()
        return consensus_distance(
            self._replicas(), self._avg_buckets, self.group, self.options.timeout
        )

    def average_replicas(self, into: nn.Module | None = None) -> None:
        """Set every replica to the exact average of all replicas (collective, one all-reduce);
        with ``into`` (a module like this one), write the average there and leave the replicas."""
        self.flush()
        target = None if into is None else replica_tensors(into, self._constants)
        average_(
            self._replicas(),
            self._avg_buckets,
            self.group,
            into=target,
            timeout=self.options.timeout,
        )

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Forwards inside do not gossip (gradient accumulation, like DDP's ``no_sync``)."""
        previous, self._gossip_enabled = self._gossip_enabled, False
        try:
            yield
        finally:
            self._gossip_enabled = previous

    def gossip_state(self) -> dict[str, Any]:
        """What a checkpoint needs to resume the schedule exactly (call after ``flush``)."""
        return schedule_state(self.step, self.options)

    def load_gossip_state(self, state: dict[str, Any]) -> None:
        self.step = load_schedule_state(state, self.options)

    # --- uneven inputs (torch.distributed.algorithms.Join) ------------------------------------

    def join(self, enable: bool = True, throw_on_early_termination: bool = False) -> Join:
        """``with model.join(): <loop>`` lets ranks run different numbers of steps: a rank that
        ran out of data keeps answering its partners' exchanges until every rank is done (as
        with DDP's ``join``). Each step inside costs one small all-reduce, as with DDP."""
        return Join([self], enable, throw_on_early_termination)

    def join_hook(self, **kwargs: Any) -> JoinHook:
        return _GossipJoinHook(self)

    @property
    def join_device(self) -> torch.device:
        tensors = list(self.module.parameters())
        return tensors[0].device if tensors else torch.device("cpu")

    @property
    def join_process_group(self) -> dist.ProcessGroup:
        return self.group

    # --- helpers ------------------------------------------------------------------------------

    def _plan(self, step: int) -> Exchange:
        return plan(self.rank, step, self.world_size, self.options.seed, self.options.schedule)

    def _replicas(self) -> list[torch.Tensor]:
        """What consensus and averaging cover: parameters and float buffers, less constants."""
        return replica_tensors(self.module, self._constants)

    def _mixed_tensors(self) -> list[torch.Tensor]:
        """What gossip mixes: the replica (and the gradient trackers), or only the parameters
        (gradients mode)."""
        if self.options.mode == "gradients":
            return [p for p in self.module.parameters() if p.is_floating_point()]
        if self._unmixed is not None:
            return replica_tensors(self.module, self._unmixed) + self._trackers
        return self._replicas() + self._trackers

    def _check_finite(self, flat: torch.Tensor, source: int, step: int) -> bool:
        """Whether ``flat``, received from ``source``, is finite (else raise or warn)."""
        if is_finite(flat):
            return True
        self._nonfinite("received", source, step)
        return False

    def _nonfinite(self, what: str, source: int, step: int) -> None:
        """Raise ``NonFiniteError``, or warn (``on_nonfinite="skip"``: the caller skips)."""
        where = (
            "its own parameters" if what == "local" else f"parameters received from rank {source}"
        )
        message = (
            f"rank {self.rank} found NaN or inf in {where} at gossip step {step}: training has "
            "diverged (lower the learning rate, add gradient clipping, or check the data)"
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
                step=step,
            )
        warnings.warn(message + "; skipping this exchange", RuntimeWarning, stacklevel=4)


@dataclass
class _Pending:
    """An exchange in flight: its index in the schedule, one ``InFlight`` per bucket, its plan
    and the buffers it uses."""

    index: int
    inflights: list[_p2p.InFlight]
    ex: Exchange
    buckets: list[Bucket]


class _GossipJoinHook(JoinHook):
    """What a rank that ran out of data does while others still train: each time they take a
    gossip step, it takes the same step with its replica as it stands (no gradient)."""

    def __init__(self, engine: GossipDataParallel) -> None:
        self.engine = engine

    def main_hook(self) -> None:
        self.engine.end_step()  # a forward without a backward left a step open
        self.engine.gossip_step()
        self.engine.end_step(joined=True)

    def post_hook(self, is_last_joiner: bool) -> None:
        self.engine.flush()


def schedule_state(step: int, options: GossipOptions) -> dict[str, Any]:
    """The gossip step and what the schedule depends on, for a checkpoint."""
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


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _grad(p: torch.Tensor, zeros: bool) -> torch.Tensor:
    if zeros or p.grad is None:
        return torch.zeros_like(p)
    return p.grad


def _first_loss(exc: PeerError, rank: int, step: int) -> str:
    """Record in the job's store that this rank lost ``exc.peer`` (unless a loss was already
    recorded), and add the first recorded loss to the message: when one rank dies, the ranks
    that fail after it, in cascade, still name the rank that was lost first."""
    mine = f"{exc.peer}:{rank}:{step}"
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=5))
        first = store.compare_set("gossipgrad/first_loss", "", mine).decode()
    except Exception:  # noqa: BLE001 - the store may be gone with the job; the message stands
        return str(exc)
    lost, seen_by, at = first.split(":") if first.count(":") == 2 else (exc.peer, rank, step)
    return f"{exc} [first loss in this job: rank {lost}, seen by rank {seen_by} at step {at}]"
