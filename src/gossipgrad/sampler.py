"""Asynchronous distributed shuffle (GossipGraD feature 4): samples travel between ranks.

Each rank starts with a disjoint shard of the dataset. In epoch ``e`` it visits its shard in a
seeded local order and, meanwhile, sends a ``shuffle_fraction`` of it to its gossip partner
(``gossipgrad.schedule.partners`` with ``step = e``) and receives as many from its source, with
non-blocking ``isend``/``irecv`` posted when the epoch starts and completed when the next one
starts: the training loop does not wait in the common case. The pure planning (which samples
leave, local order) lives in ``gossipgrad._shuffle_plan``.

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
"""

from __future__ import annotations

import operator
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

from gossipgrad import _p2p
from gossipgrad._shuffle_plan import (
    EpochPlan,
    check_shards,
    epoch_length,
    exchange_count,
    label_skew_shards,
    plan_epoch,
    strided_shard,
)
from gossipgrad.schedule import SCHEDULES, partners

__all__ = ["GossipShuffleDataset", "GossipShuffleSampler", "label_skew_shards"]


@dataclass(frozen=True)
class _Options:
    """The options every rank must share, validated."""

    seed: int
    shuffle: bool
    drop_last: bool
    fraction: float
    schedule: str
    timeout: timedelta

    def __post_init__(self) -> None:
        fraction, seed = self.fraction, self.seed
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise ValueError(f"shuffle_fraction must be a number in [0, 1], got {fraction!r}")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(
                "shuffle_fraction must be in [0, 1] (the share of a shard sent to the partner "
                f"each epoch; 0 turns the shuffle off), got {fraction!r}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63 - 1], got {seed!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not isinstance(self.timeout, timedelta) or self.timeout.total_seconds() <= 0:
            raise ValueError(f"timeout must be a positive datetime.timedelta, got {self.timeout!r}")

    def ints(self) -> dict[str, int]:
        """What ``_agree`` compares across ranks."""
        return {
            "seed": self.seed,
            "shuffle_fraction": round(self.fraction * 2**40),
            "schedule": SCHEDULES.index(self.schedule),
            "drop_last": int(self.drop_last),
        }


class _Shard:
    """One rank's shard, as tensors whose rows are samples (``tensors[0]``: global ids), and the
    exchange that moves some rows to the partner each epoch."""

    def __init__(
        self,
        tensors: list[torch.Tensor],
        sizes: list[int],
        options: _Options,
        group: dist.ProcessGroup | None,
        rank: int,
    ) -> None:
        world_size = len(sizes)
        partners(rank, 0, world_size, options.seed, options.schedule)  # fails here, not later
        self.tensors = tensors
        self.options, self.group, self.rank, self.world_size = options, group, rank, world_size
        self.count = exchange_count(sizes, options.fraction)  # rows sent (and received) per epoch
        self.length = epoch_length(sizes, options.drop_last)  # positions yielded per epoch
        self.epoch = 0  # the epoch whose shard ``tensors`` holds
        self.yielded = 0  # positions handed out so far in this epoch
        self.wait_time_s = 0.0  # total time spent waiting for exchanges to complete
        self._resume_at = 0
        self._plan: EpochPlan | None = None
        self._inflight: _p2p.InFlight | None = None
        self._sends: list[torch.Tensor] = []
        self._recvs: list[torch.Tensor] = []

    def set_epoch(self, epoch: int) -> None:
        """Complete the exchanges up to ``epoch`` (normally the one in flight), post its own."""
        epoch = operator.index(epoch)
        if epoch < self.epoch:
            raise ValueError(
                f"set_epoch({epoch!r}) after epoch {self.epoch}: the gossip shuffle only moves "
                "forward; to go back, load_state_dict a state saved at that epoch"
            )
        while self.epoch < epoch:
            self._advance()
        self._start()

    def positions(self) -> Iterator[int]:
        """This epoch's local positions, from the resume point if a state was just loaded."""
        order = self._start().order
        start, self._resume_at = self._resume_at, 0
        self.yielded = start
        return self._count(order[start:].tolist())

    def _count(self, order: list[int]) -> Iterator[int]:
        for pos in order:
            self.yielded += 1
            yield pos

    def _start(self) -> EpochPlan:
        """Plan this epoch and post its exchange, once."""
        if self._plan is not None:
            return self._plan
        rows = self.tensors[0].shape[0]
        plan = plan_epoch(
            self.rank,
            self.epoch,
            rows,
            world_size=self.world_size,
            seed=self.options.seed,
            count=self.count,
            length=self.length,
            shuffle=self.options.shuffle,
            schedule=self.options.schedule,
        )
        self._plan = plan
        if plan.leaving.size:
            assert self.group is not None
            leaving = torch.from_numpy(plan.leaving)
            self._sends = [t.index_select(0, leaving) for t in self.tensors]
            self._recvs = [t.new_empty((self.count, *t.shape[1:])) for t in self.tensors]
            self._inflight = _p2p.start(
                self._sends, self._recvs, plan.send_to, plan.recv_from, self.epoch, self.group
            )
        return plan

    def flush(self) -> None:
        """Wait for the exchange in flight, if any; what it received joins the next epoch."""
        if self._inflight is None:
            return
        began = time.perf_counter()
        self._inflight.wait(self.options.timeout, self.rank)
        self.wait_time_s += time.perf_counter() - began
        self._inflight = None
        self._sends = []

    def _advance(self) -> None:
        plan = self._start()
        self.flush()
        if plan.leaving.size:
            keep = torch.from_numpy(plan.keep)
            self.tensors = [
                torch.cat([t.index_select(0, keep), r])
                for t, r in zip(self.tensors, self._recvs, strict=True)
            ]
        self._recvs = []
        self._plan = None
        self.epoch += 1
        self.yielded = self._resume_at = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "yielded": self.yielded,
            "tensors": list(self.tensors),  # never modified in place: no copy needed
            **self._config(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in self._config().items():
            if state.get(key) != value:
                raise ValueError(
                    f"the state was saved with {key}={state.get(key)!r} but this sampler has "
                    f"{key}={value!r}: resume each rank from its own state with the same world "
                    "size, seed, shuffle_fraction and drop_last"
                )
        tensors = list(state["tensors"])
        if _layout(tensors) != _layout(self.tensors):
            raise ValueError(
                f"the state holds samples {_layout(tensors)} but this rank's shard is "
                f"{_layout(self.tensors)}: load the state this rank saved"
            )
        if not 0 <= state["yielded"] <= self.length:
            raise ValueError(f"the state's position {state['yielded']} is outside the epoch")
        self.flush()  # our own exchange in flight must complete before its buffers go
        self._plan, self._recvs = None, []
        self.tensors = tensors
        self.epoch = int(state["epoch"])
        self.yielded = self._resume_at = int(state["yielded"])

    def _config(self) -> dict[str, int]:
        return {
            "seed": self.options.seed,
            "world_size": self.world_size,
            "rank": self.rank,
            "exchange_count": self.count,
            "num_samples": self.length,
        }


class GossipShuffleSampler(Sampler[int]):
    """``DistributedSampler`` whose shards gossip: each epoch a rank sends ``shuffle_fraction`` of
    its shard's ids to its partner and receives as many (see the module docstring).

    Args:
        dataset: anything with ``len``; the same length on every rank.
        num_replicas, rank: default from ``process_group``; if given, they must match it.
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
    ) -> None:
        options = _Options(seed, shuffle, drop_last, shuffle_fraction, schedule, timeout)
        group, world, me = _resolve_group(process_group, num_replicas, rank)
        n = len(dataset)
        shards_crc = _crc(np.asarray(s, dtype=np.int64).tobytes() for s in initial_shards or [])
        _agree(
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
        self._shard = _Shard([torch.from_numpy(mine)], sizes, options, group, me)
        self.num_samples = self._shard.length
        self.total_size = self.num_samples * world

    def __iter__(self) -> Iterator[int]:
        positions = self._shard.positions()
        ids = self._shard.tensors[0].tolist()
        return (ids[pos] for pos in positions)

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``: completes the previous epoch's exchange (normally already arrived)
        and posts this one's. Call on every rank at every epoch, like ``DistributedSampler``."""
        self._shard.set_epoch(epoch)

    def flush(self) -> None:
        """Wait for the exchange in flight; call before ``destroy_process_group``."""
        self._shard.flush()

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
        shuffle, seed, drop_last, shuffle_fraction, schedule, process_group, timeout: as for
            ``GossipShuffleSampler``; ``len(dataset.sampler)`` is equal on every rank.
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
    ) -> None:
        options = _Options(seed, shuffle, drop_last, shuffle_fraction, schedule, timeout)
        _check_tensors(tensors, ids)
        group, world, me = _resolve_group(process_group, None, None)
        rows = tensors[0].shape[0]
        kinds = [f"{tuple(t.shape[1:])} {t.dtype}".encode() for t in tensors]
        sizes = _agree(
            group,
            world,
            {"rows": rows, "tensors' row shapes and dtypes": _crc(kinds)} | options.ints(),
            {"rows": ""},
        )["rows"]
        if min(sizes) == 0:
            raise ValueError(
                f"rank {sizes.index(0)} holds no samples: every rank needs at least one"
            )
        if ids is None:
            ids = torch.arange(rows, dtype=torch.int64) + sum(sizes[:me])
        self._shard = _Shard([ids.to(torch.int64), *tensors], sizes, options, group, me)
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

    def __init__(self, shard: _Shard) -> None:
        self._shard = shard

    def __iter__(self) -> Iterator[int]:
        return self._shard.positions()

    def __len__(self) -> int:
        return self._shard.length

    def set_epoch(self, epoch: int) -> None:
        self._shard.set_epoch(epoch)


def _layout(tensors: Sequence[torch.Tensor]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    return [(tuple(t.shape), t.dtype) for t in tensors]


def _resolve_group(
    process_group: dist.ProcessGroup | None, num_replicas: int | None, rank: int | None
) -> tuple[dist.ProcessGroup | None, int, int]:
    """``(group, world size, rank)``; no group when torch.distributed is not initialised."""
    if process_group is None and not (dist.is_available() and dist.is_initialized()):
        if num_replicas not in (None, 1) or rank not in (None, 0):
            raise ValueError(
                f"num_replicas={num_replicas}, rank={rank}: the gossip shuffle moves samples "
                "between ranks, so it needs torch.distributed initialised "
                "(init_process_group) before it is built"
            )
        return None, 1, 0
    group = process_group if process_group is not None else dist.new_group(backend="gloo")
    if "gloo" not in str(dist.get_backend(group)):
        raise ValueError(
            "process_group must be a gloo group (ids and samples travel as CPU tensors); leave "
            "it None to get one, even when training on NCCL"
        )
    world, me = dist.get_world_size(group), dist.get_rank(group)
    if num_replicas not in (None, world) or rank not in (None, me):
        raise ValueError(
            f"num_replicas={num_replicas}, rank={rank} disagree with the process group "
            f"(world size {world}, rank {me}): leave them None"
        )
    return group, world, me


def _agree(
    group: dist.ProcessGroup | None,
    world_size: int,
    mine: dict[str, int],
    fixes: dict[str, str],
) -> dict[str, list[int]]:
    """One ``all_gather`` of a few integers; every rank's values by key. Raises ``ValueError`` if
    a key's values differ across ranks, with the fix from ``fixes`` (``""``: may differ)."""
    values = torch.tensor(list(mine.values()), dtype=torch.int64)
    everyone = [values]
    if world_size > 1:
        everyone = [torch.empty_like(values) for _ in range(world_size)]
        dist.all_gather(everyone, values, group=group)
    table = {key: [int(v[i]) for v in everyone] for i, key in enumerate(mine)}
    for key, seen in table.items():
        fix = fixes.get(key, f"pass the same {key} on every rank")
        if fix and len(set(seen)) > 1:
            raise ValueError(f"{key} differs across ranks ({seen}, by rank): {fix}")
    return table


def _crc(parts: Iterable[bytes]) -> int:
    """A checksum of ``parts`` and of where each ends."""
    crc = 0
    for part in parts:
        crc = zlib.crc32(part + len(part).to_bytes(8, "little"), crc)
    return crc


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
