"""The virtual cluster: ``p`` replicas in one process, mixed by the engine's own schedule and code.

    cluster = VirtualCluster(model, 16, lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9))
    for epoch, ids in replica_batches(y_train, 16, epochs=5, batch_size=16):
        cluster.train_step([(x_train[i], y_train[i]) for i in ids], F.cross_entropy)
    print(cluster.consensus_distance())
    cluster.average_replicas()                  # every replica = the exact mean, as runs end

For studying convergence against ``p`` (up to 64 with a small model), schedule, staleness and data
shuffle without ``p`` processes. Partners come from ``gossipgrad.schedule.plan`` and replicas are
packed and mixed with ``gossipgrad.mixing`` (``make_buckets``, ``pack_``, ``mix_``,
``mix_residual_``), in the order ``GossipDataParallel`` uses; a message is a copy of the partner's
send buffer into this replica's receive buffer. Step ``t``, with ``w`` the plan's weight:

- ``algo="gossip", mode="params"`` (``sync`` or overlapped: the same arithmetic, only the timing
  differs in the engine): before the forward, every replica snapshots its parameters and float
  buffers ``s`` (the result of step ``t-1``) and "sends" it; forward and backward run; then the
  source's snapshot ``r`` is mixed in residual form ``x <- x + w (r - s)`` (which keeps what the
  forward changed in the buffers), and the optimizer step follows: ``x' = W x - lr g(x)``.
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
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from gossipgrad import cadence
from gossipgrad._shuffle_plan import label_skew_shards, simulate, strided_shard
from gossipgrad.mixing import (
    Bucket,
    delayed_weight,
    encode_,
    grads_of,
    make_buckets,
    mix_,
    mix_residual_,
    replica_tensors,
    track_,
    tracked_parameters,
)
from gossipgrad.options import GossipOptions
from gossipgrad.schedule import Exchange, plan

ALGOS = ("gossip", "allreduce")  # what the virtual cluster simulates

PARTITIONS = ("iid", "label-skew")

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
LossFn = Callable[[Any, Any], torch.Tensor]


class VirtualCluster:
    """``world_size`` replicas of ``module`` (deep copies, all equal at the start), each with its
    own optimizer from ``make_optimizer(replica.parameters())``. ``options`` (or keyword
    overrides) are the engine's ``GossipOptions``: ``mode``, ``sync``, ``schedule``, ``seed`` and
    ``bucket_cap_mb`` act as in ``gossipgrad.wrap`` (see the module docstring); the options of
    the wire (timeout, streams, on_nonfinite) do not apply; ``wire_dtype`` rounds the payloads
    as the engine does. ``replicas[i]`` plays rank ``i``."""

    def __init__(
        self,
        module: nn.Module,
        world_size: int,
        make_optimizer: OptimizerFactory,
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
        self.optimizers = [make_optimizer(r.parameters()) for r in self.replicas]
        # gradient tracking (as GossipDataParallel): per replica, its trackers and last gradients
        tracking = o.tracking and world_size > 1
        tracked = [tracked_parameters(r) for r in self.replicas] if tracking else []
        self._trackers = [[torch.zeros_like(p) for p in ps] for ps in tracked]
        self._last_grads = [[torch.zeros_like(p) for p in ps] for ps in tracked]
        cap = o.bucket_cap_bytes
        # exchange j uses slot j % buffers_in_flight, as in the engine: every slot made now
        self._pool: list[list[list[Bucket]]] = [
            [make_buckets(self._mixed(i), cap, o.wire_dtype) for i in range(world_size)]
            for _ in range(cadence.buffers_in_flight(o.gossip_every, o.max_staleness))
        ]
        self._buckets = self._pool[0]
        # overlapped: the exchanges in flight (index, plans, buffers), oldest first
        self._pending: deque[tuple[int, list[Exchange], list[list[Bucket]]]] = deque()

    # --- the training step -------------------------------------------------------------------

    def train_step(self, batches: Sequence[tuple[Any, Any]], loss_fn: LossFn) -> list[float]:
        """One step of every replica: ``batches[i] = (input, target)`` is replica ``i``'s
        mini-batch. Returns each replica's loss."""
        if len(batches) != self.world_size:
            raise ValueError(
                f"train_step got {len(batches)} batches for {self.world_size} replicas: "
                "give one (input, target) pair per replica"
            )
        o = self.options
        if self._gossips_params and cadence.exchange_starts(self.step, o.gossip_every):
            self._start_params()
        elif self.algo == "allreduce":
            self._broadcast_buffers()
        losses = []
        for replica, (x, y) in zip(self.replicas, batches, strict=True):
            loss = loss_fn(replica(x), y)
            loss.backward()
            losses.append(loss.item())
        due = cadence.mixed_exchange(self.step, o.gossip_every, o.max_staleness)
        while due is not None and self._pending and self._pending[0][0] <= due:
            self._finish()  # the end of backward: mix what was received
        for replica, trackers, last in zip(
            self.replicas, self._trackers, self._last_grads, strict=False
        ):
            track_(grads_of(tracked_parameters(replica)), trackers, last)
        if self.algo == "gossip" and cadence.average_due(self.step, o.average_every):
            self.average_replicas()
        if self.algo == "allreduce":
            self._average_grads()
        elif self.mode == "gradients":
            self._gossip_grads()
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad()
        self.step += 1
        return losses

    def gossip(self) -> None:
        """One gossip step with no local computation (params mode only): what a training step
        does to the replicas when the optimizer does not move them."""
        if not self._gossips_params:
            raise ValueError(
                "gossip() mixes parameters, so it needs algo='gossip' and mode='params'; "
                f"this cluster has algo={self.algo!r}, mode={self.mode!r}"
            )
        self._start_params()
        self.flush()
        self.step += 1

    def flush(self) -> None:
        """Mix in the exchange in flight, like ``GossipDataParallel`` at the end of backward."""
        while self._pending:
            self._finish()

    # --- mixing, in GossipDataParallel's order -------------------------------------------------

    @property
    def _gossips_params(self) -> bool:
        return self.algo == "gossip" and self.mode == "params"

    def _start_params(self) -> None:
        o = self.options
        index = cadence.exchange_index(self.step, o.gossip_every)
        slot = cadence.buffer_slot(index, o.gossip_every, o.max_staleness)
        tensors = [self._mixed(i) for i in range(self.world_size)]
        plans = self._exchange(tensors, index, self._pool[slot])
        self._pending.append((index, plans, self._pool[slot]))

    def _finish(self) -> None:
        _, plans, pool = self._pending.popleft()
        delay = self.options.max_staleness
        for i, (buckets, ex) in enumerate(zip(pool, plans, strict=True)):
            if ex.recv_from is None:
                continue
            tensors, weight = self._mixed(i), delayed_weight(ex.weight, delay)
            for b in buckets:
                own = [tensors[i] for i in b.indices]
                mix_residual_(own, b.send, b.recv, weight, scratch=b.stage)

    def _gossip_grads(self) -> None:
        params = [list(r.parameters()) for r in self.replicas]
        grads = [[_grad(p) for p in ps] for ps in params]
        plans = self._exchange(grads, self.step)
        for buckets, gs, ex in zip(self._buckets, grads, plans, strict=True):
            if ex.recv_from is not None:
                for b in buckets:
                    mix_([gs[i] for i in b.indices], b.recv, ex.weight)
        for ps, gs in zip(params, grads, strict=True):
            for p, g in zip(ps, gs, strict=True):
                if p.grad is None and p.requires_grad:
                    p.grad = g

    def _exchange(
        self,
        tensors: list[list[torch.Tensor]],
        index: int,
        pool: list[list[Bucket]] | None = None,
    ) -> list[Exchange]:
        """Pack every replica's ``tensors`` into its send buffers (``pool[i]``, default the first
        slot) and deliver each message: the receive buffers of replica ``i`` get the send
        buffers of ``plan(i, step).recv_from``."""
        pool = self._buckets if pool is None else pool
        plans = [
            plan(i, index, self.world_size, self.seed, self.schedule)
            for i in range(self.world_size)
        ]
        for own, buckets in zip(tensors, pool, strict=True):
            for b in buckets:
                encode_(b, [own[i] for i in b.indices])
        for i, ex in enumerate(plans):
            _check_pairing(i, ex, plans, self.step)
            if ex.recv_from is not None:
                for mine, theirs in zip(pool[i], pool[ex.recv_from], strict=True):
                    mine.recv.copy_(theirs.send)
        return plans

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
        """What replica ``i`` exchanges, as ``GossipDataParallel._mixed_tensors``."""
        replica = self.replicas[i]
        if self.mode == "gradients" or self.algo == "allreduce":
            return list(replica.parameters())
        return replica_tensors(replica) + (self._trackers[i] if self._trackers else [])

    # --- replicas ------------------------------------------------------------------------------

    @torch.no_grad()
    def consensus_distance(self) -> float:
        """``RMS_i ||x_i - mean|| / ||mean||`` over parameters and float buffers, as
        ``GossipDataParallel.consensus_distance`` (0 when every replica is the same)."""
        self.flush()
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
        leaving the replicas as they are."""
        self.flush()
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


def _check_pairing(rank: int, ex: Exchange, plans: list[Exchange], step: int) -> None:
    """Every message has one sender and one receiver that agree (the schedule's contract)."""
    bad = (ex.send_to is not None and plans[ex.send_to].recv_from != rank) or (
        ex.recv_from is not None and plans[ex.recv_from].send_to != rank
    )
    if bad:
        raise RuntimeError(
            f"schedule inconsistency at step {step}: rank {rank} sends to {ex.send_to} and "
            f"receives from {ex.recv_from}, but those ranks do not match it"
        )
