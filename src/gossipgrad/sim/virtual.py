"""The virtual cluster: ``p`` replicas in one process, mixed by the engine's own schedule and code.

    cluster = VirtualCluster(model, 16, lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9))
    for epoch, ids in replica_batches(y_train, 16, epochs=5, batch_size=16):
        cluster.train_step([(x_train[i], y_train[i]) for i in ids], F.cross_entropy)
    print(cluster.consensus_distance())
    cluster.average_replicas()                  # every replica = the exact mean, as runs end

For studying convergence against ``p`` (up to 64 with a small model), schedule, staleness and data
shuffle without ``p`` processes. The step's logic is the engine's own
(``gossipgrad._engine``): partners from ``gossipgrad.schedule.plan``, buffers and mixing from
``gossipgrad.mixing``; a message is a copy of the partner's send buffer into this replica's
receive buffer. Step ``t``, with ``w`` the plan's weight:

- ``algo="gossip", mode="params"`` (``sync`` or overlapped: the same arithmetic, only the timing
  differs in the engine): each replica has its own ``gossipgrad._engine.StepEngine``, driven as
  ``GossipDataParallel`` drives it. At the end of step ``t-1`` every replica snapshotted its
  parameters and float buffers ``s`` and "sent" them; forward, backward and the optimizer step
  run; then the source's snapshot ``r`` is mixed in residual form ``x <- x + w (r - s)`` (which
  keeps the optimizer's step and what the forward changed in the buffers): ``x' = W x - lr
  g(x)``; then the new snapshot is sent.
- with an outer step (``outer_lr``, ``outer_momentum``): each mix is the engine's outer step
  (``gossipgrad.mixing.outer_step_``); overlapped, on the snapshot sent ``gossip_every`` steps
  earlier, and with ``sync=True`` at once, after every replica has sent (DiLoCo's timing), as
  ``GossipDataParallel`` with ``sync=True`` does.
- ``algo="gossip", mode="gradients"``: after backward, ``g <- (1 - w) g + w g_r`` with the
  source's gradients, then the optimizer step. Buffers stay local.
- ``algo="allreduce"``: gradients are averaged over all replicas before the optimizer step, and
  replica 0's buffers are copied to the others before each forward (DDP's ``broadcast_buffers``).

Data (``replica_batches``): each replica draws batches from its own shard, strided (iid when the
dataset order is random) or label-skewed, and, with ``shuffle_fraction > 0``, sends that fraction
of its shard's ids to its gossip partner every epoch. The shards are planned by
``gossipgrad._shuffle_plan.simulate``, the reference that ``GossipShuffleSampler`` matches.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from torch import nn

from gossipgrad._engine import StepEngine
from gossipgrad._shuffle_plan import label_skew_shards, simulate, strided_shard
from gossipgrad.mixing import replica_tensors, tracked_parameters
from gossipgrad.options import GossipOptions
from gossipgrad.schedule import Exchange, plan

ALGOS = ("gossip", "allreduce")  # what the virtual cluster simulates

PARTITIONS = ("iid", "label-skew")

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
LossFn = Callable[[Any, Any], torch.Tensor]


class VirtualCluster:
    """``world_size`` replicas of ``module`` (deep copies, all equal at the start), each with its
    own optimizer from ``make_optimizer(replica.parameters())`` (``None``: the caller updates
    the replicas and calls ``step_ended``). ``options`` (or keyword overrides) are the engine's
    ``GossipOptions``: ``mode``, ``sync``, ``schedule``, ``seed``, ``bucket_cap_mb`` and the
    outer step act as in ``gossipgrad.wrap`` (see the module docstring); the options of the wire
    (timeout, streams, on_nonfinite) do not apply; ``wire_dtype`` rounds the payloads as the
    engine does. ``replicas[i]`` plays rank ``i``; ``engines[i]`` is its step engine."""

    def __init__(
        self,
        module: nn.Module,
        world_size: int,
        make_optimizer: OptimizerFactory | None,
        options: GossipOptions | None = None,
        *,
        algo: str = "gossip",
        **overrides: Any,
    ) -> None:
        if algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {algo!r}")
        o = self.options = GossipOptions.build(options, **overrides)
        plan(0, 0, world_size, o.seed, o.schedule)  # checks world_size against the schedule
        self.world_size = world_size
        self.algo = algo
        self.sync, self.mode, self.schedule, self.seed = o.sync, o.mode, o.schedule, o.seed
        self.step = 0
        self.replicas = [copy.deepcopy(module) for _ in range(world_size)]
        make = make_optimizer
        self.optimizers = [make(r.parameters()) for r in self.replicas] if make else []
        # one engine per replica, as each rank has; messages are copies between them. Waiting
        # early (sync) changes no arithmetic, and a replica here cannot wait for one that has
        # not sent yet, so the engines overlap.
        mailbox: dict[tuple[int, int, int], torch.Tensor] = {}
        engine_options = replace(o, sync=False)
        self.engines = [
            StepEngine(
                functools.partial(self._mixed, i),
                engine_options,
                i,
                world_size,
                _MemoryTransport(mailbox, i),
                tracked=tracked_parameters(r),
                touch=False,
            )
            for i, r in enumerate(self.replicas)
        ]

    @property
    def _trackers(self) -> list[list[torch.Tensor]]:
        """Each replica's gradient trackers (empty without tracking)."""
        return [e._trackers for e in self.engines if e._trackers]

    # --- the training step -------------------------------------------------------------------

    def train_step(self, batches: Sequence[tuple[Any, Any]], loss_fn: LossFn) -> list[float]:
        """One step of every replica: ``batches[i] = (input, target)`` is replica ``i``'s
        mini-batch. Returns each replica's loss."""
        if not self.optimizers:
            raise ValueError(
                "this cluster has no optimizers (make_optimizer=None): update the replicas "
                "yourself and call step_ended() after each update"
            )
        if len(batches) != self.world_size:
            raise ValueError(
                f"train_step got {len(batches)} batches for {self.world_size} replicas: "
                "give one (input, target) pair per replica"
            )
        if self.algo == "allreduce":
            self._broadcast_buffers()
        losses = []
        for replica, engine, (x, y) in zip(self.replicas, self.engines, batches, strict=True):
            loss = loss_fn(replica(x), y)
            loss.backward()
            losses.append(loss.item())
            for p in engine._tracked:  # what the engine's backward hooks do
                engine.offset_gradient(p)
        if self.algo == "allreduce":
            self._average_grads()
        elif self.mode == "gradients":
            started = [e.start_gradients() for e in self.engines]
            for e, s in zip(self.engines, started, strict=True):
                e.finish_gradients(s)
        for opt in self.optimizers:
            opt.step()
        self.step_ended()  # what the engine's hook runs at the end of each optimizer step
        for opt in self.optimizers:
            opt.zero_grad()
        return losses

    def step_ended(self) -> None:
        """End every replica's step, once the replicas were updated (by ``train_step``, or by
        the caller, as ``GossipDataParallel.step_ended`` for a loop without a torch optimizer:
        e.g. one optimizer over parameters that are views of tensors stacked over the
        replicas, for speed): mix what is due, average when due, start the next exchanges."""
        if self._gossips:
            for engine in self.engines:
                engine.finish_step()
            if self.engines[0].average_due():
                self.average_replicas()
            for engine in self.engines:
                engine.begin_next_step()
            if self.sync and self.options.outer_step:
                self.flush()  # what sync's engine does as each exchange starts
        self.step += 1

    def gossip(self) -> None:
        """One exchange, mixed at once, with no local computation (params mode only): what a
        training step does to the replicas when the optimizer does not move them."""
        if not (self._gossips and self.mode == "params"):
            raise ValueError(
                "gossip() mixes parameters, so it needs algo='gossip' and mode='params'; "
                f"this cluster has algo={self.algo!r}, mode={self.mode!r}"
            )
        for e in self.engines:
            e.start_exchange(self.step)
        self.flush()
        self.step += 1
        for e in self.engines:
            e.step += 1

    def flush(self) -> None:
        """Mix in the exchanges in flight, as ``GossipDataParallel.flush``."""
        for e in self.engines:
            e.flush()

    @property
    def _gossips(self) -> bool:
        return self.algo == "gossip"

    @torch.no_grad()
    def _average_grads(self) -> None:
        for group in zip(*(r.parameters() for r in self.replicas), strict=True):
            if not group[0].requires_grad:
                continue
            mean = torch.stack([_grad(p) for p in group]).mean(0)
            for p in group:
                p.grad = mean.clone()

    @torch.no_grad()
    def _broadcast_buffers(self) -> None:
        first = list(self.replicas[0].buffers())
        for replica in self.replicas[1:] if first else []:
            torch._foreach_copy_(list(replica.buffers()), first)

    def _mixed(self, i: int) -> list[torch.Tensor]:
        """What replica ``i`` exchanges, as ``GossipDataParallel._mixed``."""
        replica = self.replicas[i]
        if self.mode == "gradients":
            return [p for p in replica.parameters() if p.is_floating_point()]
        return replica_tensors(replica)

    # --- replicas ------------------------------------------------------------------------------

    @torch.no_grad()
    def consensus_distance(self) -> float:
        """``RMS_i ||x_i - mean|| / ||mean||`` over parameters and float buffers of the replicas
        as they stand, as ``GossipDataParallel.consensus_distance`` (0 when every replica is the
        same; the exchanges in flight stay in flight)."""
        flats = torch.stack(
            [torch.cat([t.reshape(-1).double() for t in replica_tensors(r)]) for r in self.replicas]
        )
        mean = flats.mean(0)
        norm = mean.norm().item()
        spread = (flats - mean).square().sum(1).mean().sqrt().item()
        return spread / norm if norm > 0 else 0.0

    @torch.no_grad()
    def average_replicas(self) -> None:
        """Set every replica's parameters and float buffers to the exact mean over replicas."""
        self.flush()
        for group in zip(*(replica_tensors(r) for r in self.replicas), strict=True):
            mean = torch.stack(group).mean(0)
            for t in group:
                t.copy_(mean)

    @torch.no_grad()
    def mean_module(self) -> nn.Module:
        """A new module holding the mean of the replicas (integer buffers from replica 0),
        leaving the replicas and the exchanges in flight as they are (mixing keeps the mean)."""
        out = copy.deepcopy(self.replicas[0])
        for i, t in enumerate(replica_tensors(out)):
            t.copy_(torch.stack([replica_tensors(r)[i] for r in self.replicas]).mean(0))
        return out


def replica_batches(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    world_size: int,
    *,
    epochs: int,
    batch_size: int,
    partition: str = "iid",
    shuffle_fraction: float = 0.0,
    seed: int = 0,
    schedule: str = "dissemination",
) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """Yield ``(epoch, ids)`` per training step, ``ids[i]`` the sample ids of replica ``i``'s
    mini-batch (the last batch of an epoch may be short; every replica has the same count).

    ``partition``: ``"iid"`` gives replica ``i`` ids ``i, i + p, ...`` (``GossipShuffleSampler``'s
    default), ``"label-skew"`` gives it a run of ids sorted by label (``label_skew_shards``).
    ``shuffle_fraction``: the share of its shard a replica sends to its partner of
    ``plan(rank, epoch, p, seed, schedule)`` each epoch, as ``GossipShuffleSampler`` does."""
    labels = np.asarray(labels)
    if partition not in PARTITIONS:
        raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
    if not 0.0 <= shuffle_fraction <= 1.0:
        raise ValueError(f"shuffle_fraction must be in [0, 1], got {shuffle_fraction!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
    if len(labels) < world_size:
        raise ValueError(
            f"{len(labels)} samples cannot be split over {world_size} replicas: "
            "use fewer replicas or more data"
        )
    if partition == "iid":
        shards = [strided_shard(len(labels), r, world_size) for r in range(world_size)]
    else:
        shards = label_skew_shards(labels, world_size)
    epoch_plans = simulate(
        shards, epochs, seed=seed, fraction=shuffle_fraction, schedule=schedule, shuffle=True
    )
    for epoch, per_replica in enumerate(epoch_plans):
        visited = [torch.from_numpy(ids) for _, ids in per_replica]
        for k in range(math.ceil(len(visited[0]) / batch_size)):
            yield epoch, [v[k * batch_size : (k + 1) * batch_size] for v in visited]


def _grad(p: torch.Tensor) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


class _MemoryTransport:
    """Messages between the replicas of one process: a send is a copy put in the shared
    mailbox, a receive takes it out (the schedule's contract: every message has one sender and
    one receiver that agree)."""

    def __init__(self, mailbox: dict[tuple[int, int, int], torch.Tensor], rank: int) -> None:
        self.mailbox, self.rank = mailbox, rank

    def start(
        self,
        sends: list[torch.Tensor],
        recvs: list[torch.Tensor],
        ex: Exchange,
        index: int,
        where: str,
        first: int,
        salt: int,
    ) -> _MemoryWire:
        if ex.send_to is not None:
            for k, s in enumerate(sends):
                self.mailbox[(index, self.rank, first + k)] = s.clone()
        return _MemoryWire(self.mailbox, recvs, ex.recv_from, (index, first), where)


class _MemoryWire:
    def __init__(
        self,
        mailbox: dict[tuple[int, int, int], torch.Tensor],
        recvs: list[torch.Tensor],
        source: int | None,
        at: tuple[int, int],
        where: str,
    ) -> None:
        self.mailbox, self.recvs, self.source, self.at = mailbox, recvs, source, at
        self.where = where

    def wait(self, timeout: timedelta, rank: int) -> None:
        index, first = self.at
        if self.source is None:
            return
        for k, r in enumerate(self.recvs):
            sent = self.mailbox.pop((index, self.source, first + k), None)
            if sent is None:
                raise RuntimeError(
                    f"schedule inconsistency at {self.where}: replica {rank} receives from "
                    f"{self.source}, which sent it nothing"
                )
            r.copy_(sent)
