"""Gradient tracking (``tracking=True``): the trackers' mean is the mean gradient at every step,
and the virtual cluster tracks exactly as the engine. What tracking is for, AdamW and Muon on
label-skewed shards reaching all-reduce's accuracy where plain gossip falls far short, is
tests/sim/test_optimizers.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _dist import run_world
from _toy import batch, flat, toy_model
from torch import nn

from gossipgrad import GossipDataParallel
from gossipgrad.sim.virtual import VirtualCluster

_STEPS = 8


def _optimizer(params: object) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)  # type: ignore[arg-type]


def _skewed_batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch(rank, step)
    return x + 2.0 * rank, y  # each rank's data sits elsewhere: its gradients differ


def _tracked_mean(
    rank: int, world: int, every: int
) -> tuple[list[float], list[float], torch.Tensor]:
    model = GossipDataParallel(toy_model(batchnorm=False), tracking=True, gossip_every=every)
    opt = _optimizer(model.parameters())
    params = list(model.parameters())
    gaps, offsets = [], []
    for t in range(_STEPS):
        x, y = _skewed_batch(rank, t)
        loss = nn.functional.cross_entropy(model(x), y)
        local = torch.cat(
            [g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)]
        )
        loss.backward()  # each parameter's grad hook adds y - g_last: .grad is the tracked one
        tracked = torch.cat([p.grad.reshape(-1) for p in params])
        offsets.append((local - tracked).abs().max().item() / local.abs().max().item())
        dist.all_reduce(local)
        dist.all_reduce(tracked)
        gaps.append((local - tracked).abs().max().item() / local.abs().max().item())
        opt.step()
        opt.zero_grad()
    return gaps, offsets, flat(model.module)


@pytest.mark.parametrize("every", [1, 3])
def test_the_trackers_mean_is_the_mean_gradient_at_every_step(every: int) -> None:
    for gaps, offsets, _ in run_world(_tracked_mean, 3, every):
        assert max(gaps) < 1e-5, gaps
        # .grad after backward is the tracked direction, not this rank's own gradient (once a
        # mixed tracker came back), or the mean above would hold trivially
        assert max(offsets) > 1e-3, offsets


def test_the_virtual_cluster_tracks_as_the_engine() -> None:
    world = 3
    engine = run_world(_tracked_mean, world, 1)
    cluster = VirtualCluster(toy_model(batchnorm=False), world, _optimizer, tracking=True)
    for t in range(_STEPS):
        batches = [_skewed_batch(rank, t) for rank in range(world)]
        cluster.train_step(batches, nn.functional.cross_entropy)
    for rank, (_, _, real) in enumerate(engine):
        assert (flat(cluster.replicas[rank]) - real).abs().max().item() < 1e-5
