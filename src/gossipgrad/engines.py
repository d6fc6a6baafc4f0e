"""The algorithm registry: ``wrap(module, algo)`` builds the wrapper for one of ``ALGOS``.

    model = gossipgrad.wrap(module, "gossip", sync=True)      # GossipDataParallel
    model = gossipgrad.wrap(module, "allreduce")              # DDP with the same extra methods

Every wrapper satisfies ``gossipgrad.contract.DataParallel``, so the loop around it is the same.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn

from gossipgrad._setup import DDP_KEYWORDS
from gossipgrad.allreduce import AllReduceDataParallel
from gossipgrad.contract import DataParallel
from gossipgrad.gossip import GossipDataParallel
from gossipgrad.hierarchical import HierarchicalDataParallel
from gossipgrad.options import ALGOS, GossipOptions


def wrap(
    module: nn.Module,
    algo: str = "gossip",
    options: GossipOptions | None = None,
    *,
    process_group: dist.ProcessGroup | None = None,
    ranks_per_node: int | None = None,
    **overrides: Any,
) -> DataParallel:
    """Wrap ``module`` for ``algo``: ``"gossip"``, ``"allreduce"`` or ``"hierarchical"``
    (all-reduce inside a node, gossip between nodes; ``ranks_per_node`` defaults to torchrun's
    layout). ``options`` and the keyword ``overrides`` are ``GossipOptions`` fields and DDP's own
    keywords (``find_unused_parameters``, ...): all-reduce passes DDP's keywords to DDP and uses
    only ``bucket_cap_mb`` and ``timeout`` of the gossip options; the gossip wrappers take both
    (see ``GossipDataParallel``)."""
    if algo not in ALGOS:
        raise ValueError(f"algo must be one of {ALGOS}, got {algo!r}")
    ddp = {k: overrides.pop(k) for k in list(overrides) if k in DDP_KEYWORDS}
    opts = GossipOptions.build(options, **overrides)
    if algo == "gossip":
        return GossipDataParallel(module, opts, process_group=process_group, **ddp)
    if algo == "hierarchical":
        if process_group is not None:
            raise ValueError("algo='hierarchical' builds its own groups: leave process_group out")
        return HierarchicalDataParallel(module, opts, ranks_per_node=ranks_per_node, **ddp)
    return AllReduceDataParallel(
        module,
        process_group=process_group,
        bucket_cap_mb=opts.bucket_cap_mb,
        timeout=opts.timeout,
        **ddp,
    )
