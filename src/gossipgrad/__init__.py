"""gossipgrad: data-parallel training where each rank talks to one partner per step (GossipGraD)."""

from gossipgrad.allreduce import ALGOS, AllReduceDataParallel, wrap
from gossipgrad.errors import GossipError, NonFiniteError, PeerError
from gossipgrad.parallel import GossipDataParallel
from gossipgrad.schedule import SCHEDULES, partners, plan

__all__ = [
    "ALGOS",
    "SCHEDULES",
    "AllReduceDataParallel",
    "GossipDataParallel",
    "GossipError",
    "NonFiniteError",
    "PeerError",
    "partners",
    "plan",
    "wrap",
]
__version__ = "0.1.0"
