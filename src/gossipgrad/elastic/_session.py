"""``ElasticGossip``: a ``GossipDataParallel`` whose ranks may leave and join while it trains.

Each generation ``n`` (``gossipgrad.elastic._membership``) has a process group of its own:
``init_process_group(backend, store=PrefixStore(f"{prefix}/g{n}/pg", store), ...)``. At a change
every member lets go of its gossip exchanges and its groups
(``GossipDataParallel.change_group(None)``, ``GossipShuffleSampler.change_membership(None, ...)``)
and destroys them, which closes their connections: a peer blocked on a receive from this member
gets a connection error at once and takes part in the change too. The members then register,
agree, build the new group, and the lowest rank sends each joiner its replica; then the next
step begins on every member.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.optim  # noqa: F401 - see below
from torch import nn

from gossipgrad import checkpoint
from gossipgrad.collectives import barrier
from gossipgrad.elastic import _checkpoint
from gossipgrad.elastic._membership import Generation, Member, Membership, MembershipError
from gossipgrad.errors import PeerError
from gossipgrad.gossip import GossipDataParallel
from gossipgrad.options import GossipOptions
from gossipgrad.sampler import GossipShuffleSampler

# ``torch.distributed.optim`` (imported by the step clock at the first step) imports
# ``torch.distributed.nn``, whose functions take ``group=group.WORLD`` as a default argument: made
# after a group exists, they would hold the first generation's group, and its connections, open
# for good. Imported here, before any group, their default is None.

# what gloo says when a peer's connection is gone (a collective outside the gossip exchange)
_LOST = ("connection closed by peer", "connection reset", "broken pipe", "timed out waiting")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass(frozen=True)
class MembershipChange:
    """One change, as a member saw it: the generation formed, this member's rank and the
    world size in it, the step training resumed at, how many ranks left and joined, the
    seconds from the change being noticed to the new group being ready, and the cause."""

    generation: int
    rank: int
    world_size: int
    step: int
    left: int
    joined: int
    seconds: float
    cause: str


class ElasticGossip:
    """Data-parallel gossip training that goes on when ranks leave, and takes in new ones.

    Args:
        module: the model (every process builds the same one).
        store: a ``torch.distributed`` store that outlives the workers (a ``TCPStore`` hosted
            by the launcher, or by ``python -m gossipgrad.elastic store``).
        world_size: the processes that start the job (generation 0). A process that comes
            after the job started joins it.
        rank: this process's rank at the start (default: ``RANK`` from the environment, else
            the order of arrival); it orders the ranks of generation 0.
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (CUDA).
        settle: how long a forming generation waits for more members after the last one came
            (a member that died never comes); keep it above a step's time.
        on_change: called after each membership change with a ``MembershipChange``.
        options: ``GossipDataParallel``'s; ``timeout`` (30 s unless ``options`` says
            otherwise) is also how long a change may take.
        **keywords: ``GossipDataParallel``'s. ``schedule="hypercube"`` (powers of two only)
            is refused.

    Use: build, make the optimizer over ``model.parameters()``, ``start`` (a replacement
    receives its replica there), then train in a loop bounded by steps::

        elastic = ElasticGossip(module, store, world_size=4)
        optimizer = torch.optim.SGD(elastic.model.parameters(), lr=0.05)
        elastic.start(optimizer, sampler=sampler)
        batches = elastic.batches(loader)
        while elastic.step < steps:
            x, y = next(batches)
            loss_fn(elastic.model(x), y).backward()
            optimizer.step()          # a membership change happens in here, if one is due
            optimizer.zero_grad()
        elastic.model.average_replicas()
        elastic.close()
    """

    def __init__(
        self,
        module: nn.Module,
        store: dist.Store,
        *,
        world_size: int,
        rank: int | None = None,
        backend: str = "gloo",
        settle: timedelta = timedelta(seconds=1),
        on_change: Callable[[MembershipChange], None] | None = None,
        options: GossipOptions | None = None,
        **keywords: Any,
    ) -> None:
        if dist.is_initialized():
            raise RuntimeError(
                "ElasticGossip makes its own process groups (one per membership): build it "
                "before torch.distributed.init_process_group, and do not call that yourself"
            )
        if options is None:
            keywords.setdefault("timeout", timedelta(seconds=30))
        self.options = GossipOptions.build(
            options, **{k: v for k, v in keywords.items() if k in GossipOptions.names()}
        )
        if self.options.schedule == "hypercube":
            raise ValueError(
                "schedule='hypercube' needs a power-of-two world size, which a membership "
                "change breaks: use 'dissemination' (any size) or 'exact'"
            )
        self.store, self.backend, self.on_change = store, backend, on_change
        self.membership = Membership(store, settle=settle, timeout=self.options.timeout)
        self.changes: list[MembershipChange] = []
        self._uid = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._optimizer: torch.optim.Optimizer | None = None
        self._sampler: GossipShuffleSampler | None = None
        self._state: dict[str, Stateful] = {}
        self._store_lost: str | None = None
        order = rank if rank is not None else int(os.environ.get("RANK", "0"))
        me = Member(self._uid, False, order, 0, None, self._where())
        self.generation = self.membership.start(me, world_size)
        if self.generation is not None:
            try:
                self._init_group(self.generation)
            except RuntimeError as error:
                raise MembershipError(
                    f"rank {order}: the job's first process group did not connect "
                    f"({_short(error)}): a worker died or stopped while the job started. Fix: "
                    "start the job again (a death after the first step is survived)"
                ) from error
        else:  # the job runs: wrap alone, join in start()
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        self.model = GossipDataParallel(module, options, **keywords)

    # --- the loop --------------------------------------------------------------------------------

    def start(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        sampler: GossipShuffleSampler | None = None,
        state: dict[str, Stateful] | None = None,
    ) -> None:
        """Begin: a process that came after the job started joins it here (it receives the
        model, ``optimizer``'s state and each of ``state``'s from a live member, and the
        sampler's position). ``sampler`` (built after this object, on every process) is
        re-sharded at each change; ``state``'s objects (an LR scheduler, ...) travel to
        joiners with the replica."""
        self._optimizer, self._sampler, self._state = optimizer, sampler, dict(state or {})
        self.model.step_hook = self._at_step_end
        if self.generation is None:
            if self.membership.store.check(["finished"]):
                raise MembershipError(
                    "the job this process came to join has finished: there is nothing to join"
                )
            self._release()  # the group of one this process wrapped in
            me = Member(self._uid, True, 0, 0, None, self._where())
            self._enter(me, time.monotonic(), "joined")

    @property
    def step(self) -> int:
        """Steps ended so far, agreed by every member."""
        return self.model.step

    @property
    def rank(self) -> int:
        return self.model.rank

    @property
    def world_size(self) -> int:
        return self.model.world_size

    def batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """``loader``'s batches, epoch after epoch, forever (bound the loop by steps). With a
        sampler, each epoch's ``set_epoch`` is made here, and a partner lost in the shuffle's
        exchange leads to a membership change here (between steps)."""
        iterator = iter(loader)
        while True:
            try:
                yield next(iterator)
                continue
            except StopIteration:
                if self._sampler is None:
                    iterator = iter(loader)
                    continue
                try:
                    self._sampler.set_epoch(self._sampler.epoch + 1)
                    iterator = iter(loader)
                    continue
                except PeerError as error:
                    cause = str(error)
            except PeerError as error:
                cause = str(error)
            self._change(self.model.step, cause)
            iterator = iter(loader)

    def save_checkpoint(
        self, folder: str | Path, *, keep: int = 3, extra: dict[str, Any] | None = None
    ) -> Path | None:
        """Write checkpoint ``step`` in ``folder`` (``gossipgrad.checkpoint``'s format): every
        member its replica, optimizer state, engine state, sampler position and ``start``'s
        ``state`` objects, plus ``extra`` (JSON values and tensors); return its path. Collective:
        every member calls it between steps at the same step (a condition on ``step``, which
        every member agrees on). A member lost during the write leads to a membership change,
        and the survivors write the checkpoint again, at the same step, in the new generation;
        None if that change moved the step back (a member had not reached it: the members take
        those steps again, and the caller's condition brings them here again)."""
        assert self._optimizer is not None, "call start() before save_checkpoint()"
        at = self.step
        while self.step == at:
            try:
                state = _checkpoint.state_of(
                    self.model,
                    self._optimizer,
                    self._sampler,
                    self._state,
                    self.membership.number,
                    dict(extra or {}),
                )
                return checkpoint.save(folder, self.step, state, keep=keep)
            except RuntimeError as error:  # a PeerError, gloo's, or a CheckpointError naming it
                if isinstance(error, MembershipError) or not (
                    _lost(error) or isinstance(error, dist.DistError)
                ):
                    raise
                cause = str(error)
            self._change(self.step, cause)  # outside the handler, as in _at_step_end
        return None

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """Resume from checkpoint ``path`` (``save_checkpoint``'s), before the first step, on
        every member of the job's start (collective). On the number of ranks that saved it,
        rank ``r`` gets back exactly what rank ``r`` saved (replica, optimizer, engine state
        with the exchange in flight, sampler, step); on another number, every rank starts from
        the exact mean of the saved replicas, optimizer and engine states, with the sampler
        re-sharded at the saved position. Returns the saved ``elastic`` entry (``generation``,
        ``step``, ``world_size``, ``position``), ``extra`` and ``saved_world_size``. A process
        that joined a running job has its replica from a peer already: it must not call this."""
        assert self._optimizer is not None, "call start() before load_checkpoint()"
        if self.changes or self.model.step:
            raise RuntimeError(
                f"rank {self.rank}: load_checkpoint() is for the job's start, before the first "
                "step; a process that joined a running job got its replica from a live peer "
                "(check `elastic.changes` before loading)"
            )
        return _checkpoint.load_into(
            Path(path), self.model, self._optimizer, self._sampler, self._state
        )

    def close(self) -> None:
        """Complete the last exchange, remove the hooks and destroy the process group (every
        member calls it at the same point)."""
        with contextlib.suppress(dist.DistError):  # a late joiner is told; the store may be gone
            self.membership.store.set("finished", "1")
        self.model.close()
        if self._sampler is not None:
            self._sampler.flush()
        # no member leaves before every one has its last messages: leaving closes connections
        barrier(None, self.options.timeout, "ElasticGossip.close()")
        dist.destroy_process_group()

    # --- membership changes ----------------------------------------------------------------------

    def _at_step_end(self, step_end: Callable[[], None]) -> None:
        """The hook of every step's end (``GossipDataParallel.step_hook``): a change is due if
        the store says so or if a partner is lost on the way."""
        ended = self.model.step + 1
        if self._change_wanted():
            cause = f"rank {self.rank} saw that generation {self.membership.wanted()} is wanted"
        else:
            try:
                step_end()
                return
            except (PeerError, dist.DistError) as error:
                if not _lost(error):
                    raise
                cause = str(error)
        self._change(ended, cause)  # outside the handler: its traceback (and the works) are gone

    def _change_wanted(self) -> bool:
        if self._store_lost is not None:
            return False
        try:
            return self.membership.change_wanted()
        except dist.DistError as error:  # the store's host is gone: go on without changes
            self._store_lost = _short(error)
            warnings.warn(
                f"rank {self.rank}: the elastic store is gone ({self._store_lost}); training "
                "goes on with the current members, but a rank that fails now ends the job. "
                "Host the store in a process that outlives the workers",
                RuntimeWarning,
                stacklevel=2,
            )
            return False

    def _change(self, ended: int, cause: str) -> None:
        """Leave the current generation and form the next one, at ``ended`` steps."""
        began = time.monotonic()
        before = self.rank
        if self._store_lost is not None:
            raise MembershipError(self._no_store(cause, self._store_lost))
        try:
            self.membership.request(self.membership.number + 1)
        except dist.DistError as error:
            raise MembershipError(self._no_store(cause, _short(error))) from None
        self._release()
        position = self._sampler.position if self._sampler is not None else None
        self._enter(Member(self._uid, False, before, ended, position, self._where()), began, cause)

    def _enter(self, me: Member, began: float, cause: str) -> None:
        """Enter the next generation; if a member dies before its group is ready (the group
        never connects, or a joiner's replica cannot be sent), release and try the next one."""
        while True:
            generation = self.membership.enter(me)
            try:
                self._form(generation, began, cause)
                return
            except MembershipError:
                raise
            except RuntimeError as error:  # gloo's, the store's, or a PeerError
                if not (_lost(error) or isinstance(error, dist.DistError)):
                    raise
                cause = f"{cause}; then generation {generation.number} failed to form: {error}"
            if dist.is_initialized():
                self._release()
            self.membership.request(generation.number + 1)

    def _release(self) -> None:
        """Let go of the exchanges in flight and of every group, and destroy them: their
        connections close, so peers blocked on this member fail at once and join the change."""
        self.model.change_group(None)
        if self._sampler is not None:
            self._sampler.change_membership(None, self._sampler.position)
        held = weakref.ref(dist.group.WORLD) if dist.group.WORLD is not None else None
        dist.destroy_process_group()
        if held is not None and held() is not None:
            gc.collect()  # a group held in a reference cycle would keep its connections open

    def _form(self, generation: Generation, began: float, cause: str) -> None:
        """Build ``generation``'s group, give joiners their replica, re-plan and re-shard; the
        next step begins."""
        previous = self.generation
        self._init_group(generation)
        self._send_replicas(generation)
        self.model.change_group(dist.group.WORLD, step=generation.step)
        if self._sampler is not None:
            source = generation.members[0].position or self._sampler.position
            self._sampler.change_membership(dist.new_group(backend="gloo"), source)
        self.generation = generation
        kept = {m.uid for m in generation.members if not m.joining}
        left = 0 if previous is None else len({m.uid for m in previous.members} - kept)
        change = MembershipChange(
            generation.number,
            generation.rank,
            generation.world_size,
            generation.step,
            left,
            len(generation.joiners),
            time.monotonic() - began,
            cause,
        )
        self.changes.append(change)
        if self.on_change is not None:
            self.on_change(change)

    def _init_group(self, generation: Generation) -> None:
        prefix = f"{self.membership.prefix}/g{generation.number}/pg"
        dist.init_process_group(
            self.backend,
            store=dist.PrefixStore(prefix, self.store),
            rank=generation.rank,
            world_size=generation.world_size,
            timeout=self.options.timeout,
        )

    def _send_replicas(self, generation: Generation) -> None:
        """The lowest rank sends each joiner its model, optimizer state and ``state``."""
        joiners = generation.joiners
        if not joiners:
            return
        if generation.members[0].joining:
            raise MembershipError(
                f"generation {generation.number} has no member that trained: every rank that "
                "held a replica has left (or the job is finishing), so a joiner has nothing to "
                "start from. Restart the job from its last checkpoint"
            )
        box: list[Any] = [None]
        if generation.rank == 0:
            box[0] = self._replica()
            for joiner in joiners:
                dist.send_object_list(box, dst=joiner)
        elif generation.rank in joiners:
            dist.recv_object_list(box, src=0)
            self._load(box[0])

    def _replica(self) -> dict[str, Any]:
        assert self._optimizer is not None
        return {
            "model": self.model.module.state_dict(),
            "optimizer": self._optimizer.state_dict(),
            "state": {name: obj.state_dict() for name, obj in self._state.items()},
        }

    def _load(self, replica: dict[str, Any]) -> None:
        assert self._optimizer is not None
        self.model.module.load_state_dict(replica["model"])
        self._optimizer.load_state_dict(replica["optimizer"])
        for name, obj in self._state.items():
            obj.load_state_dict(replica["state"][name])

    # --- messages --------------------------------------------------------------------------------

    def _where(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    def _no_store(self, cause: str, lost: str) -> str:
        return (
            f"rank {self.rank} lost a partner ({cause}), and the elastic store is gone "
            f"({lost}), so the survivors cannot agree on a new membership. Fix: host the store "
            "in a process that outlives the workers (`gossipgrad train --elastic` hosts it in "
            "the launcher; `python -m gossipgrad.elastic store` on a machine of its own), then "
            "restart from the last checkpoint"
        )


def _lost(error: BaseException) -> bool:
    """Whether ``error`` says a peer is gone (or silent): a ``PeerError``, or gloo's own words."""
    text = str(error).lower()
    return isinstance(error, PeerError) or any(words in text for words in _LOST)


def _short(error: BaseException) -> str:
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__
