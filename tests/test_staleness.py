"""``max_staleness`` (bounded staleness, SGP's overlap with a delay): each exchange is mixed ``S``
steps after it is due and never later; every message is mixed exactly once, so the replicas'
average is kept; ranks run ahead of a paused rank by up to ``S`` steps instead of waiting for it;
the virtual cluster mixes exactly as the engine; flush and checkpoints drain every exchange."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _dist import run_world
from _toy import Recorder, batch, flat, perturb_, toy_model
from torch import nn

from gossipgrad import GossipDataParallel, GossipOptions, cadence
from gossipgrad.mixing import delayed_weight
from gossipgrad.sim.virtual import VirtualCluster

_STEPS = 10


@pytest.mark.parametrize("every", [1, 2, 3])
@pytest.mark.parametrize("staleness", [0, 1, 4])
def test_each_exchange_is_mixed_once_exactly_staleness_steps_late(
    every: int, staleness: int
) -> None:
    mixed = [cadence.mixed_exchange(t, every, staleness) for t in range(60)]
    exchanges = [j for j in mixed if j is not None]
    # each once, in order, from exchange 1 (exchange 0 is not sent: every replica is the same)
    assert exchanges == list(range(1, len(exchanges) + 1))
    for t, j in enumerate(mixed):
        if j is not None:  # due at the end of step jK + K - 1, mixed S steps later
            assert t == j * every + every - 1 + staleness
    # never more exchanges in flight than buffers_in_flight
    in_flight = 0
    for t in range(60):
        in_flight += cadence.exchange_starts(t, every)
        assert in_flight <= cadence.buffers_in_flight(every, staleness)
        in_flight -= mixed[t] is not None
    if staleness == 0:
        indices = [cadence.exchange_index(t, every) for t in range(60)]
        assert mixed == [
            j if cadence.exchange_ends(t, every) and j > 0 else None for t, j in enumerate(indices)
        ]


def test_bad_staleness_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="max_staleness must be an integer >= 0"):
        GossipOptions(max_staleness=-1)
    with pytest.raises(ValueError, match="needs sync=False"):
        GossipOptions(max_staleness=2, sync=True)
    with pytest.raises(ValueError, match="mode='params'"):
        GossipOptions(max_staleness=2, mode="gradients")
    with pytest.raises(ValueError, match="below 1024"):
        GossipOptions(max_staleness=5000)


def _optimizer(params: object) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)  # type: ignore[arg-type]


def _still(params: object) -> torch.optim.Optimizer:
    """An optimizer that leaves the parameters as they are (lr 0): a step still ends inside its
    ``step()``, so only mixing moves the replicas."""
    return torch.optim.SGD(params, lr=0.0)  # type: ignore[arg-type]


def _train(rank: int, world: int, staleness: int, every: int) -> tuple:
    model = GossipDataParallel(toy_model(), max_staleness=staleness, gossip_every=every)
    perturb_(model.module, rank)
    opt = _optimizer(model.parameters())
    engine = model._engine
    mixed_at: list[tuple[int, int]] = []  # (exchange, step whose end mixed it)
    mix = engine._mix

    def recording_mix(pending: Any, **kwargs: Any) -> None:
        mixed_at.append((pending.index, engine.step))  # the step ending now (not yet counted)
        mix(pending, **kwargs)

    engine._mix = recording_mix  # type: ignore[method-assign]
    sends = []
    for t in range(_STEPS):
        events: list[tuple] = []
        with Recorder(events):  # the whole step: exchanges leave inside optimizer.step()
            x, y = batch(rank, t)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        sends.append(sum(e[0] == "isend" for e in events))
        opt.zero_grad()
    before_flush, in_training = flat(model.module), list(mixed_at)
    model.flush()
    everything = [j for j, _ in mixed_at]
    return (
        in_training,
        everything,
        sends,
        before_flush,
        flat(model.module),
        model.consensus_distance(),
    )


@pytest.mark.parametrize(("staleness", "every"), [(2, 1), (3, 2)])
def test_the_engine_mixes_s_steps_late_and_the_virtual_cluster_matches(
    staleness: int, every: int
) -> None:
    world = 4
    engine = run_world(_train, world, staleness, every)
    # exchange 0 is not sent; exchange j leaves at the end of step jK - 1 (inside its optimizer
    # step), so the run sends exchanges 1 .. _STEPS // every
    exchanges = len(range(every, _STEPS + 1, every))
    for in_training, everything, sends, *_ in engine:
        assert in_training, "some exchanges are due within the run"
        for j, t in in_training:
            assert t == j * every + every - 1 + staleness, in_training  # never later or sooner
        assert everything == list(range(1, exchanges + 1))  # each mixed once, in order
        for t, n in enumerate(sends):  # still one partner per exchange, one message stream,
            assert (n > 0) == cadence.exchange_starts(t + 1, every)  # sent as step t ends
    torch.manual_seed(0)
    cluster = VirtualCluster(
        toy_model(), world, _optimizer, max_staleness=staleness, gossip_every=every
    )
    for rank, replica in enumerate(cluster.replicas):
        perturb_(replica, rank)
    for t in range(_STEPS):
        cluster.train_step([batch(rank, t) for rank in range(world)], nn.functional.cross_entropy)
    for rank, (*_, before_flush, _, _) in enumerate(engine):
        assert torch.allclose(flat(cluster.replicas[rank]), before_flush, rtol=1e-6, atol=1e-6)
    cluster.flush()
    for rank, (*_, after, distance) in enumerate(engine):
        assert torch.allclose(flat(cluster.replicas[rank]), after, rtol=1e-6, atol=1e-6)
        assert abs(cluster.consensus_distance() - distance) < 1e-6


def _pure_mixing(rank: int, world: int, staleness: int) -> tuple[float, float, float]:
    model = GossipDataParallel(toy_model(batchnorm=False), max_staleness=staleness)
    perturb_(model.module, rank)
    before = flat(model.module)
    dist.all_reduce(before)
    start = model.consensus_distance()
    opt = _still(model.parameters())
    x, _ = batch(rank, 0)
    for _ in range(12):  # steps that do not move the parameters: only the delayed mixing moves
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
    model.flush()
    after = flat(model.module)
    dist.all_reduce(after)
    return (before - after).abs().max().item(), start, model.consensus_distance()


def test_delayed_mixing_keeps_the_average_and_reaches_consensus() -> None:
    for err, start, end in run_world(_pure_mixing, 4, 3):
        assert err < 1e-5 * 4
        assert end < 0.5 * start


def _run_ahead(rank: int, world: int, staleness: int, pause_before: int) -> int:
    """Rank 0 stops before step ``pause_before`` until every other rank has finished step
    ``pause_before + staleness``: possible only if they need none of its later messages (the
    exchange of step ``pause_before`` left rank 0 inside its last optimizer step, at the end of
    step ``pause_before - 1``, and is mixed at the end of step ``pause_before + staleness``)."""
    model = GossipDataParallel(toy_model(), max_staleness=staleness)
    opt = _optimizer(model.parameters())
    store = dist.distributed_c10d._get_default_store()
    ahead = pause_before + staleness
    for t in range(pause_before + staleness + 2):
        if rank == 0 and t == pause_before:
            store.wait([f"done_{r}_{ahead}" for r in range(1, world)], timedelta(seconds=60))
        x, y = batch(rank, t)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        store.set(f"done_{rank}_{t}", "1")
    model.flush()
    return model.step


def test_ranks_run_up_to_s_steps_ahead_of_a_paused_rank() -> None:
    assert run_world(_run_ahead, 4, 2, 3) == [7, 7, 7, 7]


def _checkpoint(rank: int, world: int) -> tuple[int, int]:
    model = GossipDataParallel(toy_model(), max_staleness=3)
    opt = _optimizer(model.parameters())
    for t in range(5):
        x, y = batch(rank, t)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    in_flight = len(model._engine._pending)
    model.module.load_state_dict(model.module.state_dict())  # a load drains every exchange first
    return in_flight, len(model._engine._pending)


def test_a_load_drains_every_exchange_in_flight() -> None:
    # after 5 steps, exchanges 1..5 were sent (the last at the end of step 4) and exchange 1 was
    # mixed at the end of step 4 (3 steps late): S + 1 = 4 are in flight, every buffer set
    assert cadence.buffers_in_flight(1, 3) == 4
    assert run_world(_checkpoint, 2) == [(4, 0), (4, 0)]


def test_the_delayed_weight_is_the_weight_without_delay_and_shrinks_with_it() -> None:
    weights = [delayed_weight(0.5, d) for d in range(6)]
    assert weights[0] == 0.5
    assert all(a > b > 0 for a, b in zip(weights, weights[1:], strict=False))


@pytest.mark.parametrize("staleness", [1, 2, 4, 8])
def test_delayed_mixing_contracts_at_every_staleness(staleness: int) -> None:
    """Without the shrunk weight, w = 1/2 diverges from a delay of 2 on (Levin and May)."""
    world = 8
    cluster = VirtualCluster(
        toy_model(batchnorm=False), world, lambda p: torch.optim.SGD(p, lr=0.0),
        max_staleness=staleness,
    )  # fmt: skip
    for rank, replica in enumerate(cluster.replicas):
        perturb_(replica, rank)
    mean = torch.stack([flat(r) for r in cluster.replicas]).mean(0)
    start = cluster.consensus_distance()
    for t in range(150):
        cluster.train_step([batch(r, t) for r in range(world)], nn.functional.cross_entropy)
    cluster.flush()
    assert torch.allclose(torch.stack([flat(r) for r in cluster.replicas]).mean(0), mean, atol=1e-5)
    assert cluster.consensus_distance() < 1e-2 * start


def _uneven(rank: int, world: int) -> tuple[float, int]:
    model = GossipDataParallel(toy_model(batchnorm=False), max_staleness=2)
    perturb_(model.module, rank)
    before = flat(model.module)
    dist.all_reduce(before)
    opt = _still(model.parameters())
    x, _ = batch(rank, 0)
    with model.join():  # rank r has 3 + 2r batches; joined ranks keep answering, S steps late
        for _ in range(3 + 2 * rank):
            model(x).sum().backward()
            opt.step()  # lr 0: only mixing moves the replicas
            opt.zero_grad()
    model.flush()
    after = flat(model.module)
    dist.all_reduce(after)
    return (before - after).abs().max().item(), model.step


def test_uneven_inputs_under_join_keep_the_average_with_delayed_mixing() -> None:
    results = run_world(_uneven, 3)
    assert all(err < 1e-5 * 3 for err, _ in results)
    assert {step for _, step in results} == {7}  # every rank took the longest rank's steps


def _buffers_at_wrapping(rank: int, world: int, wire: torch.dtype | None) -> tuple[int, bool, bool]:
    model = GossipDataParallel(toy_model(), gossip_every=2, max_staleness=3, wire_dtype=wire)
    engine = model._engine
    opt = _optimizer(model.parameters())
    made = {b.send.data_ptr() for buckets in engine._free for b in buckets}
    buffers = [(b.send, b.recv, b.stage) for buckets in engine._free for b in buckets]
    zeroed = all(t is None or not t.any() for group in buffers for t in group)
    if wire is not None:  # the stage where a compressed payload's difference is computed
        assert all(stage is not None for *_, stage in buffers)
    used = set()
    for t in range(12):
        x, y = batch(rank, t)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()  # the step's end: mixes what is due, then sends the next exchange
        opt.zero_grad()
        used |= {b.send.data_ptr() for p in engine._pending for b in p.buckets}
    model.flush()
    return len(engine._free), zeroed, used <= made


@pytest.mark.parametrize("wire", [None, torch.bfloat16])
def test_every_exchange_buffer_is_allocated_and_touched_when_wrapping(
    wire: torch.dtype | None,
) -> None:
    # touched at wrapping, so that no exchange step pays the page faults of fresh memory
    slots = cadence.buffers_in_flight(2, 3)
    assert slots == 3
    assert run_world(_buffers_at_wrapping, 2, wire) == [(slots, True, True)] * 2


def test_the_virtual_cluster_makes_every_buffer_slot_when_built_as_the_engine() -> None:
    cluster = VirtualCluster(toy_model(), 2, _optimizer, gossip_every=2, max_staleness=3)
    slots = cadence.buffers_in_flight(2, 3)
    assert all(len(e._free) == slots for e in cluster.engines)
    made = [{id(buckets) for buckets in e._free} for e in cluster.engines]
    for t in range(12):
        cluster.train_step([batch(rank, t) for rank in range(2)], nn.functional.cross_entropy)
        for e, mine in zip(cluster.engines, made, strict=True):
            assert {id(p.buckets) for p in e._pending} <= mine  # in flight: buffers made at first
            assert len(e._free) + len(e._pending) == slots  # none made or lost since
    cluster.flush()
    for e, mine in zip(cluster.engines, made, strict=True):
        assert {id(buckets) for buckets in e._free} == mine
