"""How a step's messages travel: the ``Transport`` the step engine (``gossipgrad._engine``)
sends through, and its torch.distributed implementation (gloo or NCCL point-to-point,
``gossipgrad._p2p``). The virtual cluster has an in-memory one (``gossipgrad.sim.virtual``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist

from gossipgrad import _p2p
from gossipgrad.errors import GossipError, PeerError
from gossipgrad.schedule import Exchange


class Wire(Protocol):
    """One exchange's messages in flight."""

    def wait(self, timeout: timedelta, rank: int) -> None: ...


class Transport(Protocol):
    """Puts one exchange's buffers on the wire: ``sends`` to ``send_to`` and ``recvs`` from
    ``recv_from`` (``None``: no message), as exchange ``index`` of the schedule. ``salt``
    (< 128) differs between replica layouts, so that the messages of partners whose models
    differ never match each other."""

    def start(
        self,
        sends: list[torch.Tensor],
        recvs: list[torch.Tensor],
        ex: Exchange,
        index: int,
        where: str,
        first: int,
        salt: int,
    ) -> Wire: ...


class GroupTransport:
    """Point-to-point over a torch.distributed group (``streams``: extra groups over the same
    ranks, one TCP stream each on gloo)."""

    def __init__(
        self, group: dist.ProcessGroup, streams: list[dist.ProcessGroup] | None = None
    ) -> None:
        self.group, self.streams = group, streams

    def start(
        self,
        sends: list[torch.Tensor],
        recvs: list[torch.Tensor],
        ex: Exchange,
        index: int,
        where: str,
        first: int,
        salt: int,
    ) -> Wire:
        inflight = _p2p.start(
            sends,
            recvs,
            ex.send_to,
            ex.recv_from,
            index,
            self.group,
            streams=self.streams,
            index=first,
            salt=salt,
            where=where,
        )
        return _GroupWire(inflight)


class _GroupWire:
    """A wire whose failure also names the first rank lost in the job (see ``_first_loss``)."""

    def __init__(self, inflight: _p2p.InFlight) -> None:
        self.inflight = inflight

    def wait(self, timeout: timedelta, rank: int) -> None:
        try:
            self.inflight.wait(timeout, rank)
        except PeerError as exc:
            raise PeerError(_first_loss(exc, rank, self.inflight.label), exc.peer) from exc


def _first_loss(exc: PeerError, rank: int, where: str) -> str:
    """Record in the job's store that this rank lost ``exc.peer`` (unless a loss was already
    recorded), and add the first recorded loss to the message: when one rank dies, the ranks
    that fail after it, in cascade, still name the rank that was lost first. The store's
    timeout is shortened for this call only (the store may be gone with the job)."""
    mine = f"{exc.peer}|{rank}|{where}"
    try:
        store = dist.distributed_c10d._get_default_store()
        previous = store.timeout  # type: ignore[attr-defined]  # in torch, missing from its stubs
        store.set_timeout(timedelta(seconds=5))
        try:
            first = store.compare_set("gossipgrad/first_loss", "", mine).decode()
        finally:
            store.set_timeout(previous)
    except Exception:  # noqa: BLE001 - the store may be gone with the job; the message stands
        return str(exc)
    lost, seen_by, at = first.split("|") if first.count("|") == 2 else (exc.peer, rank, where)
    return f"{exc} [first loss in this job: rank {lost}, seen by rank {seen_by} at {at}]"


class Detached:
    """The transport of a replica between two memberships (``gossipgrad.elastic``): the old
    group is being destroyed and the new one is not formed yet, so nothing may be sent."""

    def start(
        self,
        sends: list[torch.Tensor],
        recvs: list[torch.Tensor],
        ex: Exchange,
        index: int,
        where: str,
        first: int,
        salt: int,
    ) -> Wire:
        raise GossipError(
            f"{where}: this replica is between two memberships (its group was released for a "
            "membership change and no new one was given): call change_group(group) first"
        )
