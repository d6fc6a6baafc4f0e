"""The core of the distributed shuffle: one rank's shard and the exchange that moves part of it to
the gossip partner each epoch (``gossipgrad.sampler`` builds its public classes on it), and the
checks that the ranks agree on their options. The pure planning lives in ``_shuffle_plan``.

In balance mode a rank also measures its speed (``report_speed``) and, when it plans an epoch,
trades a float64 header ``(shard size, speed)`` with both its partners of that epoch before the
rows move; ``_shuffle_plan.balanced_count`` turns the headers into the counts each way."""

from __future__ import annotations

import math
import numbers
import operator
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from gossipgrad import _p2p
from gossipgrad._shuffle_plan import (
    EpochPlan,
    balanced_count,
    epoch_length,
    exchange_count,
    min_shard,
    plan_epoch,
)
from gossipgrad.schedule import SCHEDULES, partners


@dataclass(frozen=True)
class Options:
    """The options every rank must share, validated."""

    seed: int
    shuffle: bool
    drop_last: bool
    fraction: float
    schedule: str
    timeout: timedelta
    balance: bool = False

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
        if not isinstance(self.balance, bool):
            raise ValueError(f"balance must be True or False, got {self.balance!r}")
        if self.balance and self.drop_last:
            raise ValueError(
                "balance=True visits every sample exactly once per epoch (shard sizes follow the "
                "ranks' speeds, nothing is padded or dropped): leave drop_last=False"
            )

    def ints(self) -> dict[str, int]:
        """What ``agree`` compares across ranks."""
        return {
            "seed": self.seed,
            "shuffle_fraction": round(self.fraction * 2**40),
            "schedule": SCHEDULES.index(self.schedule),
            "drop_last": int(self.drop_last),
            "balance": int(self.balance),
        }


class Shard:
    """One rank's shard, as tensors whose rows are samples (``tensors[0]``: global ids), and the
    exchange that moves some rows to the partner each epoch."""

    def __init__(
        self,
        tensors: list[torch.Tensor],
        sizes: list[int],
        options: Options,
        group: dist.ProcessGroup | None,
        rank: int,
    ) -> None:
        world_size = len(sizes)
        partners(rank, 0, world_size, options.seed, options.schedule)  # fails here, not later
        self.tensors = tensors
        self.options, self.group, self.rank, self.world_size = options, group, rank, world_size
        self.count = exchange_count(sizes, options.fraction)  # rows sent (and received) per epoch
        self.length = epoch_length(sizes, options.drop_last)  # positions yielded per epoch
        self.sizes = list(sizes)  # the initial shard sizes, every rank's
        self.total = sum(sizes)  # N: the samples of the dataset, all ranks together
        self.minimum = min_shard(self.total, world_size)  # balance mode's smallest shard
        self.speed = 1.0  # samples per busy second this epoch is balanced with
        self.work = [0.0, 0.0]  # samples and busy seconds reported in this epoch
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

    @property
    def epoch_length(self) -> int:
        """Positions ``positions()`` yields this epoch: the whole shard in balance mode."""
        return self.tensors[0].shape[0] if self.options.balance else self.length

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

    def batches(self, count: int) -> Iterator[list[int]]:
        """This epoch's shard, every position once in the local order, as ``count`` consecutive
        batches (``np.array_split``), from the resume point if a state was just loaded."""
        chunks = np.array_split(self._start().permutation, count)
        bounds = np.cumsum([0] + [c.size for c in chunks]).tolist()
        start, self._resume_at = self._resume_at, 0
        if start not in bounds:
            raise ValueError(
                f"the loaded state stopped {start} samples into the epoch, which is not the end "
                f"of a batch of this batch sampler (batches end at {bounds[1:]}): resume a "
                "batch_sampler from a state saved while iterating a batch_sampler of the same "
                "batch_size"
            )
        self.yielded = start
        return self._count_batches(chunks[bounds.index(start) :])

    def _count_batches(self, chunks: list[np.ndarray]) -> Iterator[list[int]]:
        for chunk in chunks:
            self.yielded += chunk.size
            yield chunk.tolist()

    def report_speed(self, samples: float, seconds: float) -> None:
        """Add ``samples`` processed in ``seconds`` of compute to this epoch's measurement."""
        for name, value in (("samples", samples), ("seconds", seconds)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(
                    f"report_speed({name}=...) must be a number, got {value!r}: pass the "
                    "samples of the step (e.g. len(batch)) and its busy seconds as a float"
                )
            if not math.isfinite(float(value)) or value < 0:
                raise ValueError(
                    f"report_speed({name}={value!r}) must be finite and >= 0: pass the samples "
                    "of the step and the seconds it computed (its time minus the time spent "
                    "waiting for peers, which can be 0 but not negative)"
                )
        self.work[0] += float(samples)
        self.work[1] += float(seconds)

    def _start(self) -> EpochPlan:
        """Plan this epoch and post its exchange, once."""
        if self._plan is not None:
            return self._plan
        rows = self.tensors[0].shape[0]
        send = recv = self.count
        if self.options.balance:
            send, recv = self._balanced_counts(rows)
        plan = plan_epoch(
            self.rank,
            self.epoch,
            rows,
            world_size=self.world_size,
            seed=self.options.seed,
            count=send,
            length=rows if self.options.balance else self.length,
            shuffle=self.options.shuffle,
            schedule=self.options.schedule,
            recv_count=recv,
        )
        self._plan = plan
        if plan.leaving.size or plan.received:
            assert self.group is not None
            leaving = torch.from_numpy(plan.leaving)
            self._sends = [t.index_select(0, leaving) for t in self.tensors]
            self._recvs = [t.new_empty((plan.received, *t.shape[1:])) for t in self.tensors]
            self._inflight = _p2p.start(
                self._sends,
                self._recvs,
                plan.send_to if plan.leaving.size else None,
                plan.recv_from if plan.received else None,
                self.epoch,
                self.group,
            )
        return plan

    def _balanced_counts(self, rows: int) -> tuple[int, int]:
        """Trade ``(rows, speed)`` with this epoch's partners; the rows to send and receive."""
        send_to, recv_from = partners(
            self.rank, self.epoch, self.world_size, self.options.seed, self.options.schedule
        )
        if send_to is None or recv_from is None:
            return 0, 0  # plan_epoch explains a schedule that sends without receiving
        assert self.group is not None
        mine = torch.tensor([rows, self.speed], dtype=torch.float64)
        from_src, from_dst = (
            torch.empty(2, dtype=torch.float64),
            torch.empty(2, dtype=torch.float64),
        )
        # tags of their own (the last two buckets), apart from the rows' and from each other, so
        # that p = 2 (send_to == recv_from) pairs each message with its own receive
        last = 1 << _p2p._BUCKET_BITS
        headers = [
            _p2p.start(
                [mine], [from_src], send_to, recv_from, self.epoch, self.group, index=last - 2
            ),
            _p2p.start(
                [mine], [from_dst], recv_from, send_to, self.epoch, self.group, index=last - 1
            ),
        ]
        began = time.perf_counter()
        for inflight in headers:
            inflight.wait(self.options.timeout, self.rank)
        self.wait_time_s += time.perf_counter() - began
        n_src, v_src = from_src.tolist()
        n_dst, v_dst = from_dst.tolist()
        send = balanced_count(rows, self.speed, n_dst, v_dst, self.count, self.minimum)
        recv = balanced_count(n_src, v_src, rows, self.speed, self.count, self.minimum)
        return send, recv

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
        if plan.leaving.size or plan.received:
            keep = torch.from_numpy(plan.keep)
            self.tensors = [
                torch.cat([t.index_select(0, keep), r])
                for t, r in zip(self.tensors, self._recvs, strict=True)
            ]
        self._recvs = []
        self._plan = None
        self.epoch += 1
        self.yielded = self._resume_at = 0
        samples, seconds = self.work
        if samples > 0 and seconds > 0:  # else nothing measured: keep the speed we had
            self.speed = samples / seconds
        self.work = [0.0, 0.0]

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "yielded": self.yielded,
            "tensors": list(self.tensors),  # never modified in place: no copy needed
            "balance": self.options.balance,
            "speed": self.speed,
            "work": list(self.work),
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
        if bool(state.get("balance", False)) != self.options.balance:
            raise ValueError(
                f"the state was saved with balance={bool(state.get('balance', False))} but this "
                f"sampler has balance={self.options.balance}: resume with the same balance"
            )
        tensors = list(state["tensors"])
        if self.options.balance:  # shard sizes change from epoch to epoch: only the row layout
            if [(tuple(t.shape[1:]), t.dtype) for t in tensors] != [
                (tuple(t.shape[1:]), t.dtype) for t in self.tensors
            ] or len({t.shape[0] for t in tensors}) != 1:
                raise ValueError(
                    f"the state holds samples {layout(tensors)}, unlike this rank's "
                    f"{layout(self.tensors)}: load the state this rank saved"
                )
        elif layout(tensors) != layout(self.tensors):
            raise ValueError(
                f"the state holds samples {layout(tensors)} but this rank's shard is "
                f"{layout(self.tensors)}: load the state this rank saved"
            )
        length = tensors[0].shape[0] if self.options.balance else self.length
        if not 0 <= state["yielded"] <= length:
            raise ValueError(f"the state's position {state['yielded']} is outside the epoch")
        self.flush()  # our own exchange in flight must complete before its buffers go
        self._plan, self._recvs = None, []
        self.tensors = tensors
        self.epoch = int(state["epoch"])
        self.yielded = self._resume_at = int(state["yielded"])
        self.speed = float(state.get("speed", 1.0))
        self.work = [float(w) for w in state.get("work", (0.0, 0.0))]

    def _config(self) -> dict[str, int]:
        return {
            "seed": self.options.seed,
            "world_size": self.world_size,
            "rank": self.rank,
            "exchange_count": self.count,
            "num_samples": self.length,
        }


def resolve_group(
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


def layout(tensors: Sequence[torch.Tensor]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    return [(tuple(t.shape), t.dtype) for t in tensors]
