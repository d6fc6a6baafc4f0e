"""``HierarchicalDataParallel``: all-reduce inside each node, gossip between nodes.

The layout Bagua and BlueFog use by default. Ranks on one node average their gradients with an
all-reduce over their fast local links (PyTorch DDP over a per-node group), so the ranks of a node
always hold the same replica. One leader per node (its lowest rank: ``LOCAL_RANK`` 0 under
torchrun) gossips that replica with the other nodes' leaders (``GossipDataParallel`` over the
leaders' group: one partner per step, overlapped by default), and the node's other ranks take the
mixed replica from their leader (a broadcast inside the node). Across nodes, per step, one model's
worth of bytes leaves each node, whatever the number of ranks on it::

    model = HierarchicalDataParallel(module)     # node layout from torchrun's environment
    for x, y in loader:
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step(); optimizer.zero_grad()
    model.average_replicas()                     # one all-reduce: every rank holds the mean

A step ends inside ``optimizer.step()``, as for ``GossipDataParallel`` (``gossipgrad._clock``);
DDP all-reduces the gradients inside the node during backward, so the node's ranks take the same
optimizer step; then the leader runs the step engine (``gossipgrad._engine``: it mixes the
exchange due and sends its new replica, which travels during the next step), and when it mixed,
the node's ranks receive the mixed parameters and floating-point buffers from it. With one node
this is plain DDP; with one rank per node, plain gossip. DDP's keywords
(``find_unused_parameters``, ...) go to the DDP inside the node.

Node layout: ``ranks_per_node=k`` groups global ranks ``[0, k)``, ``[k, 2k)``, ... (to emulate
nodes on one machine, or under a launcher other than torchrun); left out, it is read from
torchrun's environment (``GROUP_RANK`` names the node, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` are
checked).

``flush``, ``consensus_distance`` and ``average_replicas`` are collectives: every rank calls them at
the same point, as with the other wrappers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gossipgrad import _setup, cadence
from gossipgrad._clock import StepClock
from gossipgrad._engine import StepEngine, load_schedule_state, schedule_state
from gossipgrad._transport import GroupTransport
from gossipgrad.collectives import (
    DeferredAverage,
    Scratch,
    average_,
    broadcast_,
    consensus_distance,
    gather_object,
    world_group,
)
from gossipgrad.mixing import constant_buffers, make_buckets, replica_tensors
from gossipgrad.options import GossipOptions

_ENV = ("GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")  # what torchrun tells about the node


@dataclass
class _Engines:
    """The wrappers doing the work, kept out of ``nn.Module``'s registry so that the state dict
    holds ``module.*`` once (as DDP's does), not once per wrapper."""

    ddp: DistributedDataParallel | None  # gradients inside the node (None: one rank per node)
    gossip: StepEngine | None  # the leader's gossip (None: not a leader, or one node)


class HierarchicalDataParallel(nn.Module):
    """Wrap ``module`` for hierarchical training (see the module docstring).

    Args:
        module: the model, on the device its rank trains on.
        ranks_per_node: ranks per node; consecutive global ranks share a node. Default: the node
            layout of torchrun's environment.
        options: the options of the gossip between leaders (``GossipOptions``; keywords
            override single ones, as for ``GossipDataParallel``); ``bucket_cap_mb`` also sizes
            DDP's buckets. ``mode="params"`` only, without ``tracking`` or an outer step.

    Attributes: ``nodes`` (each node's global ranks), ``node`` (this rank's node index),
    ``is_leader``, ``node_group`` and ``leaders_group`` (process groups), ``step``.
    """

    def __init__(
        self,
        module: nn.Module,
        options: GossipOptions | None = None,
        *,
        ranks_per_node: int | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        _setup.check_initialised("HierarchicalDataParallel")
        if "process_group" in overrides:
            raise ValueError(
                "HierarchicalDataParallel builds its own process groups (one per node, one of the "
                "leaders): leave process_group out"
            )
        ddp_options = {k: overrides.pop(k) for k in list(overrides) if k in _setup.DDP_KEYWORDS}
        self.options = o = GossipOptions.build(options, **overrides)
        if o.mode != "params" or o.tracking:
            raise ValueError(
                "HierarchicalDataParallel supports mode='params' without tracking only, got "
                f"mode={o.mode!r}, tracking={o.tracking!r}: use GossipDataParallel for those"
            )
        if o.outer_step:
            raise ValueError(
                f"rank {dist.get_rank()}: HierarchicalDataParallel has no outer step (got "
                f"outer_lr={o.outer_lr}, outer_momentum={o.outer_momentum}; its checkpoints "
                "would not hold the leaders' slow weights): leave outer_lr=1 and "
                "outer_momentum=0, or use GossipDataParallel"
            )
        self.module = module
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        # one gather over the world: the node layout, and the same options everywhere
        agreed = _setup.settings(o, _setup.ddp_settings(ddp_options))
        self.nodes = _layout(ranks_per_node, self.world_size, agreed, o.timeout)
        self.node = next(i for i, ranks in enumerate(self.nodes) if self.rank in ranks)
        self.is_leader = self.rank == self.nodes[self.node][0]
        # Every rank creates every group, in the same order (torch.distributed's rule).
        self.node_group, _ = dist.new_subgroups_by_enumeration(self.nodes)
        leaders = [ranks[0] for ranks in self.nodes]
        self.leaders_group = dist.new_group(leaders)
        self.step = 0
        self._owed = False  # a skipped step left a mix for the next step end
        self._constants = constant_buffers(module)
        self._scratch = Scratch(o.bucket_cap_bytes)
        self._deferred = DeferredAverage()

        node_size = len(self.nodes[self.node])
        gossip = None
        if len(self.nodes) > 1:
            streams = [self.leaders_group] + [dist.new_group(leaders) for _ in range(o.streams - 1)]
            gossip = _on_leader(
                lambda: self._leader_engine(o, streams if o.streams > 1 else None),
                self.is_leader,
                self.node_group,
            )
        ddp = None
        if node_size > 1:
            ddp = DistributedDataParallel(
                module, process_group=self.node_group, bucket_cap_mb=o.bucket_cap_mb, **ddp_options
            )
        self._engines = _Engines(ddp=ddp, gossip=gossip)
        self._clock: StepClock | None = None
        if len(self.nodes) > 1:
            self._clock = StepClock(
                module,
                on_step_end=_setup.WeakHook(self._step_ended),
                on_step_skipped=_setup.WeakHook(self._step_skipped),
                what="HierarchicalDataParallel",
                rank=self.rank,
            )

    def _leader_engine(
        self, o: GossipOptions, streams: list[dist.ProcessGroup] | None
    ) -> StepEngine:
        """The leader's side of the gossip between nodes (broadcast from the first leader)."""
        module, group = self.module, self.leaders_group
        _setup.check_device(module, group)
        _setup.check_same_model(module, group, o.timeout)
        everything = [_real(t) for t in list(module.parameters()) + list(module.buffers())]
        broadcast_(everything, make_buckets(everything, o.bucket_cap_bytes), group, o.timeout)
        return StepEngine(
            self._replicas,
            o,
            dist.get_rank(group),
            dist.get_world_size(group),
            GroupTransport(group, streams),
        )

    # --- the training step -------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        compute = self._engines.ddp or self.module
        return compute(*args, **kwargs)

    def _step_ended(self) -> None:
        """Inside ``optimizer.step()``: the leader mixes what is due and the node's ranks take
        its replica; the exact average when due; the leader's next exchange leaves."""
        o, t, gossip = self.options, self.step, self._engines.gossip
        mixed = cadence.mixed_exchange(t, o.gossip_every, o.max_staleness) is not None
        if gossip is not None:
            gossip.finish_step()
        self._deferred.apply(self._replicas())
        if mixed or self._owed:
            self._share()
        self._owed = False
        if cadence.average_due(t, o.average_every):
            self.average_replicas()
        self.step += 1
        if gossip is not None:
            gossip.begin_next_step()

    def _step_skipped(self) -> None:
        """The node's step ended without an optimizer step (inside a backward: nothing may
        change now); what was due is mixed and shared at the next step end."""
        o, t, gossip = self.options, self.step, self._engines.gossip
        self._owed |= cadence.mixed_exchange(t, o.gossip_every, o.max_staleness) is not None
        if cadence.average_due(t, o.average_every):
            tensors = self._replicas()
            self._deferred.take(tensors, self._scratch(tensors), world_group(), o.timeout)
        self.step += 1
        if gossip is not None:
            gossip.skip_step()

    def _catch_up(self) -> None:
        """At a collective between steps: count a step whose optimizer step was skipped on this
        node (``GradScaler``), as the other nodes counted theirs (no parameter changes)."""
        if self._clock is not None and self._clock.take_unfinished():
            self._step_skipped()

    def step_ended(self) -> None:
        """End the step by hand, for a loop that updates parameters without a torch optimizer:
        call it after each update (on every rank). Loops with an optimizer never call it."""
        if self._clock is not None:
            self._clock.end_step()

    def _share(self) -> None:
        """Give the node's ranks the leader's parameters and floating-point buffers."""
        if len(self.nodes[self.node]) > 1:
            tensors = self._replicas()
            broadcast_(tensors, self._scratch(tensors), self.node_group, self.options.timeout)

    def flush(self) -> None:
        """Complete the leaders' exchange in flight, mix it in, and share the result within the
        node (collective). Call it between steps, before evaluating or saving a replica."""
        if len(self.nodes) == 1:
            return
        self._catch_up()
        if self._engines.gossip is not None:
            self._engines.gossip.flush()
        self._deferred.apply(self._replicas())
        self._share()

    @property
    def bytes_sent_last_step(self) -> int:
        """Bytes this rank sent to other nodes in the last step (the leader's gossip message; the
        all-reduce and broadcast inside the node are not counted)."""
        gossip = self._engines.gossip
        return gossip.bytes_sent_last_step if gossip is not None else 0

    # --- replicas ------------------------------------------------------------------------------

    def consensus_distance(self) -> float:
        """``RMS_i ||x_i - mean|| / ||mean||`` over all ranks' parameters and float buffers, as
        they stand (collective; the exchange in flight stays in flight)."""
        self._catch_up()
        tensors = self._replicas()
        return consensus_distance(
            tensors, self._scratch(tensors), world_group(), self.options.timeout
        )

    def average_replicas(self, into: nn.Module | None = None) -> None:
        """Set every rank's replica to the exact average over all ranks (collective; the
        exchange in flight is completed first); with ``into`` (a module like this one), write the
        average there and leave the replicas and the exchange in flight as they are."""
        if into is None:
            self.flush()
        else:
            self._catch_up()
        target = None if into is None else replica_tensors(into, self._constants)
        tensors = self._replicas()
        average_(tensors, self._scratch(tensors), world_group(), target, self.options.timeout)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backwards inside neither all-reduce gradients nor count as the step's own (gradient
        accumulation); the step still ends at the optimizer's step."""
        clock = self._clock
        previous = clock.synced if clock is not None else True
        if clock is not None:
            clock.synced = False
        ddp = self._engines.ddp
        try:
            with ddp.no_sync() if ddp is not None else contextlib.nullcontext():
                yield
        finally:
            if clock is not None:
                clock.synced = previous

    def _replicas(self) -> list[torch.Tensor]:
        return replica_tensors(self.module, self._constants)

    def gossip_state(self) -> dict[str, Any]:
        """What a checkpoint needs to resume the schedule exactly (the same keys as
        ``GossipDataParallel``'s). It completes the exchange in flight first (collective)."""
        self.flush()
        return schedule_state(self.step, self.options)

    def load_gossip_state(self, state: dict[str, Any]) -> None:
        self.step = load_schedule_state(state, self.options)
        if self._engines.gossip is not None:
            self._engines.gossip.load_state(state)

    def close(self) -> None:
        """Complete the exchange in flight and remove every hook (collective): ``module`` is a
        plain module again."""
        if self._clock is None and self._engines.ddp is None:
            return
        self.flush()
        if self._clock is not None:
            self._clock.close()
            self._clock = None
        if self._engines.gossip is not None:
            self._engines.gossip.close()
        self._engines = _Engines(ddp=None, gossip=None)

    def __enter__(self) -> HierarchicalDataParallel:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        elif self._clock is not None:  # an error: leave without waiting for the others
            self._clock.close()
            self._clock = None


def _layout(
    ranks_per_node: int | None, world: int, agreed: dict[str, str], timeout: timedelta
) -> list[list[int]]:
    """Each node's global ranks, in node order (collective over the world); every rank must have
    been given the same ``agreed`` settings (``_setup.settings``)."""
    torchrun = "GROUP_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", world)) == world
    mine = (ranks_per_node, tuple(int(os.environ[k]) for k in _ENV) if torchrun else None, agreed)
    everyone = gather_object(mine, None, world, timeout, "wrapping the model (the node layout)")
    if any(e[0] != ranks_per_node for e in everyone):
        raise ValueError(
            f"ranks disagree on ranks_per_node ({[e[0] for e in everyone]}): pass the same value "
            "on every rank"
        )
    _setup.check_same_settings([e[2] for e in everyone])
    if ranks_per_node is None:
        if any(e[1] is None for e in everyone):
            raise ValueError(
                "cannot tell which ranks share a node: launch with torchrun (which sets "
                "GROUP_RANK, LOCAL_RANK and LOCAL_WORLD_SIZE) or pass ranks_per_node"
            )
        return _nodes_from_env([e[1] for e in everyone])
    if (
        isinstance(ranks_per_node, bool)
        or not isinstance(ranks_per_node, int)
        or not 1 <= ranks_per_node <= world
        or world % ranks_per_node
    ):
        divisors = [k for k in range(1, world + 1) if world % k == 0]
        raise ValueError(
            f"ranks_per_node must divide the world size {world} (one of {divisors}), "
            f"got {ranks_per_node!r}"
        )
    return [list(range(s, s + ranks_per_node)) for s in range(0, world, ranks_per_node)]


def _nodes_from_env(env: list[tuple[int, int, int]]) -> list[list[int]]:
    """Group ranks by ``GROUP_RANK``, checking that each node's ``LOCAL_RANK`` values are
    ``0..LOCAL_WORLD_SIZE-1``; ``env[r]`` is rank ``r``'s ``(GROUP_RANK, LOCAL_RANK,
    LOCAL_WORLD_SIZE)``."""
    nodes: dict[int, list[int]] = {}
    for r, (node, _, _) in enumerate(env):
        nodes.setdefault(node, []).append(r)
    for node, ranks in nodes.items():
        local = sorted(env[r][1] for r in ranks)
        sizes = {env[r][2] for r in ranks}
        if local != list(range(len(ranks))) or sizes != {len(ranks)}:
            raise ValueError(
                f"torchrun's environment describes node {node} inconsistently (ranks {ranks}, "
                f"LOCAL_RANK {local}, LOCAL_WORLD_SIZE {sorted(sizes)}): pass ranks_per_node"
            )
    return [nodes[k] for k in sorted(nodes)]


def _on_leader(
    build: Callable[[], StepEngine], is_leader: bool, node_group: dist.ProcessGroup
) -> StepEngine | None:
    """``build()`` on the node's leader; if it raises, raise it on the node's other ranks too
    (they would otherwise wait for the leader forever)."""
    engine, error = None, None
    if is_leader:
        try:
            engine = build()
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank of the node
            error = exc
    if dist.get_world_size(node_group) > 1:
        box = [error]
        dist.broadcast_object_list(box, src=dist.get_global_rank(node_group, 0), group=node_group)
        error = box[0]
    if error is not None:
        raise error
    return engine


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t
