"""gossipgrad: data-parallel training where each rank talks to one partner per step (GossipGraD).

The library core lives at the top of the package (engines, schedules, mixing, point-to-point,
collectives, replica checkpoints, the distributed shuffle). ``gossipgrad.sim`` is the simulator and
``gossipgrad.train`` the training job (``gossipgrad train``); the core imports neither.

The public names below are imported on first use (PEP 562), so ``import gossipgrad`` is instant
and ``gossipgrad --help`` never loads torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "ALGOS": "gossipgrad.engines",
    "wrap": "gossipgrad.engines",
    "AllReduceDataParallel": "gossipgrad.allreduce",
    "DataParallel": "gossipgrad.contract",
    "ElasticGossip": "gossipgrad.elastic",
    "MembershipChange": "gossipgrad.elastic",
    "MembershipError": "gossipgrad.elastic",
    "GossipError": "gossipgrad.errors",
    "NonFiniteError": "gossipgrad.errors",
    "PeerError": "gossipgrad.errors",
    "GossipDataParallel": "gossipgrad.gossip",
    "HierarchicalDataParallel": "gossipgrad.hierarchical",
    "GossipOptions": "gossipgrad.options",
    "GossipShuffleDataset": "gossipgrad.sampler",
    "GossipShuffleSampler": "gossipgrad.sampler",
    "label_skew_shards": "gossipgrad.sampler",
    "SCHEDULES": "gossipgrad.schedule",
    "partners": "gossipgrad.schedule",
    "plan": "gossipgrad.schedule",
}
__all__ = [
    "ALGOS",
    "SCHEDULES",
    "AllReduceDataParallel",
    "DataParallel",
    "ElasticGossip",
    "GossipDataParallel",
    "GossipError",
    "GossipOptions",
    "GossipShuffleDataset",
    "GossipShuffleSampler",
    "HierarchicalDataParallel",
    "MembershipChange",
    "MembershipError",
    "NonFiniteError",
    "PeerError",
    "label_skew_shards",
    "partners",
    "plan",
    "wrap",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gossipgrad' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from gossipgrad.allreduce import AllReduceDataParallel
    from gossipgrad.contract import DataParallel
    from gossipgrad.elastic import ElasticGossip, MembershipChange, MembershipError
    from gossipgrad.engines import ALGOS, wrap
    from gossipgrad.errors import GossipError, NonFiniteError, PeerError
    from gossipgrad.gossip import GossipDataParallel
    from gossipgrad.hierarchical import HierarchicalDataParallel
    from gossipgrad.options import GossipOptions
    from gossipgrad.sampler import GossipShuffleDataset, GossipShuffleSampler, label_skew_shards
    from gossipgrad.schedule import SCHEDULES, partners, plan
