"""``GossipDataParallel``: data parallelism where each rank talks to one partner per step.

Used exactly like ``DistributedDataParallel``::

    model = GossipDataParallel(module)          # parameters broadcast from rank 0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in loader:
        loss = loss_fn(model(x), y)
        loss.backward()                          # .grad: this rank's own gradient
        optimizer.step(); optimizer.zero_grad()  # the partner's replica is mixed in here
    model.average_replicas()                     # one all-reduce: every rank holds the mean

**A step ends inside** ``optimizer.step()``, as parameters change only there in a single-process
loop and under DDP (``gossipgrad._clock``: torch's optimizer hooks). In the default ``params``
mode, at the end of step ``t`` (``gossipgrad._engine``):

1. the exchange that left at the end of step ``t - 1`` (the snapshot ``s`` of this rank's
   replica then, sent to ``send_to`` while ``recv_from``'s snapshot ``r`` came in,
   ``gossipgrad.schedule``) is waited for and mixed in residual form ``x <- x + w (r - s)``
   (``gossipgrad.mixing``), which keeps the optimizer step just taken: ``x' = W x - lr g(x)``;
2. the new replica is snapshotted and put on the wire; it travels while step ``t + 1``'s
   forwards and backwards compute (gloo's own threads move the bytes).

Forwards and backwards never change a parameter, whatever their number, the module's
``train()``/``eval()`` mode, ``no_sync()``, autocast or activation checkpointing (reentrant or
not); SAM's perturb-and-restore, closures (LBFGS, Lightning), several optimizers over disjoint
parameters and ``load_state_dict`` between steps are safe. ``.grad`` after backward is this
rank's own gradient (DDP's is the average over ranks): gradient clipping, gradient-norm logging
and NaN checks see the local gradient.

``max_staleness=S`` mixes each exchange ``S`` steps later, so a rank waits for a slow partner
only when its message is more than ``S`` steps overdue; up to ``S + 1`` exchanges are in
flight. ``sync=True`` waits for each exchange as soon as it is sent (same arithmetic; with an
outer step, ``outer_lr``/``outer_momentum``, it also mixes each exchange at once, so that the
outer step follows the local steps as in DiLoCo: ``gossipgrad._engine``).
``mode="gradients"`` (for comparison only: replicas drift apart) averages the gradients with the
partner's at the end of each backward instead, ``g <- (1 - w) g + w g_r``.

Uneven inputs: run the loop inside ``with model.join():`` (torch's ``Join``), and a rank out of
data keeps answering its partners until every rank is done. ``close()`` (or ``with
GossipDataParallel(...) as model:``) completes the exchange in flight and removes every hook.

Per step a rank sends one message stream to one rank and receives one from one rank (several
buckets, same partner), with no collective. Tensors: floating-point (and complex, as their real
view) parameters and buffers are mixed, read afresh at every exchange (a buffer created or
resized after wrapping, on every rank alike, is followed); integer ones stay local; float
buffers that are non-finite when wrapping (a causal mask of ``-inf``) are constants, left out of
mixing and averaging. All tensors are broadcast from rank 0 when wrapping.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.join import Join, Joinable, JoinHook

from gossipgrad import _setup
from gossipgrad._clipping import AverageNormEstimate
from gossipgrad._clock import StepClock
from gossipgrad._engine import StepEngine
from gossipgrad._transport import Detached, GroupTransport
from gossipgrad.collectives import (
    DeferredAverage,
    Scratch,
    average_,
    broadcast_,
    consensus_distance,
    world_group,
)
from gossipgrad.mixing import constant_buffers, make_buckets, replica_tensors, tracked_parameters
from gossipgrad.options import GossipOptions


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
        self.group = process_group if process_group is not None else world_group()
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        _setup.check_device(module, self.group)
        # one gather: the same architecture and the same options (and DDP keywords) everywhere
        agreed = _setup.settings(o, _setup.ddp_settings(ddp, ("broadcast_buffers", "init_sync")))
        _setup.check_same_setup(module, self.group, o.timeout, agreed)
        self._constants = constant_buffers(module)
        # broadcast_buffers=False: buffers are not mixed while training (they stay local, as
        # DDP's do) but still averaged at the end, so that one model is exported
        keep_local = ddp.get("broadcast_buffers", True) is False
        self._unmixed = frozenset(n for n, _ in module.named_buffers()) if keep_local else None
        if ddp.get("init_sync", True):
            everything = [_real(t) for t in list(module.parameters()) + list(module.buffers())]
            broadcast_(
                everything, make_buckets(everything, o.bucket_cap_bytes), self.group, o.timeout
            )
        self._engine = StepEngine(
            self._mixed,
            o,
            self.rank,
            self.world_size,
            GroupTransport(self.group, _setup.extra_groups(self.group, o.streams, o.timeout)),
            tracked=tracked_parameters(module),
        )
        # float32-or-wider scratch for the collectives (the gossip buffers may be compressed)
        self._scratch = Scratch(o.bucket_cap_bytes)
        self._deferred = DeferredAverage()  # the exact average of a skipped step
        self._norms: AverageNormEstimate | None = None  # clip_grad_norm_'s estimate
        gradients = o.mode == "gradients" and self.world_size > 1
        tracking = bool(self._engine._tracked)
        self._clock: StepClock | None = StepClock(
            module,
            on_step_end=_setup.WeakHook(self._step_ended),
            on_step_skipped=_setup.WeakHook(self._step_skipped),
            on_grad=_setup.WeakHook(self._engine.offset_gradient) if tracking else None,
            on_backward_end=_setup.WeakHook(self._exchange_gradients) if gradients else None,
            rank=self.rank,
        )
        self._load_hook = module.register_load_state_dict_pre_hook(
            _setup.WeakHook(self._before_load)
        )
        self._loaded_hook = module.register_load_state_dict_post_hook(
            _setup.WeakHook(self._after_load)
        )
        # called with each step's end (gossipgrad.elastic: the membership check); see _through_hook
        self.step_hook: Callable[[Callable[[], None]], None] | None = None

    # --- the training step -------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @property
    def step(self) -> int:
        """Steps ended so far (optimizer steps of this model, and skipped ones)."""
        return self._engine.step

    @step.setter
    def step(self, value: int) -> None:
        self._engine.step = value

    @property
    def bytes_sent_last_step(self) -> int:
        """Bytes this rank put on the wire when its last step ended."""
        return self._engine.bytes_sent_last_step

    @property
    def wait_time_s(self) -> float:
        """Seconds spent blocked on partners' messages, in total."""
        return self._engine.wait_time_s

    def _step_ended(self) -> None:
        """Inside ``optimizer.step()``, after the update: mix what is due, average when due,
        and put the new replica on the wire."""
        if self.options.mode == "params":
            Join.notify_join_context(self)
        self._through_hook(self._finish_and_begin)

    def _through_hook(self, step_end: Callable[[], None]) -> None:
        """Run a step's end through ``step_hook`` when one is set: ``hook(step_end)`` calls
        ``step_end`` or, after a membership change, begins the next step itself
        (``gossipgrad.elastic``)."""
        if self.step_hook is None:
            step_end()
        else:
            self.step_hook(step_end)

    def _finish_and_begin(self) -> None:
        self._engine.finish_step()
        self._deferred.apply(self._replicas())
        if self._engine.average_due():
            self.average_replicas()
        self._engine.begin_next_step()

    def _step_skipped(self) -> None:
        """A backward began after a step whose gradients were discarded without an optimizer
        step on this rank: keep the schedule; change nothing now."""
        if self.options.mode == "params":
            Join.notify_join_context(self)
        self._through_hook(self._skip)

    def _skip(self) -> None:
        if self._engine.average_due():
            tensors = self._replicas()
            self._deferred.take(tensors, self._scratch(tensors), self.group, self.options.timeout)
        self._engine.skip_step()

    def _exchange_gradients(self, zeros: bool = False) -> None:
        """Gradients mode, at the end of a backward outside ``no_sync``."""
        if not zeros:
            Join.notify_join_context(self)
        self._engine.finish_gradients(self._engine.start_gradients(zeros=zeros), zeros=zeros)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients as DDP's ``clip_grad_norm_(model.parameters(), max_norm)`` clips
        the average over ranks, without communicating: against an estimate of the norm of the
        rank-average gradient (``gossipgrad._clipping``; ranks must see different data). With
        ``tracking=True``, ``.grad`` already estimates the average and is clipped against its own
        norm. Returns the norm clipped against, as torch's ``clip_grad_norm_`` does."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self._engine._tracked or self.world_size == 1:
            return nn.utils.clip_grad_norm_(params, max_norm)
        grads = [p.grad for p in params if p.grad is not None]
        if self._norms is None:
            self._norms = AverageNormEstimate(self.world_size)
        norm = self._norms.update(grads)
        coefficient = max_norm / (norm + 1e-6)
        if coefficient < 1:
            torch._foreach_mul_(grads, coefficient)
        return torch.tensor(norm)

    def step_ended(self) -> None:
        """End the step by hand, for a loop that updates parameters without a torch optimizer:
        call it after each update (on every rank). Loops with an optimizer never call it."""
        if self._clock is not None:
            self._clock.end_step()

    def flush(self) -> None:
        """Complete the exchange in flight, if any, and mix it in now rather than at the end of
        the next optimizer step. Call it between steps (before evaluating or saving a
        replica); ``average_replicas``, ``consensus_distance`` and ``load_state_dict`` call it.
        """
        self._catch_up()
        self._engine.flush()
        self._deferred.apply(self._replicas())

    def _catch_up(self) -> None:
        """At a collective between steps: a backward since the last optimizer step means that
        step was skipped on this rank (``GradScaler``); count it, as its partners counted
        theirs (this changes no parameter)."""
        if self._clock is not None and self._clock.take_unfinished():
            self._step_skipped()

    def _before_load(self, *_args: Any) -> None:
        """A ``load_state_dict`` completes the exchange in flight first, so that what it loads
        is not shifted afterwards by a residual of the replicas from before the load."""
        self.flush()

    def _after_load(self, *_args: Any) -> None:
        """The outer step's slow weights restart from what was loaded (``load_gossip_state``
        after it restores saved ones)."""
        self._engine.reset_outer()

    # --- replicas ------------------------------------------------------------------------------

    def consensus_distance(self) -> float:
        """``RMS_i ||x_i - mean|| / ||mean||`` over parameters and float buffers of the replicas
        as they stand (collective: every rank calls it at the same point); ``nan`` if a replica
        is not finite. The exchange in flight stays in flight, so measuring changes nothing."""
        self._catch_up()
        tensors = self._replicas()
        return consensus_distance(tensors, self._scratch(tensors), self.group, self.options.timeout)

    def average_replicas(self, into: nn.Module | None = None) -> None:
        """Set every replica to the exact average of all replicas (collective, one all-reduce;
        the exchange in flight is completed first); with ``into`` (a module like this one), write
        the average there and leave the replicas and the exchange in flight as they are (mixing
        keeps the replicas' mean, so the average is the same either way)."""
        if into is None:
            self.flush()
        else:
            self._catch_up()
        target = None if into is None else replica_tensors(into, self._constants)
        tensors = self._replicas()
        average_(tensors, self._scratch(tensors), self.group, target, self.options.timeout)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backwards inside are not the step's own (gradient accumulation, SAM's first pass), as
        with DDP's ``no_sync``; the step still ends at the optimizer's step."""
        clock = self._clock
        previous = clock.synced if clock is not None else True
        if clock is not None:
            clock.synced = False
        try:
            yield
        finally:
            if clock is not None:
                clock.synced = previous

    def gossip_state(self) -> dict[str, Any]:
        """What a checkpoint needs to resume exactly: the step, what the schedule depends on,
        the trackers, the exchange in flight, waited for but not mixed, and ``clip_grad_norm_``'s
        estimate, so that taking a checkpoint changes nothing in the run (collective: every rank
        calls it at the same point, between steps)."""
        self._catch_up()
        state = self._engine.state()
        if self._norms is not None:
            state["clip_norm_estimate"] = self._norms.state_dict()
        return state

    def load_gossip_state(self, state: dict[str, Any]) -> None:
        self._engine.load_state(state)
        self._norms = None
        if "clip_norm_estimate" in state:
            self._norms = AverageNormEstimate(self.world_size)
            self._norms.load_state_dict(state["clip_norm_estimate"])

    def change_group(self, group: dist.ProcessGroup | None, *, step: int | None = None) -> None:
        """Gossip in ``group`` from now on: a membership change (``gossipgrad.elastic``). The
        exchanges in flight are dropped unmixed, without waiting (a partner may be gone);
        ``None`` lets go of the current group, so that ``destroy_process_group`` closes its
        connections, until a later call gives the new one. With a group, the schedule is
        re-planned over its ranks (``StepEngine.change_membership``) and step ``step`` (default:
        the current one) begins: its exchange leaves now. Every rank of ``group`` calls it at
        the same point with the same ``step``, at a step's end or between steps; parameters
        do not change."""
        o = self.options
        began = self.step if step is None else step
        self._deferred = DeferredAverage()
        self._norms = None
        if group is None:
            # detached between generations: nothing uses the group until the next call
            self.group = None  # type: ignore[assignment]
            self._engine.change_membership(Detached(), 0, 1, step=began)
            return
        self.group, self.rank = group, dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        streams = _setup.extra_groups(group, o.streams, o.timeout)
        self._engine.change_membership(
            GroupTransport(group, streams),
            self.rank,
            self.world_size,
            step=began - 1,
            tracked=tracked_parameters(self.module),
        )
        self._engine.begin_next_step()

    # --- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Complete the exchange in flight, remove every hook this wrapper put on torch and on
        the module, and free the buffers: ``module`` is a plain module again. Every rank calls
        it at the same point (the last exchange completes with the partner)."""
        if self._clock is None:
            return
        self.flush()
        self._clock.close()
        self._clock = None
        self._load_hook.remove()
        self._loaded_hook.remove()
        self._engine.close()

    def __enter__(self) -> GossipDataParallel:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        elif self._clock is not None:  # an error: leave without waiting for partners
            self._clock.close()
            self._clock = None
            self._load_hook.remove()
            self._loaded_hook.remove()

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

    def _replicas(self) -> list[torch.Tensor]:
        """What consensus and averaging cover: parameters and float buffers, less constants."""
        return replica_tensors(self.module, self._constants)

    def _mixed(self) -> list[torch.Tensor]:
        """What the engine exchanges: the replica (less local buffers with
        ``broadcast_buffers=False``), or the parameters (gradients mode)."""
        if self.options.mode == "gradients":
            return [p for p in self.module.parameters() if p.is_floating_point()]
        if self._unmixed is not None:
            return replica_tensors(self.module, self._unmixed)
        return self._replicas()


class _GossipJoinHook(JoinHook):
    """What a rank that ran out of data does while others still train: each time they end a
    step, it ends the same step with its replica as it stands (no gradient)."""

    def __init__(self, engine: GossipDataParallel) -> None:
        self.engine = engine

    def main_hook(self) -> None:
        if self.engine.options.mode == "gradients":
            self.engine._exchange_gradients(zeros=True)
        else:
            self.engine._finish_and_begin()

    def post_hook(self, is_last_joiner: bool) -> None:
        self.engine.flush()


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t
