"""The collectives gossipgrad uses, never inside a training step: how far apart the replicas
are (consensus distance, every N steps), their exact average (at the end, or on request), the
broadcast from rank 0 when wrapping, and the checks that every rank agrees on its setup.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from gossipgrad.mixing import Bucket, pack_, views


@torch.no_grad()
def consensus_distance(
    tensors: Sequence[torch.Tensor], buckets: Sequence[Bucket], group: dist.ProcessGroup
) -> float:
    """RMS over ranks of ``||x_i - mean||``, relative to ``||mean||`` (0 when all agree).

    ``buckets`` must cover ``tensors`` (see ``mixing.make_buckets``); their ``recv`` buffers are
    used as scratch. One all-reduce of the model and one of two scalars.
    """
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
    return math.sqrt(mean_sq_dist) / math.sqrt(norm_sq) if norm_sq > 0 else 0.0


@torch.no_grad()
def average_(
    tensors: Sequence[torch.Tensor],
    buckets: Sequence[Bucket],
    group: dist.ProcessGroup,
    into: Sequence[torch.Tensor] | None = None,
) -> None:
    """Replace every rank's ``tensors`` by their exact mean over the group (one all-reduce), or,
    with ``into`` (tensors shaped like ``tensors``), write the mean there and leave ``tensors``
    as they are."""
    world = dist.get_world_size(group)
    if world == 1 and into is None:
        return
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
    tensors: Sequence[torch.Tensor], buckets: Sequence[Bucket], group: dist.ProcessGroup
) -> None:
    """Copy group rank 0's ``tensors`` to every rank."""
    if dist.get_world_size(group) == 1:
        return
    src = dist.get_global_rank(group, 0)
    is_src = dist.get_rank(group) == 0
    for b in buckets:
        own = [tensors[i] for i in b.indices]
        flat = pack_(b.recv, own) if is_src else b.recv
        dist.broadcast(flat, src, group=group)
        if not is_src:
            torch._foreach_copy_(own, views(flat, own))


def gather_object(obj: Any, group: dist.ProcessGroup | None, world_size: int) -> list[Any]:
    """Every rank's ``obj`` (picklable), by group rank; no communication in a world of one."""
    if world_size == 1:
        return [obj]
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
