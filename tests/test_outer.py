"""The outer step (``outer_lr``, ``outer_momentum``): DiLoCo's outer optimizer on each gossip pair.

What must hold: with identical data it is DiLoCo (``sync=True``) or DiLoCo with the outer step
one exchange late (overlapped); with different data the mean of the slow weights takes exactly
DiLoCo's outer step on the mean; the engine over gloo and the virtual cluster agree; a resume
mid-run and a step skipped by ``GradScaler`` change nothing; the default path is untouched.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _dist import run_world
from _toy import batch, toy_model
from torch import nn

from gossipgrad import GossipDataParallel, HierarchicalDataParallel, cadence
from gossipgrad.errors import NonFiniteError
from gossipgrad.mixing import (
    difference,
    encode_,
    make_buckets,
    mix_residual_,
    outer_step_,
    pack_,
    sent_values,
)
from gossipgrad.sim.virtual import VirtualCluster

LR, MOMENTUM = 0.7, 0.9  # DiLoCo's outer settings
H = 3  # gossip_every


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def _flat(tensors: Any) -> torch.Tensor:
    return torch.cat([t.detach().double().reshape(-1) for t in tensors])


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y)


def _cluster(world: int, sync: bool, **options: Any) -> VirtualCluster:
    options = {"gossip_every": H, "outer_lr": LR, "outer_momentum": MOMENTUM, **options}
    return VirtualCluster(toy_model(batchnorm=False), world, _adamw, sync=sync, **options)


# --- 1. identical data: DiLoCo ------------------------------------------------------------------


def _diloco_reference(steps: int, late: bool) -> torch.Tensor:
    """One process: ``H`` AdamW steps, then the outer Nesterov step on ``phi - s`` and
    ``x <- x + (phi' - s)``. ``late=False``: ``s`` is the replica now (DiLoCo: ``x = phi'``);
    ``late=True``: ``s`` is the replica of ``H`` steps ago (the step lands one exchange late)."""
    model = toy_model(batchnorm=False)
    params = list(model.parameters())
    opt = _adamw(params)
    slow = [p.detach().clone() for p in params]
    buf = [torch.zeros_like(p) for p in params]
    sent: list[torch.Tensor] | None = None
    for t in range(steps):
        x, y = batch(0, t)
        _loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if (t + 1) % H:
            continue
        s = sent if late else [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, phi, u, snap in zip(params, slow, buf, s, strict=True) if s else []:
                d = phi - snap
                u.mul_(MOMENTUM).add_(d)
                phi.sub_(LR * (d + MOMENTUM * u))
                p.add_(phi - snap)
        sent = [p.detach().clone() for p in params]  # the next snapshot: after the step
    return _flat(params)


@pytest.mark.parametrize("sync", [True, False])
def test_identical_data_is_diloco_sync_and_one_exchange_late_overlapped(sync: bool) -> None:
    steps = 4 * H
    cluster = _cluster(2, sync)
    for t in range(steps):
        cluster.train_step([batch(0, t)] * 2, _loss)
    want = _diloco_reference(steps, late=not sync)
    other = _diloco_reference(steps, late=sync)
    for replica in cluster.replicas:
        got = _flat(replica.parameters())
        assert (got - want).abs().max().item() < 1e-6
    assert (want - other).abs().max().item() > 1e-3  # the two timings differ: the test can fail


# --- 2. different data: the mean of the slow weights ------------------------------------------


class _Spy:
    """A transport that records the mean over ranks of every snapshot sent (uncompressed wire:
    the send buffer is ``s``), including a resting rank's."""

    def __init__(self, inner: Any, sums: dict[int, torch.Tensor]) -> None:
        self.inner, self.sums = inner, sums

    def start(self, sends, recvs, ex, index, where, first, salt):  # noqa: ANN001, ANN201
        total = self.sums.get(index)
        s = sends[0].double()
        self.sums[index] = s.clone() if total is None else total + s
        return self.inner.start(sends, recvs, ex, index, where, first, salt)


def _means(cluster: VirtualCluster) -> tuple[torch.Tensor, torch.Tensor]:
    slow = torch.stack([_flat(e._slow) for e in cluster.engines]).mean(0)
    buf = torch.stack([_flat(e._momentum) for e in cluster.engines]).mean(0)
    return slow, buf


@pytest.mark.parametrize(
    ("world", "schedule"), [(2, "dissemination"), (4, "dissemination"), (3, "exact")]
)
@pytest.mark.parametrize("sync", [True, False])
def test_the_mean_of_the_slow_weights_takes_diloco_outer_steps(
    world: int, schedule: str, sync: bool
) -> None:
    cluster = _cluster(world, sync, schedule=schedule)
    sums: dict[int, torch.Tensor] = {}
    for e in cluster.engines:
        assert len(e.buckets) == 1  # the spy reads one bucket per rank
        e.transport = _Spy(e.transport, sums)
    checked, spread = 0, 0.0
    for t in range(5 * H):
        slow, buf = _means(cluster)
        cluster.train_step([batch(r, t) for r in range(world)], _loss)
        spread = max(spread, cluster.consensus_distance())
        if sync:
            mixed = cadence.exchange_index(t + 1, H) if cadence.exchange_starts(t + 1, H) else None
        else:
            mixed = cadence.mixed_exchange(t, H)
        after, after_buf = _means(cluster)
        if mixed is None:
            assert torch.equal(after, slow)
            continue
        d = slow - sums[mixed] / world  # mean(phi) - mean(s)
        want_buf = MOMENTUM * buf + d
        want = slow - LR * (d + MOMENTUM * want_buf)
        assert (after - want).abs().max().item() < 1e-6, f"exchange {mixed}"
        assert (after_buf - want_buf).abs().max().item() < 1e-6
        checked += 1
    assert checked >= 4
    assert spread > 1e-3  # the data differ
    cluster.average_replicas()
    flats = [_flat(r.parameters()) for r in cluster.replicas]
    assert all(torch.equal(flats[0], f) for f in flats)


# --- 3. the engine over gloo agrees with the virtual cluster ----------------------------------

_VARIANTS = [  # (sync, schedule, wire), in groups of one world each
    [(True, "dissemination", None), (False, "exact", torch.bfloat16)],
    [(False, "dissemination", None), (True, "exact", torch.bfloat16)],
    [(False, "ring", torch.int8)],
]
_STEPS = 4 * H + 1  # ends with an exchange in flight (overlapped)


def _options(sync: bool, schedule: str, wire: torch.dtype | None) -> dict[str, Any]:
    return {
        "sync": sync,
        "schedule": schedule,
        "wire_dtype": wire,
        "gossip_every": H,
        "outer_lr": LR,
        "outer_momentum": MOMENTUM,
    }


def _gloo_runs(rank: int, world: int, group: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for variant in _VARIANTS[group]:
        model = GossipDataParallel(toy_model(batchnorm=False), **_options(*variant))
        opt = _adamw(model.parameters())
        for t in range(_STEPS):
            x, y = batch(rank, t)
            _loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        before = _flat(model.module.parameters())
        model.flush()
        out.append((before, _flat(model.module.parameters())))
        model.close()
        dist.barrier()
    return out


@pytest.mark.parametrize("group", range(len(_VARIANTS)))
def test_the_engine_over_gloo_agrees_with_the_virtual_cluster(group: int) -> None:
    world = 3  # exact for 3 ranks: weights 2/3 and ranks without a partner
    engine = run_world(_gloo_runs, world, group)
    for k, variant in enumerate(_VARIANTS[group]):
        cluster = VirtualCluster(toy_model(batchnorm=False), world, _adamw, **_options(*variant))
        for t in range(_STEPS):
            cluster.train_step([batch(r, t) for r in range(world)], _loss)
        before = [_flat(r.parameters()) for r in cluster.replicas]
        cluster.flush()
        after = [_flat(r.parameters()) for r in cluster.replicas]
        for rank in range(world):
            got_before, got_after = engine[rank][k]
            assert (got_before - before[rank]).abs().max().item() < 1e-6, (variant, rank)
            assert (got_after - after[rank]).abs().max().item() < 1e-6, (variant, rank)
        assert (after[0] - after[1]).abs().max().item() > 1e-4  # different data: not trivial


# --- 4. exact resume and a step skipped by GradScaler ------------------------------------------


def _train(model: GossipDataParallel, opt: torch.optim.Optimizer, rank: int, steps: range) -> None:
    for t in steps:
        x, y = batch(rank, t)
        _loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def _resume(rank: int, world: int, sync: bool, wire: torch.dtype | None) -> tuple[bool, str]:
    options = _options(sync, "dissemination", wire)
    straight = GossipDataParallel(toy_model(batchnorm=False), **options)
    opt = _adamw(straight.parameters())
    _train(straight, opt, rank, range(10))
    want = _flat(straight.module.parameters())
    straight.close()

    first = GossipDataParallel(toy_model(batchnorm=False), **options)
    opt = _adamw(first.parameters())
    _train(first, opt, rank, range(5))  # stops with exchange 1 in flight (overlapped)
    state = copy.deepcopy((first.module.state_dict(), opt.state_dict(), first.gossip_state()))
    in_flight = len(state[2]["in_flight"])
    first.close()  # completes the exchange with the partner; the saved state holds it unmixed

    resumed = GossipDataParallel(toy_model(seed=1, batchnorm=False), **options)
    opt = _adamw(resumed.parameters())
    resumed.module.load_state_dict(state[0])
    opt.load_state_dict(state[1])
    resumed.load_gossip_state(state[2])
    _train(resumed, opt, rank, range(5, 10))
    got = _flat(resumed.module.parameters())
    resumed.close()
    keys = f"in flight {in_flight}, slow weights {'slow_weights' in state[2]}"
    return torch.equal(got, want), keys


@pytest.mark.parametrize(("sync", "wire"), [(False, None), (False, torch.bfloat16), (True, None)])
def test_a_resume_mid_run_continues_bit_for_bit(sync: bool, wire: torch.dtype | None) -> None:
    results = run_world(_resume, 2, sync, wire)
    flight = 0 if sync else 1  # sync mixes each exchange at once
    assert results == [(True, f"in flight {flight}, slow weights True")] * 2


def _skipped(rank: int, world: int, sync: bool) -> list[tuple[torch.Tensor, int]]:
    """Perturbed replicas, learning rate 0 (only the outer step moves them); a GradScaler finds
    inf on rank 1 at step ``skip_at`` (None: never): the end of each run, and its step count."""
    out = []
    for skip_at in (None, 2 * H - 1, 2 * H):  # never, a step that ends with a mix, one inside
        options = _options(sync, "dissemination", None)
        model = GossipDataParallel(toy_model(batchnorm=False), **options)
        torch.manual_seed(rank)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        model._engine.reset_outer()  # the slow weights start from the perturbed replica
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
        for t in range(4 * H):
            x, y = batch(rank, t)
            poison = float("inf") if (rank == 1 and t == skip_at) else 1.0
            scaler.scale(_loss(model(x), y) * poison).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        model.flush()
        out.append((_flat(model.module.parameters()), model.step))
        model.close()
    return out


@pytest.mark.parametrize("sync", [True, False])
def test_a_step_skipped_on_one_rank_changes_nothing_but_when(sync: bool) -> None:
    """With learning rate 0 a skipped optimizer step would have changed nothing: the runs with
    a skip must end where the run without one ends (their mixes land in the delta, later)."""
    # three ranks: with two, the first mix of lr-0 replicas is their exact mean (the pull is
    # not amplified by the momentum) and every run would trivially end at consensus
    results = run_world(_skipped, 3, sync)
    for rank, ((want, steps), *skipped) in enumerate(results):
        assert steps == 4 * H
        for got, got_steps in skipped:
            assert got_steps == steps
            assert (got - want).abs().max().item() < 1e-6, rank
    ends = [runs[0][0] for runs in results]
    assert (ends[0] - ends[1]).abs().max().item() > 1e-3  # not trivially at consensus


# --- 5. the default path is untouched ------------------------------------------------------------


def test_defaults_keep_no_slow_weights_and_save_no_outer_state() -> None:
    cluster = VirtualCluster(toy_model(batchnorm=False), 2, _adamw, wire_dtype=torch.bfloat16)
    for t in range(4):
        cluster.train_step([batch(r, t) for r in range(2)], _loss)
    engine = cluster.engines[0]
    assert engine._slow == [] and engine._momentum == []
    assert not any(b.snapshot for b in engine.buckets)  # the shared scratch, as before
    assert not {"slow_weights", "outer_momentum"} & set(engine.state())


@pytest.mark.parametrize("wire", [None, torch.bfloat16, torch.int8])
def test_outer_step_with_lr_1_and_no_momentum_is_residual_mixing(wire: torch.dtype | None) -> None:
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    partner = [t + torch.randn(t.shape, generator=g) for t in x]
    slow = [t + torch.randn(t.shape, generator=g) for t in x]  # anything: lr 1 forgets it
    mine = make_buckets(x, 1 << 20, wire, keep_snapshot=True)[0]
    theirs = make_buckets(partner, 1 << 20, wire, keep_snapshot=True)[0]
    encode_(mine, x)
    encode_(theirs, partner)
    mine.recv.copy_(theirs.send)
    moved = [t + 0.1 for t in x]  # local steps since the snapshot
    residual = [t.clone() for t in moved]
    assert mix_residual_(residual, mine.send.clone(), mine.recv, 0.5)
    outer = [t.clone() for t in moved]
    diff = difference(mine.send, mine.recv, torch.float32, 17)
    buf = [torch.zeros_like(t) for t in x]
    outer_step_(outer, slow, buf, sent_values(mine), diff, 0.5, 1.0, 0.0)
    assert (_flat(outer) - _flat(residual)).abs().max().item() < 1e-6
    # the new slow weights are the pair's mean of the snapshots (as the wire carried them)
    assert (_flat(slow) - _flat(pack_(torch.empty(17), x)) + 0.5 * diff.double()).abs().max() < 1e-6


def test_the_pull_toward_the_partner_stays_out_of_the_momentum_and_the_lr() -> None:
    """NoLoCo's split: ``u`` follows this replica's own pseudo-gradient whoever the partner is,
    and ``phi`` moves by the Nesterov step plus ``w (r - s)`` exactly once."""
    g = torch.Generator().manual_seed(1)
    s = [torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    slow0 = [t + torch.randn(t.shape, generator=g, dtype=torch.float64) for t in s]
    u0 = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in s]
    snapshot = pack_(torch.empty(17, dtype=torch.float64), s)
    results = []
    for partner_shift in (0.0, 3.0):  # two different partners
        diff = torch.randn(17, generator=g, dtype=torch.float64) * partner_shift  # s - r
        x, slow, buf = [t + 0.1 for t in s], [t.clone() for t in slow0], [t.clone() for t in u0]
        outer_step_(x, slow, buf, snapshot, diff, 0.5, LR, MOMENTUM)
        d = _flat(slow0) - snapshot
        u = MOMENTUM * _flat(u0) + d
        phi = _flat(slow0) - LR * (d + MOMENTUM * u) - 0.5 * diff
        assert (_flat(buf) - u).abs().max() < 1e-12
        assert (_flat(slow) - phi).abs().max() < 1e-12
        assert (_flat(x) - (snapshot + 0.1 + phi - snapshot)).abs().max() < 1e-12
        results.append(_flat(buf))
    assert torch.equal(results[0], results[1])  # the partner never enters the momentum


def _hierarchical(rank: int, world: int) -> str:
    try:
        HierarchicalDataParallel(toy_model(), ranks_per_node=1, outer_lr=0.7, outer_momentum=0.9)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_hierarchical_refuses_an_outer_step_and_says_what_to_do() -> None:
    for rank, message in enumerate(run_world(_hierarchical, 2)):
        assert f"rank {rank}" in message and "GossipDataParallel" in message, message


# --- relayout and non-finite values ---------------------------------------------------------------


class _Growing(nn.Module):
    """A model that creates a float buffer when asked (as a rotary cache does on first use)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = toy_model(batchnorm=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_a_layout_change_restarts_the_outer_step_from_the_replica() -> None:
    cluster = VirtualCluster(
        _Growing(), 2, _adamw, gossip_every=H, outer_lr=LR, outer_momentum=MOMENTUM
    )
    for t in range(2 * H):
        cluster.train_step([batch(r, t) for r in range(2)], _loss)
    assert any(_flat(e._momentum).abs().max() > 0 for e in cluster.engines)
    for replica in cluster.replicas:
        replica.register_buffer("cache", torch.ones(4))
    for t in range(2 * H, 3 * H):  # the end of step 3H - 1 starts the next exchange
        cluster.train_step([batch(r, t) for r in range(2)], _loss)
    for replica, engine in zip(cluster.replicas, cluster.engines, strict=True):
        assert len(engine._slow) == len(list(replica.parameters())) + 1
        assert torch.equal(_flat(engine._slow), _flat(list(replica.parameters()) + [replica.cache]))
        assert _flat(engine._momentum).abs().max() == 0


def test_a_nonfinite_replica_is_named_and_never_stepped_on() -> None:
    cluster = _cluster(2, sync=False)
    for t in range(2 * H):  # exchange 2, sent at the end, carries the NaN (mixed at 3H - 1)
        if t == H:
            with torch.no_grad():
                next(cluster.replicas[1].parameters())[0, 0] = float("nan")
        cluster.train_step([batch(r, t) for r in range(2)], _loss)
    slow = _flat(cluster.engines[0]._slow)
    with pytest.raises(NonFiniteError, match="rank 0 found NaN or inf in parameters received"):
        for t in range(2 * H, 3 * H):
            cluster.train_step([batch(r, t) for r in range(2)], _loss)
    assert torch.equal(_flat(cluster.engines[0]._slow), slow)
    assert bool(slow.isfinite().all())
