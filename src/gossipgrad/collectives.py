"""The collectives gossipgrad uses, never inside a training step: how far apart the replicas
are (consensus distance, every N steps), their exact average (at the end, or on request), the
broadcast from rank 0 when wrapping, and the checks that every rank agrees on its setup.

Each takes an optional ``timeout``: on gloo, every rank first meets the others in torch's
``monitored_barrier``, so a rank that never calls the collective makes the others raise
``PeerError`` within that timeout, naming it, instead of waiting for the process group's own
timeout (30 minutes by default). NCCL has its own watchdog and is not monitored here.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from gossipgrad.errors import PeerError
from gossipgrad.mixing import Bucket, make_buckets, pack_, views


def arrive(group: dist.ProcessGroup | None, timeout: timedelta | None, what: str) -> None:
    """Wait until every rank of ``group`` reaches this point (``what``, for the message); raise
    ``PeerError`` naming the ranks that did not within ``timeout``. No-op without a timeout, in a
    world of one, or on a backend other than gloo."""
    if timeout is None or dist.get_world_size(group) == 1:
        return
    if "gloo" not in str(dist.get_backend(group)):
        return
    try:
        dist.monitored_barrier(group=group, timeout=timeout, wait_all_ranks=True)
    except RuntimeError as exc:
        rank = dist.get_rank(group)
        missing = _missing_ranks(str(exc))
        who = f"rank(s) {missing}" if missing else "rank 0 (which checks who arrived)"
        raise PeerError(
            f"rank {rank}: {who} did not reach {what} within {timeout.total_seconds():g} s. "
            f"Fix: {what} is collective, call it on every rank at the same point of the loop "
            "(or check that those ranks are alive)",
            missing[0] if missing else 0,
        ) from exc


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
) -> dict[str, list[int]]:
    """Every rank's ``mine`` values by key (one ``all_gather_object``). Raises ``ValueError`` if
    a key's values differ across ranks, with the fix from ``fixes`` (``""``: may differ)."""
    everyone = gather_object(mine, group, world_size)
    table = {key: [int(v[key]) for v in everyone] for key in mine}
    for key, seen in table.items():
        fix = fixes.get(key, f"pass the same {key} on every rank")
        if fix and len(set(seen)) > 1:
            raise ValueError(f"{key} differs across ranks ({seen}, by rank): {fix}")
    return table


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
