"""The collectives gossipgrad uses, never inside a training step: how far apart the replicas
are (consensus distance, every N steps), their exact average (at the end, or on request), the
broadcast from rank 0 when wrapping, the checks that every rank agrees on its setup, and the
training job's own (``all_reduce_``, ``barrier``, ``broadcast_object``).

Each takes an optional ``timeout``: on gloo, every rank first meets the others in torch's
``monitored_barrier`` (``arrive``), so a rank that never calls the collective (stopped, hung,
dead, or its code elsewhere) makes the others raise ``PeerError`` within that timeout, naming
it, instead of gloo's "Timed out waiting for recv" after the process group's own timeout (30
minutes by default), which names no rank. NCCL has its own watchdog and is not monitored here.
"""

from __future__ import annotations

import math
import re
import time
import zlib
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from gossipgrad.errors import PeerError
from gossipgrad.mixing import Bucket, make_buckets, pack_, views


def world_group() -> dist.ProcessGroup:
    """The default process group (``dist.group.WORLD``), typed: ``init_process_group`` first."""
    group = dist.group.WORLD
    if group is None:
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group() "
            "(torchrun sets the environment it reads) before wrapping the model"
        )
    return group


def arrive(group: dist.ProcessGroup | None, timeout: timedelta | None, what: str) -> None:
    """Wait until every rank of ``group`` reaches this point (``what``, for the message); raise
    ``PeerError`` naming the ranks that did not within ``timeout``. No-op without a timeout, in a
    world of one, or on a backend other than gloo."""
    if timeout is None or not _monitored(group, timeout):
        return
    try:
        dist.monitored_barrier(group=group, timeout=timeout, wait_all_ranks=True)
    except RuntimeError as exc:
        raise _absent(exc, group, timeout, what) from exc


def _monitored(group: dist.ProcessGroup | None, timeout: timedelta | None) -> bool:
    """Whether ``arrive`` meets the others: a timeout, more than one rank, gloo."""
    if timeout is None or dist.get_world_size(group) == 1:
        return False
    return "gloo" in str(dist.get_backend(group))


def _absent(
    exc: RuntimeError, group: dist.ProcessGroup | None, timeout: timedelta, what: str
) -> PeerError:
    """The ``PeerError`` for a ``monitored_barrier`` that failed: group rank 0 knows who did not
    arrive; the others learn it from the job's first recorded loss (``_transport._first_loss``),
    or name rank 0, which stopped answering them."""
    missing = _missing_ranks(str(exc))
    return _absence(dist.get_rank(group), missing, what, timeout, checker_lost=not missing)


def _absence(
    rank: int, missing: list[int], what: str, timeout: timedelta, checker_lost: bool = False
) -> PeerError:
    """``PeerError``: ``missing`` (else rank 0, the checker) did not reach ``what``; with the
    job's first recorded loss when it was another (``_transport._first_loss``)."""
    from gossipgrad._transport import _first_loss  # not at import: it imports _p2p

    who = "rank 0 (which checks who arrived)" if checker_lost else _ranks_named(missing)
    missing = missing or [0]
    them = _ranks_named(missing)
    message = (
        f"rank {rank}: {who} did not reach {what} within {timeout.total_seconds():g} s. "
        f"Fix: check that {them} {'are' if len(missing) > 1 else 'is'} alive and not stopped "
        "(SIGSTOP, a debugger) and that every rank reaches it at the same point; raise the "
        "timeout (timeout=... / --timeout-s) if a rank is legitimately that slow"
    )
    noted = _first_loss(PeerError(message, missing[0]), rank, what)
    ours = f" [first loss in this job: rank {missing[0]}, seen by rank {rank} at {what}]"
    return PeerError(message if noted == message + ours else noted, missing[0])


# gloo's message for a collective that timed out, which names no rank
_TIMED_OUT = re.compile(r"Timed out waiting \d+ ?ms for (recv|send)", re.IGNORECASE)
_PRESENT = "gossipgrad/present"


def name_the_absent(
    error: BaseException, timeout: timedelta, what: str, grace: timedelta = timedelta(seconds=3)
) -> PeerError | None:
    """For a collective of the default group that gloo timed out without naming a rank (one not
    behind ``arrive``: DDP's all-reduce, a checkpoint's): the ranks that timed out note
    themselves in the job's store and wait ``grace`` for each other; the ``PeerError`` names
    those that never did (stopped, hung, or computing elsewhere). None if ``error`` is not
    such a timeout, if every rank came (the timeout was too short), or if the store is gone."""
    if isinstance(error, PeerError) or not _TIMED_OUT.search(str(error)):
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        present = _roll_call(dist.distributed_c10d._get_default_store(), rank, world, grace)
    except Exception:  # noqa: BLE001 - the store may be gone with the job: gloo's error stands
        return None
    missing = [r for r in range(world) if r not in present]
    return _absence(rank, missing, what, timeout) if missing else None


def _roll_call(store: dist.Store, rank: int, world: int, grace: timedelta) -> set[int]:
    """Note this rank as present, wait up to ``grace`` for every rank; the ranks present."""
    previous = store.timeout  # type: ignore[attr-defined]  # in torch, missing from its stubs
    store.set_timeout(grace)
    try:
        keys = [f"{_PRESENT}/{r}" for r in range(world)]
        store.set(keys[rank], "1")
        deadline = time.monotonic() + grace.total_seconds()
        while not store.check(keys) and time.monotonic() < deadline:
            time.sleep(0.05)
        return {r for r, key in enumerate(keys) if store.check([key])}
    finally:
        store.set_timeout(previous)


def _ranks_named(ranks: Sequence[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


def _missing_ranks(message: str) -> list[int]:
    found = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", message)
    return [int(r) for r in found.group(1).split(",") if r.strip()] if found else []


@torch.no_grad()
def consensus_distance(
    tensors: Sequence[torch.Tensor],
    buckets: Sequence[Bucket],
    group: dist.ProcessGroup,
    timeout: timedelta | None = None,
) -> float:
    """RMS over ranks of ``||x_i - mean||``, relative to ``||mean||`` (0 when all agree, ``nan``
    when a replica holds NaN or inf).

    ``buckets`` must cover ``tensors`` (see ``mixing.make_buckets``); their ``recv`` buffers are
    used as scratch. One all-reduce of the model and one of two scalars.
    """
    arrive(group, timeout, "consensus_distance()")
    world = dist.get_world_size(group)
    sq_dist = torch.zeros((), dtype=torch.float64)
    sq_norm = torch.zeros((), dtype=torch.float64)
    for b in buckets:
        own = [tensors[i] for i in b.indices]
        mean = pack_(b.recv, own)
        if world > 1:
            dist.all_reduce(mean, group=group)
        mean.div_(world)
        mean64 = mean.double()
        local = torch.cat([t.reshape(-1) for t in own]).to(torch.float64)
        sq_dist += (local - mean64).square().sum().cpu()
        sq_norm += mean64.square().sum().cpu()
    sums = torch.stack([sq_dist, sq_norm]).to(buckets[0].recv.device if buckets else "cpu")
    if world > 1:
        dist.all_reduce(sums, group=group)
    mean_sq_dist, norm_sq = (sums / world).tolist()
    if not (math.isfinite(mean_sq_dist) and math.isfinite(norm_sq)):
        return math.nan
    return math.sqrt(mean_sq_dist) / math.sqrt(norm_sq) if norm_sq > 0 else 0.0


@torch.no_grad()
def average_(
    tensors: Sequence[torch.Tensor],
    buckets: Sequence[Bucket],
    group: dist.ProcessGroup,
    into: Sequence[torch.Tensor] | None = None,
    timeout: timedelta | None = None,
) -> None:
    """Replace every rank's ``tensors`` by their exact mean over the group (one all-reduce), or,
    with ``into`` (tensors shaped like ``tensors``), write the mean there and leave ``tensors``
    as they are. The sums accumulate in the buckets' dtype (give float32 buckets for bfloat16
    tensors: ``make_buckets(..., at_least=torch.float32)``)."""
    world = dist.get_world_size(group)
    if world == 1 and into is None:
        return
    arrive(group, timeout, "average_replicas()")
    for b in buckets:
        own = [tensors[i] for i in b.indices]
        flat = pack_(b.recv, own)
        if world > 1:
            dist.all_reduce(flat, group=group)
            flat.div_(world)
        out = own if into is None else [into[i] for i in b.indices]
        torch._foreach_copy_(out, views(flat, out))


@torch.no_grad()
def broadcast_(
    tensors: Sequence[torch.Tensor],
    buckets: Sequence[Bucket],
    group: dist.ProcessGroup,
    timeout: timedelta | None = None,
) -> None:
    """Copy group rank 0's ``tensors`` to every rank."""
    if dist.get_world_size(group) == 1:
        return
    arrive(group, timeout, "wrapping the model (the broadcast from rank 0)")
    src = dist.get_global_rank(group, 0)
    is_src = dist.get_rank(group) == 0
    for b in buckets:
        own = [tensors[i] for i in b.indices]
        flat = pack_(b.recv, own) if is_src else b.recv
        dist.broadcast(flat, src, group=group)
        if not is_src:
            torch._foreach_copy_(own, views(flat, own))


def gather_object(
    obj: Any,
    group: dist.ProcessGroup | None,
    world_size: int,
    timeout: timedelta | None = None,
    what: str = "wrapping the model",
) -> list[Any]:
    """Every rank's ``obj`` (picklable), by group rank; no communication in a world of one."""
    if world_size == 1:
        return [obj]
    arrive(group, timeout, what)
    everyone: list[Any] = [None] * world_size
    dist.all_gather_object(everyone, obj, group=group)
    return everyone


def agree(
    group: dist.ProcessGroup | None,
    world_size: int,
    mine: dict[str, int],
    fixes: dict[str, str],
    timeout: timedelta | None = None,
) -> dict[str, list[int]]:
    """Every rank's ``mine`` values by key (one ``all_gather_object``). Raises ``ValueError`` if
    a key's values differ across ranks, with the fix from ``fixes`` (``""``: may differ).
    ``timeout`` defaults to the group's own (a rank that never comes is named, see ``arrive``).
    """
    timeout = timeout if timeout is not None else group_timeout(group)
    everyone = gather_object(mine, group, world_size, timeout, "the sampler's setup check")
    table = {key: [int(v[key]) for v in everyone] for key in mine}
    for key, seen in table.items():
        fix = fixes.get(key, f"pass the same {key} on every rank")
        if fix and len(set(seen)) > 1:
            raise ValueError(f"{key} differs across ranks ({seen}, by rank): {fix}")
    return table


def group_timeout(group: dist.ProcessGroup | None) -> timedelta | None:
    """The timeout ``group`` was created with (``init_process_group(timeout=...)``), or None
    where torch does not tell it (its backend's options are private API)."""
    try:
        pg = group if group is not None else world_group()
        backend = pg._get_backend(torch.device("cpu"))
        timeout = backend.options._timeout
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return None
    return timeout if isinstance(timeout, timedelta) and timeout.total_seconds() > 0 else None


# --- the training job's collectives, each behind ``arrive`` -------------------------------------


def all_reduce_(
    tensor: torch.Tensor, group: dist.ProcessGroup | None, timeout: timedelta | None, what: str
) -> None:
    """``dist.all_reduce`` (a sum, in place), after every rank arrived (``arrive``)."""
    if dist.get_world_size(group) == 1:
        return
    arrive(group, timeout, what)
    dist.all_reduce(tensor, group=group)


def barrier(group: dist.ProcessGroup | None, timeout: timedelta | None, what: str) -> None:
    """Every rank of ``group`` waits here for the others; with a timeout on gloo the
    ``monitored_barrier`` of ``arrive`` is the barrier, naming a rank that never comes."""
    if dist.get_world_size(group) == 1:
        return
    if _monitored(group, timeout):
        arrive(group, timeout, what)
    else:
        dist.barrier(group=group)


def broadcast_object(
    value: Any, group: dist.ProcessGroup | None, timeout: timedelta | None, what: str
) -> Any:
    """Group rank 0's ``value`` (picklable), on every rank, after every rank arrived."""
    if dist.get_world_size(group) == 1:
        return value
    arrive(group, timeout, what)
    box = [value]
    src = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def crc(parts: Iterable[bytes]) -> int:
    """A checksum of ``parts`` and of where each ends."""
    crc = 0
    for part in parts:
        crc = zlib.crc32(part + len(part).to_bytes(8, "little"), crc)
    return crc


class DeferredAverage:
    """The exact average at a step that ended inside a backward (a skipped optimizer step),
    where parameters must not change: ``take`` joins the all-reduce now, as every other rank
    does at that step; ``apply`` gives it to the replica at its next step end in residual form,
    ``x <- x + (mean - x_then)``, keeping the update taken meanwhile."""

    def __init__(self) -> None:
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def take(
        self,
        tensors: Sequence[torch.Tensor],
        buckets: Sequence[Bucket],
        group: dist.ProcessGroup,
        timeout: timedelta | None,
    ) -> None:
        then = [t.detach().clone() for t in tensors]
        mean = [torch.empty_like(t) for t in then]
        average_(then, buckets, group, into=mean, timeout=timeout)
        self._pending = list(zip(then, mean, strict=True))

    @torch.no_grad()
    def apply(self, tensors: Sequence[torch.Tensor]) -> None:
        pending, self._pending = self._pending, []
        for t, (then, mean) in zip(tensors, pending, strict=False):
            if t.shape == then.shape:
                t.add_(mean - then)


class Scratch:
    """The collectives' float32-or-wider buffers for a replica's tensors, remade when those
    tensors change (a buffer created or resized after wrapping)."""

    def __init__(self, cap_bytes: int) -> None:
        self.cap_bytes = cap_bytes
        self._key: tuple[tuple[int, torch.dtype, torch.device], ...] | None = None
        self._buckets: list[Bucket] = []

    def __call__(self, tensors: Sequence[torch.Tensor]) -> list[Bucket]:
        key = tuple((t.numel(), t.dtype, t.device) for t in tensors)
        if key != self._key:
            self._buckets = make_buckets(tensors, self.cap_bytes, at_least=torch.float32)
            self._key = key
        return self._buckets
