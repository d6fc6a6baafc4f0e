"""HierarchicalDataParallel on 4-6 gloo ranks emulating nodes of 2: nodes stay identical inside,
only leaders talk across nodes, mixing keeps the average, the edge cases are DDP and gossip."""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _dist import run_world
from _toy import Recorder, batch, fit, flat, toy_model
from torch import nn

import gossipgrad
from gossipgrad import AllReduceDataParallel, GossipDataParallel
from gossipgrad.hierarchical import HierarchicalDataParallel


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    everyone = [torch.empty(0)] * dist.get_world_size()
    dist.all_gather_object(everyone, t)
    return everyone


def _step(model: nn.Module, opt: torch.optim.Optimizer, rank: int, t: int) -> None:
    x, y = batch(rank, t)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


# --- the node's ranks hold one replica ----------------------------------------------------------


def _per_step_params(rank: int, world: int, options: dict) -> list[list[torch.Tensor]]:
    model = HierarchicalDataParallel(toy_model(), ranks_per_node=2, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    history = []
    for t in range(6):
        _step(model, opt, rank, t)  # every rank sees its own batches
        history.append(_gather(flat(model.module, buffers=False)))
    model.flush()
    return history


@pytest.mark.parametrize(
    "options",
    [{"sync": True}, {"sync": False}, {"max_staleness": 1, "gossip_every": 2}],
    ids=["sync", "async", "K2-S1"],
)
def test_ranks_of_a_node_hold_identical_parameters_after_every_step(options: dict) -> None:
    for t, flats in enumerate(run_world(_per_step_params, 4, options)[0]):
        assert torch.equal(flats[0], flats[1]), f"node 0 differs inside at step {t}"
        assert torch.equal(flats[2], flats[3]), f"node 1 differs inside at step {t}"
        assert not torch.equal(flats[0], flats[2]), "the nodes saw different data"


# --- traffic: only leaders cross nodes, one partner each ----------------------------------------


def _traffic(rank: int, world: int) -> tuple[list[tuple[list, list]], list[int], int]:
    model = HierarchicalDataParallel(toy_model(), ranks_per_node=2, streams=2)
    model_bytes = sum(t.numel() * t.element_size() for t in model.module.state_dict().values())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    per_step, sent = [], []
    for t in range(6):
        compute: list[tuple] = []
        ending: list[tuple] = []
        x, y = batch(rank, t)
        with Recorder(compute):
            nn.functional.cross_entropy(model(x), y).backward()
        with Recorder(ending):  # the step ends: mix what is due, send the next exchange
            opt.step()
        opt.zero_grad()
        per_step.append((compute, ending))
        sent.append(model.bytes_sent_last_step)
    model.flush()
    return per_step, sent, model_bytes


def test_only_leaders_send_across_nodes_to_one_leader_per_step() -> None:
    leaders = {0, 2, 4}
    for rank, (steps, sent, model_bytes) in enumerate(run_world(_traffic, 6)):
        for t, (compute, events) in enumerate(steps):
            assert compute == [], f"rank {rank} step {t}: forward and backward send nothing"
            sends = [e for e in events if e[0] == "isend"]
            recvs = [e for e in events if e[0] == "irecv"]
            collectives = {e[0] for e in events if e[0] in Recorder.COLLECTIVES}
            # exchange 0 is never sent (every replica is the same at step 0), so the end of step 0
            # mixes nothing and the node's ranks get no replica from their leader there
            assert ("broadcast" in collectives) == (t > 0), f"rank {rank} step {t}: {events}"
            if rank not in leaders:
                assert not sends and not recvs, f"rank {rank} step {t}: {events}"
                assert sent[t] == 0
                continue
            # the end of step t sends exchange t + 1 (it travels during step t + 1)
            assert len({e[1] for e in sends}) == 1, f"rank {rank} step {t}: {sends}"
            assert len({e[1] for e in recvs}) == 1, f"rank {rank} step {t}: {recvs}"
            assert {e[1] for e in sends + recvs} <= leaders - {rank}
            assert sum(e[2] for e in sends) <= 1.05 * model_bytes
            assert sent[t] == sum(e[2] for e in sends)
            assert collectives <= {"broadcast"}, "inside the node: the leader's replica only"


# --- mixing between nodes ------------------------------------------------------------------------


def _mixing(rank: int, world: int, sync: bool) -> tuple[float, float, float]:
    model = HierarchicalDataParallel(toy_model(batchnorm=False), ranks_per_node=2, sync=sync)
    g = torch.Generator().manual_seed(rank // 2)  # the same perturbation on the node's ranks
    with torch.no_grad():
        for p in model.module.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    before = flat(model.module)
    dist.all_reduce(before)
    start = model.consensus_distance()
    x, _ = batch(rank, 0)
    still = torch.optim.SGD(model.parameters(), lr=0.0)  # steps that change nothing: pure mixing
    for _ in range(6):
        model(x).sum().backward()
        still.step()
        still.zero_grad()
    model.flush()
    after = flat(model.module)
    dist.all_reduce(after)
    return (before - after).abs().max().item(), start, model.consensus_distance()


@pytest.mark.parametrize("sync", [True, False])
def test_mixing_between_nodes_keeps_the_average_and_pulls_nodes_together(sync: bool) -> None:
    for err, start, end in run_world(_mixing, 6, sync):  # 3 nodes of 2
        assert err < 1e-5 * 6
        assert start > 0.1
        assert end < 0.2 * start


def _averaged(rank: int, world: int) -> tuple[float, float, list[torch.Tensor]]:
    model = HierarchicalDataParallel(toy_model(), ranks_per_node=2)  # with BatchNorm buffers
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for t in range(5):
        _step(model, opt, rank, t)
    before = model.consensus_distance()
    model.average_replicas()
    return before, model.consensus_distance(), _gather(flat(model.module))


def test_average_replicas_gives_every_rank_the_same_replica() -> None:
    # 3 nodes: with 2, completing the exchange in flight (consensus_distance flushes) would
    # already average the two leaders' replicas exactly, so they would not differ before
    for before, after, flats in run_world(_averaged, 6):
        assert before > 1e-4
        assert after < 1e-6
        assert all(torch.equal(flats[0], f) for f in flats)


# --- one node is DDP, one rank per node is gossip -------------------------------------------------


def _against_plain(rank: int, world: int, ranks_per_node: int) -> tuple[float, list[str]]:
    reference: nn.Module
    if ranks_per_node == 1:
        reference = GossipDataParallel(toy_model())
    else:
        reference = AllReduceDataParallel(toy_model())
    model = HierarchicalDataParallel(toy_model(), ranks_per_node=ranks_per_node)
    for wrapped in (reference, model):
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.05, momentum=0.9)
        for t in range(5):
            _step(wrapped, opt, rank, t)
        wrapped.flush()
    diff = (flat(reference.module) - flat(model.module)).abs().max().item()
    return diff, list(model.state_dict())


@pytest.mark.parametrize("ranks_per_node", [1, 4])
def test_one_rank_per_node_is_gossip_and_one_node_is_allreduce(ranks_per_node: int) -> None:
    for diff, keys in run_world(_against_plain, 4, ranks_per_node):
        assert diff == 0.0
        assert keys == ["module." + k for k in toy_model().state_dict()], "no duplicate entries"


def _fit_hierarchical(rank: int, world: int) -> float:
    # test_parallel's fit wraps with gossipgrad.wrap: point it here, in this forked rank only
    gossipgrad.wrap = lambda module, algo: HierarchicalDataParallel(module, ranks_per_node=2)
    return fit(rank, world, "hierarchical")


def test_accuracy_is_within_one_point_of_allreduce() -> None:
    allreduce = run_world(fit, 4, "allreduce")[0]
    hierarchical = run_world(_fit_hierarchical, 4)[0]
    assert allreduce > 0.85, "the task must be learnable for the comparison to mean anything"
    assert abs(hierarchical - allreduce) <= 0.01, (hierarchical, allreduce)


# --- node layout from torchrun's environment, resume, no_sync -------------------------------------


def _from_env(rank: int, world: int, local_world_size: str) -> tuple[Any, ...] | str:
    os.environ.update(
        GROUP_RANK=str(rank // 2),
        LOCAL_RANK=str(rank % 2),
        LOCAL_WORLD_SIZE=local_world_size,
        WORLD_SIZE=str(world),
    )
    try:
        model = HierarchicalDataParallel(toy_model())
    except ValueError as exc:
        return str(exc)
    return model.nodes, model.node, model.is_leader


def test_node_layout_is_read_from_torchrun_environment() -> None:
    results = run_world(_from_env, 4, "2")
    assert results == [
        ([[0, 1], [2, 3]], 0, True),
        ([[0, 1], [2, 3]], 0, False),
        ([[0, 1], [2, 3]], 1, True),
        ([[0, 1], [2, 3]], 1, False),
    ]
    for message in run_world(_from_env, 4, "3"):
        assert "describes node 0 inconsistently" in message
        assert "LOCAL_WORLD_SIZE [3]" in message


def _resume_and_no_sync(rank: int, world: int) -> tuple[list[tuple], int, str]:
    model = HierarchicalDataParallel(toy_model(), ranks_per_node=2, schedule="ring")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for t in range(2):
        _step(model, opt, rank, t)
    events: list[tuple] = []
    x, y = batch(rank, 2)
    with Recorder(events), model.no_sync():  # gradient accumulation: a backward of its own
        nn.functional.cross_entropy(model(x), y).backward()
    _step(model, opt, rank, 2)  # the step's last backward, and its end (the optimizer's step)
    model.flush()
    fresh = HierarchicalDataParallel(toy_model(), ranks_per_node=2, schedule="ring")
    fresh.load_gossip_state(model.gossip_state())
    other = HierarchicalDataParallel(toy_model(), ranks_per_node=2)
    try:
        other.load_gossip_state(model.gossip_state())
    except ValueError as exc:
        return events, fresh.step, str(exc)
    return events, fresh.step, "no error"


def test_no_sync_is_silent_and_gossip_state_round_trips() -> None:
    for events, step, message in run_world(_resume_and_no_sync, 4):
        assert events == []
        assert step == 3
        assert "schedule='ring'" in message


# --- bad input ------------------------------------------------------------------------------------


def _bad(rank: int, world: int, kwargs: dict[str, Any]) -> str:
    try:
        HierarchicalDataParallel(toy_model(), **kwargs)
    except ValueError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ranks_per_node": 3}, r"must divide the world size 4 \(one of \[1, 2, 4\]\), got 3"),
        ({"ranks_per_node": 0}, "ranks_per_node must divide"),
        ({}, "cannot tell which ranks share a node: launch with torchrun"),
        (
            {"ranks_per_node": 2, "mode": "gradients"},
            "supports mode='params' without tracking only, got mode='gradients'.*"
            "use GossipDataParallel",
        ),
        (
            {"ranks_per_node": 2, "tracking": True},
            "supports mode='params' without tracking only, got .*tracking=True: "
            "use GossipDataParallel",
        ),
        ({"ranks_per_node": 2, "process_group": None}, "leave process_group out"),
        ({"ranks_per_node": 2, "bucket_mb": 1}, r"unknown options \['bucket_mb'\]"),
        ({"ranks_per_node": 2, "schedule": "star"}, "schedule must be one of"),  # from the leader
    ],
)
def test_bad_layout_and_options_are_named_on_every_rank(kwargs: dict, message: str) -> None:
    for text in run_world(_bad, 4, kwargs):
        assert re.search(message, text), text


def test_uninitialised_process_group_is_a_clear_error() -> None:
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        HierarchicalDataParallel(toy_model(), ranks_per_node=1)
