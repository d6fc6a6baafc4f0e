"""Checkpoints of an elastic job, in ``gossipgrad.checkpoint``'s format (atomic, no code run
from the files): every member writes its own state at the same step, as a job without
elasticity does.

A member's state: ``model`` (its replica), ``optim`` (its optimizer's state), ``gossip``
(``GossipDataParallel.gossip_state()``: the step, the schedule's state, the exchange in flight
waited for but not mixed), ``sampler`` (its ``state_dict``), ``state`` (each object of
``ElasticGossip.start(state=...)``), ``elastic`` (the generation, the step, the world size and
the sampler's ``(epoch, share done)``), and the caller's ``extra`` entries beside them (a
run's record under ``run``, as ``gossipgrad train`` keeps it).

Loading on the number of ranks that saved (``checkpoint.load``): rank ``r`` gets back exactly
what rank ``r`` saved; the run goes on as the saved one would have with the same members.
On another number (``checkpoint.load_resharded``): every rank gets the exact mean of the saved
replicas, optimizer states and engine states (summed in float64), the other objects of saved
rank ``r % p``, and the sampler is re-sharded over the new ranks at the saved position.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from gossipgrad import checkpoint
from gossipgrad.gossip import GossipDataParallel
from gossipgrad.sampler import GossipShuffleSampler

AVERAGED = ("model", "optim", "gossip")  # averaged over the saved ranks on another world size
OURS = ("model", "optim", "gossip", "sampler", "state", "elastic")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any], /) -> Any: ...


def state_of(
    model: GossipDataParallel,
    optimizer: torch.optim.Optimizer,
    sampler: GossipShuffleSampler | None,
    objects: dict[str, Stateful],
    generation: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """This member's state (module docstring); waits for the exchange in flight (it raises
    ``PeerError`` if the partner is gone)."""
    taken = sorted(set(extra) & set(OURS))
    if taken:
        raise ValueError(f"save_checkpoint(extra=...): {taken} are the checkpoint's own keys")
    gossip = model.gossip_state()  # first: the one part that talks to a partner
    return extra | {
        "model": model.module.state_dict(),
        "optim": optimizer.state_dict(),
        "gossip": gossip,
        "sampler": sampler.state_dict() if sampler is not None else {},
        "state": {name: obj.state_dict() for name, obj in objects.items()},
        "elastic": {
            "generation": generation,
            "step": model.step,
            "world_size": model.world_size,
            "position": list(sampler.position) if sampler is not None else [0, 0.0],
        },
    }


def load_into(
    path: Path,
    model: GossipDataParallel,
    optimizer: torch.optim.Optimizer,
    sampler: GossipShuffleSampler | None,
    objects: dict[str, Stateful],
) -> dict[str, Any]:
    """Load checkpoint ``path`` into this member's objects (collective over the current
    members); returns the saved ``elastic`` entry, the ``extra`` entries (under ``extra``)
    and the number of ranks that saved it (``saved_world_size``)."""
    saved = checkpoint.saved_world_size(path)
    same = saved == model.world_size
    state = checkpoint.load(path) if same else checkpoint.load_resharded(path, AVERAGED)
    model.module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    model.load_gossip_state(state["gossip"])
    for name, obj in objects.items():
        obj.load_state_dict(state["state"][name])
    if sampler is not None:
        if same:
            sampler.load_state_dict(state["sampler"])
        else:
            epoch, share = state["elastic"]["position"]
            sampler.change_membership(dist.new_group(backend="gloo"), (int(epoch), float(share)))
    extra = {key: value for key, value in state.items() if key not in OURS}
    return {"elastic": state["elastic"], "extra": extra, "saved_world_size": saved}
