"""What every wrapper offers: ``GossipDataParallel``, ``HierarchicalDataParallel`` and the
all-reduce baseline ``AllReduceDataParallel`` (DDP) all satisfy ``DataParallel``, so a training
loop, a benchmark or the training job is written once against this protocol and runs any of them.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from torch import nn


@runtime_checkable
class DataParallel(Protocol):
    """A data-parallel wrapper of ``module``. Calling it runs a forward; ``consensus_distance``,
    ``average_replicas`` and ``flush`` are collectives (every rank calls them at the same point).
    """

    module: nn.Module
    step: int  # training steps taken

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    @property
    def bytes_sent_last_step(self) -> int:
        """Bytes this rank put on the network in its last step."""
        ...

    def flush(self) -> None:
        """Complete the exchange in flight, if any (before evaluating or saving a replica)."""
        ...

    def consensus_distance(self) -> float:
        """RMS over ranks of ``||x_i - mean|| / ||mean||``; ``nan`` if a replica is not finite."""
        ...

    def average_replicas(self, into: nn.Module | None = None) -> None:
        """Set every replica to the exact average of all replicas; with ``into`` (a module of the
        same architecture), write the average there and leave the replicas as they are."""
        ...

    def no_sync(self) -> AbstractContextManager[None]:
        """Forwards inside do not communicate (gradient accumulation)."""
        ...

    def gossip_state(self) -> dict[str, Any]:
        """What a checkpoint needs to resume the communication schedule exactly."""
        ...

    def load_gossip_state(self, state: dict[str, Any]) -> None: ...
