"""Pure planning for the gossip shuffle: initial shards, which samples leave, local visiting order.

Nothing here communicates. A rank's plan for an epoch depends only on its own shard size and on
``(seed, epoch, rank)``, so it never needs the whole dataset order; ``gossipgrad.sampler`` carries
the plan out over torch.distributed. ``simulate`` plays every rank at once, as a reference model
for tests.

Invariants: shards are disjoint and cover the dataset; every rank sends ``count`` samples to its
partner and receives ``count`` from its source each epoch (``count`` is the same on every rank),
so shard sizes never change; a rank visits its whole shard once per epoch, cycled to pad or cut
to ``length`` (the same on every rank), like ``DistributedSampler`` with ``drop_last``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from gossipgrad.schedule import partners


@dataclass(frozen=True)
class EpochPlan:
    """One rank's part of one epoch, in positions of its current shard.

    ``order``: positions visited this epoch, in order (``length`` of them); ``leaving``: positions
    sent to ``send_to`` (sorted); ``keep``: the others (sorted). After the exchange the shard is
    ``shard[keep]`` followed by the ``count`` samples received from ``recv_from``.
    """

    order: np.ndarray
    leaving: np.ndarray
    keep: np.ndarray
    send_to: int | None
    recv_from: int | None


def strided_shard(dataset_len: int, rank: int, world_size: int) -> np.ndarray:
    """The default initial shard: ids ``rank, rank + p, ...`` (as ``DistributedSampler`` without
    shuffling); the first ``dataset_len % p`` ranks hold one more id than the others."""
    return np.arange(rank, dataset_len, world_size, dtype=np.int64)


def label_skew_shards(labels: Sequence[int] | np.ndarray, world_size: int) -> list[np.ndarray]:
    """Shards skewed by label: ids sorted by label (stably) and cut into ``world_size`` runs of
    balanced sizes, so each rank starts with only a few classes. Pass the result as
    ``GossipShuffleSampler(..., initial_shards=...)``."""
    order = np.argsort(np.asarray(labels), kind="stable").astype(np.int64)
    return list(np.array_split(order, world_size))


def check_shards(
    shards: Sequence[Sequence[int] | np.ndarray], dataset_len: int, world_size: int
) -> list[np.ndarray]:
    """Validate ``initial_shards``: one non-empty shard per rank, disjoint, covering the dataset."""
    if len(shards) != world_size:
        raise ValueError(
            f"initial_shards has {len(shards)} shards but the world size is {world_size}: "
            "give one list of sample ids per rank"
        )
    arrays = [np.asarray(s, dtype=np.int64).reshape(-1) for s in shards]
    empty = [r for r, a in enumerate(arrays) if a.size == 0]
    if empty:
        raise ValueError(f"initial_shards gives rank {empty[0]} no samples: every rank needs one")
    everything = np.sort(np.concatenate(arrays))
    if everything.size != dataset_len or not np.array_equal(everything, np.arange(dataset_len)):
        raise ValueError(
            f"initial_shards must be disjoint and cover ids 0..{dataset_len - 1} of the dataset "
            f"exactly once; they hold {everything.size} ids, {np.unique(everything).size} distinct"
        )
    return arrays


def exchange_count(shard_sizes: Sequence[int], fraction: float) -> int:
    """Samples each rank sends (and receives) per epoch: ``floor(fraction * smallest shard)``, the
    same on every rank so that no shard grows or shrinks."""
    if len(shard_sizes) < 2:
        return 0
    return math.floor(fraction * min(shard_sizes))


def epoch_length(shard_sizes: Sequence[int], drop_last: bool) -> int:
    """Samples each rank yields per epoch: the smallest shard with ``drop_last`` (the surplus is
    dropped), else the largest (smaller shards are padded by repeating their start)."""
    return min(shard_sizes) if drop_last else max(shard_sizes)


def plan_epoch(
    rank: int,
    epoch: int,
    shard_size: int,
    *,
    world_size: int,
    seed: int,
    count: int,
    length: int,
    shuffle: bool = True,
    schedule: str = "dissemination",
) -> EpochPlan:
    """``rank``'s plan for ``epoch``: its visiting order and the ``count`` positions it sends to
    its gossip partner (``gossipgrad.schedule.partners`` with ``step = epoch``)."""
    send_to, recv_from = partners(rank, epoch, world_size, seed, schedule)
    if (send_to is None) != (recv_from is None):
        raise ValueError(
            f"schedule {schedule!r} makes rank {rank} send without receiving (or the reverse) "
            f"at step {epoch}: the shuffle needs a schedule where every rank does both"
        )
    order_seed, leave_seed = np.random.SeedSequence([seed, epoch, rank]).spawn(2)
    order = (
        np.random.default_rng(order_seed).permutation(shard_size)
        if shuffle
        else np.arange(shard_size)
    )
    order = np.resize(order, length)  # cycles to pad, cuts to drop
    moving = count if send_to is not None else 0
    leaving = np.sort(np.random.default_rng(leave_seed).choice(shard_size, moving, replace=False))
    stays = np.ones(shard_size, dtype=bool)
    stays[leaving] = False
    keep = np.flatnonzero(stays)
    return EpochPlan(order, leaving, keep, send_to, recv_from)


def simulate(
    shards: Sequence[np.ndarray],
    epochs: int,
    *,
    seed: int = 0,
    fraction: float = 0.25,
    schedule: str = "dissemination",
    shuffle: bool = True,
    drop_last: bool = False,
) -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
    """Play every rank for ``epochs`` epochs; yield, per epoch, ``(shard, visited ids)`` for
    each rank. The reference the distributed implementation must match exactly."""
    shards = [np.asarray(s, dtype=np.int64) for s in shards]
    world = len(shards)
    sizes = [s.size for s in shards]
    count, length = exchange_count(sizes, fraction), epoch_length(sizes, drop_last)
    for epoch in range(epochs):
        plans = [
            plan_epoch(
                r,
                epoch,
                sizes[r],
                world_size=world,
                seed=seed,
                count=count,
                length=length,
                shuffle=shuffle,
                schedule=schedule,
            )
            for r in range(world)
        ]
        yield [(s, s[p.order]) for s, p in zip(shards, plans, strict=True)]
        shards = [
            np.concatenate([s[p.keep], _received(shards, plans, p.recv_from)])
            for s, p in zip(shards, plans, strict=True)
        ]


def _received(shards: list[np.ndarray], plans: list[EpochPlan], source: int | None) -> np.ndarray:
    if source is None:
        return np.empty(0, dtype=np.int64)
    return shards[source][plans[source].leaving]
