"""The virtual cluster: it must mix exactly as the real engine does, and keep its invariants."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.distributed as dist
from _dist import run_world
from torch import nn

import gossipgrad
from gossipgrad.schedule import rounds_length
from gossipgrad.sim.virtual import VirtualCluster, replica_batches

_CONFIGS = [  # (algo, sync, mode)
    ("gossip", True, "params"),
    ("gossip", False, "params"),
    ("gossip", True, "gradients"),
    ("allreduce", False, "params"),
]
_SCHEDULES = ["dissemination", "exact"]  # (all-reduce ignores the schedule: run it once)
_RUNS = [
    (s, *c)
    for s, c in itertools.product(_SCHEDULES, _CONFIGS)
    if s == _SCHEDULES[0] or c[0] == "gossip"
]
_STEPS = 9
_SEED = 3


def _model(batchnorm: bool = True) -> nn.Module:
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(16) if batchnorm else nn.Identity()
    return nn.Sequential(nn.Linear(6, 16), norm, nn.ReLU(), nn.Linear(16, 3))


def _optimizer(params: object) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)  # type: ignore[arg-type]


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(8, 6, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def _flat(module: nn.Module) -> torch.Tensor:
    tensors = list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]
    return torch.cat([t.detach().double().reshape(-1) for t in tensors])


def _perturb_(module: nn.Module, rank: int) -> None:
    g = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        for t in module.parameters():
            t.add_(torch.randn(t.shape, generator=g))


# --- agreement with the real engine -----------------------------------------------------------


def _engine_runs(rank: int, world: int) -> dict[tuple, tuple[torch.Tensor, float]]:
    out = {}
    for schedule, algo, sync, mode in _RUNS:
        model = gossipgrad.wrap(_model(), algo, sync=sync, mode=mode, schedule=schedule, seed=_SEED)
        opt = _optimizer(model.parameters())
        for t in range(_STEPS):
            x, y = _batch(rank, t)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        model.flush()
        distance = model.consensus_distance()
        out[schedule, algo, sync, mode] = (_flat(model.module), distance)
        dist.barrier()
    return out


def _virtual_run(world: int, schedule: str, algo: str, sync: bool, mode: str) -> VirtualCluster:
    cluster = VirtualCluster(
        _model(), world, _optimizer, algo=algo, sync=sync, mode=mode, schedule=schedule, seed=_SEED
    )
    for t in range(_STEPS):
        cluster.train_step([_batch(r, t) for r in range(world)], nn.functional.cross_entropy)
    cluster.flush()
    return cluster


def test_virtual_cluster_matches_the_engine() -> None:
    world = 3  # exact for 3 ranks: weights other than 1/2, and ranks that rest
    engine = run_world(_engine_runs, world)
    for schedule, algo, sync, mode in _RUNS:
        cluster = _virtual_run(world, schedule, algo, sync, mode)
        flats = [_flat(r) for r in cluster.replicas]
        spread = max((flats[0] - f).abs().max().item() for f in flats)
        for rank in range(world):
            real, real_distance = engine[rank][schedule, algo, sync, mode]
            assert (flats[rank] - real).abs().max().item() < 1e-6, (schedule, algo, sync, mode)
            assert cluster.consensus_distance() == pytest.approx(real_distance, abs=1e-6)
        if algo == "gossip":  # the comparison means something only if replicas differ
            assert spread > 1e-3


def test_allreduce_keeps_replicas_identical() -> None:
    # (BatchNorm statistics would differ: as with DDP, each replica's forward updates its own)
    cluster = VirtualCluster(_model(batchnorm=False), 5, _optimizer, algo="allreduce")
    for t in range(6):
        cluster.train_step([_batch(r, t) for r in range(5)], nn.functional.cross_entropy)
    flats = [_flat(r) for r in cluster.replicas]
    assert (flats[0] - _flat(_model(batchnorm=False))).abs().max() > 1e-3  # training moved them
    assert all(torch.equal(flats[0], f) for f in flats)
    assert cluster.consensus_distance() == 0.0


# --- mixing invariants ------------------------------------------------------------------------


def _perturbed_cluster(world: int, sync: bool, schedule: str) -> VirtualCluster:
    cluster = VirtualCluster(
        _model(batchnorm=False), world, _optimizer, sync=sync, schedule=schedule, seed=1
    )
    for rank, replica in enumerate(cluster.replicas):
        _perturb_(replica, rank)
    return cluster


def _mean(cluster: VirtualCluster) -> torch.Tensor:
    return torch.stack([_flat(r) for r in cluster.replicas]).mean(0)


@pytest.mark.parametrize("world", [3, 5, 8])
@pytest.mark.parametrize("sync", [True, False])
def test_mixing_without_optimizer_preserves_the_mean(world: int, sync: bool) -> None:
    cluster = _perturbed_cluster(world, sync, "dissemination")
    before, start = _mean(cluster), cluster.consensus_distance()
    for _ in range(7):
        cluster.gossip()
    cluster.flush()
    assert (_mean(cluster) - before).abs().max().item() < 1e-6
    assert cluster.consensus_distance() < 0.3 * start


@pytest.mark.parametrize(("world", "schedule"), [(8, "hypercube"), (16, "hypercube"), (6, "exact")])
@pytest.mark.parametrize("sync", [True, False])
def test_exact_schedules_reach_the_mean_after_one_round(
    world: int, schedule: str, sync: bool
) -> None:
    cluster = _perturbed_cluster(world, sync, schedule)
    mean = _mean(cluster)
    for _ in range(rounds_length(world, schedule) - 1):
        cluster.gossip()
    cluster.flush()
    assert cluster.consensus_distance() > 1e-2  # one step short of the round: not there yet
    cluster.gossip()
    cluster.flush()
    for replica in cluster.replicas:
        assert (_flat(replica) - mean).abs().max().item() < 1e-5
    assert cluster.consensus_distance() < 1e-6


def test_average_replicas_and_mean_module_give_the_exact_mean() -> None:
    cluster = _perturbed_cluster(4, True, "dissemination")
    mean = _mean(cluster)
    assert (_flat(cluster.mean_module()) - mean).abs().max().item() < 1e-6
    assert cluster.consensus_distance() > 0.1  # mean_module left the replicas alone
    cluster.average_replicas()
    assert cluster.consensus_distance() < 1e-6
    assert (_flat(cluster.replicas[2]) - mean).abs().max().item() < 1e-6


# --- data -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_replica_batches_visit_every_sample_once_per_epoch(fraction: float) -> None:
    labels = np.repeat(np.arange(4), 24)  # 96 samples, 4 classes, sorted
    owners = np.full((3, 96), -1)  # owners[epoch, sample]: the replica that visited it
    for epoch, ids in replica_batches(
        labels, 4, epochs=3, batch_size=5, partition="label-skew", shuffle_fraction=fraction
    ):
        assert len({len(i) for i in ids}) == 1  # every replica takes a step together
        for replica, i in enumerate(ids):
            assert (owners[epoch, i.numpy()] == -1).all()  # no sample visited twice
            owners[epoch, i.numpy()] = replica
    assert (owners >= 0).all()  # ... and none missed
    moved = (owners[0] != owners[2]).sum()
    if fraction == 0.0:  # label skew without shuffle: replica 0 holds class 0 only, forever
        assert moved == 0
        assert set(labels[owners[2] == 0]) == {0}
    else:
        assert moved >= 12


def test_iid_batches_mix_classes() -> None:
    labels = np.repeat(np.arange(4), 24)
    _, ids = next(iter(replica_batches(labels, 4, epochs=1, batch_size=24)))
    for i in ids:
        assert len(set(labels[i.numpy()])) == 4


def test_bad_input_is_explained() -> None:
    with pytest.raises(ValueError, match="algo"):
        VirtualCluster(_model(), 2, _optimizer, algo="ring")
    with pytest.raises(ValueError, match="hypercube"):
        VirtualCluster(_model(), 6, _optimizer, schedule="hypercube")
    with pytest.raises(ValueError, match="one .input, target. pair per replica"):
        VirtualCluster(_model(), 2, _optimizer).train_step([_batch(0, 0)], lambda o, y: o.sum())
    with pytest.raises(ValueError, match="mode='params'"):
        VirtualCluster(_model(), 2, _optimizer, mode="gradients").gossip()
    with pytest.raises(ValueError, match="partition"):
        next(replica_batches([0, 1], 2, epochs=1, batch_size=1, partition="dirichlet"))
