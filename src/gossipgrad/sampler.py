"""Asynchronous distributed shuffle (GossipGraD feature 4): samples travel between ranks.

Each rank starts with a disjoint shard of the dataset. In epoch ``e`` it visits its shard in a
seeded local order and, meanwhile, sends a ``shuffle_fraction`` of it to its gossip partner
(``gossipgrad.schedule.partners`` with ``step = e``) and receives as many from its source, with
non-blocking ``isend``/``irecv`` posted when the epoch starts and completed when the next one
starts: the training loop does not wait in the common case. The pure planning (which samples
leave, local order) lives in ``gossipgrad._shuffle_plan``, the shard and its exchange in
``gossipgrad._shard``.

Two forms:

- ``GossipShuffleSampler(dataset)``: a drop-in for ``DistributedSampler`` when every rank can read
  the whole dataset; sample ids travel::

      sampler = GossipShuffleSampler(train_set, shuffle_fraction=0.25)
      loader = DataLoader(train_set, batch_size=64, sampler=sampler)
      for epoch in range(epochs):
          sampler.set_epoch(epoch)          # completes last epoch's exchange, posts this one's
          for x, y in loader: ...
      sampler.flush()                       # before destroy_process_group

- ``GossipShuffleDataset(x_local, y_local)``: the data lives only on its own rank; the samples
  themselves travel (with their global ids). Use ``DataLoader(data, sampler=data.sampler)``.

Both are collective to build (every rank, same order): they make their own gloo group (so their
messages never mix with the training's) and check with one small ``all_gather`` that the ranks
agree. State is per rank: save ``state_dict()`` on every rank, resume with ``load_state_dict``.

Work balancing (``balance=True``, both forms): gossip steps in lockstep with partners, so one slow
rank would slow everyone. Instead, every rank takes the same number of steps per epoch and a fast
rank takes bigger batches: the shuffle moves samples from slow ranks to fast ones so that shard
sizes follow the ranks' speeds. Each rank reports its compute (``report_speed(samples,
busy_seconds)``, time waiting for peers excluded); at the next ``set_epoch`` its speed is the
epoch's samples / seconds (unchanged if nothing was reported; 1.0 on every rank at first), and
it trades ``(shard size, speed)`` with both partners of the new epoch before the rows move. Each
pair then moves, on top of the plain shuffle's count, the rows that equalise ``size / speed``
between the two, never leaving a shard under ``max(1, ceil(N / (8 p)))`` rows
(``gossipgrad._shuffle_plan.balanced_count``). The samples still travel while the epoch runs;
the sizes change at the next epoch. Iterate with ``batch_sampler(batch_size)``, which gives
every rank ``L = ceil(N / (p * batch_size))`` batches per epoch (``batch_size >= 8``) that cover
its shard once, so every sample is visited exactly once per epoch, and ``weight(len(batch))``,
the factor of the loss that makes the replicas' mean the sample-weighted gradient::

    sampler = GossipShuffleSampler(train_set, balance=True)
    batches = sampler.batch_sampler(batch_size=64)
    loader = DataLoader(train_set, batch_sampler=batches)
    for epoch in range(epochs):
        batches.set_epoch(epoch)
        for x, y in loader:
            t0 = time.perf_counter()
            waited = model.wait_time_s              # GossipDataParallel: cumulative seconds
            loss = loss_fn(model(x), y) * batches.weight(len(y))
            loss.backward(); optimizer.step(); optimizer.zero_grad()
            busy = time.perf_counter() - t0 - (model.wait_time_s - waited)
            sampler.report_speed(len(y), busy)
    sampler.flush()

``balance=False`` (the default) keeps equal shard sizes; ``batch_sampler`` works there too.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence, Sized
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

from gossipgrad._shard import Options, Shard, resolve_group
from gossipgrad._shuffle_plan import check_shards, label_skew_shards, strided_shard
from gossipgrad.collectives import agree, crc

__all__ = [
    "BalancedBatchSampler",
    "GossipShuffleDataset",
    "GossipShuffleSampler",
    "label_skew_shards",
]

# The smallest batch_size of a balanced BalancedBatchSampler: balance mode keeps every shard at
# ``_shuffle_plan.min_shard(N, p) = ceil(N / (8 p))`` rows or more, at least the batches per epoch.
_MIN_BALANCED_BATCH = 8


class GossipShuffleSampler(Sampler[int]):
    """``DistributedSampler`` whose shards gossip: each epoch a rank sends ``shuffle_fraction`` of
    its shard's ids to its partner and receives as many (see the module docstring).

    Args:
        dataset: anything with ``len``; the same length on every rank.
        num_replicas: default from ``process_group``; if given, it must match it.
        rank: default from ``process_group``; if given, it must match it.
        shuffle: visit the local shard in a seeded random order each epoch (else shard order).
        seed: seeds the local orders, the ids that leave, and the partner schedule; equal on
            every rank.
        drop_last: every rank yields the size of the smallest shard (surplus dropped) instead of
            the largest (smaller shards padded by repeating their start).
        shuffle_fraction: share of the smallest shard that each rank sends per epoch, in [0, 1].
        schedule: partner schedule, one of ``gossipgrad.schedule.SCHEDULES``.
        initial_shards: one sequence of sample ids per rank, disjoint and covering the dataset
            (e.g. ``label_skew_shards(labels, p)``); default: ids ``rank::p``.
        process_group: a gloo group to exchange in (default: a new gloo group over the world).
        timeout: how long to wait for a partner's ids before raising ``PeerError``.
        balance: shard sizes follow the ranks' speeds (``report_speed``); iterate with
            ``batch_sampler`` (see the module docstring). Not with ``drop_last``.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        *,
        shuffle_fraction: float = 0.25,
        schedule: str = "dissemination",
        initial_shards: Sequence[Sequence[int] | np.ndarray] | None = None,
        process_group: dist.ProcessGroup | None = None,
        timeout: timedelta = timedelta(minutes=5),
        balance: bool = False,
    ) -> None:
        options = Options(seed, shuffle, drop_last, shuffle_fraction, schedule, timeout, balance)
        group, world, me = resolve_group(process_group, num_replicas, rank)
        n = len(dataset)
        shards_crc = crc(np.asarray(s, dtype=np.int64).tobytes() for s in initial_shards or [])
        agree(
            group,
            world,
            {"len(dataset)": n, "initial_shards": shards_crc} | options.ints(),
            {"len(dataset)": "every rank must pass the same dataset"},
        )
        if n < world:
            raise ValueError(
                f"the dataset has {n} samples, fewer than the world size {world}: every rank "
                "needs at least one sample; use fewer ranks or a bigger dataset"
            )
        if initial_shards is None:
            sizes = [len(range(r, n, world)) for r in range(world)]
            mine = strided_shard(n, me, world)
        else:
            shards = check_shards(initial_shards, n, world)
            sizes, mine = [s.size for s in shards], shards[me]
        self.dataset = dataset
        self.num_replicas, self.rank = world, me
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.shuffle_fraction, self.schedule = shuffle_fraction, schedule
        self._shard = Shard([torch.from_numpy(mine)], sizes, options, group, me)
        self.num_samples = self._shard.length
        self.total_size = self.num_samples * world

    def __iter__(self) -> Iterator[int]:
        shard = self._shard
        return self._follow(shard, shard.positions(), shard.tensors[0].tolist())

    def _follow(self, shard: Shard, positions: Iterator[int], ids: list[int]) -> Iterator[int]:
        for pos in positions:
            if self._shard is not shard:  # re-sharded meanwhile (change_membership): go on there
                yield from iter(self)
                return
            yield ids[pos]

    def __len__(self) -> int:
        """Indices yielded per epoch: ``num_samples``; with ``balance``, this epoch's shard."""
        return self._shard.epoch_length

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``: completes the previous epoch's exchange (normally already arrived)
        and posts this one's. Call on every rank at every epoch, like ``DistributedSampler``."""
        self._shard.set_epoch(epoch)

    def flush(self) -> None:
        """Wait for the exchange in flight; call before ``destroy_process_group``."""
        self._shard.flush()

    def report_speed(self, samples: int, seconds: float) -> None:
        """Add ``samples`` processed in ``seconds`` of compute (time waiting for peers excluded)
        to this epoch's measurement; ``balance`` sizes the shards of the next epoch by the
        epoch's samples / seconds. Call on every step, or once per epoch with the totals."""
        self._shard.report_speed(samples, seconds)

    def batch_sampler(self, batch_size: int) -> BalancedBatchSampler:
        """Batches of ids for ``DataLoader(dataset, batch_sampler=...)``: the same number on every
        rank each epoch, covering this rank's shard once (see ``BalancedBatchSampler``)."""
        return BalancedBatchSampler(self._shard, batch_size, ids=True)

    @property
    def epoch(self) -> int:
        return self._shard.epoch

    @property
    def shard(self) -> torch.Tensor:
        """The sample ids this rank holds in the current epoch (read only)."""
        return self._shard.tensors[0]

    @property
    def exchange_count(self) -> int:
        """Ids sent to the partner (and received) per epoch."""
        return self._shard.count

    @property
    def wait_time_s(self) -> float:
        """Total seconds spent waiting for shuffle traffic (in ``set_epoch`` and ``flush``)."""
        return self._shard.wait_time_s

    def state_dict(self) -> dict[str, Any]:
        """This rank's position: epoch, indices yielded so far, the ids it holds (per rank).

        "Yielded" counts the indices handed to the ``DataLoader``; with ``num_workers > 0`` it
        has prefetched a few batches more than the model consumed, which a resume skips."""
        return self._shard.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``: the next iteration continues where that one stopped."""
        self._shard.load_state_dict(state)

    @property
    def position(self) -> tuple[int, float]:
        """``(epoch, share of the epoch's indices yielded so far)``."""
        shard = self._shard
        return shard.epoch, shard.yielded / max(1, shard.epoch_length)

    def change_membership(
        self, process_group: dist.ProcessGroup | None, position: tuple[int, float]
    ) -> None:
        """Re-shard over the ranks of ``process_group`` after a membership change
        (``gossipgrad.elastic``); ``None`` lets go of the current group first (so that
        ``destroy_process_group`` closes its connections). Every rank of the new group calls
        it at the same point with the same ``position`` (``(epoch, share done)``, as the
        ``position`` property gives it): each gets a fresh strided shard (ids ``rank::p``, whatever
        ``initial_shards`` was) at that epoch and share, so the shards stay disjoint and cover
        the dataset, and a departed rank's ids are spread over the survivors. The ids in flight
        are dropped (the new shards do not need them); the rest of the epoch may visit some
        samples twice or miss some, as a resume on another number of ranks would. An iterator
        in progress (a ``DataLoader``'s) goes on in the new shard. Not with ``balance``."""
        old = self._shard
        old.group, old._inflight, old._sends, old._recvs = None, None, [], []
        if process_group is None:
            return
        if old.options.balance:
            raise ValueError(
                "a membership change cannot re-shard balance=True (the shard sizes follow the "
                "ranks' speeds): use balance=False with gossipgrad.elastic"
            )
        group, world, me = resolve_group(process_group, None, None)
        n = len(self.dataset)
        sizes = [len(range(r, n, world)) for r in range(world)]
        shard = Shard(
            [torch.from_numpy(strided_shard(n, me, world))], sizes, old.options, group, me
        )
        epoch, share = position
        state = shard.state_dict() | {"epoch": int(epoch), "yielded": round(share * shard.length)}
        shard.load_state_dict(state)
        self._shard = shard
        self.num_replicas, self.rank = world, me
        self.num_samples = shard.length
        self.total_size = self.num_samples * world


class GossipShuffleDataset(Dataset[tuple[torch.Tensor, ...]]):
    """This rank's own samples (rows of ``tensors``, e.g. inputs and targets, on the CPU) that
    gossip: each epoch ``shuffle_fraction`` of them travel to the partner and as many arrive.

    ``dataset[i]`` is the tuple of row ``i`` of each tensor in the current epoch; iterate with
    ``DataLoader(dataset, batch_size=..., sampler=dataset.sampler)`` (``num_workers=0``: the
    samples are in memory already, and worker copies would miss those that arrive) and call
    ``dataset.set_epoch(epoch)`` (or ``dataset.sampler.set_epoch``) at every epoch.

    Args:
        tensors: this rank's samples, same number of rows; row shapes and dtypes equal across
            ranks.
        ids: global id of each row (default: rows numbered across ranks in rank order).
        shuffle: as for ``GossipShuffleSampler``.
        seed: as for ``GossipShuffleSampler``.
        drop_last: as for ``GossipShuffleSampler``; ``len(dataset.sampler)`` is equal on every
            rank.
        shuffle_fraction: as for ``GossipShuffleSampler``.
        schedule: as for ``GossipShuffleSampler``.
        process_group: as for ``GossipShuffleSampler``.
        timeout: as for ``GossipShuffleSampler``.
        balance: as for ``GossipShuffleSampler``.
    """

    def __init__(
        self,
        *tensors: torch.Tensor,
        ids: torch.Tensor | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        shuffle_fraction: float = 0.25,
        schedule: str = "dissemination",
        process_group: dist.ProcessGroup | None = None,
        timeout: timedelta = timedelta(minutes=5),
        balance: bool = False,
    ) -> None:
        options = Options(seed, shuffle, drop_last, shuffle_fraction, schedule, timeout, balance)
        _check_tensors(tensors, ids)
        group, world, me = resolve_group(process_group, None, None)
        rows = tensors[0].shape[0]
        kinds = [f"{tuple(t.shape[1:])} {t.dtype}".encode() for t in tensors]
        sizes = agree(
            group,
            world,
            {"rows": rows, "tensors' row shapes and dtypes": crc(kinds)} | options.ints(),
            {"rows": ""},
        )["rows"]
        if min(sizes) == 0:
            raise ValueError(
                f"rank {sizes.index(0)} holds no samples: every rank needs at least one"
            )
        if ids is None:
            ids = torch.arange(rows, dtype=torch.int64) + sum(sizes[:me])
        self._shard = Shard([ids.to(torch.int64), *tensors], sizes, options, group, me)
        self.num_samples = self._shard.length
        self.sampler = _LocalSampler(self._shard)

    def __len__(self) -> int:
        return self._shard.tensors[0].shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[index] for t in self._shard.tensors[1:])

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """This rank's samples in the current epoch (read only)."""
        return tuple(self._shard.tensors[1:])

    @property
    def ids(self) -> torch.Tensor:
        """The global id of each row of ``tensors``."""
        return self._shard.tensors[0]

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``: the samples that arrived join, this epoch's leavers are sent."""
        self._shard.set_epoch(epoch)

    def report_speed(self, samples: int, seconds: float) -> None:
        """As ``GossipShuffleSampler.report_speed`` (also ``dataset.sampler.report_speed``)."""
        self._shard.report_speed(samples, seconds)

    def batch_sampler(self, batch_size: int) -> BalancedBatchSampler:
        """As ``GossipShuffleSampler.batch_sampler``, yielding local positions (rows of
        ``tensors``): ``DataLoader(dataset, batch_sampler=dataset.batch_sampler(64))``."""
        return BalancedBatchSampler(self._shard, batch_size, ids=False)

    def flush(self) -> None:
        self._shard.flush()

    @property
    def wait_time_s(self) -> float:
        return self._shard.wait_time_s

    def state_dict(self) -> dict[str, Any]:
        """Epoch, position, and this rank's samples (they exist nowhere else: save per rank)."""
        return self._shard.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._shard.load_state_dict(state)


class _LocalSampler(Sampler[int]):
    """Yields positions in a ``GossipShuffleDataset``'s local order, ``len`` equal on all ranks."""

    def __init__(self, shard: Shard) -> None:
        self._shard = shard

    def __iter__(self) -> Iterator[int]:
        return self._shard.positions()

    def __len__(self) -> int:
        return self._shard.epoch_length

    def set_epoch(self, epoch: int) -> None:
        self._shard.set_epoch(epoch)

    def report_speed(self, samples: int, seconds: float) -> None:
        self._shard.report_speed(samples, seconds)

    def batch_sampler(self, batch_size: int) -> BalancedBatchSampler:
        return BalancedBatchSampler(self._shard, batch_size, ids=False)


class BalancedBatchSampler(Sampler[list[int]]):
    """Batches for ``DataLoader(dataset, batch_sampler=...)`` that keep the ranks in lockstep:
    every rank yields ``L = ceil(N / (p * batch_size))`` non-empty batches per epoch (``N``
    samples, ``p`` ranks), the consecutive chunks (``np.array_split``) of its shard in its seeded
    local order, so each sample is seen once per epoch. With ``balance=True`` a fast rank's shard,
    hence its batches, are bigger; ``weight(len(batch))`` scales its loss accordingly.

    Get one from ``sampler.batch_sampler(batch_size)``; it shares the sampler's position, so
    ``state_dict``/``load_state_dict`` of the sampler resume it at a batch boundary."""

    def __init__(self, shard: Shard, batch_size: int, *, ids: bool) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(
                f"batch_size must be a positive integer (samples per batch on an average rank), "
                f"got {batch_size!r}"
            )
        if shard.options.balance and batch_size < _MIN_BALANCED_BATCH:
            raise ValueError(
                f"batch_size={batch_size} is too small for balance=True: balancing may shrink a "
                f"slow rank's shard to ceil(N / (8 p)) samples, fewer than the batches per epoch "
                f"of a batch_size under {_MIN_BALANCED_BATCH}; use batch_size >= "
                f"{_MIN_BALANCED_BATCH} (and scale the learning rate) or balance=False"
            )
        self._shard, self._ids = shard, ids
        self.batch_size = batch_size
        self.num_batches = -(-shard.total // (shard.world_size * batch_size))
        if min(shard.sizes) < self.num_batches:
            raise ValueError(
                f"batch_size={batch_size} gives {self.num_batches} batches per epoch, more than "
                f"the {min(shard.sizes)} samples of rank {shard.sizes.index(min(shard.sizes))}'s "
                "initial shard, so some batch would be empty: raise batch_size or give that "
                "rank more samples (initial_shards)"
            )

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._shard.batches(self.num_batches)
        if not self._ids:
            return batches
        ids = self._shard.tensors[0].tolist()
        return ([ids[pos] for pos in batch] for batch in batches)

    def __len__(self) -> int:
        return self.num_batches

    def batches_left(self, yielded: int) -> int:
        """Batches left in this epoch once the first ``yielded`` samples of the shard (the
        sampler's ``state_dict()["yielded"]``) are done."""
        rows = self._shard.tensors[0].shape[0]
        ends = np.cumsum([c.size for c in np.array_split(np.arange(rows), self.num_batches)])
        return self.num_batches - int(np.searchsorted(ends, yielded, side="right"))

    def weight(self, batch_len: int) -> float:
        """``batch_len * L * p / N``: multiply this rank's mean loss by it, so that the replicas'
        mean gradient is the sample-weighted mean over every rank's batch of the step (what an
        all-reduce of the union of the batches would give)."""
        try:
            batch_len = operator.index(batch_len)
        except TypeError:
            batch_len = -1
        if batch_len < 0:
            raise ValueError(
                f"weight(batch_len) takes the number of samples in the batch (len(y)), a "
                f"non-negative integer, got {batch_len!r}"
            )
        shard = self._shard
        return batch_len * self.num_batches * shard.world_size / shard.total

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` (the sampler's ``set_epoch``): call on every rank at every epoch."""
        self._shard.set_epoch(epoch)


def _check_tensors(tensors: tuple[torch.Tensor, ...], ids: torch.Tensor | None) -> None:
    if not tensors:
        raise ValueError("GossipShuffleDataset needs at least one tensor of samples")
    rows = {t.shape[0] if t.dim() else -1 for t in tensors}
    if len(rows) > 1 or -1 in rows:
        raise ValueError(
            f"every tensor must have one row per sample (same first dimension), got shapes "
            f"{[tuple(t.shape) for t in tensors]}"
        )
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError(
            "keep the local samples on the CPU (they travel over gloo); move each batch to the "
            "GPU in the training loop"
        )
    if ids is not None and (ids.shape != (tensors[0].shape[0],) or ids.is_floating_point()):
        raise ValueError(
            f"ids must be an integer tensor with one global id per row, shape "
            f"({tensors[0].shape[0]},), got {ids.dtype} {tuple(ids.shape)}"
        )
