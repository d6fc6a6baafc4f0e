"""The training job's samplers, behind one surface.

    sampler = make_sampler(cfg, "gossip", train_set)   # GossipShuffleSampler (samples travel)
    sampler = make_sampler(cfg, "allreduce", train_set)  # ResumableDistributedSampler (DDP's)

Both offer ``set_epoch``, ``flush`` (a no-op where nothing is in flight), ``state_dict`` and
``load_state_dict`` with at least ``epoch`` and ``yielded`` (indices handed out in the epoch), so
the loop and the checkpoints treat them alike (``JobSampler``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from datetime import timedelta
from typing import Any, Protocol, cast

from torch.utils.data import Dataset, DistributedSampler

from gossipgrad.sampler import GossipShuffleSampler
from gossipgrad.train.config import TrainConfig


class JobSampler(Protocol):
    """What the loop and ``run_state`` need from a sampler."""

    def __iter__(self) -> Iterator[int]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def flush(self) -> None:
        """Complete any exchange in flight (before the process group goes)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` that can stop mid-epoch and resume there (``state_dict``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.yielded = 0
        self._resume_at = 0

    def __iter__(self) -> Iterator[int]:
        order = list(super().__iter__())
        start, self._resume_at = self._resume_at, 0
        self.yielded = start
        for index in order[start:]:
            self.yielded += 1
            yield index

    def flush(self) -> None:
        """Nothing is ever in flight: the global reshuffle is computed locally."""

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.yielded = self._resume_at = int(state["yielded"])


def make_sampler(cfg: TrainConfig, algo: str, dataset: Dataset) -> JobSampler:
    """Gossip (flat or hierarchical) shuffles shards between partners; all-reduce uses
    DistributedSampler's global reshuffle (the usual DDP setup)."""
    if algo in ("gossip", "hierarchical"):
        return GossipShuffleSampler(
            cast(Sized, dataset),  # a map-style dataset: the job's datasets all have a length
            seed=cfg.seed,
            drop_last=not cfg.balance,  # balanced batches visit every sample once instead
            balance=cfg.balance,
            shuffle_fraction=cfg.shuffle_fraction,
            schedule=cfg.schedule,
            timeout=timedelta(seconds=cfg.timeout_s),
        )
    return ResumableDistributedSampler(dataset, seed=cfg.seed, drop_last=True)


def move_to(sampler: JobSampler, epoch: int, yielded: int) -> None:
    """Put a freshly built ``sampler`` at position ``yielded`` of ``epoch`` (its own shard as
    built: used when resuming on another number of ranks)."""
    sampler.load_state_dict({**sampler.state_dict(), "epoch": epoch, "yielded": yielded})
