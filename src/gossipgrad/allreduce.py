"""The all-reduce baseline, one switch away from gossip: ``gossipgrad.wrap(module, "allreduce")``.

``AllReduceDataParallel`` is PyTorch's ``DistributedDataParallel`` with the few extra methods that
``GossipDataParallel`` has, so a training loop (and every benchmark) runs either unchanged.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gossipgrad import _setup
from gossipgrad.collectives import Scratch, average_, consensus_distance, world_group
from gossipgrad.mixing import constant_buffers, replica_tensors
from gossipgrad.options import GossipOptions, check_bucket_cap


class AllReduceDataParallel(DistributedDataParallel):
    """``DistributedDataParallel`` plus ``step``, ``flush``, ``consensus_distance``,
    ``average_replicas``, ``gossip_state`` and ``bytes_sent_last_step``."""

    def __init__(
        self,
        module: nn.Module,
        *,
        process_group: dist.ProcessGroup | None = None,
        bucket_cap_mb: float = GossipOptions.bucket_cap_mb,
        timeout: timedelta | None = GossipOptions.timeout,
        **ddp_options: Any,
    ) -> None:
        check_bucket_cap(bucket_cap_mb)
        _setup.check_initialised("AllReduceDataParallel")
        super().__init__(
            module, process_group=process_group, bucket_cap_mb=bucket_cap_mb, **ddp_options
        )
        self.group = process_group if process_group is not None else world_group()
        self.world_size = dist.get_world_size(self.group)
        self.step = 0
        self.timeout = timeout  # of consensus_distance and average_replicas (gloo)
        self._constants = constant_buffers(module)
        self._scratch = Scratch(int(bucket_cap_mb * 2**20))
        model_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        # What a ring all-reduce sends per rank: 2 (p - 1) / p model copies.
        self.bytes_sent_last_step = 0
        self._bytes_per_step = int(2 * (self.world_size - 1) / self.world_size * model_bytes)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.module.training and self.require_backward_grad_sync and torch.is_grad_enabled():
            self.step += 1
            self.bytes_sent_last_step = self._bytes_per_step
        return super().forward(*args, **kwargs)

    def flush(self) -> None:
        """Nothing is ever in flight between steps with all-reduce."""

    def consensus_distance(self) -> float:
        tensors = self._replicas()
        return consensus_distance(tensors, self._scratch(tensors), self.group, self.timeout)

    def average_replicas(self, into: nn.Module | None = None) -> None:
        target = None if into is None else replica_tensors(into, self._constants)
        tensors = self._replicas()
        average_(tensors, self._scratch(tensors), self.group, target, self.timeout)

    def _replicas(self) -> list[torch.Tensor]:
        return replica_tensors(self.module, self._constants)

    def gossip_state(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_gossip_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
