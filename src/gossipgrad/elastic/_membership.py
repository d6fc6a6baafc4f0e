"""Who trains now: generations of members, agreed through a torch.distributed store.

A *generation* is a set of processes that gossip in one process group. Generation ``g`` forms
when some process wants it (a survivor that lost a partner, a replacement that wants in): the
counter ``wanted`` in the store goes to ``g``, every live member of ``g - 1`` sees it at its next
step's end (one ``add`` of 0: a store round trip per step) and registers, as do the processes
that want to join. Generation ``g`` closes when every member of ``g - 1`` and every announced
joiner has registered, or when no one has registered for ``settle`` seconds (a member that died
never will); the first process that sees either condition freezes the list of registrants with
a ``compare_set``, so every process reads the same list. Its members take ranks by their rank
in ``g - 1`` (the joiners after them, in the order they came) and build a new process group
over a ``PrefixStore`` of their own (``gossipgrad.elastic._session``). A process that
registered after the list froze (too slow) is in none: it tries ``g + 1`` as a joiner.

Keys, under the prefix (default ``gossipgrad/elastic``): ``wanted`` (a counter), and per
generation ``g{g}/list`` (the registrants' ids, appended), ``g{g}/info/{id}`` (what each one
brings: its rank, its steps, its sampler's position), ``g{g}/joiners`` (a counter), and
``g{g}/closed`` (the frozen list). Generation 0 is the job's start: it closes when the
``world_size`` processes given have come (a rendezvous), within the timeout.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass, replace
from datetime import timedelta

import torch.distributed as dist

from gossipgrad.errors import GossipError

PREFIX = "gossipgrad/elastic"


class MembershipError(GossipError):
    """The members could not agree on a new membership (the store is gone, a generation never
    formed within the timeout, or no member holds a replica to give a joiner)."""


@dataclass(frozen=True)
class Member:
    """One process as it registers for a generation."""

    uid: str  # unique per process
    joining: bool  # holds no replica of the job yet (a replacement, or a member that was late)
    order: int  # its rank in the generation before (or the rank it was started with)
    ended: int  # steps ended when it registered (0 for a joiner)
    position: tuple[int, float] | None  # its sampler's (epoch, share done), if it has one
    where: str  # host and pid, for messages


@dataclass(frozen=True)
class Generation:
    """A formed generation: ``members`` by rank, and this process's ``rank`` among them."""

    number: int
    members: tuple[Member, ...]
    rank: int

    @property
    def world_size(self) -> int:
        return len(self.members)

    @property
    def joiners(self) -> list[int]:
        """Ranks of the members that need a replica."""
        return [r for r, m in enumerate(self.members) if m.joining]

    @property
    def step(self) -> int:
        """The step this generation resumes at: the fewest steps any member that trained had
        ended, so that no member loses a step (one ahead takes its last steps again)."""
        return min(m.ended for m in self.members if not m.joining)


class Membership:
    """This process's view of the generations in ``store`` (see the module docstring)."""

    def __init__(
        self,
        store: dist.Store,
        *,
        settle: timedelta,
        timeout: timedelta,
        prefix: str = PREFIX,
    ) -> None:
        self.store = dist.PrefixStore(prefix, store)
        self.prefix = prefix
        self.settle, self.timeout = settle, timeout
        self.number = -1  # the generation this process is in (-1: none yet)

    # --- cheap checks, once per step ----------------------------------------------------------

    def wanted(self) -> int:
        """The newest generation some process wants."""
        return self.store.add("wanted", 0)

    def change_wanted(self) -> bool:
        return self.wanted() > self.number

    def request(self, number: int) -> None:
        """Make ``wanted`` at least ``number`` (a compare-and-set, so that a concurrent request
        for the same generation is one request)."""
        seen = self.wanted()
        while seen < number:
            self.store.compare_set("wanted", str(seen), str(number))
            seen = self.wanted()

    # --- forming a generation -------------------------------------------------------------------

    def start(self, me: Member, world_size: int) -> Generation | None:
        """Register for generation 0, the job's start, which closes when ``world_size``
        processes have come; None if it had closed already (the job runs: ``enter`` as a
        joiner)."""
        self.store.compare_set("g0/expected", "", str(world_size))
        if self.store.check(["g0/closed"]):
            return None
        return self._register(0, me)

    def enter(self, me: Member) -> Generation:
        """Register for the next generation that forms and return it once closed. A member
        that finds the next one closed without it (it came too late) joins a later one, as a
        joiner."""
        number = max(self.number + 1, 1)
        while True:
            if me.joining:
                number = max(number, self.wanted())
            opened = self._first_open(number)
            if opened != number:
                me = _as_joiner(me)
            number = opened
            generation = self._register(number, me)
            if generation is not None:
                return generation
            me = _as_joiner(me)
            number += 1

    def _register(self, number: int, me: Member) -> Generation | None:
        """Register for generation ``number``; it once closed, or None if closed without us."""
        self.request(number)
        if me.joining:
            self.store.add(f"g{number}/joiners", 1)
        # torch's stubs are narrower than its bindings: ``set`` takes bytes, ``append`` exists
        self.store.set(f"g{number}/info/{me.uid}", pickle.dumps(me))  # type: ignore[arg-type]
        self.store.append(f"g{number}/list", f"{me.uid},")  # type: ignore[attr-defined]
        uids = self._close(number)
        if me.uid not in uids:
            return None
        self.number = number
        return self._generation(number, uids, me.uid)

    def _first_open(self, number: int) -> int:
        while self.store.check([f"g{number}/closed"]):
            number += 1
        return number

    def _close(self, number: int) -> list[str]:
        """Wait until generation ``number`` closes, closing it when its condition holds."""
        began = changed = time.monotonic()
        seen: list[str] = []
        closed = f"g{number}/closed"
        while not self.store.check([closed]):
            listed = self.store.get(f"g{number}/list").decode()
            uids = _ids(listed)
            now = time.monotonic()
            if uids != seen:
                seen, changed = uids, now
            expected = self._expected(number)
            settled = number > 0 and now - changed >= self.settle.total_seconds()
            if len(uids) >= expected or settled:
                self.store.compare_set(closed, "", listed)
                break
            if now - began > self.timeout.total_seconds():
                raise MembershipError(self._not_formed(number, len(uids), expected))
            time.sleep(0.01)
        return _ids(self.store.get(closed).decode())

    def _expected(self, number: int) -> int:
        """Registrants that close generation ``number`` at once: every member of the one
        before (the job's size for generation 0) and every announced joiner."""
        joiners = self.store.add(f"g{number}/joiners", 0)
        if number == 0:
            return int(self.store.get("g0/expected").decode()) + joiners
        return len(_ids(self.store.get(f"g{number - 1}/closed").decode())) + joiners

    def _generation(self, number: int, uids: list[str], mine: str) -> Generation:
        infos = self.store.multi_get([f"g{number}/info/{uid}" for uid in uids])
        members: list[Member] = [pickle.loads(info) for info in infos]  # noqa: S301 - our own store
        arrival = {m.uid: i for i, m in enumerate(members)}
        members.sort(key=lambda m: (m.joining, m.order if not m.joining else 0, arrival[m.uid]))
        rank = next(r for r, m in enumerate(members) if m.uid == mine)
        return Generation(number, tuple(members), rank)

    def _not_formed(self, number: int, came: int, expected: int) -> str:
        if number == 0:
            return (
                f"only {came} of the {expected} processes of the job reached the store within "
                f"{self.timeout.total_seconds():g} s: start every worker with the same store "
                "address and world size, or raise the timeout"
            )
        return (
            f"generation {number} did not form within {self.timeout.total_seconds():g} s "
            f"({came} of {expected} processes registered)"
        )


def _as_joiner(me: Member) -> Member:
    return replace(me, joining=True, ended=0, position=None)


def _ids(listed: str) -> list[str]:
    return [uid for uid in listed.split(",") if uid]
