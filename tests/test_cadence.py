"""``gossip_every`` (local steps between exchanges) and ``average_every`` (Gossip-PGA): traffic
per step follows the cadence, the replicas' average is kept by every mix, the periodic average
leaves every rank bit-identical, and the virtual cluster mixes exactly as the engine."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _dist import run_world
from _toy import Recorder, batch, flat, perturb_, toy_model
from torch import nn

from gossipgrad import GossipDataParallel, cadence
from gossipgrad.sim.virtual import VirtualCluster

_STEPS = 12


def _optimizer(params: object) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)  # type: ignore[arg-type]


def _run(rank: int, world: int, every: int, average: int, wire: torch.dtype | None = None) -> tuple:
    model = GossipDataParallel(
        toy_model(), gossip_every=every, average_every=average, wire_dtype=wire
    )
    perturb_(model.module, rank)  # replicas differ, so the first mixes mean something
    opt = _optimizer(model.parameters())
    per_step, spreads = [], []
    for t in range(_STEPS):
        events: list[tuple] = []
        with Recorder(events):  # the whole step: a step ends (mixes, averages, sends) in opt.step
            x, y = batch(rank, t)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        opt.zero_grad()
        per_step.append(events)
        everyone = [torch.empty(0)] * world  # at the step's end, after the optimizer step
        dist.all_gather_object(everyone, flat(model.module))
        spreads.append(max((everyone[0] - e).abs().max().item() for e in everyone))
    return per_step, spreads, flat(model.module), model.consensus_distance()


@pytest.mark.parametrize(("every", "average"), [(3, 0), (1, 4), (2, 6)])
def test_traffic_and_averages_follow_the_cadence(every: int, average: int) -> None:
    for steps, spreads, _, _ in run_world(_run, 3, every, average):
        for t, events in enumerate(steps):
            sends = [e for e in events if e[0] == "isend"]
            collectives = [e for e in events if e[0] in Recorder.COLLECTIVES]
            # the exchange of step t + 1 leaves at the end of step t, inside its optimizer step
            assert bool(sends) == cadence.exchange_starts(t + 1, every), (t, events)
            assert bool(collectives) == cadence.average_due(t, average), (t, events)
            if cadence.average_due(t, average):
                assert spreads[t] == 0.0, f"step {t}: the exact average leaves ranks equal"
            elif t < every:
                assert spreads[t] > 0.0


@pytest.mark.parametrize("every", [1, 2, 5])
@pytest.mark.parametrize("staleness", [0, 3])
def test_exchange_0_is_neither_sent_nor_mixed(every: int, staleness: int) -> None:
    # every replica is the same at step 0, so its exchange would mix in exactly nothing
    starts = [t for t in range(40) if cadence.exchange_starts(t, every)]
    mixed = [cadence.mixed_exchange(t, every, staleness) for t in range(40)]
    assert starts[0] == every and starts == list(range(every, 40, every))
    assert 0 not in mixed and min(j for j in mixed if j is not None) == 1


def _pure_mixing(rank: int, world: int, every: int) -> tuple[float, float, float]:
    model = GossipDataParallel(toy_model(batchnorm=False), gossip_every=every)
    perturb_(model.module, rank)
    before = flat(model.module)
    dist.all_reduce(before)
    start = model.consensus_distance()
    x, _ = batch(rank, 0)
    for _ in range(4 * every):  # no optimizer: step_ended() ends each step, only mixing moves
        model(x).sum().backward()
        model.step_ended()
    after = flat(model.module)
    dist.all_reduce(after)
    return (before - after).abs().max().item(), start, model.consensus_distance()


def test_local_steps_keep_the_average_and_still_reach_consensus() -> None:
    for err, start, end in run_world(_pure_mixing, 4, 3):
        assert err < 1e-5 * 4
        assert end < 0.2 * start


@pytest.mark.parametrize("wire", [None, torch.int8], ids=["float32", "int8"])
def test_the_virtual_cluster_matches_the_engine_under_a_cadence(wire: torch.dtype | None) -> None:
    every, average, world = 3, 5, 3
    engine = run_world(_run, world, every, average, wire)
    torch.manual_seed(0)
    cluster = VirtualCluster(
        toy_model(), world, _optimizer, gossip_every=every, average_every=average, wire_dtype=wire
    )
    for rank, replica in enumerate(cluster.replicas):
        perturb_(replica, rank)
    for t in range(_STEPS):
        batches = [batch(rank, t) for rank in range(world)]
        cluster.train_step(batches, nn.functional.cross_entropy)
    for rank, (_, _, real, _) in enumerate(engine):  # before any flush: the last exchange sent
        assert (flat(cluster.replicas[rank]) - real).abs().max().item() < 1e-6  # is in flight
    for _, _, _, distance in engine:  # (consensus_distance flushes it)
        assert abs(cluster.consensus_distance() - distance) < 1e-6
