"""gossipgrad: data-parallel training where each rank talks to one partner per step (GossipGraD).

The library core lives at the top of the package (engines, schedules, mixing, point-to-point,
collectives, replica checkpoints, the distributed shuffle). ``gossipgrad.sim`` is the simulator and
``gossipgrad.train`` the training job (``gossipgrad train``); the core imports neither.
"""

from gossipgrad.allreduce import AllReduceDataParallel
from gossipgrad.contract import DataParallel
from gossipgrad.engines import ALGOS, wrap
from gossipgrad.errors import GossipError, NonFiniteError, PeerError
from gossipgrad.gossip import GossipDataParallel
from gossipgrad.hierarchical import HierarchicalDataParallel
from gossipgrad.options import GossipOptions
from gossipgrad.sampler import GossipShuffleDataset, GossipShuffleSampler, label_skew_shards
from gossipgrad.schedule import SCHEDULES, partners, plan

__all__ = [
    "ALGOS",
    "SCHEDULES",
    "AllReduceDataParallel",
    "DataParallel",
    "GossipDataParallel",
    "GossipError",
    "GossipOptions",
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
