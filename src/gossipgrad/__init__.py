"""gossipgrad: data-parallel training where each rank talks to one partner per step (GossipGraD)."""

from gossipgrad.allreduce import ALGOS, AllReduceDataParallel, wrap
from gossipgrad.errors import GossipError, NonFiniteError, PeerError
from gossipgrad.hierarchical import HierarchicalDataParallel
from gossipgrad.parallel import GossipDataParallel
from gossipgrad.sampler import GossipShuffleDataset, GossipShuffleSampler, label_skew_shards
from gossipgrad.schedule import SCHEDULES, partners, plan

__all__ = [
    "ALGOS",
    "SCHEDULES",
    "AllReduceDataParallel",
    "GossipDataParallel",
    "GossipError",
    "GossipShuffleDataset",
    "GossipShuffleSampler",
    "HierarchicalDataParallel",
    "NonFiniteError",
    "PeerError",
    "label_skew_shards",
    "partners",
    "plan",
    "wrap",
]
__version__ = "0.1.0"
