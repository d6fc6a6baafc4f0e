"""The core of the distributed shuffle: one rank's shard and the exchange that moves part of it to
the gossip partner each epoch (``gossipgrad.sampler`` builds its public classes on it), and the
checks that the ranks agree on their options. The pure planning lives in ``_shuffle_plan``."""

from __future__ import annotations

import operator
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from gossipgrad import _p2p
from gossipgrad._shuffle_plan import EpochPlan, epoch_length, exchange_count, plan_epoch
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
        """What ``agree`` compares across ranks."""
        return {
            "seed": self.seed,
            "shuffle_fraction": round(self.fraction * 2**40),
            "schedule": SCHEDULES.index(self.schedule),
            "drop_last": int(self.drop_last),
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
        if layout(tensors) != layout(self.tensors):
            raise ValueError(
                f"the state holds samples {layout(tensors)} but this rank's shard is "
                f"{layout(self.tensors)}: load the state this rank saved"
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
