"""Pure planning for the gossip shuffle: initial shards, which samples leave, local visiting order.

Nothing here communicates. A rank's plan for an epoch depends only on its own shard size and on
``(seed, epoch, rank)``, so it never needs the whole dataset order; ``gossipgrad.sampler`` carries
the plan out over torch.distributed. ``simulate`` plays every rank at once, as a reference model
for tests.

Invariants: shards are disjoint and cover the dataset; every rank sends ``count`` samples to its
partner and receives ``count`` from its source each epoch (``count`` is the same on every rank),
so shard sizes never change; a rank visits its whole shard once per epoch, cycled to pad or cut
to ``length`` (the same on every rank), like ``DistributedSampler`` with ``drop_last``.

Balance mode (``GossipShuffleSampler(..., balance=True)``; ``simulate(..., speeds=...)``): shard
sizes follow the ranks' speeds, so that a slow rank holds fewer samples. At each epoch a rank
learns its partners' shard size ``n`` and speed ``v`` (a float64 header), and the rows that rank
``a`` sends to its partner ``b`` are ``balanced_count(n_a, v_a, n_b, v_b, base, minimum)``:

- ``base``: the count of the plain shuffle (``exchange_count`` of the initial sizes);
- plus ``move = trunc((n_a * v_b - n_b * v_a) / (2 (v_a + v_b)))``, half the move that makes
  ``n / v`` equal between the two (each rank is in two transfers per epoch, one out and one in,
  so the whole move would correct twice and oscillate); it is negative when ``b`` is the more
  loaded one, and then ``a`` sends it fewer than ``base`` rows, so a slow rank is not refilled
  by the plain shuffle;
- clamped to ``[0, n_a - minimum]``, ``minimum = min_shard(N, p) = max(1, ceil(N / (8 p)))``:
  a shard that holds at least ``minimum`` rows never drops below it, whatever it receives (one
  smaller from the start never sends).

Both ends of a pair compute the count from the same float64 inputs with the same function, so
they agree with no further message. Shards stay disjoint and covering, sizes change from epoch
to epoch, and a rank visits its whole shard exactly once per epoch (no padding, no cut:
``length`` is the shard's size), so every sample is visited exactly once per epoch.
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

    ``order``: positions visited this epoch, in order (``length`` of them); ``permutation``: the
    same before it was cycled or cut (each position once); ``leaving``: positions sent to
    ``send_to`` (sorted); ``keep``: the others (sorted). After the exchange the shard is
    ``shard[keep]`` followed by the ``received`` samples from ``recv_from``.
    """

    order: np.ndarray
    leaving: np.ndarray
    keep: np.ndarray
    send_to: int | None
    recv_from: int | None
    permutation: np.ndarray
    received: int


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


def min_shard(dataset_len: int, world_size: int) -> int:
    """The smallest shard that balance mode leaves a rank: ``max(1, ceil(N / (8 p)))``. It is at
    least the ``ceil(N / (p * batch_size))`` batches per epoch of a ``BalancedBatchSampler`` with
    ``batch_size >= 8``, so every batch of every rank holds a sample."""
    return max(1, -(-dataset_len // (8 * world_size)))


def balanced_count(
    n_from: float, v_from: float, n_to: float, v_to: float, base: int, minimum: int
) -> int:
    """Rows a rank holding ``n_from`` rows at speed ``v_from`` sends to its partner holding
    ``n_to`` at ``v_to`` in balance mode (see the module docstring): ``base`` plus half the
    (signed) move that equalises ``n / v`` between the two, clamped to
    ``[0, n_from - minimum]``. Pure and computed in float64 from the same inputs at both ends,
    so sender and receiver agree."""
    n_from, v_from, n_to, v_to = (float(np.float64(x)) for x in (n_from, v_from, n_to, v_to))
    move = math.trunc((n_from * v_to - n_to * v_from) / (2.0 * (v_from + v_to)))
    return max(0, min(base + move, int(n_from) - minimum))


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
    recv_count: int | None = None,
) -> EpochPlan:
    """``rank``'s plan for ``epoch``: its visiting order and the ``count`` positions it sends to
    its gossip partner (``gossipgrad.schedule.partners`` with ``step = epoch``); it receives
    ``recv_count`` rows from its source (default ``count``, as in the plain shuffle)."""
    send_to, recv_from = partners(rank, epoch, world_size, seed, schedule)
    if (send_to is None) != (recv_from is None):
        raise ValueError(
            f"schedule {schedule!r} makes rank {rank} send without receiving (or the reverse) "
            f"at step {epoch}: the shuffle needs a schedule where every rank does both"
        )
    order_seed, leave_seed = np.random.SeedSequence([seed, epoch, rank]).spawn(2)
    permutation = (
        np.random.default_rng(order_seed).permutation(shard_size)
        if shuffle
        else np.arange(shard_size)
    )
    order = np.resize(permutation, length)  # cycles to pad, cuts to drop
    moving = count if send_to is not None else 0
    if not 0 <= moving <= shard_size:
        raise ValueError(f"rank {rank} cannot send {moving} of its {shard_size} rows")
    leaving = np.sort(np.random.default_rng(leave_seed).choice(shard_size, moving, replace=False))
    stays = np.ones(shard_size, dtype=bool)
    stays[leaving] = False
    keep = np.flatnonzero(stays)
    received = 0 if recv_from is None else count if recv_count is None else recv_count
    return EpochPlan(order, leaving, keep, send_to, recv_from, permutation, received)


def balanced_plans(
    epoch: int,
    sizes: Sequence[int],
    speeds: Sequence[float],
    *,
    seed: int,
    base: int,
    minimum: int,
    shuffle: bool = True,
    schedule: str = "dissemination",
) -> list[EpochPlan]:
    """Every rank's plan for ``epoch`` in balance mode, from every rank's shard size and speed
    (what the distributed protocol computes, one rank at a time, from its partners' headers)."""
    world = len(sizes)
    plans = []
    for r in range(world):
        send_to, recv_from = partners(r, epoch, world, seed, schedule)
        send = recv = 0
        if send_to is not None and recv_from is not None:
            send = balanced_count(
                sizes[r], speeds[r], sizes[send_to], speeds[send_to], base, minimum
            )
            recv = balanced_count(
                sizes[recv_from], speeds[recv_from], sizes[r], speeds[r], base, minimum
            )
        plans.append(
            plan_epoch(
                r,
                epoch,
                sizes[r],
                world_size=world,
                seed=seed,
                count=send,
                length=sizes[r],
                shuffle=shuffle,
                schedule=schedule,
                recv_count=recv,
            )
        )
    return plans


def simulate(
    shards: Sequence[np.ndarray],
    epochs: int,
    *,
    seed: int = 0,
    fraction: float = 0.25,
    schedule: str = "dissemination",
    shuffle: bool = True,
    drop_last: bool = False,
    speeds: Sequence[float] | None = None,
) -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
    """Play every rank for ``epochs`` epochs; yield, per epoch, ``(shard, visited ids)`` for
    each rank. The reference the distributed implementation must match exactly.

    ``speeds``: play balance mode, ``speeds[r]`` being what rank ``r`` reports in every epoch
    (``report_speed``). As in the distributed protocol, epoch 0 is planned with speed 1.0 on
    every rank (nothing measured yet) and epoch ``e >= 1`` with the speeds measured in ``e - 1``;
    a rank visits its whole shard once (``drop_last`` does not apply)."""
    shards = [np.asarray(s, dtype=np.int64) for s in shards]
    world = len(shards)
    sizes = [s.size for s in shards]
    count, length = exchange_count(sizes, fraction), epoch_length(sizes, drop_last)
    if speeds is not None:
        check_speeds(speeds, world)
        minimum = min_shard(sum(sizes), world)
    for epoch in range(epochs):
        if speeds is not None:
            plans = balanced_plans(
                epoch,
                [s.size for s in shards],
                [1.0] * world if epoch == 0 else [float(v) for v in speeds],
                seed=seed,
                base=count,
                minimum=minimum,
                shuffle=shuffle,
                schedule=schedule,
            )
            yield [(s, s[p.order]) for s, p in zip(shards, plans, strict=True)]
            shards = [
                np.concatenate([s[p.keep], _received(shards, plans, p.recv_from)])
                for s, p in zip(shards, plans, strict=True)
            ]
            continue
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


def check_speeds(speeds: Sequence[float], world_size: int) -> None:
    if len(speeds) != world_size or not all(
        math.isfinite(float(v)) and float(v) > 0 for v in speeds
    ):
        raise ValueError(
            f"speeds must give one finite positive speed per rank ({world_size}), got {speeds!r}"
        )


def _received(shards: list[np.ndarray], plans: list[EpochPlan], source: int | None) -> np.ndarray:
    if source is None:
        return np.empty(0, dtype=np.int64)
    return shards[source][plans[source].leaving]
