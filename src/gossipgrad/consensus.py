"""Collective helpers over a set of replicas: how far apart they are, and their exact average.

These are the only collectives gossipgrad uses, and never inside a training step: the consensus
distance is measured every N steps, the exact average once at the end (or every K steps on request).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
