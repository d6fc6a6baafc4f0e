"""gossipgrad: data-parallel training where each rank talks to one partner per step (GossipGraD)."""

from gossipgrad.schedule import SCHEDULES, partners, plan

__all__ = ["SCHEDULES", "partners", "plan"]
__version__ = "0.1.0"
